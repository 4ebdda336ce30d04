"""`icecache bench ...` subcommands: each writes JSON, prints a table and, where useful, saves a PNG."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


INDEX_SPEC_HELP = ("default: every registered index; a variant as NAME:OPTION=VALUE,... (e.g. "
                   "tree:hot_layout=spans) makes a row of its own")


def positive_int(text: str) -> int:
    """argparse type for counts and sizes (contexts, budgets, questions, steps, batch sizes)."""
    value = int(text)  # argparse reports a ValueError as "invalid positive_int value"
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def prose_file(text: str) -> str:
    """argparse type for `--prose`: a readable UTF-8 text file (haystack prose), checked before any model loads."""
    try:
        Path(text).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise argparse.ArgumentTypeError(f"cannot read {text!r} as a UTF-8 text file ({error})") from None
    return text


def check_rows(indexes: list[str] | None, budgets: list[int], **rule) -> None:
    """Make every row's runtime once (index spec, options, budget rule), so that a bad one fails with the
    runtime's own message before any model loads. `indexes` None: every registered index."""
    from ..index import available_indexes
    from ..runtime import IceRuntime

    for spec in indexes or available_indexes():
        for budget in budgets:
            IceRuntime(index=spec, budget=budget, **rule)


def _load_model(args):
    """`(model, tokenizer)`; for a random-weight model `(None, tokenizer)`: the default model's tokenizer, or
    the one in `--tokenizer` (a folder, for a machine without the embedded model, e.g. a lent GPU)."""
    from ..models import DEFAULT_MODEL, load_model, load_tokenizer

    if not args.model.startswith("random-"):
        return load_model(args.model)
    if getattr(args, "tokenizer", None):
        from transformers import AutoTokenizer

        return None, AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
    return None, load_tokenizer(DEFAULT_MODEL)


def _frame(args) -> str:
    """How tasks frame questions for this model: an instruct model reads them inline, a base model as Q/A."""
    from ..models import model_spec

    return "inline" if args.model.startswith("random-") or model_spec(args.model).instruct else "qa"


def _add_model_option(parser: argparse.ArgumentParser, extra: tuple[str, ...] = ()) -> None:
    from ..models import DEFAULT_MODEL, available_models

    parser.add_argument("--model", default=DEFAULT_MODEL, choices=[*available_models(), *extra],
                        help=f"embedded model (default {DEFAULT_MODEL})"
                             + ("; random-*: random weights of a named shape, for timing" if extra else ""))
    if extra:
        parser.add_argument("--tokenizer", default=None, metavar="DIR",
                            help="random-* models: a tokenizer folder to make the prompt with (default: the "
                                 f"embedded {DEFAULT_MODEL}'s; for a machine without the embedded model)")


def read_prose(path: str | None) -> str | None:
    """The text of a `--prose` file (None: none given)."""
    return Path(path).read_text(encoding="utf-8") if path else None


def _finish(args: argparse.Namespace, name: str, result: dict, start: float, text: str, plot=None) -> int:
    """Write `<out>/<name>.json` (and `<name>.png` with `plot`), print the table and the wall time."""
    from .common import write_json

    result["wall_seconds"] = time.perf_counter() - start
    out = Path(args.out)
    written = [write_json(out / f"{name}.json", result)]
    if plot is not None:
        plot(result, out / f"{name}.png")
        written.append(out / f"{name}.png")
    print(text)
    print(f"\nwrote {' and '.join(map(str, written))}; wall time {result['wall_seconds']:.0f} s")
    return 0


def _recall(args: argparse.Namespace) -> int:
    from .recall import format_recall, plot_recall, run_recall

    start = time.perf_counter()
    model, tokenizer = _load_model(args)
    result = run_recall(model, tokenizer, contexts=args.contexts, budgets=args.budgets, indexes=args.indexes,
                        steps=args.steps, layers=args.layers, prose=read_prose(args.prose), source=args.source,
                        sink=args.sink, window=args.window, page_size=args.page_size)
    result["settings"]["model"] = args.model
    return _finish(args, "recall", result, start, format_recall(result), plot_recall)


def _tasks(args: argparse.Namespace) -> int:
    from .tasks import format_tasks, run_tasks

    import json

    from .common import write_json

    start = time.perf_counter()
    # written after every question, so that a long run cut off goes on with --resume
    partial = Path(args.out) / "tasks.partial.json"
    resume = None
    if args.resume and partial.is_file():
        resume = json.loads(partial.read_text())
        if resume["settings"].pop("model", None) != args.model:
            args.parser.error(f"--resume: {partial} is a run of another --model; resume it with the same arguments")

    def checkpoint(result: dict) -> None:
        staged = write_json(partial.with_suffix(".tmp"), {**result, "settings": {**result["settings"],
                                                                                  "model": args.model}})
        staged.replace(partial)  # a run killed while writing keeps the last whole checkpoint

    model, tokenizer = _load_model(args)
    result = run_tasks(model, tokenizer, kinds=args.kinds, contexts=args.contexts, depths=args.depths,
                       budgets=args.budgets, indexes=args.indexes, seed=args.seed, prose=read_prose(args.prose),
                       runtime_options={"select_every": args.select_every, "sink": args.sink,
                                        "window": args.window, "page_size": args.page_size}, frame=_frame(args),
                       questions=args.questions, sources=args.sources, resume=resume, checkpoint=checkpoint)
    result["settings"]["model"] = args.model
    if resume is not None:  # wall_seconds then covers only what this invocation asked
        from .tasks import _question

        result["resumed_questions"] = len({_question(r) for r in resume["records"]})
    peers = Path(args.out) / "tasks_peers.json"
    if peers.is_file():  # rows written by benchmarks/kvpress_peer.py in its own environment
        from .tasks import summarize

        result["records"] += json.loads(peers.read_text())["records"]
        result["summary"] = summarize(result["records"])
    written = _finish(args, "tasks", result, start, format_tasks(result))
    partial.unlink(missing_ok=True)
    return written


def _latency(args: argparse.Namespace) -> int:
    import torch

    from .common import random_model
    from .latency import format_latency, plot_latency, run_latency

    start = time.perf_counter()
    model, tokenizer = _load_model(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    if not args.model.startswith("random-"):
        model = model.to(device=device, dtype=dtype)
    else:  # random weights of a bigger shape, for timing; the embedded tokenizer still makes the prompt
        model = random_model(args.model.removeprefix("random-"), device, dtype)
    result = run_latency(model, tokenizer, contexts=args.contexts, indexes=args.indexes, budget=args.budget,
                         steps=args.steps, runtime_options={"select_every": args.select_every,
                                                            "page_size": args.page_size},
                         batches=args.batch, passes=args.passes)
    result["settings"].update(model=args.model, dtype=args.dtype)
    return _finish(args, "latency", result, start, format_latency(result), plot_latency)


def _check_syncs(args: argparse.Namespace) -> None:
    import torch

    if not torch.cuda.is_available():
        raise ValueError("bench syncs lists the host synchronisations of CUDA decode steps: it needs a CUDA "
                         "device, and torch sees none")
    check_rows(args.indexes, [args.budget], select_every=args.select_every)


def _syncs(args: argparse.Namespace) -> int:
    import torch

    from .common import random_model
    from .syncs import format_syncs, run_syncs

    start = time.perf_counter()
    model, tokenizer = _load_model(args)
    dtype = getattr(torch, args.dtype)
    if args.model.startswith("random-"):
        model = random_model(args.model.removeprefix("random-"), "cuda", dtype)
    else:
        model = model.to(device="cuda", dtype=dtype)
    result = run_syncs(model, tokenizer, context=args.context, indexes=args.indexes, budget=args.budget,
                       steps=args.steps, batch=args.batch, runtime_options={"select_every": args.select_every})
    result["settings"].update(model=args.model)
    return _finish(args, "syncs", result, start, format_syncs(result))


def _prefill(args: argparse.Namespace) -> int:
    from .prefill import format_prefill, run_prefill

    start = time.perf_counter()
    result = run_prefill(args.model, contexts=args.contexts, methods=args.methods, chunk=args.chunk,
                         index=args.index, budget=args.budget, max_unchunked=args.max_unchunked)
    return _finish(args, "prefill", result, start, format_prefill(result))


def _kernel(args: argparse.Namespace) -> int:
    import torch

    from .kernel import format_kernel, run_kernel

    start = time.perf_counter()
    result = run_kernel(contexts=args.contexts, budgets=args.budgets, dtype=getattr(torch, args.dtype),
                        device=args.device, repeats=args.repeats)
    return _finish(args, "kernel", result, start, format_kernel(result))


def _vllm(args: argparse.Namespace) -> int:
    from .vllm import format_vllm, run_vllm

    start = time.perf_counter()
    points = [tuple(int(x) for x in p.split("x")) for p in args.points]
    result = run_vllm(args.model, points=points, indexes=args.indexes, budget=args.budget,
                      new_tokens=args.new_tokens, kv_cache_gib=args.kv_cache_gib)
    return _finish(args, "vllm", result, start, format_vllm(result))


def add_bench_commands(sub: argparse._SubParsersAction) -> None:
    from ..tasks import PROSE_SOURCES

    bench = sub.add_parser("bench", help="benchmarks: recall, tasks, latency, prefill, kernel, syncs, vllm")
    kinds = bench.add_subparsers(dest="bench", required=True)

    recall = kinds.add_parser("recall", help="retrieval recall of every index on real attention")
    recall.add_argument("--contexts", type=positive_int, nargs="+", default=[2048, 4096, 8192])
    recall.add_argument("--budgets", type=positive_int, nargs="+", default=[64, 128, 256, 512])
    recall.add_argument("--indexes", nargs="+", default=None, help=INDEX_SPEC_HELP)
    recall.add_argument("--steps", type=positive_int, default=32, help="greedy decode steps scored per context")
    recall.add_argument("--layers", type=int, nargs="+", default=None, help="default: every 3rd sparse layer")
    recall.add_argument("--source", default="pydoc", choices=PROSE_SOURCES,
                        help="haystack prose by name (default pydoc; torch: text no default was tuned on)")
    recall.add_argument("--prose", default=None, type=prose_file, help="a text file to use instead of a named --source")
    recall.add_argument("--sink", type=int, default=16, help="first tokens always attended (budget rule)")
    recall.add_argument("--window", type=int, default=None,
                        help="most recent tokens always attended (budget rule; default 32, 16 under budget 128)")
    recall.add_argument("--page-size", type=int, default=None,
                        help="tokens per KV page (budget rule; default 8)")
    recall.add_argument("--out", default="results", help="output folder")
    _add_model_option(recall)
    recall.set_defaults(run=_recall, parser=recall, check=lambda a: check_rows(
        a.indexes, a.budgets, sink=a.sink, window=a.window, page_size=a.page_size))

    from ..tasks import TASK_KINDS

    tasks = kinds.add_parser("tasks", help="RULER-style long-context tasks: full KV beside every index")
    tasks.add_argument("--kinds", nargs="+", default=list(TASK_KINDS), choices=TASK_KINDS)
    tasks.add_argument("--contexts", type=positive_int, nargs="+", default=[2048, 4096])
    tasks.add_argument("--depths", type=float, nargs="+", default=[0.25, 0.75])
    tasks.add_argument("--budgets", type=positive_int, nargs="+", default=[64, 256])
    tasks.add_argument("--questions", type=positive_int, default=None,
                       help="questions per kind and context at evenly spread depths (instead of --depths)")
    tasks.add_argument("--sources", nargs="+", default=["pydoc"], choices=PROSE_SOURCES,
                       help="haystack prose, taken in turn per question")
    tasks.add_argument("--indexes", nargs="+", default=None, help=INDEX_SPEC_HELP)
    tasks.add_argument("--seed", type=int, default=0)
    tasks.add_argument("--prose", default=None, type=prose_file, help="a text file to use instead of pydoc_data prose")
    tasks.add_argument("--select-every", type=int, default=1,
                       help="layers sharing one page selection (IceCache(r) layer reuse)")
    tasks.add_argument("--sink", type=int, default=16, help="first tokens always attended (budget rule)")
    tasks.add_argument("--window", type=int, default=None,
                       help="most recent tokens always attended (budget rule; default 32, 16 under budget 128)")
    tasks.add_argument("--page-size", type=int, default=None,
                       help="tokens per KV page (budget rule; default 8)")
    tasks.add_argument("--out", default="results")
    tasks.add_argument("--resume", action="store_true",
                       help="go on with the run cut off in --out (its tasks.partial.json, written after every "
                            "question) instead of asking its questions again; same arguments")
    _add_model_option(tasks)
    tasks.set_defaults(run=_tasks, parser=tasks, check=lambda a: check_rows(
        a.indexes, a.budgets, sink=a.sink, window=a.window, page_size=a.page_size, select_every=a.select_every))

    latency = kinds.add_parser("latency", help="decode time per token against context length")
    latency.add_argument("--contexts", type=positive_int, nargs="+", default=[1024, 2048, 4096, 8192])
    latency.add_argument("--indexes", nargs="+", default=None)
    latency.add_argument("--budget", type=positive_int, default=256)
    latency.add_argument("--steps", type=positive_int, default=16)
    latency.add_argument("--batch", type=positive_int, nargs="+", default=[1], help="batch sizes (copies of one prompt)")
    latency.add_argument("--passes", type=positive_int, default=2,
                         help="times each method runs, in turn; a row keeps its method's fastest pass")
    latency.add_argument("--select-every", type=int, default=1,
                         help="layers sharing one page selection (IceCache(r) layer reuse)")
    latency.add_argument("--page-size", type=int, default=None,
                         help="tokens per KV page (budget rule; default 8)")
    _add_model_option(latency, extra=("random-smollm2-135m", "random-llama-8b"))
    latency.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    latency.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    latency.add_argument("--out", default="results")
    latency.set_defaults(run=_latency, parser=latency, check=lambda a: check_rows(
        a.indexes, [a.budget], page_size=a.page_size, select_every=a.select_every))

    syncs = kinds.add_parser("syncs", help="host synchronisations per decode step on CUDA, by call site")
    syncs.add_argument("--context", type=positive_int, default=4096)
    syncs.add_argument("--indexes", nargs="+", default=None, help=INDEX_SPEC_HELP)
    syncs.add_argument("--budget", type=positive_int, default=256)
    syncs.add_argument("--steps", type=positive_int, default=4)
    syncs.add_argument("--batch", type=positive_int, default=1)
    syncs.add_argument("--select-every", type=int, default=1)
    _add_model_option(syncs, extra=("random-smollm2-135m", "random-llama-8b"))
    syncs.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    syncs.add_argument("--out", default="results")
    syncs.set_defaults(run=_syncs, parser=syncs, check=_check_syncs)

    from ..index import DEFAULT_INDEX
    from .prefill import METHODS
    from .vllm import DEFAULT_KV_CACHE_GIB, DEFAULT_NEW_TOKENS

    prefill = kinds.add_parser("prefill", help="prefill time and peak RSS at long context, icecache vs transformers")
    prefill.add_argument("--contexts", type=positive_int, nargs="+", default=[8192, 16384, 32000])
    prefill.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    prefill.add_argument("--chunk", type=positive_int, default=2048, help="prefill chunk in tokens")
    prefill.add_argument("--index", default=DEFAULT_INDEX)
    prefill.add_argument("--budget", type=positive_int, default=256)
    prefill.add_argument("--max-unchunked", type=positive_int, default=16384,
                         help="longest context for transformers' unchunked prefill")
    prefill.add_argument("--out", default="results")
    _add_model_option(prefill)
    prefill.set_defaults(run=_prefill, parser=prefill, check=lambda a: check_rows([a.index], [a.budget]))

    kernel = kinds.add_parser("kernel", help="decode attention kernel vs SDPA and dense; bandwidth")
    kernel.add_argument("--contexts", type=positive_int, nargs="+", default=[4096, 32768, 131072])
    kernel.add_argument("--budgets", type=positive_int, nargs="+", default=[256, 1024, 4096])
    kernel.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    kernel.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    kernel.add_argument("--repeats", type=positive_int, default=50)
    kernel.add_argument("--out", default="results")
    kernel.set_defaults(run=_kernel)

    vllm = kinds.add_parser("vllm", help="vLLM (CPU) with each index beside stock vLLM: tokens/s, decode step")
    vllm.add_argument("--points", nargs="+", default=["4096x1", "4096x4", "4096x16", "8192x16"],
                      help="CONTEXTxREQUESTS: prompt tokens and concurrent requests")
    vllm.add_argument("--indexes", nargs="+", default=None)
    vllm.add_argument("--budget", type=positive_int, default=256)
    vllm.add_argument("--new-tokens", type=positive_int, default=DEFAULT_NEW_TOKENS,
                      help="greedy tokens per request; the decode medians need them to outlast the prefills")
    vllm.add_argument("--kv-cache-gib", type=positive_int, default=DEFAULT_KV_CACHE_GIB, help="VLLM_CPU_KVCACHE_SPACE")
    vllm.add_argument("--out", default="results")
    _add_model_option(vllm)
    vllm.set_defaults(run=_vllm, parser=vllm, check=lambda a: check_rows(a.indexes, [a.budget]))
