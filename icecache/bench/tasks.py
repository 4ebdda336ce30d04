"""`icecache bench tasks`: RULER-style long-context tasks, full KV beside every index and budget.

Tasks (pass key, multi-key needle, multi-value, variable tracking) are generated offline from prose at
several context lengths and needle depths with fixed seeds. One dense prefill per task is shared by every
runtime (`shared_prefill`, then `IceRuntime.new_cache(prefill=...)`); as in `model.generate`, that dense
prefill also decides the first answer token, so rows differ only in decode-time retrieval. Answers are
greedy and scored by exact match (every expected value must appear in the output).
"""

from __future__ import annotations

import time

from tqdm.auto import tqdm

from ..index import available_indexes
from ..runtime import IceRuntime, full_kv_copy, generate_after_prefill, shared_prefill
from ..tasks import TASK_KINDS, TaskBuilder
from .common import environment, table

NEW_TOKENS = {"passkey": 10, "multikey": 12, "multivalue": 28, "vartrack": 10}
FULL = "full KV"


def run_tasks(model, tokenizer, kinds=TASK_KINDS, contexts=(2048, 4096), depths=(0.25, 0.75), budgets=(64, 256),
              indexes=None, seed: int = 0, prose: str | None = None, runtime_options: dict | None = None,
              extra_methods: dict | None = None, frame: str = "inline") -> dict:
    """Run every task with full KV and every (index, budget). `extra_methods` maps a row name to
    `fn(model, tokenizer, task, max_new_tokens) -> str` for peers (e.g. other KV-compression libraries);
    `frame` is how questions are framed (`icecache.tasks.FRAMES`: "qa" for a base model)."""
    indexes = list(indexes or available_indexes())
    runtime_options = runtime_options or {}
    extra_methods = extra_methods or {}
    builder = TaskBuilder(tokenizer, prose, frame)
    configs = [(FULL, None)] + [(name, b) for name in indexes for b in budgets] + \
              [(name, None) for name in extra_methods]
    tasks = [builder.build(kind, seed + 1000 * i + j, context, depth)
             for i, kind in enumerate(kinds) for context in contexts for j, depth in enumerate(depths)]
    records = []
    bar = tqdm(total=len(tasks) * len(configs), desc="tasks", unit="run")
    for task in tasks:
        ids = tokenizer(task.prompt, return_tensors="pt").input_ids
        base, first = shared_prefill(model, ids, max(budgets))  # dense, as generate's own prefill
        donors = {}  # one index build per (task, index), copied for every budget
        for name, budget in configs:
            start = time.perf_counter()
            if name in extra_methods:
                text = extra_methods[name](model, tokenizer, task, NEW_TOKENS[task.kind])
            else:
                if name != FULL and name not in donors:
                    donors[name] = IceRuntime(index=name, budget=max(budgets), **runtime_options).new_cache(
                        model, prefill=base)
                cache = full_kv_copy(base) if name == FULL else IceRuntime(
                    index=name, budget=budget, **runtime_options).new_cache(model, prefill=donors[name])
                out = generate_after_prefill(model, cache, ids, first, NEW_TOKENS[task.kind])
                text = tokenizer.decode(out[0], skip_special_tokens=True)
            records.append({"method": name, "budget": budget, "kind": task.kind, "context": task.context_tokens,
                            "prompt_tokens": ids.shape[1], "depth": task.depth, "correct": task.score(text),
                            "answers": task.answers, "output": text, "seconds": time.perf_counter() - start})
            bar.update(1)
    bar.close()
    return {"benchmark": "tasks", "environment": environment(),
            "settings": {"kinds": list(kinds), "contexts": list(contexts), "depths": list(depths),
                         "budgets": list(budgets), "seed": seed, "runtime_options": runtime_options,
                         "frame": frame},
            "records": records, "summary": summarize(records)}


def summarize(records: list[dict]) -> list[dict]:
    """Accuracy per (method, budget) per task kind and overall, and the share of full KV's answers kept."""
    full_correct = {(r["kind"], r["context"], r["depth"]) for r in records if r["method"] == FULL and r["correct"]}
    rows = []
    keys = list(dict.fromkeys((r["method"], r["budget"]) for r in records))
    for method, budget in keys:
        mine = [r for r in records if r["method"] == method and r["budget"] == budget]
        row = {"method": method, "budget": "all" if budget is None else budget}
        for kind in dict.fromkeys(r["kind"] for r in mine):
            of_kind = [r for r in mine if r["kind"] == kind]
            row[kind] = sum(r["correct"] for r in of_kind) / len(of_kind)
        row["accuracy"] = sum(r["correct"] for r in mine) / len(mine)
        kept = [r for r in mine if (r["kind"], r["context"], r["depth"]) in full_correct]
        row["of_full_kv"] = sum(r["correct"] for r in kept) / len(kept) if kept else float("nan")
        rows.append(row)
    return rows


def format_tasks(result: dict) -> str:
    kinds = result["settings"]["kinds"]
    columns = [("method", "method", ""), ("budget", "budget", "")] + [(k, k, ".2f") for k in kinds] + \
              [("accuracy", "all", ".2f"), ("of_full_kv", "kept of full KV", ".2f")]
    return table(result["summary"], columns)
