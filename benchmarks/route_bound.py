"""Would an exact branch-and-bound routing make the tree's insert cheaper? (RESULTS.md, "Decode latency")

A decode step's insert routes each new key to the page with the nearest running mean (augmented keys), reading
every page's float32 sum: at 32k that is the tree's `admit` phase. The node hierarchy bounds every key below a
node (`|k - c| <= r`), so `max(0, |p - c| - r)^2` bounds the distance from `p` to every page mean below it (the
augmented coordinate only adds), and a best-first descent could skip subtrees without changing the page chosen.
This prints, per layer, the share of leaves such a descent would still score, for the keys of the decode steps
after a real prompt (a tree over the whole prompt's keys, with its prefill queries, at the runtime's page size)::

    .venv/bin/python benchmarks/route_bound.py --context 8192 --steps 32 --layers 4 12 20 28
"""

from __future__ import annotations

import argparse
import heapq

import numpy as np
import torch

from icecache.bench.capture import capture
from icecache.bench.common import prompt_ids
from icecache.index.base import BuildContext, get_index
from icecache.models import load_model


def leaves_scored(index, h: int, point: np.ndarray) -> tuple[int, int]:
    """(leaves a best-first bound descent scores before it can stop, pages holding tokens) for raw key `point`
    `[d]` of KV head `h`; asserts the descent finds the flat scan's nearest mean."""
    nodes, arrays = index._nodes, index._arrays()
    pages = int(index._pages[h])
    fill = arrays.fill[h, :pages]
    extra = np.sqrt(max(index.max_norm ** 2 - float((point ** 2).sum()), 0.0))
    augmented = np.concatenate([point, [extra]]).astype(np.float32)
    means = arrays.sums[h, :pages] / np.maximum(fill, 1)[:, None]
    dist = ((means - augmented) ** 2).sum(1)
    dist[fill == 0] = np.inf
    heap, scored, best = [(0.0, 0)], 0, np.inf
    while heap:
        bound, node = heapq.heappop(heap)
        if bound >= best:
            break
        page = nodes.page[h, node]
        if page >= 0:
            scored += 1
            best = min(best, dist[page])
            continue
        child = nodes.first_child[h, node]
        while child >= 0:
            if nodes.counts[h, child] > 0:
                gap = max(0.0, float(np.linalg.norm(point - nodes.centers[h, child])) - float(nodes.radii[h, child]))
                heapq.heappush(heap, (gap * gap, child))
            child = nodes.next_sibling[h, child]
    assert np.isclose(best, dist.min(), rtol=1e-6), (best, dist.min())
    return scored, int((fill > 0).sum())


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 12, 20, 28])
    parser.add_argument("--page-size", type=int, default=8)
    return parser.parse_args()


def layer_trees(args: argparse.Namespace):
    """Per layer of `args.layers`: `(layer, keys [kv_heads, context + steps, head_dim], tree)`, the tree built over
    a real prompt's keys with its prefill queries, at `args.page_size`; the decode steps' keys follow the prompt's."""
    model, tokenizer = load_model(args.model)
    ids = prompt_ids(tokenizer, args.context)
    cap = capture(model, ids, steps=args.steps)
    for layer in args.layers:
        keys = cap.keys[layer]
        index = get_index("tree", head_dim=keys.shape[2], page_size=args.page_size)
        index.build(keys[:, : args.context], BuildContext.from_query_heads(cap.prefill_queries[layer], keys.shape[0],
                                                                         cap.scaling[layer]))
        yield layer, keys, index


def main() -> None:
    args = parse_args(__doc__.split("\n")[0])
    for layer, keys, index in layer_trees(args):
        shares = [np.divide(*leaves_scored(index, h, keys[h, t].numpy()))
                  for t in range(args.context, keys.shape[1]) for h in range(keys.shape[0])]
        print(f"layer {layer}: a bound descent scores {np.mean(shares):.2f} of the leaves "
              f"(min {np.min(shares):.2f}, max {np.max(shares):.2f}; {len(shares)} routed keys)")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
