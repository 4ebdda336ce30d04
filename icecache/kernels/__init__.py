"""Decode attention kernels over a paged device tier. They know nothing about indexes: they read pages
`[kv_heads, slots, page_size, head_dim]` and a validity mask, nothing else."""

from .reference import dense_decode_attention, paged_decode_attention_reference

__all__ = ["dense_decode_attention", "paged_decode_attention_reference"]
