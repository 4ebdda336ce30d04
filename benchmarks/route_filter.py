"""How many leaves the tree's insert measures exactly, and that it picks the nearest one (RESULTS.md, "Decode latency")

A decode step's insert routes each new key to the page with the nearest running mean (augmented keys). It first
estimates every page's distance from the bfloat16 centroids the search reads anyway (within a bound on their
rounding) and measures exactly, on the float32 sums, only the pages whose interval reaches the best one's
(`_tree_kernels._nearest_leaf`). This prints, per layer, the share of pages measured exactly, and asserts
that the page chosen is the nearest in float64 (up to float32 rounding), for the keys of the decode steps
after a real prompt (a tree over the prompt's keys, with its prefill queries, at the runtime's page size)::

    .venv/bin/python benchmarks/route_filter.py --context 8192 --steps 32 --layers 4 12 20 28
"""

from __future__ import annotations

import numpy as np
import torch
from route_bound import layer_trees, parse_args  # this folder: the same prompt, capture and trees

from icecache.index._tree_kernels import _ROUTE_ABS, _ROUTE_REL, _decode_bf16, _nearest_leaf
from icecache.index.tree import augment


def route_one(index, h: int, point: np.ndarray) -> tuple[int, int]:
    """(pages measured exactly, pages holding tokens) for raw key `point` `[d]` of KV head `h`; asserts the
    compiled routing picks the page with the nearest mean."""
    arrays = index._arrays()
    pages = int(index._pages[h])
    fill = arrays.fill[h, :pages]
    augmented = augment(point[None], index.max_norm)[0]  # the insert's own augmentation
    extra = augmented[-1]
    chosen = _nearest_leaf(augmented, h, pages, arrays.fill, arrays.sums, arrays.centroid_bits, arrays.route,
                           index.max_norm ** 2, np.empty(pages, np.float32), np.empty(pages, np.uint32))
    means = arrays.sums[h, :pages].astype(np.float64) / np.maximum(fill, 1)[:, None]
    dist = ((means - augmented) ** 2).sum(1)
    dist[fill == 0] = np.inf
    assert dist[chosen] <= dist.min() + 1e-5 * dist.min() + 1e-6, (chosen, dist[chosen], dist.min())
    # the filter's intervals, as the kernel forms them
    cent = _decode_bf16(arrays.centroid_bits[h, :, :pages].reshape(-1),
                        np.empty(pages * index.head_dim, np.uint32)).reshape(index.head_dim, pages)
    route = arrays.route[h, :pages]
    est = route[:, 1] - 2 * (point @ cent + route[:, 0] * extra)
    err = 2 * np.linalg.norm(point) * _ROUTE_REL * route[:, 2] + _ROUTE_ABS * index.max_norm ** 2
    est[fill == 0] = np.inf
    measured = int(((est - err) <= (est + err).min()).sum())
    return measured, int((fill > 0).sum())


def main() -> None:
    args = parse_args(__doc__.split("\n")[0])
    for layer, keys, index in layer_trees(args):
        shares = []
        for t in range(args.context, keys.shape[1]):
            shares += [np.divide(*route_one(index, h, keys[h, t].numpy())) for h in range(keys.shape[0])]
            index.insert(keys[:, t : t + 1])  # the tree grows as in a decode: later keys meet split pages
        print(f"layer {layer}: the nearest page every time; measured exactly {np.mean(shares):.3f} of the pages "
              f"(min {np.min(shares):.3f}, max {np.max(shares):.3f}; {len(shares)} routed keys)")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
