"""Decode attention kernels over a paged device tier. They know nothing about indexes: they read pages
`[kv_heads, slots, page_size, head_dim]` and a validity mask, nothing else.

`triton_decode` (the Triton flash-decoding kernel) never imports triton at import time; its names are
exported here lazily as well.
"""

from .reference import dense_decode_attention, paged_decode_attention_reference

_TRITON_EXPORTS = ("paged_decode_attention", "paged_decode_attention_triton", "triton_available")

__all__ = ["dense_decode_attention", "paged_decode_attention_reference", *_TRITON_EXPORTS]


def __getattr__(name: str):
    if name in _TRITON_EXPORTS:
        from . import triton_decode

        return getattr(triton_decode, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
