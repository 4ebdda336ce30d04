"""Reference (torch) decode attention: the oracle every faster kernel is tested against."""

from __future__ import annotations

import math

import torch


def _check_decode_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    if q.dim() != 2:
        raise ValueError(f"q must be [q_heads, head_dim], got shape {tuple(q.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"head_dim differs: q has {q.shape[-1]}, k has {k.shape[-1]}")
    kv_heads = k.shape[0]
    if q.shape[0] % kv_heads:
        raise ValueError(f"q_heads ({q.shape[0]}) must be a multiple of kv_heads ({kv_heads})")
    return q.shape[0] // kv_heads


def paged_decode_attention_reference(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    valid: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """One decode query per query head over every valid slot of a paged tier, with GQA.

    Args:
        q: `[q_heads, head_dim]`; query head `h` reads KV head `h // (q_heads // kv_heads)`.
        k_pages, v_pages: `[kv_heads, slots, page_size, head_dim]`.
        valid: bool `[kv_heads, slots, page_size]`, False for empty or inactive slots (masked out).
        scale: softmax scale, default `1 / sqrt(head_dim)`.

    Returns:
        `[q_heads, head_dim]` in `q.dtype`, accumulated in float32.
    """
    group = _check_decode_shapes(q, k_pages, v_pages)
    kv_heads, head_dim = k_pages.shape[0], k_pages.shape[-1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    k = k_pages.reshape(kv_heads, -1, head_dim).float()
    v = v_pages.reshape(kv_heads, -1, head_dim).float()
    mask = valid.reshape(kv_heads, 1, -1)
    logits = torch.einsum("hgd,hnd->hgn", q.float().view(kv_heads, group, head_dim), k) * scale
    logits = logits.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a head with no valid slot attends to nothing
    out = torch.einsum("hgn,hnd->hgd", probs, v)
    return out.reshape(-1, head_dim).to(q.dtype)


def dense_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Full attention of one decode query per head over `k`, `v` `[kv_heads, tokens, head_dim]` -> `[q_heads, head_dim]`."""
    valid = torch.ones(k.shape[:2], dtype=torch.bool, device=k.device)
    return paged_decode_attention_reference(q, k.unsqueeze(2), v.unsqueeze(2), valid.unsqueeze(2), scale)
