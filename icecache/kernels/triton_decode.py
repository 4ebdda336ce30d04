"""Triton flash-decoding attention over a paged device tier (same contract as the torch reference).

Two kernels:

1. `decode_partial_kernel`, grid `(kv_heads, splits)`: each program takes every query head of one GQA group
   (so each K/V page is read once for the whole group) over a range of `pages_per_split` slots, runs an
   online softmax in float32 and writes the partial (max, sum, acc) to a float32 workspace. With a single
   split it writes the normalised output directly and the second kernel is skipped.
2. `decode_combine_kernel`, grid `(q_heads,)`: merges the partials of every split into the output.

Importing this module does not import triton; the kernels load on first use. On CPU the kernels run only
through the Triton interpreter, which needs ``TRITON_INTERPRET=1`` in the environment *before* the first call
(triton reads it when the kernels are defined), e.g. ``os.environ.setdefault("TRITON_INTERPRET", "1")`` at
the top of a test file. The interpreter is slow; it is meant for testing, not for serving on CPU
(`paged_decode_attention` uses the torch reference there).
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from functools import lru_cache

import torch

from .reference import _check_decode_shapes, paged_decode_attention_reference

__all__ = ["paged_decode_attention", "paged_decode_attention_triton", "triton_available"]

_KERNELS_MODULE = "icecache.kernels._triton_decode_kernels"
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_LOG2E = 1.4426950408889634
#: cap on GROUP_P * BLOCK_N * HEAD_DIM_P, the broadcast products of the partial kernel (~110-140 registers
#: per thread on sm_90 with 4 warps, no spills; not tuned on hardware)
_TILE_ELEMENTS = 4096
#: on CUDA, do not split below this many tokens per program (partials would cost more than they save)
_MIN_TOKENS_PER_SPLIT = 64


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes", "y")


def _interpreted() -> bool:
    """Whether the kernels run (or will run once loaded) through the Triton interpreter."""
    module = sys.modules.get(_KERNELS_MODULE)
    return module.INTERPRETED if module is not None else _interpret_env()


def triton_available(device: torch.device | str | None = None) -> bool:
    """Whether `paged_decode_attention_triton` can run here (on `device` when given).

    True when triton is installed and either a CUDA device is present (for a CUDA `device`, or any when
    `device` is None) or the interpreter is on (``TRITON_INTERPRET=1`` set before the kernels were first
    loaded), which runs the kernels on CPU tensors.
    """
    if importlib.util.find_spec("triton") is None:
        return False
    if _interpreted():
        return True
    if device is not None and torch.device(device).type != "cuda":
        return False
    return torch.cuda.is_available()


def _kernels():
    import importlib

    return importlib.import_module(_KERNELS_MODULE)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _auto_pages_per_split(device: torch.device, kv_heads: int, slots: int, page_size: int) -> int:
    """One split under the interpreter (every program is Python there); on CUDA enough splits for about two
    programs per SM, each covering at least `_MIN_TOKENS_PER_SPLIT` tokens."""
    if device.type != "cuda" or _interpreted():
        return slots
    index = device.index if device.index is not None else torch.cuda.current_device()
    target_splits = max(1, -(-2 * _sm_count(index) // kv_heads))
    pages = -(-slots // target_splits)
    return max(1, min(slots, max(pages, -(-_MIN_TOKENS_PER_SPLIT // page_size))))


def _validate(q, k_pages, v_pages, valid, scale, pages_per_split) -> tuple[int, float]:
    for name, t in (("q", q), ("k_pages", k_pages), ("v_pages", v_pages), ("valid", valid)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if k_pages.dim() != 4:
        raise ValueError(f"k_pages must be [kv_heads, slots, page_size, head_dim], got shape {tuple(k_pages.shape)}")
    if k_pages.shape[0] == 0:
        raise ValueError("k_pages must have at least one kv head, got kv_heads = 0")
    group = _check_decode_shapes(q, k_pages, v_pages)  # q 2-D, k/v same shape, head_dim, GQA divisibility
    if valid.shape != k_pages.shape[:3]:
        raise ValueError(f"valid must be [kv_heads, slots, page_size] = {tuple(k_pages.shape[:3])}, "
                         f"got shape {tuple(valid.shape)}")
    if valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool tensor, got {valid.dtype}")
    for name, t in (("q", q), ("k_pages", k_pages), ("v_pages", v_pages)):
        if t.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    for name, t in (("k_pages", k_pages), ("v_pages", v_pages), ("valid", valid)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; all inputs must share a device")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a number or None, got {type(scale).__name__}")
    if pages_per_split is not None and (isinstance(pages_per_split, bool) or not isinstance(pages_per_split, int)
                                        or pages_per_split < 1):
        raise ValueError(f"pages_per_split must be a positive int or None, got {pages_per_split!r}")
    return group, float(scale)


def paged_decode_attention_triton(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    valid: torch.Tensor,
    scale: float | None = None,
    pages_per_split: int | None = None,
) -> torch.Tensor:
    """Triton version of `paged_decode_attention_reference` (same arguments, same result).

    Args:
        q: `[q_heads, head_dim]`; query head `h` reads KV head `h // (q_heads // kv_heads)`.
        k_pages, v_pages: `[kv_heads, slots, page_size, head_dim]` (any strides).
        valid: bool `[kv_heads, slots, page_size]`; False slots are masked out (and never read).
        scale: softmax scale, default `1 / sqrt(head_dim)`.
        pages_per_split: slots per program of the first kernel; None picks it from the device.

    Returns:
        `[q_heads, head_dim]` in `q.dtype`, accumulated in float32; zeros for a head with no valid slot.

    Raises:
        ValueError: bad shapes, dtypes, devices, `scale` or `pages_per_split`.
        RuntimeError: the kernels cannot run on this device (CPU tensors without ``TRITON_INTERPRET=1``).
    """
    group, scale = _validate(q, k_pages, v_pages, valid, scale, pages_per_split)
    kv_heads, slots, page_size, head_dim = k_pages.shape
    q_heads = q.shape[0]
    if q_heads == 0 or head_dim == 0 or slots == 0 or page_size == 0:
        return torch.zeros(q_heads, head_dim, dtype=q.dtype, device=q.device)
    if not triton_available(q.device):
        raise RuntimeError(f"the Triton decode kernel cannot run on {q.device}: it needs a CUDA device, or "
                           "TRITON_INTERPRET=1 set before icecache's Triton kernels are first used")

    kern = _kernels()
    device = q.device
    if pages_per_split is None:
        pages_per_split = _auto_pages_per_split(device, kv_heads, slots, page_size)
    pages_per_split = min(pages_per_split, slots)
    num_splits = -(-slots // pages_per_split)

    group_p, head_dim_p = _next_pow2(group), _next_pow2(head_dim)
    block_n = max(1, _TILE_ELEMENTS // (group_p * head_dim_p))
    block_n = min(1 << (block_n.bit_length() - 1), 64, _next_pow2(pages_per_split * page_size))

    out = torch.empty(q_heads, head_dim, dtype=q.dtype, device=device)
    valid_u8 = valid.view(torch.uint8)  # same storage; triton loads it as bytes
    final = num_splits == 1
    if final:
        m_ws = l_ws = acc_ws = out  # unused placeholders
    else:
        m_ws = torch.empty(q_heads, num_splits, dtype=torch.float32, device=device)
        l_ws = torch.empty_like(m_ws)
        acc_ws = torch.empty(q_heads, num_splits, head_dim, dtype=torch.float32, device=device)

    num_warps = 4 if group_p * block_n * head_dim_p >= 2048 else 2
    kern.decode_partial_kernel[(kv_heads, num_splits)](
        q, k_pages, v_pages, valid_u8,
        out, m_ws, l_ws, acc_ws,
        scale * _LOG2E,
        slots, pages_per_split, num_splits,
        q.stride(0), q.stride(1),
        *k_pages.stride(), *v_pages.stride(), *valid_u8.stride(),
        out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=head_dim, PAGE_SIZE=page_size,
        GROUP_P=group_p, HEAD_DIM_P=head_dim_p, BLOCK_N=block_n,
        FINAL=final,
        num_warps=num_warps,
    )
    if not final:
        kern.decode_combine_kernel[(q_heads,)](
            m_ws, l_ws, acc_ws, out,
            num_splits,
            out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, HEAD_DIM_P=head_dim_p, BLOCK_S=min(_next_pow2(num_splits), 32),
            num_warps=1 if head_dim_p <= 64 else 2,
        )
    return out


def paged_decode_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    valid: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Decode attention for the runtime (`AttentionKernel` signature): the Triton kernel on CUDA tensors when
    triton can compile there, otherwise the torch reference (also on CPU under the interpreter, which is far
    slower than torch). Same arguments and result as `paged_decode_attention_reference`."""
    if q.device.type == "cuda" and not _interpreted() and triton_available(q.device):
        return paged_decode_attention_triton(q, k_pages, v_pages, valid, scale)
    return paged_decode_attention_reference(q, k_pages, v_pages, valid, scale)
