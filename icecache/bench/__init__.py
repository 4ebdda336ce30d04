"""Benchmarks that compare index strategies under the same budget and transfer rules."""
