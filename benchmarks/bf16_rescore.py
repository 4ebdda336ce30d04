"""Would bfloat16 candidate keys make the tree's search cheaper? (measured 2026-12-06, not adopted)

Times the rescoring's first loop (the logits of every token of 136 candidate pages, 3 KV heads of 3 query heads,
head_dim 64, 8-token pages, 1024 pages per head: the embedded model at 8k, budget 256) over 28 layers' worth of
random page keys, with a 64 MB sweep between passes so that, as inside a decode step, the keys come from memory:
the kernel's own float32 loop (`candidate_logits`, keys of d + 1 floats) against the same loop over bfloat16 keys
(d values of 2 bytes, decoded by a shift per value), alternating; prints the largest logit difference too.

    .venv/bin/python benchmarks/bf16_rescore.py
"""

import time

import numba
import numpy as np
from numba.typed import List

from icecache.index._tree_kernels import candidate_logits, _prefetch


@numba.njit(cache=True, fastmath=True)
def logits_bf16(q, h, cand, n_cand, fill, keys16, scale, logits, top, ahead, scratch):
    """`candidate_logits` over bfloat16 keys `[kv, pages, page_size, d]` (int16 bits), `scratch` `[d]` uint32."""
    group, dim = q.shape
    page_size = keys16.shape[2]
    top[:] = -np.inf
    for c in range(n_cand):
        if ahead > 0 and c + ahead < n_cand:
            flat = keys16[h, cand[c + ahead]].reshape(-1)
            for i in range(0, flat.shape[0], 32):
                _prefetch(flat, i)
        used = fill[h, cand[c]]
        base = c * page_size
        for s in range(page_size):
            if s >= used:
                for g in range(group):
                    logits[g, base + s] = -np.inf
                continue
            row = keys16[h, cand[c], s]
            for j in range(dim):
                scratch[j] = np.uint32(np.uint16(row[j])) << np.uint32(16)
            key = scratch.view(np.float32)
            for g in range(group):
                a = np.float32(0.0)
                for j in range(dim):
                    a += q[g, j] * key[j]
                a *= scale
                logits[g, base + s] = a
                top[g] = max(top[g], a)


@numba.njit
def run32(queries, cands, fills, pk, scale, logits, top, n_cand):
    for layer in range(len(pk)):
        for h in range(queries.shape[1]):
            candidate_logits(queries[layer, h], h, cands[layer, h], n_cand, fills[layer], pk[layer], scale, logits, top, 4)


@numba.njit
def run16(queries, cands, fills, pk, scale, logits, top, n_cand, scratch):
    for layer in range(len(pk)):
        for h in range(queries.shape[1]):
            logits_bf16(queries[layer, h], h, cands[layer, h], n_cand, fills[layer], pk[layer], scale, logits, top, 4, scratch)


def main() -> None:
    rng = np.random.default_rng(0)
    layers, kv, group, dim, pages, page_size, n_cand = 28, 3, 3, 64, 1024, 8, 136
    pk32 = [rng.standard_normal((kv, pages, page_size, dim + 1)).astype(np.float32) * 3 for _ in range(layers)]
    # bfloat16 by truncation (the timing does not care; rounding would halve the logit difference)
    pk16 = List([(np.ascontiguousarray(p[..., :dim]).view(np.uint32) >> 16).astype(np.uint16).astype(np.int16)
                 for p in pk32])
    pk32 = List(pk32)
    fills = List([np.full((kv, pages), page_size, np.int64) for _ in range(layers)])
    cands = np.stack([np.stack([rng.choice(pages, n_cand, replace=False) for _ in range(kv)]) for _ in range(layers)])
    queries = rng.standard_normal((layers, kv, group, dim)).astype(np.float32)
    logits, top = np.empty((group, n_cand * page_size), np.float32), np.empty(group, np.float32)
    scratch = np.empty(dim, np.uint32)
    sweep = np.ones(64 << 20, np.uint8)
    args32 = (queries, cands, fills, pk32, np.float32(0.125), logits, top, n_cand)
    args16 = (queries, cands, fills, pk16, np.float32(0.125), logits, top, n_cand, scratch)
    run32(*args32)  # compile both, and compare
    exact = logits.copy()
    run16(*args16)
    print(f"largest logit difference {np.abs(exact - logits).max():.4f} (mean |logit| {np.abs(exact).mean():.2f})")
    times = {run32: [], run16: []}
    for _ in range(20):
        for run, args in ((run32, args32), (run16, args16)):
            sweep += 1
            start = time.perf_counter()
            run(*args)
            times[run].append(time.perf_counter() - start)
    for name, run in (("float32 keys", run32), ("bfloat16 keys", run16)):
        print(f"{name}: {np.median(times[run]) * 1e3:.2f} ms per step (fastest {min(times[run]) * 1e3:.2f}), {layers} layers")

if __name__ == "__main__":
    main()
