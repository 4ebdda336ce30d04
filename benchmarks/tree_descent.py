"""The tree's two candidate searches side by side: a scan of every leaf centroid vs a bounded descent.

    .venv/bin/python benchmarks/tree_descent.py [--context 8192] [--steps 16] [--budget 256] [--out benchmarks]

Captures the embedded model's real keys and queries (as `icecache bench recall` does), builds one tree per
search mode at every third layer from the same keys and prefill queries, and replays the captured decode
queries through both: microseconds per `index.search` (all KV heads of the layer), the share of the
hierarchy's nodes the descent scored, and the share of returned pages the two modes agree on. Both run in
one process, one after the other on the same data, so the time ratio is the figure to read.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import icecache
from icecache.bench.capture import capture
from icecache.bench.common import environment, prompt_ids, table, write_json
from icecache.models import load_default

MODES = ("scan", "descent")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--out", default="benchmarks")
    args = parser.parse_args()
    sink, window, page = 16, 32, 16
    max_pages = (args.budget - sink - window) // page
    model, tokenizer = load_default()
    cap = capture(model, prompt_ids(tokenizer, args.context, None), args.steps)
    n = cap.prompt_tokens
    rows = []
    for layer in range(2, len(cap.keys), 3):
        kv, _, d = cap.keys[layer].shape
        keys = cap.keys[layer][:, sink : n - window]
        build_queries = cap.prefill_queries[layer]
        indexes = {mode: icecache.get_index("tree", head_dim=d, page_size=page, search=mode) for mode in MODES}
        for index in indexes.values():
            index.build(keys, icecache.BuildContext.from_query_heads(build_queries, kv))
        pages, micros, scored = {}, {}, {}
        for mode, index in indexes.items():
            index.search(cap.decode_queries[layer][0].view(kv, -1, d), max_pages)  # compile / warm up
            start, pages[mode], scored[mode] = time.perf_counter(), [], 0
            for step in range(cap.steps):
                pages[mode].append(index.search(cap.decode_queries[layer][step].view(kv, -1, d), max_pages))
                scored[mode] += index.nodes_scored
            micros[mode] = (time.perf_counter() - start) / cap.steps * 1e6
        nodes = indexes["descent"].num_nodes
        same = np.mean([(a == b).float().mean().item() for a, b in zip(pages["scan"], pages["descent"])])
        rows.append({"layer": layer, "pages": indexes["scan"].num_pages, "nodes": nodes,
                     "scan_us": micros["scan"], "descent_us": micros["descent"],
                     "descent_over_scan": micros["descent"] / micros["scan"],
                     "scored_share": scored["descent"] / cap.steps / nodes, "same_pages": same})
        print(f"layer {layer}: scan {micros['scan']:.0f} us, descent {micros['descent']:.0f} us", flush=True)
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "layer"}
    rows.append({"layer": "mean", **mean})
    columns = [("layer", "layer", ""), ("pages", "pages (max over heads)", ".0f"), ("nodes", "nodes", ".0f"),
               ("scan_us", "scan us", ".0f"), ("descent_us", "descent us", ".0f"),
               ("descent_over_scan", "descent / scan", ".2f"), ("scored_share", "nodes scored", ".3f"),
               ("same_pages", "same pages", ".3f")]
    print(table(rows, columns))
    path = write_json(f"{args.out}/tree_descent.json", {
        "benchmark": "tree_descent", "environment": environment(),
        "settings": {"context": args.context, "steps": args.steps, "budget": args.budget, "sink": sink,
                     "window": window, "page_size": page}, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
