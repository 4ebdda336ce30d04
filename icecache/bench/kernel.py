"""`icecache bench kernel`: the decode attention kernel against the alternatives, and the bandwidth it reaches.

For every (context, budget) on one device, with the same random query and K/V:

- `paged (triton)`: `paged_decode_attention_triton` over a device tier of `budget / page_size` full pages
  (natively on CUDA; under the Triton interpreter it is far too slow to time, so it is left out on CPU);
- `paged (torch)`: the torch reference over the same tier;
- `sdpa gathered`: torch SDPA over the same `budget` tokens already gathered contiguously (what a kernel
  without a page table would need, gather not counted);
- `sdpa dense`: torch SDPA decode over the whole context (what full KV costs per layer).

Bandwidth: the bytes each kernel must read (K and V of the tokens it attends) per second, as a share of the
device's own measured copy bandwidth (a large device-to-device clone, read + write). The host-to-device
bandwidth of a pinned copy (what the bulk loader's single transfer can reach) is measured alongside.
Times are medians over `repeats` calls (CUDA events on a GPU), all measured in the same run.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from ..kernels import paged_decode_attention_reference
from ..kernels.triton_decode import _interpreted, paged_decode_attention_triton, triton_available
from .common import environment, table


def _median_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, mib: int = 256, repeats: int = 10) -> dict:
    """GB/s of a device-to-device clone (bytes read + written) and of a pinned host-to-device copy."""
    n = mib * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), device, repeats)
    out = {"device_copy_gbs": 2 * src.numel() * 4 / ms / 1e6}
    if device.type == "cuda":
        host = torch.empty(n, dtype=torch.float32).pin_memory()
        ms = _median_ms(lambda: dst.copy_(host, non_blocking=True), device, repeats)
        out["host_to_device_gbs"] = src.numel() * 4 / ms / 1e6
    return out


def run_kernel(contexts=(4096, 32768, 131072), budgets=(256, 1024, 4096), kv_heads: int = 8, q_heads: int = 32,
               head_dim: int = 128, page_size: int = 16, dtype: torch.dtype = torch.bfloat16,
               device: str | torch.device | None = None, repeats: int = 50, seed: int = 0) -> dict:
    """Time the kernels per (context, budget); shapes default to one Llama-3-8B layer. Returns a JSON-ready dict."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    use_triton = triton_available(device) and not _interpreted()
    g = torch.Generator(device=device).manual_seed(seed)
    bandwidth = copy_bandwidth(device)
    elt = torch.empty((), dtype=dtype).element_size()
    scale = 1.0 / math.sqrt(head_dim)
    rows = []
    for context in contexts:
        keys = torch.randn(1, kv_heads, context, head_dim, generator=g, device=device, dtype=dtype)
        values = torch.randn(1, kv_heads, context, head_dim, generator=g, device=device, dtype=dtype)
        q = torch.randn(q_heads, head_dim, generator=g, device=device, dtype=dtype)
        q4 = q.view(1, q_heads, 1, head_dim)
        dense_ms = _median_ms(lambda: F.scaled_dot_product_attention(q4, keys, values, scale=scale, enable_gqa=True),
                              device, repeats)
        dense_bytes = 2 * kv_heads * context * head_dim * elt
        rows.append({"context": context, "budget": None, "kernel": "sdpa dense", "ms": dense_ms,
                     "bytes_read": dense_bytes, "gbs": dense_bytes / dense_ms / 1e6})
        for budget in budgets:
            if budget > context:
                continue
            slots = budget // page_size
            chosen = torch.randperm(context // page_size, generator=g, device=device)[:slots]
            k_pages = keys[0].view(kv_heads, -1, page_size, head_dim)[:, chosen].contiguous()
            v_pages = values[0].view(kv_heads, -1, page_size, head_dim)[:, chosen].contiguous()
            valid = torch.ones(kv_heads, slots, page_size, dtype=torch.bool, device=device)
            k_flat = k_pages.view(1, kv_heads, -1, head_dim)
            v_flat = v_pages.view(1, kv_heads, -1, head_dim)
            read = 2 * kv_heads * slots * page_size * head_dim * elt
            candidates = {
                "paged (torch)": lambda: paged_decode_attention_reference(q, k_pages, v_pages, valid, scale),
                "sdpa gathered": lambda: F.scaled_dot_product_attention(q4, k_flat, v_flat, scale=scale,
                                                                        enable_gqa=True),
            }
            error = None  # Triton vs the float32 reference, where Triton runs
            if use_triton:
                candidates = {"paged (triton)": lambda: paged_decode_attention_triton(q, k_pages, v_pages, valid,
                                                                                      scale), **candidates}
                reference = paged_decode_attention_reference(q.float(), k_pages.float(), v_pages.float(), valid,
                                                             scale)
                error = float((candidates["paged (triton)"]().float() - reference).abs().max())
            for name, fn in candidates.items():
                ms = _median_ms(fn, device, repeats)
                rows.append({"context": context, "budget": budget, "kernel": name, "ms": ms, "bytes_read": read,
                             "gbs": read / ms / 1e6, "vs_dense": dense_ms / ms,
                             "max_abs_error": error if name == "paged (triton)" else None})
        del keys, values
    for row in rows:
        row["bandwidth_share"] = row["gbs"] / bandwidth["device_copy_gbs"]
    return {"benchmark": "kernel", "environment": environment(),
            "settings": {"contexts": list(contexts), "budgets": list(budgets), "kv_heads": kv_heads,
                         "q_heads": q_heads, "head_dim": head_dim, "page_size": page_size, "dtype": str(dtype),
                         "repeats": repeats, "triton": use_triton},
            "bandwidth": bandwidth, "rows": rows}


COLUMNS = [("context", "context", "d"), ("budget", "budget", "d"), ("kernel", "kernel", ""),
           ("ms", "ms", ".4f"), ("vs_dense", "speed-up vs dense", ".1f"), ("gbs", "GB/s read", ".1f"),
           ("bandwidth_share", "of copy bandwidth", ".2f"), ("max_abs_error", "max abs err", ".1e")]


def format_kernel(result: dict) -> str:
    bw = result["bandwidth"]
    head = f"device copy bandwidth {bw['device_copy_gbs']:.1f} GB/s (read + write)"
    if "host_to_device_gbs" in bw:
        head += f"; pinned host-to-device {bw['host_to_device_gbs']:.1f} GB/s"
    return head + "\n\n" + table(result["rows"], COLUMNS)
