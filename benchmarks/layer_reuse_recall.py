"""How much of a layer's attention the pages chosen by an earlier layer still carry (layer reuse).

    .venv/bin/python benchmarks/layer_reuse_recall.py [--context 4096]

Captures the embedded model's real K/V and queries (as `icecache bench recall` does), builds the tree at
every third sparse layer, searches it with that layer's decode queries (budget 256), and scores the same
pages against that layer's and the next two layers' exact attention (retrievable recall, as in the
recall benchmark). For reference it also scores the next layers searching their own trees.
"""

from __future__ import annotations

import argparse

import torch

import icecache
from icecache.bench.capture import capture
from icecache.bench.common import prompt_ids
from icecache.models import load_default


def recall(cap, layer: int, query: torch.Tensor, tokens: list[torch.Tensor], sink: int, window: int) -> float:
    n = cap.prompt_tokens
    kv, _, d = cap.keys[layer].shape
    logits = torch.einsum("hgd,hnd->hgn", query.view(kv, -1, d), cap.keys[layer][:, :n]) / d**0.5
    mass = torch.softmax(logits, -1).sum(1)
    retrievable = torch.zeros(n, dtype=torch.bool)
    retrievable[sink: n - window] = True
    attended = torch.zeros(kv, n, dtype=torch.bool)
    for h, t in enumerate(tokens):
        attended[h, t] = True
    return float(((mass * retrievable * attended).sum(1) / (mass * retrievable).sum(1)).mean())


def chosen_tokens(cap, layer: int, query: torch.Tensor, sink: int, window: int, budget: int, page: int):
    n = cap.prompt_tokens
    kv, _, d = cap.keys[layer].shape
    index = icecache.get_index("tree", head_dim=d, page_size=page)
    index.build(cap.keys[layer][:, sink: n - window], icecache.BuildContext.from_query_heads(cap.prefill_queries[layer], kv))
    pages = index.search(query.view(kv, -1, d), (budget - sink - window) // page)
    out = []
    for h in range(kv):
        t = index.page_table[h, pages[h][pages[h] >= 0]].flatten()
        out.append(t[t >= 0] + sink)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()
    sink, window, page, budget = 16, 32, 16, 256
    model, tokenizer = load_default()
    cap = capture(model, prompt_ids(tokenizer, args.context, None), args.steps)
    layers = len(cap.keys)
    shared = {0: [], 1: [], 2: []}
    own = []
    for leader in range(2, layers - 2, 3):
        for step in range(0, cap.steps, 4):
            tokens = chosen_tokens(cap, leader, cap.decode_queries[leader][step], sink, window, budget, page)
            for offset in range(3):
                q = cap.decode_queries[leader + offset][step]
                shared[offset].append(recall(cap, leader + offset, q, tokens, sink, window))
            q = cap.decode_queries[leader + 1][step]
            mine = chosen_tokens(cap, leader + 1, q, sink, window, budget, page)
            own.append(recall(cap, leader + 1, q, mine, sink, window))
    for offset in range(3):
        print(f"pages chosen at layer L, attention of layer L+{offset}: {sum(shared[offset]) / len(shared[offset]):.3f}")
    print(f"layer L+1 searching its own tree: {sum(own) / len(own):.3f}")


if __name__ == "__main__":
    main()
