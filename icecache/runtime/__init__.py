"""The paged KV runtime: budget rule, memory tiers, bulk loader, sparse layers, transformers cache."""

from .budget import Budget
from .cache import IceCache, IceCacheLayer, full_kv_copy, icecache_attention, layer_plan
from .layer import DecodePlan, SparseLayer
from .runtime import (PREFILL_CHUNK, IceRuntime, LayerReport, RuntimeReport, chunked_prefill, generate_after_prefill,
                      shared_prefill)
from .requests import BatchRow, EngineStep, RequestLayers, RequestTracker
from .tiers import BulkLoader, DeviceTier, HostTier, TransferStats

__all__ = ["BatchRow", "Budget", "BulkLoader", "EngineStep", "RequestLayers", "RequestTracker", "DecodePlan", "DeviceTier", "HostTier", "IceCache", "IceCacheLayer", "IceRuntime", "LayerReport",
           "PREFILL_CHUNK", "RuntimeReport", "SparseLayer", "TransferStats", "chunked_prefill", "full_kv_copy",
           "generate_after_prefill", "icecache_attention", "layer_plan", "shared_prefill"]
