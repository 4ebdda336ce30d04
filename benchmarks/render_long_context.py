"""Write benchmarks/LONG_CONTEXT.md from the committed JSON under benchmarks/gemma3/, so that the long-context
figures quoted in the README and docs cannot drift from the runs (tests/test_bench_tools.py re-renders and
compares).

    .venv/bin/python benchmarks/render_long_context.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from icecache.bench.common import replace_block
from icecache.bench.tasks import _question, summarize
from icecache.runtime.budget import describe_rule, describe_rules

HERE = Path(__file__).resolve().parent
DATA = HERE / "gemma3"
OUT = HERE / "LONG_CONTEXT.md"


def _load(name: str) -> dict | None:
    path = DATA / name
    return json.loads(path.read_text()) if path.is_file() else None


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def prefill_section(result: dict) -> str:
    rows = []
    for r in result["rows"]:
        if "error" in r:
            rows.append([str(r["context"]), r["method"], "failed: " + " ".join(r["error"])] + [""] * 4)
            continue
        rows.append([str(r["context"]), r["method"], f"{r['prefill_s']:.0f}",
                     f"{r['index_build_s']:.1f}" if r["method"] == "icecache" else "-",
                     f"{r['total_s']:.0f}", f"{r['peak_rss_gib']:.2f}", f"{r['kv_mib']:.0f} / {r['full_kv_mib']:.0f}"])
    s = result["settings"]
    return "\n".join([
        "## Prefill at long context",
        "",
        "```bash",
        f".venv/bin/icecache bench prefill --model {s['model']} --contexts "
        f"{' '.join(map(str, s['contexts']))} --out benchmarks/gemma3",
        "```",
        "",
        f"Each row is its own process (peak RSS includes loading the model, ~0.94 GiB). icecache: `IceRuntime("
        f"index=\"{s['index']}\", budget={s['budget']})`, the prompt in {s['chunk']}-token chunks, then the first "
        "decode step, which builds the three global layers' indexes. transformers chunked: `generate(..., "
        f"prefill_chunk_size={s['chunk']})`; transformers: one forward over the prompt (skipped above "
        f"{s['max_unchunked']} tokens).",
        "",
        _table(["context", "method", "prefill s", "index build s", "total s", "peak RSS GiB", "KV MiB (device / full)"],
               rows),
    ])


def recall_section(result: dict) -> str:
    s = result["settings"]
    budgets = s["budgets"]
    parts = ["## Retrieval recall on Gemma 3's global layers", "",
             "```bash",
             f".venv/bin/icecache bench recall --model gemma3-270m --contexts {' '.join(map(str, s['contexts']))} "
             f"--budgets {' '.join(map(str, budgets))} --steps {s['steps']} --out benchmarks/gemma3",
             "```", "",
             f"Retrievable attention-mass recall, averaged over the global layers {s.get('layers')}, the KV head, "
             f"and {s['steps']} greedy decode steps (sink {s['sink']}, {describe_rules(s['rules']) if 'rules' in s else describe_rule(s['window'], s['page_size'])}).",
             ""]
    for context in s["contexts"]:
        rows = [r for r in result["rows"] if r["context"] == context]
        names = list(dict.fromkeys(r["index"] for r in rows))
        table_rows = []
        for name in names:
            mine = {r["budget"]: r for r in rows if r["index"] == name}
            last = mine[budgets[-1]]
            per_layer = " / ".join(f"{v['recall']:.2f}" for v in last["layers"].values())
            search = "-" if last["search_ms"] is None else f"{last['search_ms']:.2f}"
            table_rows.append([name] + [f"{mine[b]['recall']:.3f}" for b in budgets] + [per_layer, search])
        parts += [f"### {context}-token context", "",
                  _table(["index"] + [str(b) for b in budgets] + [f"per layer @{budgets[-1]}",
                                                                   f"search ms @{budgets[-1]}"], table_rows), ""]
    return "\n".join(parts).rstrip()


#: today's task runs on Gemma 3 with every index beside full KV: (context, kinds, files under benchmarks/). A
#: group's table keeps the questions every one of its methods ran (the tree and `exact` ran more two-hop
#: questions than the other indexes; variable tracking, which full KV rarely answers on this model, ran with
#: those two only and is in TASKS.md)
TODAY_TASKS = [
    (16384, ("passkey", "multikey"), ("tasks_suite/gemma3_16k_page8.json",)),
    (16384, ("twohop",), ("tasks_suite/gemma3_16k_vartrack_twohop.json", "gemma3/every_index_twohop/tasks16k.json")),
    (32000, ("passkey", "multikey"), ("tasks_suite/gemma3_32k.json",)),
    (32000, ("twohop",), ("tasks_suite/gemma3_32k_vartrack_twohop.json", "gemma3/every_index_twohop/tasks32k.json")),
]


def shared_questions(results: list[dict], kinds: tuple[str, ...]) -> list[dict]:
    """The records of `kinds` on the questions that every method of `results` ran, full KV's once (the runs
    must agree on its answer to each question they share)."""
    full, others = {}, []
    for result in results:
        for rec in result["records"]:
            if rec["kind"] not in kinds:
                continue
            if rec["method"] != "full KV":
                others.append(rec)
                continue
            question = _question(rec)
            if question in full and bool(full[question]["correct"]) != bool(rec["correct"]):
                raise ValueError(f"full KV answers {question} differently in two runs")
            full.setdefault(question, rec)
    asked: dict[str, set] = {}
    for rec in others:
        asked.setdefault(rec["method"], set()).add(_question(rec))
    shared = set(full).intersection(*asked.values())
    return [full[q] for q in full if q in shared] + [r for r in others if _question(r) in shared]


def today_tasks_section() -> str:
    parts = ["## Tasks at 16k and 32k tokens: every index beside full KV", "",
             "Today's defaults and budget rule (`icecache bench tasks --model gemma3-270m ...`; the commands, seeds "
             "and wall times are in each file's `notes` and in [`TASKS.md`](TASKS.md)); `pydoc_data` and numpy's "
             "docstrings as haystacks, Q/A framing, greedy, exact match. 'kept' is the share of full KV's "
             "answers a row also gives; '+/-' counts the questions only this row answers and only full KV "
             "answers, with McNemar's exact p. Variable tracking, which full KV rarely answers on this model, ran "
             "with the tree and `exact` only (TASKS.md).", ""]
    for context, kinds, files in TODAY_TASKS:
        results = [json.loads((HERE / f).read_text()) for f in files if (HERE / f).is_file()]
        if not results:
            continue
        records = shared_questions(results, kinds)
        summary = summarize(records)
        full = [r for r in records if r["method"] == "full KV"]
        answered = sum(bool(r["correct"]) for r in full)
        parts += [f"### ~{context} tokens: {' / '.join(kinds)}, {len(full)} questions, full KV answers {answered}",
                  "", f"From {', '.join(f'`{f}`' for f in files)}.", ""]
        by_method: dict[str, dict] = {}
        for row in summary:
            if row["method"] != "full KV":
                by_method.setdefault(row["method"], {})[row["budget"]] = row
        budgets = sorted({b for rows in by_method.values() for b in rows})
        rows = []
        for method, per_budget in by_method.items():
            cells = [per_budget.get(b) for b in budgets]
            kept = " / ".join(f"{r['of_full_kv']:.2f}" if r else "-" for r in cells)
            accuracy = " / ".join(f"{r['accuracy']:.2f}" if r else "-" for r in cells)
            paired = " / ".join(f"+{r['vs_full_gained']}/-{r['vs_full_lost']} p={r['vs_full_p']:.2f}"
                                if r and "vs_full_p" in r else "-" for r in cells)
            rows.append([f"`{method}`", kept, accuracy, paired])
        each = " / ".join(map(str, budgets))
        parts += [_table(["index", f"kept at {each}", f"accuracy at {each}", f"vs full KV at {each}"], rows),
                  "", f"Full KV's accuracy: {answered / len(full):.2f}.", ""]
    return "\n".join(parts).rstrip()


def tasks_section(results: list[dict]) -> str:
    parts = ["## The first task runs (2026-12-02)", "",
             "Every index at its options of the time, before the tree's span pages, bound candidates and 8-token "
             "pages (today's are above).", ""]
    for result in results:
        s = result["settings"]
        contexts = " ".join(map(str, s["contexts"]))
        questions = len([r for r in result["records"] if r["method"] == "full KV"])
        parts += ["```bash",
                  f".venv/bin/icecache bench tasks --model gemma3-270m --kinds {' '.join(s['kinds'])} --contexts "
                  f"{contexts} --depths {' '.join(map(str, s['depths']))} --budgets "
                  f"{' '.join(map(str, s['budgets']))} --out ...   # {result['wall_seconds']:.0f} s",
                  "```", "",
                  f"{questions} questions at ~{contexts} tokens ({len(s['depths'])} depths per kind), Q/A framing "
                  f"(`frame=\"{s.get('frame', 'inline')}\"`), greedy, exact match.", ""]
        rows = []
        for row in summarize(result["records"]):  # recomputed: intervals and paired tests from the records
            paired = lambda key: (f"+{row[key + '_gained']}/-{row[key + '_lost']} p={row[key + '_p']:.2f}"
                                  if key + "_p" in row else "-")
            rows.append([row["method"], str(row["budget"])] + [f"{row[k]:.2f}" for k in s["kinds"]]
                        + [f"{row['accuracy']:.2f}", f"{row['ci_low']:.2f}-{row['ci_high']:.2f}",
                           f"{row['of_full_kv']:.2f}", paired("vs_full"), paired("vs_exact")])
        parts += [_table(["method", "budget", *s["kinds"], "all", "95% CI", "kept of full KV", "vs full KV",
                          "vs exact"], rows), "",
                  "'vs full KV' / 'vs exact': questions only this row answers (+) and only the other answers (-), "
                  "with McNemar's exact p.", ""]
    return "\n".join(parts).rstrip()


def latency_section(result: dict) -> str:
    s = result["settings"]
    rows = []
    for r in result["rows"]:
        rows.append([str(r["context"]), r["method"], f"{r['step_ms']:.0f}", f"{r['ratio']:.2f}",
                     "-" if r.get("search_ms") is None else f"{r['search_ms']:.1f}",
                     "-" if r.get("transfer_ms") is None else f"{r['transfer_ms']:.1f}",
                     "-" if r.get("attention_ms") is None else f"{r['attention_ms']:.1f}",
                     "-" if r.get("device_kv_mib") is None else f"{r['device_kv_mib']:.1f}",  # the floor row: none
                     "-" if r.get("device_kv_mib") is None else f"{r.get('sparse_layer_kv_ratio', 1.0):.3f}"])
    contexts = " ".join(map(str, s["contexts"]))
    return "\n".join([
        "## Decode latency on the real model", "",
        "```bash",
        f".venv/bin/icecache bench latency --model gemma3-270m --contexts {contexts} --budget {s['budget']} "
        f"--steps {s['steps']} --out benchmarks/gemma3",
        "```", "",
        "ms per decoded token (all 18 layers, the 262k-entry LM head included), float32 on the CPU; search, "
        "transfer and attention summed over the three sparse layers; 'sparse layer KV / full' is the largest "
        "device-tier share of full KV over the global layers (the budget rule allows (budget + window) / "
        "context).", "",
        _table(["context", "method", "ms/token", "vs full KV", "search ms", "transfer ms", "attention ms",
                "device KV MiB", "sparse layer KV / full"], rows),
    ])


def demo_section(result: dict) -> str:
    s = result["settings"]
    rows = []
    for r in result["rows"]:
        tps = r["new_tokens"] / r["seconds"] if r["seconds"] else 0.0
        sparse = r["sparse_device_bytes"] / r["sparse_full_bytes"] if r["sparse_full_bytes"] else 1.0
        rows.append([r["method"], r["budget"], f"{r['correct']}/{r['total']}", f"{tps:.1f}",
                     f"{r['device_kv_bytes'] / 2**20:.1f}", f"{sparse:.3f}"])
    return "\n".join([
        "## Demo at 16k", "",
        "```bash",
        f".venv/bin/icecache demo --model {s['model']} --context {s['context']}   # {result['wall_seconds']:.0f} s wall",
        "```", "",
        _table(["method", "budget", "accuracy", "decode tok/s", "device KV MiB", "sparse layers vs full KV"], rows),
    ])


def render() -> str:
    sections = ["# Long context: Gemma 3 270M",
                "",
                "Generated by `benchmarks/render_long_context.py` from the JSON under `benchmarks/gemma3/`; every "
                "figure was measured on this project's shared 2-core CPU (no GPU), float32, `pydoc_data` prose. "
                "Gemma 3 270M: 18 layers, full attention at layers 5, 11 and 17 (sparse under icecache), a "
                "512-token sliding window elsewhere (kept as is: no index, no offload); 1 KV head, head_dim 256."]
    for name, section in (("prefill.json", prefill_section), ("recall.json", recall_section),
                          ("latency.json", latency_section), ("demo.json", demo_section)):
        result = _load(name)
        if result is not None:
            sections += ["", section(result)]
        if name == "recall.json":
            tasks = [r for r in (_load("tasks16k/tasks.json"), _load("tasks32k/tasks.json")) if r is not None]
            sections += ["", today_tasks_section()]
            if tasks:
                sections += ["", tasks_section(tasks)]
    return "\n".join(sections) + "\n"


README = HERE.parent / "README.md"
START, END = "<!-- long-context:start -->", "<!-- long-context:end -->"


def readme_block() -> str:
    """The README's long-context summary: a few lines, each from one committed JSON."""
    lines = []
    prefill = _load("prefill.json")
    if prefill:
        for r in prefill["rows"]:
            if r["method"] == "icecache" and "error" not in r:
                peers = [p for p in prefill["rows"] if p["context"] == r["context"] and p["method"] != "icecache"
                         and "error" not in p]
                others = "; ".join(f"{p['method']} {p['total_s']:.0f} s, {p['peak_rss_gib']:.1f} GiB" for p in peers)
                lines.append(f"- prefill of {r['context']} tokens: {r['total_s']:.0f} s with icecache (index build "
                             f"included), peak RSS {r['peak_rss_gib']:.1f} GiB ({others})")
    recall = _load("recall.json")
    if recall:
        top = max(recall["settings"]["contexts"])
        budget = max(recall["settings"]["budgets"])
        row = {r["index"]: r["recall"] for r in recall["rows"] if r["context"] == top and r["budget"] == budget}
        ranked = ", ".join(f"{name} {value:.3f}" for name, value in sorted(row.items(), key=lambda kv: -kv[1]))
        lines.append(f"- retrieval recall at {top} tokens, budget {budget}: {ranked}")
    suite = sorted((HERE / "tasks_suite").glob("gemma3_*.json"))
    if suite:  # today's task numbers live in the suite (TASKS.md); the runs here predate the tree's span pages
        kinds: dict[int, dict] = {}  # context -> kinds run there
        for path in suite:
            settings = json.loads(path.read_text())["settings"]
            for c in settings["contexts"]:
                kinds.setdefault(c, {}).update(dict.fromkeys(settings["kinds"]))
        where = "; ".join(f"~{c} tokens ({', '.join(k)})" for c, k in sorted(kinds.items()))
        lines.append(f"- tasks at {where}: the "
                     "`gemma3-270m` lines of the task suite above ([`benchmarks/TASKS.md`](benchmarks/TASKS.md)); "
                     "every index beside full KV at 16k and 32k in "
                     "[`benchmarks/LONG_CONTEXT.md`](benchmarks/LONG_CONTEXT.md)")
    latency = _load("latency.json")
    if latency:
        top = max(latency["settings"]["contexts"])
        rows = {r["method"]: r for r in latency["rows"] if r["context"] == top}
        if "tree" in rows:
            lines.append(f"- decode at {top} tokens, budget {latency['settings']['budget']}: full KV "
                         f"{rows['full KV']['step_ms']:.0f} ms/token, tree {rows['tree']['step_ms']:.0f} "
                         f"({rows['tree']['ratio']:.2f}x); each global layer holds "
                         f"{rows['tree']['sparse_layer_kv_ratio']:.3f} of its full KV on the device")
    demo = _load("demo.json")
    if demo:
        s = demo["settings"]
        lines.append(f"- `icecache demo --model {s['model']} --context {s['context']}`: "
                     f"{demo['wall_seconds'] / 60:.0f} minutes on this 2-core CPU")
    return "\n".join(lines)


def sync_readme(text: str) -> str:
    """`text` (the README) with its long-context block replaced by `readme_block()`."""
    return replace_block(text, START, END, readme_block())


if __name__ == "__main__":
    OUT.write_text(render())
    README.write_text(sync_readme(README.read_text()))
    print(f"wrote {OUT} and the README's long-context block", file=sys.stderr)
