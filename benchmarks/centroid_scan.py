"""The tree search's first stage alone, the scan of every leaf centroid (bfloat16) against a KV head's query
group, timed three ways on random data of the embedded model's shape (28 sparse layers x 3 KV heads, group 3,
head dim 64), each layer's centroids cold as inside a decode step (a 64 MB sweep between passes):

- `columns`: `_tree_kernels.score_leaves`, the search's own loop (a centroid column decoded, then one 1-D row
  per query);
- `blocks`: the same sums over blocks of pages kept in L1 (the same order per page, so the same bits);
- `bf16 matmul` / `hi-lo matmul`: `torch.bmm` in bfloat16 (oneDNN), the query rounded to bfloat16 or split into
  two bfloat16 halves; other sums, so not the same scores.

    .venv/bin/python benchmarks/centroid_scan.py --pages 1024 4096
"""

from __future__ import annotations

import argparse
import time

import numba
import numpy as np
import torch

from icecache.index._tree_kernels import _encode_bf16, score_leaves
from icecache.index._tree_nodes import _FAST

LAYERS, KV_HEADS, GROUP, DIM = 28, 3, 3, 64


@numba.njit(fastmath=_FAST)
def scan_blocks(q, centroids, h, n_pages, partial, scratch, block):
    group, dim = q.shape
    partial[:, :n_pages] = 0.0
    values = scratch[:block].view(np.float32)
    for p0 in range(0, n_pages, block):
        end = min(p0 + block, n_pages)
        for j in range(dim):
            source = centroids[h, j, p0:end]
            for p in range(end - p0):
                scratch[p] = np.uint32(np.uint16(source[p])) << np.uint32(16)
            column = values[: end - p0]
            for g in range(group):
                qj = q[g, j]
                row = partial[g, p0:end]
                for p in range(end - p0):
                    row[p] += qj * column[p]


def fastest(run, sweep: np.ndarray, passes: int = 5) -> float:
    times = []
    for _ in range(passes):
        sweep += 1  # evict the centroids, as the model's own traffic does between two searches
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pages", type=int, nargs="+", default=[1024, 4096], help="leaves per KV head (8k, 32k)")
    parser.add_argument("--block", type=int, default=1024)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    sweep = np.ones(64 << 20, np.uint8)
    for n_pages in args.pages:
        bits = np.empty((LAYERS, KV_HEADS, DIM, n_pages), np.int16)
        for index in np.ndindex(LAYERS, KV_HEADS, DIM):
            _encode_bf16(rng.standard_normal(n_pages).astype(np.float32), bits[index])
        queries = rng.standard_normal((LAYERS, KV_HEADS, GROUP, DIM)).astype(np.float32)
        partial, other = np.empty((GROUP, n_pages), np.float32), np.empty((GROUP, n_pages), np.float32)
        scratch = np.empty(max(n_pages, args.block), np.uint32)
        for layer in range(LAYERS):
            for h in range(KV_HEADS):
                score_leaves(queries[layer, h], bits[layer], h, n_pages, partial, scratch)
                scan_blocks(queries[layer, h], bits[layer], h, n_pages, other, scratch, args.block)
                assert np.array_equal(partial.view(np.uint32), other.view(np.uint32)), "blocks changed the sums"
        centroids = [torch.from_numpy(bits[layer]).view(torch.bfloat16) for layer in range(LAYERS)]
        q = [torch.from_numpy(queries[layer]) for layer in range(LAYERS)]

        def columns():
            for layer in range(LAYERS):
                for h in range(KV_HEADS):
                    score_leaves(queries[layer, h], bits[layer], h, n_pages, partial, scratch)

        def blocks():
            for layer in range(LAYERS):
                for h in range(KV_HEADS):
                    scan_blocks(queries[layer, h], bits[layer], h, n_pages, partial, scratch, args.block)

        def matmul():
            for layer in range(LAYERS):
                torch.bmm(q[layer].to(torch.bfloat16), centroids[layer])

        def hi_lo():
            for layer in range(LAYERS):
                hi = q[layer].to(torch.bfloat16)
                lo = (q[layer] - hi.float()).to(torch.bfloat16)
                torch.bmm(torch.cat([hi, lo], 1), centroids[layer])

        for name, run in (("columns", columns), ("blocks", blocks), ("bf16 matmul", matmul), ("hi-lo matmul", hi_lo)):
            print(f"{n_pages} pages per head: {name:<13} {fastest(run, sweep):6.2f} ms per step (fastest of 5)")
        print(f"{n_pages} pages per head: blocks of {args.block} pages give the columns' sums bit for bit")


if __name__ == "__main__":
    main()
