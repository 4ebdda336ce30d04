"""One dense layer's decode step: transformers' `DynamicLayer` (a new K and V tensor per step) against
IceCache's `GrowingLayer` (appends into spare capacity), each followed by the model's SDPA attention.

    .venv/bin/python benchmarks/dense_append.py [--contexts 8192 32768] [--steps 20]

The embedded model's KV shape (3 KV heads, 9 query heads, head dim 64, float32), random K/V. A 64 MB buffer
is rewritten before every step, so the cache starts cold as it does inside a model's step (whose weights
evict it). Prints milliseconds per step (median and fastest of `--steps`), the append alone and with the
attention, and the attention over a contiguous cache with no append for reference.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from icecache.bench.common import table
from icecache.runtime.cache import GrowingLayer

KV_HEADS, Q_HEADS, HEAD_DIM = 3, 9, 64


class _Attention(torch.nn.Module):
    num_key_value_groups = Q_HEADS // KV_HEADS
    is_causal = True


def _time(step, steps: int) -> tuple[float, float]:
    flush = torch.ones(16 * 2**20)
    times = []
    for _ in range(steps):
        flush.add_(1)
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2] * 1e3, times[0] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    module = _Attention()
    rows = []
    for context in args.contexts:
        k, v = torch.randn(1, KV_HEADS, context, HEAD_DIM), torch.randn(1, KV_HEADS, context, HEAD_DIM)
        for name, layer_class in (("DynamicLayer (cat)", DynamicLayer), ("GrowingLayer (in place)", GrowingLayer)):
            layer = layer_class()
            layer.update(k.clone(), v.clone())
            for attend in (False, True):
                def step():
                    new = torch.randn(2, 1, KV_HEADS, 1, HEAD_DIM)
                    keys, values = layer.update(new[0], new[1])
                    if attend:
                        sdpa_attention_forward(module, torch.randn(1, Q_HEADS, 1, HEAD_DIM), keys, values, None,
                                               scaling=HEAD_DIM ** -0.5)
                median, fastest = _time(step, args.steps)
                rows.append(dict(context=context, step=name + (" + attention" if attend else ""), median=median,
                                 fastest=fastest))
        median, fastest = _time(lambda: sdpa_attention_forward(module, torch.randn(1, Q_HEADS, 1, HEAD_DIM), k, v,
                                                               None, scaling=HEAD_DIM ** -0.5), args.steps)
        rows.append(dict(context=context, step="attention alone (contiguous, no append)", median=median,
                         fastest=fastest))
    print(table(rows, [("context", "context", "d"), ("step", "dense layer step", ""), ("median", "median ms", ".2f"),
                      ("fastest", "fastest ms", ".2f")]))


if __name__ == "__main__":
    main()
