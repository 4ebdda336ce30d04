"""How far ahead the tree's search should prefetch candidate pages (`_tree_kernels._PAGES_AHEAD`).

Times the rescoring's first loop (the logits of every token of 96 candidate pages, 3 KV heads of 3 query
heads, head_dim 64, 16-token pages: the embedded model at budget 256) over 28 layers' worth of random page
keys, with a 64 MB sweep between passes so that, as inside a decode step, the keys come from memory. The loop
is the kernel's own (`candidate_logits`), with the look-ahead as its parameter; every look-ahead gives the
same logits bit for bit.

    .venv/bin/python benchmarks/prefetch_rescore.py [LAYERS]
"""

import sys
import time

import numba
import numpy as np
from numba.typed import List

from icecache.index._tree_kernels import candidate_logits


@numba.njit
def score_all_layers(queries, cands, fills, page_keys, scale, logits, top, n_cand, ahead):
    for layer in range(len(page_keys)):
        for h in range(queries.shape[1]):
            candidate_logits(queries[layer, h], h, cands[layer, h], n_cand, fills[layer], page_keys[layer], scale,
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
