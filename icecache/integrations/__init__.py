"""Engines icecache plugs into besides transformers (`icecache.integrations.vllm`)."""
