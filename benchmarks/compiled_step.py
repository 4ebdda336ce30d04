"""The compiled CPU decode step against the torch path it replaces, side by side in one process: the latency
benchmark (full KV beside each index, phases per step) run once with `IceRuntime(compiled=False)` and once with
the default `compiled=True`, on the embedded model.

    .venv/bin/python benchmarks/compiled_step.py --contexts 2048 8192 --indexes tree exact --out benchmarks/compiled_step
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from icecache.bench.common import environment, table, write_json
from icecache.bench.latency import run_latency
from icecache.models import load_default

COLUMNS = [("step", "step", ""), ("method", "method", ""), ("context", "context", "d"), ("step_ms", "ms/step", ".1f"),
           ("ratio", "vs full KV", ".2f"), ("search_ms", "search", ".1f"), ("transfer_ms", "transfer", ".1f"),
           ("attention_ms", "attention", ".1f"), ("other_ms", "other", ".1f")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--indexes", nargs="+", default=["tree", "exact"])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--out", default="benchmarks/compiled_step")
    args = parser.parse_args()
    start = time.perf_counter()
    model, tokenizer = load_default()
    rows = []
    for compiled in (False, True):
        result = run_latency(model, tokenizer, contexts=args.contexts, indexes=args.indexes, steps=args.steps,
                             runtime_options={"compiled": compiled})
        rows += [{"step": "compiled" if compiled else "torch", **r} for r in result["rows"]]
    payload = {"benchmark": "compiled_step", "environment": environment(), "wall_seconds": time.perf_counter() - start,
               "settings": {"contexts": args.contexts, "indexes": args.indexes, "steps": args.steps, "budget": 256},
               "rows": rows}
    path = write_json(Path(args.out) / "compiled_step.json", payload)
    print(table(rows, COLUMNS))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
