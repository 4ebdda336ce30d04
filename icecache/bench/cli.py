"""`icecache bench ...` subcommands: each writes JSON, prints a table and, where useful, saves a PNG."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def _load_model(args):
    from ..models import load_default

    return load_default()


def _read_prose(path: str | None) -> str | None:
    return Path(path).read_text() if path else None


def _recall(args: argparse.Namespace) -> int:
    from .common import write_json
    from .recall import format_recall, plot_recall, run_recall

    start = time.perf_counter()
    model, tokenizer = _load_model(args)
    result = run_recall(model, tokenizer, contexts=args.contexts, budgets=args.budgets, indexes=args.indexes,
                        steps=args.steps, layers=args.layers, prose=_read_prose(args.prose))
    result["wall_seconds"] = time.perf_counter() - start
    out = Path(args.out)
    write_json(out / "recall.json", result)
    plot_recall(result, out / "recall.png")
    print(format_recall(result))
    print(f"\nwrote {out / 'recall.json'} and {out / 'recall.png'}; wall time {result['wall_seconds']:.0f} s")
    return 0


def add_bench_commands(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks: recall, tasks, latency")
    kinds = bench.add_subparsers(dest="bench", required=True)

    recall = kinds.add_parser("recall", help="retrieval recall of every index on real attention")
    recall.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8192])
    recall.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 256, 512])
    recall.add_argument("--indexes", nargs="+", default=None, help="default: every registered index")
    recall.add_argument("--steps", type=int, default=32, help="greedy decode steps scored per context")
    recall.add_argument("--layers", type=int, nargs="+", default=None, help="default: every 3rd sparse layer")
    recall.add_argument("--prose", default=None, help="a text file to use instead of pydoc_data prose")
    recall.add_argument("--out", default="results", help="output folder")
    recall.set_defaults(run=_recall)
