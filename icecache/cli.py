"""The `icecache` command line."""

from __future__ import annotations

import argparse
import sys
import time


def _demo(args: argparse.Namespace) -> int:
    from .demo import format_table, run_demo

    start = time.perf_counter()
    rows = run_demo(samples=args.samples, context_tokens=args.context, budgets=args.budgets,
                    indexes=args.indexes)
    print(f"\nPass-key retrieval, ~{args.context}-token contexts from pydoc_data prose, SmolLM2-135M-Instruct "
          f"(sink 16, window 32, page 16; 'device KV' = K/V resident on the device tier over all layers)\n")
    print(format_table(rows))
    print(f"\nwall time {time.perf_counter() - start:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="icecache", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="long-context pass-key demo: full KV beside every index and budget")
    demo.add_argument("--samples", type=int, default=6, help="questions per configuration")
    demo.add_argument("--context", type=int, default=4096, help="context length in tokens")
    demo.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 256])
    demo.add_argument("--indexes", nargs="+", default=None, help="index names (default: all available)")
    demo.set_defaults(run=_demo)

    from .bench.cli import add_bench_commands

    add_bench_commands(sub)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
