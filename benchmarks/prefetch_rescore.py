"""How far ahead the tree's search should prefetch candidate pages (`_tree_kernels._PAGES_AHEAD`).

Times the rescoring's first loop (the logits of every token of 96 candidate pages, 3 KV heads of 3 query
heads, head_dim 64, 16-token pages: the embedded model at budget 256) over 28 layers' worth of random page
keys, with a 64 MB sweep between passes so that, as inside a decode step, the keys come from memory. The loop
is the kernel's, with the look-ahead as a parameter; every look-ahead gives the same logits bit for bit.

    .venv/bin/python benchmarks/prefetch_rescore.py [LAYERS]
"""

import sys
import time

import numba
import numpy as np
from numba.typed import List

from icecache.index._tree_kernels import _FAST, _prefetch


@numba.njit(fastmath=_FAST)
def rescore_logits32(q, h, cand, n_cand, fill, page_keys, scale, logits, top, ahead):
    group, dim = q.shape
    page_size = page_keys.shape[2]
    stride = page_size * page_keys.shape[3]  # floats per page
    flat = page_keys.reshape(-1)
    head0 = h * page_keys.shape[1] * stride
    top[:] = -np.inf
    for c in range(min(ahead, n_cand)):
        for line in range(0, stride, 16):
            _prefetch(flat, head0 + cand[c] * stride + line)
    for c in range(n_cand):
        if ahead > 0 and c + ahead < n_cand:
            base_next = head0 + cand[c + ahead] * stride
            for line in range(0, stride, 16):
                _prefetch(flat, base_next + line)
        used = fill[h, cand[c]]
        base = c * page_size
        for s in range(page_size):
            if s >= used:
                for g in range(group):
                    logits[g, base + s] = -np.inf
                continue
            key = page_keys[h, cand[c], s]
            for g in range(group):
                a = np.float32(0.0)
                for j in range(dim):
                    a += q[g, j] * key[j]
                a *= scale
                logits[g, base + s] = a
                top[g] = max(top[g], a)


@numba.njit
def score_all_layers(queries, cands, fills, page_keys, scale, logits, top, n_cand, ahead):
    for layer in range(len(page_keys)):
        for h in range(queries.shape[1]):
            rescore_logits32(queries[layer, h], h, cands[layer, h], n_cand, fills[layer], page_keys[layer], scale,
                             logits, top, ahead)


def main(layers: int = 28) -> None:
    rng = np.random.default_rng(0)
    kv, group, dim, pages, page_size, n_cand = 3, 3, 64, 512, 16, 96  # the embedded model at 8k, budget 256
    page_keys = List([rng.standard_normal((kv, pages, page_size, dim + 1)).astype(np.float32) * 3
                      for _ in range(layers)])
    fills = List([np.full((kv, pages), page_size, np.int64) for _ in range(layers)])
    cands = np.stack([np.stack([rng.choice(pages, n_cand, replace=False) for _ in range(kv)]) for _ in range(layers)])
    queries = rng.standard_normal((layers, kv, group, dim)).astype(np.float32)
    logits, top = np.empty((group, n_cand * page_size), np.float32), np.empty(group, np.float32)
    sweep = np.ones(64 << 20, np.uint8)  # the model's weights passing through the caches between steps
    reference = None
    for ahead in (0, 1, 2, 4, 8):
        args = (queries, cands, fills, page_keys, np.float32(0.125), logits, top, n_cand, ahead)
        score_all_layers(*args)  # compile, and check: a prefetch is only a hint
        if reference is None:
            reference = logits.copy()
        assert np.array_equal(reference, logits)
        times = []
        for _ in range(15):
            sweep += 1
            start = time.perf_counter()
            score_all_layers(*args)
            times.append(time.perf_counter() - start)
        print(f"{ahead} pages ahead: {np.median(times) * 1e3:.2f} ms per step ({layers} layers)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 28)
