"""Triton kernels behind `icecache.kernels.triton_decode` (imported lazily: importing this module imports triton).

`TRITON_INTERPRET=1` must be in the environment before this module is first imported for the kernels to run
through the Triton interpreter on CPU tensors: `triton.jit` reads it when the kernels are decorated.

Logits are kept in base 2 (`q` is pre-multiplied by `scale * log2(e)`, softmax uses `exp2`); the partial maxima
written to the workspace are therefore base-2 too, which is all the combine kernel needs.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton import knobs

#: whether the kernels below were decorated in interpreter mode (TRITON_INTERPRET=1 at import time)
INTERPRETED: bool = bool(knobs.runtime.interpret)


@triton.jit
def decode_partial_kernel(
    q_ptr, k_ptr, v_ptr, valid_ptr,  # inputs; valid is the bool mask viewed as uint8
    out_ptr, m_ptr, l_ptr, acc_ptr,  # final output (FINAL) or float32 workspace (partials)
    scale_log2e,  # softmax scale * log2(e)
    slots, pages_per_split, num_splits,
    stride_qh, stride_qd,
    stride_kh, stride_ks, stride_kp, stride_kd,
    stride_vh, stride_vs, stride_vp, stride_vd,
    stride_wh, stride_ws, stride_wp,
    stride_oh, stride_od,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    GROUP_P: tl.constexpr, HEAD_DIM_P: tl.constexpr, BLOCK_N: tl.constexpr,
    FINAL: tl.constexpr,
):
    """One program: every query head of KV head `program_id(0)` over slots of split `program_id(1)`.

    The slots of a split are walked as a flat token range (slot * PAGE_SIZE + position), BLOCK_N tokens at a
    time, so each K/V row is read once for the whole GQA group. Online softmax in float32.
    """
    kvh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)

    offs_g = tl.arange(0, GROUP_P)
    offs_d = tl.arange(0, HEAD_DIM_P)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    qh = kvh * GROUP + offs_g  # int64 query-head ids of this group
    gd_mask = g_mask[:, None] & d_mask[None, :]

    q = tl.load(q_ptr + qh[:, None] * stride_qh + offs_d[None, :] * stride_qd, mask=gd_mask, other=0.0)
    q = q.to(tl.float32) * scale_log2e

    slot_start = split * pages_per_split
    slot_end = tl.minimum(slot_start + pages_per_split, slots)
    tok_start = slot_start * PAGE_SIZE
    tok_end = slot_end * PAGE_SIZE

    k_base = k_ptr + kvh * stride_kh
    v_base = v_ptr + kvh * stride_vh
    w_base = valid_ptr + kvh * stride_wh

    m_i = tl.full([GROUP_P], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_P], tl.float32)
    acc = tl.zeros([GROUP_P, HEAD_DIM_P], tl.float32)

    for start in range(tok_start, tok_end, BLOCK_N):
        offs_t = start + tl.arange(0, BLOCK_N)
        in_range = offs_t < tok_end
        slot = (offs_t // PAGE_SIZE).to(tl.int64)
        pos = offs_t % PAGE_SIZE
        ok = tl.load(w_base + slot * stride_ws + pos * stride_wp, mask=in_range, other=0) != 0
        kv_mask = ok[:, None] & d_mask[None, :]  # masked-out tokens are never read

        k = tl.load(k_base + slot[:, None] * stride_ks + pos[:, None] * stride_kp + offs_d[None, :] * stride_kd,
                    mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [GROUP_P, BLOCK_N], base-2 logits
        s = tl.where(ok[None, :], s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing valid yet: avoid inf - inf
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)

        v = tl.load(v_base + slot[:, None] * stride_vs + pos[:, None] * stride_vp + offs_d[None, :] * stride_vd,
                    mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new

    if FINAL:
        denom = tl.where(l_i > 0.0, l_i, 1.0)  # no valid slot: acc is 0, output 0
        o = acc / denom[:, None]
        tl.store(out_ptr + qh[:, None] * stride_oh + offs_d[None, :] * stride_od,
                 o.to(out_ptr.dtype.element_ty), mask=gd_mask)
    else:
        row = qh * num_splits + split  # workspace rows, contiguous [q_heads, num_splits(, HEAD_DIM)]
        tl.store(m_ptr + row, m_i, mask=g_mask)
        tl.store(l_ptr + row, l_i, mask=g_mask)
        tl.store(acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=gd_mask)


@triton.jit
def decode_combine_kernel(
    m_ptr, l_ptr, acc_ptr, out_ptr,
    num_splits,
    stride_oh, stride_od,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """One program per query head: merge the `num_splits` partial (max, sum, acc) rows, BLOCK_S at a time."""
    h = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM_P)
    d_mask = offs_d < HEAD_DIM

    m_run = tl.max(tl.full([BLOCK_S], float("-inf"), tl.float32), axis=0)
    l_run = tl.sum(tl.zeros([BLOCK_S], tl.float32), axis=0)
    acc = tl.zeros([HEAD_DIM_P], tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_mask = offs_s < num_splits
        row = h * num_splits + offs_s
        m = tl.load(m_ptr + row, mask=s_mask, other=float("-inf"))
        l = tl.load(l_ptr + row, mask=s_mask, other=0.0)
        a = tl.load(acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], mask=s_mask[:, None] & d_mask[None, :],
                    other=0.0)
        m_new = tl.maximum(m_run, tl.max(m, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_run - m_safe)
        w = tl.exp2(m - m_safe)  # 0 for splits without a valid slot (m = -inf)
        l_run = l_run * alpha + tl.sum(w * l, axis=0)
        acc = acc * alpha + tl.sum(w[:, None] * a, axis=0)
        m_run = m_new

    o = acc / tl.where(l_run > 0.0, l_run, 1.0)
    tl.store(out_ptr + h * stride_oh + offs_d * stride_od, o.to(out_ptr.dtype.element_ty), mask=d_mask)
