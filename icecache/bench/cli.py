"""`icecache bench ...` subcommands."""

from __future__ import annotations

import argparse


def add_bench_commands(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks: recall, tasks, latency")
    bench.add_subparsers(dest="bench", required=True)
