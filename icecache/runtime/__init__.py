"""The paged KV runtime: budget rule, memory tiers, bulk loader, sparse layers, transformers cache."""

from .budget import Budget
from .cache import IceCache, full_kv_copy, icecache_attention
from .layer import SparseLayer
from .runtime import IceRuntime, RuntimeReport, generate_after_prefill, shared_prefill
from .tiers import BulkLoader, DeviceTier, HostTier, TransferStats

__all__ = ["Budget", "BulkLoader", "DeviceTier", "HostTier", "IceCache", "IceRuntime", "RuntimeReport",
           "SparseLayer", "TransferStats", "full_kv_copy", "generate_after_prefill", "icecache_attention",
           "shared_prefill"]
