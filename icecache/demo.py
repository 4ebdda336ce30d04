"""`icecache demo`: pass-key retrieval at ~4k tokens (or `--context`) on an embedded model (`--model`),
full KV beside the default index and the token-order oracle `exact` (or every available index) at budgets
64, 128 and 256."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .index import DEFAULT_INDEX, available_indexes
from .runtime import IceRuntime, full_kv_copy, generate_after_prefill, shared_prefill
from .tasks import TaskBuilder

#: the demo's rows by default: the library's default index (`IceRuntime()`'s) beside the token-order oracle
DEMO_INDEXES = (DEFAULT_INDEX, "exact")


@dataclass
class DemoRow:
    method: str
    budget: str
    correct: int = 0
    total: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    device_kv_bytes: int = 0
    full_kv_bytes: int = 0
    sparse_device_bytes: int = 0  # over the layers icecache retrieves for (not dense or sliding ones)
    sparse_full_bytes: int = 0
    host_bytes: int | None = None  # the sparse layers' host tiers and indexes (None: a run before it was recorded)


def run_demo(samples: int = 6, context_tokens: int = 4096, budgets=(64, 128, 256), indexes=None,
             max_new_tokens: int = 8, model=None, tokenizer=None, seed: int = 0,
             model_name: str = "smollm2-135m", prose: str | None = None) -> list[DemoRow]:
    """Answer `samples` pass-key questions with full KV and every (index, budget); returns one row each.
    `indexes`: default `DEMO_INDEXES`; `"all"` for every available index. `prose`: the haystack text
    (default `icecache.tasks.default_prose()`, at least 50 sentences).

    One dense prefill per question is shared by every runtime (`IceRuntime.new_cache(prefill=...)`),
    so the comparison differs only in decode-time retrieval.
    """
    from .models import load_model, model_spec

    if model is None:
        model, tokenizer = load_model(model_name)
    indexes = list(available_indexes() if indexes == "all" else indexes or DEMO_INDEXES)
    builder = TaskBuilder(tokenizer, prose, frame="inline" if model_spec(model_name).instruct else "qa")
    rows = {("full KV", "all"): DemoRow("full KV", "all")}
    for name in indexes:
        for b in budgets:
            rows[(name, str(b))] = DemoRow(name, str(b))
    # warm-up, untimed: the first decode steps of a process load compiled kernels (numba's cache, torch's
    # first calls); a short question through every method keeps that out of the first timed row
    warm = builder.passkey(seed=seed, context_tokens=min(context_tokens, 600), depth=0.5)
    warm_ids = tokenizer(warm.prompt, return_tensors="pt").input_ids
    base, first = shared_prefill(model, warm_ids, max(budgets))
    for cache in [full_kv_copy(base)] + [IceRuntime(index=name, budget=min(budgets)).new_cache(model, prefill=base)
                                         for name in indexes]:
        generate_after_prefill(model, cache, warm_ids, first, 3)
    bar = tqdm(total=samples * len(rows), desc="demo", unit="run")
    for i in range(samples):
        task = builder.passkey(seed=seed + i, context_tokens=context_tokens, depth=(i + 0.5) / samples)
        ids = tokenizer(task.prompt, return_tensors="pt").input_ids
        # one dense prefill, shared by every runtime below; it decides the first answer token, as in generate
        base, first = shared_prefill(model, ids, max(budgets))
        donors = {}  # one index build per (question, index), copied for every budget
        for (name, b), row in rows.items():
            if name == "full KV":
                cache = full_kv_copy(base)
            else:
                if name not in donors:
                    donors[name] = IceRuntime(index=name, budget=max(budgets)).new_cache(model, prefill=base)
                cache = IceRuntime(index=name, budget=int(b)).new_cache(model, prefill=donors[name])
            start = time.perf_counter()
            generated = generate_after_prefill(model, cache, ids, first, max_new_tokens)[0]
            row.seconds += time.perf_counter() - start
            row.new_tokens += max(generated.numel() - 1, 0)  # decoded; the first came from the prefill
            row.correct += task.score(tokenizer.decode(generated, skip_special_tokens=True))
            row.total += 1
            if name == "full KV":
                row.device_kv_bytes = row.full_kv_bytes = sum(
                    l.keys.numel() * l.keys.element_size() * 2 for l in cache.layers)
            else:
                report = IceRuntime.report(cache)
                row.device_kv_bytes, row.full_kv_bytes = report.device_kv_bytes, report.full_kv_bytes
                sparse = [l for l in report.layers if l.kind == "sparse"]
                row.sparse_device_bytes = sum(l.device_kv_bytes for l in sparse)
                row.sparse_full_bytes = sum(l.full_kv_bytes for l in sparse)
                row.host_bytes = report.host_kv_bytes + report.index_bytes
            bar.update(1)
            bar.set_postfix(question=f"{i + 1}/{samples}", ctx=ids.shape[1])
    bar.close()
    return list(rows.values())


def format_table(rows: list[DemoRow]) -> str:
    head = (f"| {'method':<10} | {'budget':>6} | {'accuracy':>9} | {'decode tok/s':>12} | {'device KV MiB':>13} | "
            f"{'vs full KV':>10} | {'sparse layers vs full KV':>24} | {'host MiB (KV + index)':>21} |")
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    for r in rows:
        acc = f"{r.correct}/{r.total}"
        tps = r.new_tokens / r.seconds if r.seconds else 0.0
        ratio = r.device_kv_bytes / r.full_kv_bytes if r.full_kv_bytes else 0.0
        sparse = r.sparse_device_bytes / r.sparse_full_bytes if r.sparse_full_bytes else 1.0
        host = "-" if r.host_bytes is None else f"{r.host_bytes / 2**20:.1f}"  # None: full KV, or an older run
        lines.append(f"| {r.method:<10} | {r.budget:>6} | {acc:>9} | {tps:>12.1f} | "
                     f"{r.device_kv_bytes / 2**20:>13.1f} | {ratio:>10.3f} | {sparse:>24.3f} | {host:>21} |")
    return "\n".join(lines)


DEMO_START, DEMO_END = "<!-- demo:start -->", "<!-- demo:end -->"


def render_demo(result: dict) -> str:
    """The demo's last run as the README and benchmarks/RESULTS.md quote it, from `icecache demo --out`'s
    demo.json: its command, wall time, budget rule and table (a test re-renders it, so it cannot drift)."""
    from .runtime.budget import describe_rule, describe_rules

    s, env = result["settings"], result["environment"]
    rows = [DemoRow(**r) for r in result["rows"]]
    flags = "" if s.get("model", "smollm2-135m") == "smollm2-135m" else f" --model {s['model']}"
    flags += "" if s["context"] == 4096 else f" --context {s['context']}"
    flags += " --all-indexes" if len(s["indexes"]) > len(DEMO_INDEXES) else ""
    # runs from before the rule was recorded ran window 32 (16 under budget 128) and 16-token pages
    rule = f"sink 16, {describe_rules(s['rules']) if 'rules' in s else describe_rule(s.get('window'), 16)}"
    return "\n".join([
        f"`icecache demo{flags}`: {s['samples']} pass-key questions at ~{s['context']} tokens, {s['model']}, "
        f"budgets {' / '.join(map(str, s['budgets']))} ({rule}); {result['wall_seconds']:.0f} s wall on "
        f"{env['device']} with {env['threads']} threads, {env['date']}:",
        "",
        format_table(rows),
    ])


def sync_demo_block(text: str, result: dict) -> str:
    """`text` (README.md or RESULTS.md) with its demo block replaced by `render_demo(result)`."""
    from .bench.common import replace_block

    return replace_block(text, DEMO_START, DEMO_END, render_demo(result))


if __name__ == "__main__":
    import json
    import sys

    # python -m icecache.demo benchmarks/demo/demo.json README.md benchmarks/RESULTS.md: re-render their blocks
    demo = json.loads(Path(sys.argv[1]).read_text())
    for name in sys.argv[2:]:
        Path(name).write_text(sync_demo_block(Path(name).read_text(), demo))
