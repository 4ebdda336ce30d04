"""`icecache bench tasks`: RULER-style long-context tasks, full KV beside every index and budget.

Tasks (pass key, multi-key needle, multi-value, variable tracking, and a two-hop question whose two
facts lie half a context apart) are generated offline from prose at several context lengths and needle
depths with fixed seeds, from one or more prose sources. One dense prefill per task is shared by every
runtime (`shared_prefill`, then `IceRuntime.new_cache(prefill=...)`); as in `model.generate`, that dense
prefill also decides the first answer token, so rows differ only in decode-time retrieval. Answers are
greedy and scored by exact match (every expected value must appear in the output).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..index import DEFAULT_INDEX, available_indexes, parse_index_spec
from ..runtime.budget import resolved_rules
from ..runtime import IceRuntime, full_kv_copy, generate_after_prefill, shared_prefill
from ..tasks import TASK_KINDS, TaskBuilder, prose_source
from .common import environment, replace_block, table
from .stats import Paired, wilson_interval

NEW_TOKENS = {"passkey": 10, "multikey": 12, "multivalue": 28, "vartrack": 10, "twohop": 10}
FULL = "full KV"


def run_tasks(model, tokenizer, kinds=TASK_KINDS, contexts=(2048, 4096), depths=(0.25, 0.75), budgets=(64, 256),
              indexes=None, seed: int = 0, prose: str | None = None, runtime_options: dict | None = None,
              extra_methods: dict | None = None, frame: str = "inline", questions: int | None = None,
              sources=("pydoc",), resume: dict | None = None, checkpoint=None) -> dict:
    """Run every task with full KV and every (index, budget). `extra_methods` maps a row name to
    `fn(model, tokenizer, task, max_new_tokens) -> str` for peers (e.g. other KV-compression libraries);
    `frame` is how questions are framed (`icecache.tasks.FRAMES`: "qa" for a base model).

    With `questions`, each (kind, context) gets that many questions at evenly spread depths, their
    haystacks taken in turn from `sources` (`icecache.tasks.PROSE_SOURCES`); otherwise one question per
    depth in `depths`, from `prose` (default: the first source).

    `checkpoint(partial)`, if given, gets the result so far after every question (write it to disk, and a
    long run cut off can go on); `resume` is such a partial result: its questions are kept, not asked again
    (it must come from a run with the same settings, or `ValueError` says which differ).
    """
    indexes = list(indexes or available_indexes())
    runtime_options = runtime_options or {}
    runtimes = {spec: _runtime_factory(spec, runtime_options) for spec in indexes}
    extra_methods = extra_methods or {}
    sources = list(sources)
    builders = {name: TaskBuilder(tokenizer, prose if prose is not None and i == 0 else prose_source(name), frame)
                for i, name in enumerate(sources)}
    configs = [(FULL, None)] + [(name, b) for name in indexes for b in budgets] + \
              [(name, None) for name in extra_methods]
    settings = {"kinds": list(kinds), "contexts": list(contexts), "depths": list(depths), "indexes": indexes,
                "questions": questions, "sources": sources, "budgets": list(budgets), "seed": seed,
                "runtime_options": runtime_options, "rules": _rules_of(runtime_options, budgets), "frame": frame}
    records = _resumed_records(resume, settings, configs)
    done = {_question(r) for r in records}
    plan = [(q.source, q.seed, builders[q.source].build(q.kind, q.seed, q.context, q.depth))
            for q in suite_questions(kinds, contexts, seed, sources, questions, depths)
            if (q.kind, q.context, q.depth, q.source, q.seed) not in done]
    bar = tqdm(total=len(plan) * len(configs), desc="tasks", unit="run")
    for source, task_seed, task in plan:
        ids = tokenizer(task.prompt, return_tensors="pt").input_ids
        base, first = shared_prefill(model, ids, max(budgets))  # dense, as generate's own prefill
        donors = {}  # one index build per (task, index), copied for every budget
        for name, budget in configs:
            start = time.perf_counter()
            if name in extra_methods:
                text = extra_methods[name](model, tokenizer, task, NEW_TOKENS[task.kind])
            else:
                if name != FULL and name not in donors:
                    donors[name] = runtimes[name](max(budgets)).new_cache(model, prefill=base)
                cache = full_kv_copy(base) if name == FULL else runtimes[name](budget).new_cache(
                    model, prefill=donors[name])
                out = generate_after_prefill(model, cache, ids, first, NEW_TOKENS[task.kind])
                text = tokenizer.decode(out[0], skip_special_tokens=True)
            records.append({"method": name, "budget": budget, "kind": task.kind, "context": task.context_tokens,
                            "prompt_tokens": ids.shape[1], "depth": task.depth, "source": source, "seed": task_seed,
                            "correct": task.score(text), "answers": task.answers, "output": text,
                            "seconds": time.perf_counter() - start})
            bar.update(1)
        if checkpoint is not None:
            checkpoint(_tasks_result(settings, records))
    bar.close()
    return _tasks_result(settings, records)


def _tasks_result(settings: dict, records: list[dict]) -> dict:
    return {"benchmark": "tasks", "environment": environment(), "settings": settings, "records": list(records),
            "summary": summarize(records)}


def _resumed_records(resume: dict | None, settings: dict, configs: list) -> list[dict]:
    """The records of `resume` (a partial `run_tasks` result) whose question every config answered."""
    if resume is None:
        return []
    theirs = json.loads(json.dumps(resume["settings"]))  # as written to disk: tuples became lists
    ours = json.loads(json.dumps(settings))
    differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    if differ:
        raise ValueError(f"resume: the interrupted run's settings differ in {differ}; resume it with the same "
                         f"arguments, or start afresh in another --out folder")
    asked: dict[tuple, list[dict]] = {}
    for record in resume["records"]:
        asked.setdefault(_question(record), []).append(record)
    wanted = {(name, budget) for name, budget in configs}
    return [r for recs in asked.values() if {(r["method"], r["budget"]) for r in recs} >= wanted for r in recs]


@dataclass(frozen=True)
class SuiteQuestion:
    """One question of a suite run: what `TaskBuilder.build(kind, seed, context, depth)` gets, and the haystack."""

    kind: str
    context: int
    depth: float
    source: str
    seed: int


def suite_questions(kinds, contexts, seed: int, sources, questions: int | None = None,
                    depths=(0.25, 0.75)) -> list[SuiteQuestion]:
    """Every question `run_tasks` asks, in its order, so that tools can replay one of them.

    Per kind and context: `questions` at evenly spread depths ((q + 0.5) / questions), else one per depth in
    `depths`; question q of the kind in place k has task seed `seed + 1000 * k + q` and haystack `sources[q %
    len(sources)]`.
    """
    asked = []
    for place, kind in enumerate(kinds):
        for context in contexts:
            spots = [(q + 0.5) / questions for q in range(questions)] if questions else list(depths)
            asked += [SuiteQuestion(kind, context, depth, sources[q % len(sources)], seed + 1000 * place + q)
                      for q, depth in enumerate(spots)]
    return asked


def suite_question(kinds, kind: str, pick: int, questions: int, seed: int, sources, context: int) -> SuiteQuestion:
    """Question number `pick` (0 .. questions - 1) of `kind` in a run of `--kinds kinds --questions questions`."""
    if kind not in kinds:
        raise ValueError(f"kind {kind!r} is not among the run's kinds {list(kinds)}")
    if not 0 <= pick < questions:
        raise ValueError(f"pick must be in 0 .. {questions - 1} (the run's questions per kind), got {pick}")
    return [q for q in suite_questions(kinds, [context], seed, sources, questions) if q.kind == kind][pick]


def _runtime_factory(spec: str, runtime_options: dict):
    """`budget -> IceRuntime` for one row's index spec (`parse_index_spec`); checks the options now."""
    name, options = parse_index_spec(spec)
    common = dict(runtime_options)
    index_options = {**common.pop("index_options", {}), **options}

    def make(budget: int) -> IceRuntime:
        return IceRuntime(index=name, budget=budget, index_options=index_options, **common)

    from ..index import get_index  # an unknown option fails before any model work
    get_index(name, head_dim=64, **index_options)
    return make


def _question(record: dict) -> tuple:
    return record["kind"], record["context"], record["depth"], record.get("source", "pydoc"), record.get("seed")


#: the runtime options a suite run records, as a run that recorded fewer ran them (budget rule, layer reuse):
#: runs from before the window followed the budget (`default_window`) ran 32 at every budget, and runs from
#: before the page size followed it (`default_page_size`) ran 16
RULE_DEFAULTS = {"select_every": 1, "sink": 16, "window": 32, "page_size": 16}
#: what `icecache bench tasks` passes when not told: None takes the budget's default window and page size
CLI_DEFAULTS = {**RULE_DEFAULTS, "window": None, "page_size": None}


def _full_answers(result: dict, seeds: dict | None = None) -> dict:
    """Full KV's answer per question of `result`: {question: correct}. `seeds` fills in the task seed of
    records from runs that did not record one ({(kind, context, depth, source): seed})."""
    seeds = seeds or {}
    return {_question({**rec, "seed": rec.get("seed", seeds.get(_question(rec)[:4]))}): bool(rec["correct"])
            for rec in result["records"] if rec["method"] == FULL}


def _prose(settings: dict) -> list[str]:
    """The haystack sources a run read (runs from before sources were recorded read `pydoc_data`)."""
    return settings.get("sources") or ["pydoc"]


def _rule(settings: dict) -> dict:
    return {**RULE_DEFAULTS, **(settings.get("runtime_options") or {})}


def _questions_per_seed(settings: dict) -> list[int]:
    """Questions per kind and context that each of a run's seeds asked (a merged run: one entry per seed)."""
    seeds = settings["seed"] if isinstance(settings["seed"], list) else [settings["seed"]]
    return settings.get("questions_per_seed") or [(settings.get("questions") or 0) // len(seeds)] * len(seeds)


def merge_runs(results: list[dict]) -> dict:
    """One suite run from several runs of the same kinds, contexts, budgets, model and framing with other
    seeds (more questions): their records together, the summary recomputed, `settings["seed"]` the list of
    seeds and `settings["questions"]` their sum."""
    keys = ("kinds", "contexts", "budgets", "model", "frame", "sources")
    first = results[0]["settings"]
    for other in results[1:]:
        differ = [k for k in keys if other["settings"].get(k) != first.get(k)]
        if _rule(other["settings"]) != _rule(first) or any(
                effective_rule(other["settings"], b) != effective_rule(first, b)
                for b in first["budgets"] if b in other["settings"]["budgets"]):
            differ.append("runtime_options")
        if differ:
            raise ValueError(f"runs to merge must share {keys}; these differ: {differ}")
    seeds = [s for r in results for s in (r["settings"]["seed"] if isinstance(r["settings"]["seed"], list)
                                         else [r["settings"]["seed"]])]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"runs to merge must have distinct seeds, got {seeds}")
    records = [rec for r in results for rec in r["records"]]
    if len({(_question(r), r["method"], r["budget"]) for r in records}) != len(records):
        raise ValueError("the runs share questions (same kind, context, depth, source and seed)")
    settings = {**first, "seed": seeds, "questions": sum(r["settings"].get("questions") or 0 for r in results),
                "questions_per_seed": [q for r in results for q in _questions_per_seed(r["settings"])],
                "indexes": list(dict.fromkeys(i for r in results for i in r["settings"].get("indexes") or []))}
    return {**results[0], "settings": settings, "records": records, "summary": summarize(records),
            "merged": [{"environment": r.get("environment"), "seed": r["settings"]["seed"]} for r in results]}


def _rules_of(runtime_options: dict, budgets) -> dict:
    """The rule each budget resolved to (`resolved_rules`) under a run's runtime options."""
    rule = {**CLI_DEFAULTS, **runtime_options}  # CLI_DEFAULTS holds every RULE_DEFAULTS key
    return resolved_rules(budgets, sink=rule["sink"], window=rule["window"], page_size=rule["page_size"])


def effective_rule(settings: dict, budget: int) -> dict:
    """The budget rule a run applied at `budget`: the window and page size it recorded for that budget
    (`settings["rules"]`, written by every run since rules are recorded); for a run without them, its
    runtime options with None resolved under today's defaults (every committed run records its rules, a
    test checks, so a later change of a default cannot rename what they ran)."""
    rule = _rule(settings)
    recorded = (settings.get("rules") or {}).get(str(budget))
    return {**rule, **(recorded if recorded is not None else _rules_of(rule, [budget])[str(budget)])}


def pin_rules(result: dict) -> dict:
    """`result` with `settings["rules"]` filled in for its budgets under today's defaults, for runs that
    recorded None ("the budget's default") before runs recorded what it resolved to. Only for runs made
    under today's defaults: a run of an earlier default must say what it ran instead."""
    settings = result["settings"]
    rules = {**_rules_of(_rule(settings), settings["budgets"]), **(settings.get("rules") or {})}
    return {**result, "settings": {**settings, "rules": rules}}


def join_budgets(results: list[dict]) -> dict:
    """One suite run at today's default rule from runs of the same questions: per budget, the rows of the one
    run that applied there the rule `icecache bench tasks` applies today (a run with window 32 and 16-token
    pages did at budgets 128 and 256, not at 64; its budget-64 rows are left out), full KV's rows from the
    first run (the runs' full-KV answers must agree question by question). The joined run reads as one
    command; `joined` keeps each part's budgets and options."""
    keys = ("kinds", "contexts", "model", "frame", "sources", "seed", "questions")
    first = results[0]["settings"]
    model = lambda settings: settings.get("model") or "smollm2-135m"  # runs without one ran the default model
    for other in results[1:]:
        differ = [k for k in keys if k != "model" and other["settings"].get(k) != first.get(k)]
        differ += ["model"] if model(other["settings"]) != model(first) else []
        if differ:
            raise ValueError(f"runs to join must share {keys}; these differ: {differ}")
    today = _today
    taken = {}  # budget -> the run whose rows are taken
    for i, r in enumerate(results):
        for b in r["settings"]["budgets"]:
            if effective_rule(r["settings"], b) == today(b):
                if b in taken:
                    raise ValueError(f"runs {taken[b]} and {i} both ran budget {b} under today's rule")
                taken[b] = i
    if not taken:
        raise ValueError("no run applied today's rule at any of its budgets")
    records = [dict(rec) for rec in results[0]["records"] if rec["method"] == FULL] + \
              [dict(rec) for i, r in enumerate(results) for rec in r["records"]
               if rec["method"] != FULL and taken.get(rec["budget"]) == i]
    # runs from before task seeds were recorded: a single-seed run's question is its kind, context, depth and
    # source; take its seed from a run that recorded it
    seeds = {_question(rec)[:4]: rec["seed"] for r in results for rec in r["records"] if rec.get("seed") is not None}
    for rec in records:
        if rec.get("seed") is None and _question(rec)[:4] in seeds:
            rec["seed"] = seeds[_question(rec)[:4]]
    if any(_full_answers(r, seeds) != _full_answers(results[0], seeds) for r in results[1:]):
        raise ValueError("the runs to join must ask the same questions with the same full-KV answers")
    settings = {**first, "budgets": sorted(taken), "runtime_options": dict(CLI_DEFAULTS), "model": model(first),
                "rules": {str(b): {k: v for k, v in today(b).items() if k != "select_every"} for b in sorted(taken)},
                "indexes": list(dict.fromkeys(i for r in results for i in r["settings"].get("indexes") or []
                                              if any(rec["method"] == i for rec in records)))}
    return {**results[0], "settings": settings, "records": records, "summary": summarize(records),
            "joined": [{"environment": r.get("environment"), "runtime_options": _rule(r["settings"]),
                        "budgets": sorted(b for b, j in taken.items() if j == i), "merged": r.get("merged")}
                       for i, r in enumerate(results)]}


def add_rows(base: dict, extra: dict) -> dict:
    """`base` with the index rows of `extra`, a run of the same questions (more methods, or a method at more
    budgets): full KV's answers must agree question by question, no (method, budget) may be in both, and
    each added budget must have run under the same rule in both. `added` keeps each addition's environment,
    methods and budgets."""
    if _full_answers(extra) != _full_answers(base):
        raise ValueError("the run to add must ask the same questions as the base with the same full-KV answers")
    rows = [rec for rec in extra["records"] if rec["method"] != FULL]
    have = {(rec["method"], rec["budget"]) for rec in base["records"]}
    clash = sorted({(rec["method"], rec["budget"]) for rec in rows} & have)
    if clash:
        raise ValueError(f"the base already has rows for {clash}; relabel one side first")
    budgets = sorted({rec["budget"] for rec in rows})
    differ = [b for b in budgets if effective_rule(extra["settings"], b) != effective_rule(base["settings"], b)]
    if differ:
        raise ValueError(f"the runs applied different budget rules at budgets {differ}")
    methods = list(dict.fromkeys(rec["method"] for rec in rows))
    records = base["records"] + rows
    settings = {**base["settings"], "indexes": list(dict.fromkeys((base["settings"].get("indexes") or []) + methods))}
    added = base.get("added", []) + [{"environment": extra.get("environment"), "methods": methods, "budgets": budgets}]
    return {**base, "settings": settings, "records": records, "summary": summarize(records), "added": added}


def relabel(result: dict, names: dict[str, str], budgets: list[int] | None = None) -> dict:
    """`result` with its rows of method `old` named `new` for each `old: new` in `names` (at `budgets` only,
    or all), for when a default changes: the rows the old default gave keep the name that reproduces them
    today. `relabelled` keeps each renaming."""
    chosen = lambda rec: rec["method"] in names and (budgets is None or rec["budget"] in budgets)
    have = {(rec["method"], rec["budget"]) for rec in result["records"] if not chosen(rec)}
    records = [{**rec, "method": names[rec["method"]]} if chosen(rec) else rec for rec in result["records"]]
    clash = sorted({(names[rec["method"]], rec["budget"]) for rec in result["records"] if chosen(rec)} & have)
    if clash:
        raise ValueError(f"relabelling would merge rows into existing ones: {clash}")
    left = {rec["method"] for rec in records}
    indexes = []
    for old in result["settings"].get("indexes") or []:
        if old in left:  # an old name stays listed while some of its rows keep it
            indexes.append(old)
        if names.get(old) in left:
            indexes.append(names[old])
    note = {"names": dict(names), "budgets": budgets}
    return {**result, "settings": {**result["settings"], "indexes": list(dict.fromkeys(indexes))},
            "records": records, "summary": summarize(records), "relabelled": result.get("relabelled", []) + [note]}


def summarize(records: list[dict]) -> list[dict]:
    """Per (method, budget), over every context: accuracy per task kind and overall with its 95% Wilson
    interval, the share of full KV's answers kept, and paired comparisons (McNemar's exact test on the
    same questions) against full KV and against `exact` at the same budget."""
    answered = {}  # (method, budget) -> {question: correct}
    for r in records:
        answered.setdefault((r["method"], r["budget"]), {})[_question(r)] = bool(r["correct"])
    full = answered.get((FULL, None), {})
    rows = []
    methods = list(dict.fromkeys(method for method, _ in answered))  # full KV first, then in order of appearance
    for (method, budget), mine in sorted(answered.items(), key=lambda item: (methods.index(item[0][0]),
                                                                          item[0][1] or 0)):
        of_method = [r for r in records if r["method"] == method and r["budget"] == budget]
        row = {"method": method, "budget": "all" if budget is None else budget, "questions": len(mine)}
        for kind in dict.fromkeys(r["kind"] for r in of_method):
            of_kind = [r for r in of_method if r["kind"] == kind]
            row[kind] = sum(r["correct"] for r in of_kind) / len(of_kind)
        correct = sum(mine.values())
        row["accuracy"] = correct / len(mine)
        row["ci_low"], row["ci_high"] = wilson_interval(correct, len(mine))
        kept = [q for q, ok in full.items() if ok and q in mine]
        row["of_full_kv"] = sum(mine[q] for q in kept) / len(kept) if kept else float("nan")
        for other, key in (((FULL, None), "vs_full"), (("exact", budget), "vs_exact")):
            if other in answered and other != (method, budget):
                paired = Paired.compare(mine, answered[other])
                row[f"{key}_gained"], row[f"{key}_lost"], row[f"{key}_p"] = (
                    paired.only_this, paired.only_other, paired.p_value)
        rows.append(row)
    return rows


def format_tasks(result: dict) -> str:
    """The summary table: accuracy per kind, overall with its 95% interval, kept share of full KV's
    answers, and the paired counts (+ answered only by this row, - only by the other) with McNemar p."""
    kinds = result["settings"]["kinds"]
    rows = []
    for r in result["summary"]:
        row = dict(r)
        row["ci"] = f"{r['ci_low']:.2f}-{r['ci_high']:.2f}" if "ci_low" in r else None
        for key in ("vs_full", "vs_exact"):
            if f"{key}_p" in r:
                row[key] = f"+{r[f'{key}_gained']}/-{r[f'{key}_lost']} p={r[f'{key}_p']:.2f}"
        rows.append(row)
    columns = [("method", "method", ""), ("budget", "budget", ""), ("questions", "n", "d")] + \
              [(k, k, ".2f") for k in kinds] + \
              [("accuracy", "all", ".2f"), ("ci", "95% CI", ""), ("of_full_kv", "kept of full KV", ".2f"),
               ("vs_full", "vs full KV", ""), ("vs_exact", "vs exact", "")]
    return table(rows, columns)


def _today(budget: int) -> dict:
    """The rule `icecache bench tasks` applies at `budget` when not told."""
    return {**CLI_DEFAULTS, **_rules_of(CLI_DEFAULTS, [budget])[str(budget)]}


def _rule_flags(settings: dict) -> list[str]:
    """The rule options that reproduce a run today: those it set, and for those it left to the budget's
    default, the values it resolved to where today's default differs (one per budget when they differ)."""
    rule, budgets = _rule(settings), settings["budgets"]
    flags = []
    for key, value in rule.items():
        flag = f"--{key.replace('_', '-')}"
        if value is not None and value != CLI_DEFAULTS[key]:
            flags.append(f"{flag} {value}")
        elif value is None and any(effective_rule(settings, b)[key] != _today(b)[key] for b in budgets):
            ran = [effective_rule(settings, b)[key] for b in budgets]
            flags.append(f"{flag} {ran[0]}" if len(set(ran)) == 1 else
                         f"{flag} {' / '.join(map(str, ran))} (at budgets {' / '.join(map(str, budgets))})")
    return flags


def _rule_words(settings: dict) -> str:
    """Where a run's rule differs from today's default, what it ran ("; page 16 at budgets 128 / 256");
    "" where it is today's at every budget."""
    differ: dict[tuple, list[str]] = {}  # (what differs, as words) -> budgets
    for b in settings["budgets"]:
        ran, today = effective_rule(settings, b), _today(b)
        words = tuple(f"{name} {ran[key]}" for key, name in (("window", "window"), ("page_size", "page"))
                      if ran[key] != today[key])
        if words:
            differ.setdefault(words, []).append(str(b))
    return "".join(f"; {' and '.join(words)} at budget{'s' if len(budgets) > 1 else ''} {' / '.join(budgets)}"
                   for words, budgets in differ.items())


def _command(result: dict) -> str:
    s = result["settings"]
    indexes = s.get("indexes") or list(dict.fromkeys(r["method"] for r in result["records"] if r["method"] != FULL))
    parts = ["icecache bench tasks", f"--kinds {' '.join(s['kinds'])}",
             f"--contexts {' '.join(map(str, s['contexts']))}"]
    parts += [f"--questions {s['questions']}"] if s.get("questions") else [f"--depths {' '.join(map(str, s['depths']))}"]
    parts += [f"--sources {' '.join(_prose(s))}", f"--budgets {' '.join(map(str, s['budgets']))}",
              f"--indexes {' '.join(indexes)}"]
    seeds = s["seed"] if isinstance(s["seed"], list) else [s["seed"]]
    if len(seeds) > 1 and s.get("questions"):  # merged runs (`merge_runs`): one command per seed
        per_seed = _questions_per_seed(s)
        asked = str(per_seed[0]) if len(set(per_seed)) == 1 else " / ".join(map(str, per_seed))
        parts[parts.index(f"--questions {s['questions']}")] = f"--questions {asked}"
    parts.append(f"--seed {' / '.join(map(str, seeds))}")
    parts += _rule_flags(s)
    if s.get("model"):
        parts.append(f"--model {s['model']}")
    return " ".join(parts)


#: where the committed runs live: the suite at today's budget rule, and the runs it superseded
SUITE, HISTORY = ("benchmarks/tasks_suite", "benchmarks/TASKS.md"), ("benchmarks/tasks_history", "benchmarks/TASKS_HISTORY.md")


def render_suite(results: list[dict], where: tuple[str, str] = SUITE) -> str:
    """benchmarks/TASKS.md from the committed suite runs, `benchmarks/tasks_suite/*.json` in name order (or
    `where=HISTORY`: TASKS_HISTORY.md from the runs of earlier budget rules): one table per run and context
    (a test re-renders both, so the text cannot drift from the runs)."""
    folder, page = where
    title = ("Task suite: answers kept, with intervals and paired tests" if where == SUITE else
             "Task suite history: runs of earlier budget rules and index variants")
    lines = [
        f"# {title}",
        "",
        f"Generated by `icecache.bench.tasks.render_suite` from `{folder}/*.json`; re-render with:",
        "",
        "```bash",
        f".venv/bin/python -m icecache.bench.tasks {folder}/*.json > {page}",
        "```",
        "",
        "Per row: accuracy per task kind and overall with its 95% Wilson interval; `kept of full KV`, the share of "
        "the questions full KV answers that the row answers too; and paired counts on the same questions against "
        "full KV and against `exact` at the same budget (+ answered only by this row, - only by the other) with "
        "McNemar's exact p. Greedy decoding, exact match; one dense prefill per question is shared by every row.",
        "",
    ]
    for result in results:
        env = result.get("environment", {})
        for context in result["settings"]["contexts"]:
            records = [r for r in result["records"] if r["context"] == context]
            if not records:
                continue
            n = len({_question(r) for r in records})
            model = result["settings"].get("model", "smollm2-135m")
            prose = ", ".join(_prose(result["settings"]))
            lines += [f"## ~{context} tokens, {n} questions ({model}; prose {prose})", "",
                      f"`{_command(result)}` ({env.get('device', 'cpu')}, {env.get('date', '')})", ""]
            if result.get("notes"):  # how the run's rows came together (merged, joined, added, relabelled)
                lines += [f"Notes: {result['notes']}", ""]
            lines += [format_tasks({**result, "summary": summarize(records)}), ""]
    return "\n".join(lines)


README_START, README_END = "<!-- tasks-suite:start -->", "<!-- tasks-suite:end -->"


#: the token-order oracle the README shows beside the default index
ORACLE = "exact"


def readme_methods(result: dict) -> tuple[str, ...]:
    """The methods a run's README line shows: the default index, the names its rows from earlier defaults
    were given (`relabel`: where the run has not measured today's default at every budget yet, they stand
    beside it; an earlier default renamed again by a later relabel shows under its latest name, newest
    default first), and the token-order oracle."""
    earlier: list[str] = []
    for note in result.get("relabelled", []):
        names = note["names"]
        earlier = [names.get(name, name) for name in earlier]
        if DEFAULT_INDEX in names:
            earlier.insert(0, names[DEFAULT_INDEX])
    return (DEFAULT_INDEX, *dict.fromkeys(earlier), ORACLE)


def suite_readme_block(results: list[dict], methods: tuple[str, ...] | None = None) -> str:
    """The README's needle-question lines: per suite run and context, the share of full KV's answers that
    `methods` (by default `readme_methods(run)`) keep at each budget ("-" where a method did not run; from the
    same JSON as benchmarks/TASKS.md)."""
    lines = []
    for result in results:
        shown = methods or readme_methods(result)
        for context in result["settings"]["contexts"]:
            records = [r for r in result["records"] if r["context"] == context]
            if not records:
                continue
            summary = summarize(records)
            full = next(r for r in summary if r["method"] == FULL)
            budgets = sorted({r["budget"] for r in summary if r["method"] != FULL})
            kept = {(r["method"], r["budget"]): r["of_full_kv"] for r in summary}
            shares = "; ".join(f"{m} " + " / ".join(f"{kept[(m, b)]:.2f}" if (m, b) in kept else "-" for b in budgets)
                               for m in shown if any((m, b) in kept for b in budgets))
            model = result["settings"].get("model", "smollm2-135m")
            rule = _rule_words(result["settings"])
            lines.append(f"- {model}, ~{context} tokens, {len({_question(r) for r in records})} questions "
                         f"({', '.join(result['settings']['kinds'])}; prose {', '.join(_prose(result['settings']))}; "
                         f"full KV answers "
                         f"{full['accuracy']:.2f}{rule}): "
                         f"share of full KV's answers kept at budget{'s' if len(budgets) > 1 else ''} "
                         f"{' / '.join(map(str, budgets))}: {shares}")
    return "\n".join(lines)


def sync_readme(text: str, results: list[dict]) -> str:
    """`text` (the README) with its task-suite block replaced by `suite_readme_block(results)`."""
    return replace_block(text, README_START, README_END, suite_readme_block(results))


def _add_note(result: dict, note: str | None) -> dict:
    if note:  # how the file's rows came together, rendered under its table
        result["notes"] = f"{result.get('notes', '')} {note}".strip()
    return result


def main(argv: list[str] | None = None) -> int:
    """Render the suite (TASKS.md, TASKS_HISTORY.md, the README block) or combine run files; see
    benchmarks/README.md for each use."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m icecache.bench.tasks", description=main.__doc__)
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--merge", metavar="OUT", help="runs of the same settings with other seeds -> OUT")
    action.add_argument("--join", metavar="OUT", help="runs of the same questions at other budgets -> OUT")
    action.add_argument("--add", metavar="OUT", help="the first run with more methods on its questions -> OUT")
    action.add_argument("--relabel", nargs=2, metavar=("OUT", "IN"),
                        help="IN's rows renamed by the OLD->NEW pairs given as inputs -> OUT")
    parser.add_argument("inputs", nargs="*", help="run JSON files (OLD->NEW pairs for --relabel)")
    parser.add_argument("--budgets", type=int, nargs="+", default=None, help="--relabel: only these budgets' rows")
    parser.add_argument("--note", default=None, help="appended to the written file's notes (rendered with its table)")
    parser.add_argument("--readme", default=None, help="rewrite this README's task-suite block instead of printing")
    args = parser.parse_args(argv)

    def load(path: str) -> dict:
        return json.loads(Path(path).read_text())

    out = args.merge or args.join or args.add
    if out:
        runs = [load(p) for p in args.inputs]
        if args.add:
            combined = runs[0]
            for extra in runs[1:]:
                combined = add_rows(combined, extra)
        else:
            combined = (merge_runs if args.merge else join_budgets)(runs)
        Path(out).write_text(json.dumps(_add_note(combined, args.note), indent=1))
        return 0
    if args.relabel:
        out, source = args.relabel
        if not args.inputs or any("->" not in pair for pair in args.inputs):
            parser.error(f"--relabel takes OLD->NEW pairs after OUT and IN, got {args.inputs}")
        result = relabel(load(source), dict(pair.split("->", 1) for pair in args.inputs), args.budgets)
        Path(out).write_text(json.dumps(_add_note(result, args.note), indent=1))
        return 0
    runs = [load(p) for p in sorted(args.inputs)]
    if args.readme:
        Path(args.readme).write_text(sync_readme(Path(args.readme).read_text(), runs))
    else:
        history = args.inputs and Path(args.inputs[0]).parent.name == Path(HISTORY[0]).name
        print(render_suite(runs, HISTORY if history else SUITE), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
