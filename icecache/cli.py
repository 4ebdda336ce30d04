"""The `icecache` command line."""

from __future__ import annotations

import argparse
import sys
import time

from .bench.cli import check_rows, positive_int, prose_file, read_prose


def _demo(args: argparse.Namespace) -> int:
    from .demo import format_table, run_demo

    start = time.perf_counter()
    from .models import model_spec
    from .runtime.budget import describe_rules, resolved_rules

    rows = run_demo(samples=args.samples, context_tokens=args.context, budgets=args.budgets,
                    indexes="all" if args.all_indexes else args.indexes, model_name=args.model,
                    prose=read_prose(args.prose))
    print(f"\nPass-key retrieval, ~{args.context}-token contexts from {args.prose or 'pydoc_data'} prose, "
          f"{model_spec(args.model).title} (sink 16, {describe_rules(resolved_rules(args.budgets))}; 'device KV' = K/V resident on the "
          f"device tier over all layers, 'sparse layers' = over the layers icecache retrieves for)\n")
    print(format_table(rows))
    wall = time.perf_counter() - start
    print(f"\nwall time {wall:.0f} s")
    if args.out:
        from dataclasses import asdict

        from .bench.common import environment, write_json

        path = write_json(f"{args.out}/demo.json", {
            "benchmark": "demo", "environment": environment(), "wall_seconds": wall,
            "settings": {"model": args.model, "context": args.context, "samples": args.samples, "prose": args.prose,
                         "budgets": args.budgets, "indexes": sorted({r.method for r in rows} - {"full KV"}),
                         "window": None, "page_size": None,  # the default rule, and what it resolved to
                         "rules": resolved_rules(args.budgets)},
            "rows": [asdict(r) for r in rows]})
        print(f"wrote {path}")
    return 0


def _models(args: argparse.Namespace) -> int:
    from .models import available_models, model_spec, prepare_model

    if args.action == "prepare":
        for name in args.names or available_models():
            start = time.perf_counter()
            print(f"{name}: {prepare_model(name)} ({time.perf_counter() - start:.0f} s)")
        return 0
    for name in available_models():
        spec = model_spec(name)
        state = "installed" if spec.installed() else f"not installed: {spec.install}"
        print(f"{name:<14} {spec.title:<22} context {spec.context:>6}  {state}")
    return 0


def _export_model(args: argparse.Namespace) -> int:
    from .models import export_model

    try:
        print(export_model(args.name, args.directory))
    except (FileExistsError, FileNotFoundError) as error:
        print(f"icecache export-model: error: {error}", file=sys.stderr)
        return 2
    return 0


def _check_demo(args: argparse.Namespace) -> None:
    from .demo import DEMO_INDEXES
    from .index import available_indexes

    check_rows(available_indexes() if args.all_indexes else args.indexes or DEMO_INDEXES, args.budgets)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="icecache", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="long-context pass-key demo: full KV beside the default index and exact")
    demo.add_argument("--samples", type=positive_int, default=6, help="questions per configuration")
    demo.add_argument("--context", type=positive_int, default=4096, help="context length in tokens")
    demo.add_argument("--budgets", type=positive_int, nargs="+", default=[64, 128, 256])
    demo.add_argument("--indexes", nargs="+", default=None,
                      help="index names or specs NAME:OPTION=VALUE,... (default: the default index and exact)")
    demo.add_argument("--all-indexes", action="store_true", help="every available index (about 6 minutes at 4k)")
    demo.add_argument("--out", default=None, help="also write the rows to OUT/demo.json")
    demo.add_argument("--prose", default=None, type=prose_file,
                      help="a UTF-8 text file for the haystacks (default: Python's pydoc_data prose)")
    from .models import DEFAULT_MODEL, available_models

    demo.add_argument("--model", default=DEFAULT_MODEL, choices=available_models(),
                      help=f"embedded model (default {DEFAULT_MODEL}; gemma3-270m reads up to 32k tokens)")
    demo.set_defaults(run=_demo, parser=demo, check=_check_demo)

    models = sub.add_parser("models", help="list the embedded models, or prepare them (one-time conversion)")
    models.add_argument("action", nargs="?", choices=["list", "prepare"], default="list")
    models.add_argument("names", nargs="*", help="models to prepare (default: all)")
    models.set_defaults(run=_models)

    export = sub.add_parser("export-model", help="write an embedded model as a safetensors folder (for vLLM)")
    export.add_argument("name", choices=available_models())
    export.add_argument("directory", help="a new or empty folder")
    export.set_defaults(run=_export_model)

    from .bench.cli import add_bench_commands

    add_bench_commands(sub)
    args = parser.parse_args(argv)
    if hasattr(args, "check"):
        try:  # a bad index, option or budget rule is a usage error, reported before any model loads
            args.check(args)
        except (ValueError, TypeError) as error:
            args.parser.error(str(error))
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
