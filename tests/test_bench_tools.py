"""Benchmark plumbing that needs no model download: the kernel bench and random-weight timing models."""

import pytest
import torch

from icecache.bench.common import random_model
from icecache.index import parse_index_spec
from icecache.bench.kernel import format_kernel, run_kernel


def test_kernel_bench_times_every_kernel_on_tiny_shapes():
    result = run_kernel(contexts=(256,), budgets=(64, 512), kv_heads=2, q_heads=4, head_dim=16,
                        dtype=torch.float32, device="cpu", repeats=2)
    kernels = [(r["budget"], r["kernel"]) for r in result["rows"]]
    # budget 512 > context 256 is skipped; triton is not timed under the interpreter
    assert kernels == [(None, "sdpa dense"), (64, "paged (torch)"), (64, "sdpa gathered")]
    for row in result["rows"]:
        assert row["ms"] > 0 and row["bytes_read"] > 0 and row["bandwidth_share"] > 0
    assert result["rows"][1]["bytes_read"] == 2 * 2 * 64 * 16 * 4
    assert "copy bandwidth" in format_kernel(result)


def test_random_model_has_the_named_shape():
    model = random_model("smollm2-135m", layers=2)
    assert model.config.num_hidden_layers == 2 and model.config.num_key_value_heads == 3
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 49152)
    with pytest.raises(ValueError, match="shape must be one of"):
        random_model("gpt-5")


def test_random_models_prompt_with_a_tokenizer_folder_and_load_no_weights(tmp_path):
    # what a lent GPU without the embedded model runs: `--tokenizer DIR` (as benchmarks/gpu_prepare.sh writes it)
    import argparse

    from icecache.bench.cli import _load_model
    from icecache.models import load_tokenizer

    default = load_tokenizer()
    default.save_pretrained(tmp_path)
    model, tokenizer = _load_model(argparse.Namespace(model="random-llama-8b", tokenizer=str(tmp_path)))
    assert model is None and tokenizer("a pass key is 4821").input_ids == default("a pass key is 4821").input_ids
    model, tokenizer = _load_model(argparse.Namespace(model="random-smollm2-135m", tokenizer=None))
    assert model is None and tokenizer.vocab_size == default.vocab_size


def test_demo_tables_are_rendered_from_the_committed_json():
    # the README and RESULTS.md quote the demo's last run: exactly what benchmarks/demo/demo.json renders to
    import json
    from pathlib import Path

    from icecache.demo import render_demo, sync_demo_block

    root = Path(__file__).resolve().parents[1]
    demo = json.loads((root / "benchmarks" / "demo" / "demo.json").read_text())
    for name in ("README.md", "benchmarks/RESULTS.md"):
        text = (root / name).read_text()
        assert text == sync_demo_block(text, demo), \
            f"{name}'s demo block is stale: python -m icecache.demo benchmarks/demo/demo.json README.md benchmarks/RESULTS.md"
    rendered = render_demo(demo)
    full = next(r for r in demo["rows"] if r["method"] == "full KV")
    assert f"{full['correct']}/{full['total']}" in rendered and f"{demo['wall_seconds']:.0f} s wall" in rendered


def test_long_context_results_are_rendered_from_the_committed_json():
    # README and docs quote benchmarks/LONG_CONTEXT.md, which must be what the committed JSON renders to
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("render_long_context", root / "benchmarks" / "render_long_context.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    assert (root / "benchmarks" / "LONG_CONTEXT.md").read_text() == render.render()
    readme = (root / "README.md").read_text()
    assert readme == render.sync_readme(readme)


@pytest.mark.model
def test_vllm_results_are_rendered_from_the_committed_json():
    import json
    from pathlib import Path

    from icecache.bench.vllm import render_results

    root = Path(__file__).resolve().parents[1]
    results = [json.loads(p.read_text()) for p in sorted((root / "benchmarks" / "vllm").glob("*.json"))]
    assert results
    assert (root / "benchmarks" / "VLLM.md").read_text() == render_results(results), \
        "benchmarks/VLLM.md is stale: python -m icecache.bench.vllm benchmarks/vllm/*.json > benchmarks/VLLM.md"


def test_vllm_runs_are_described_by_the_budget_rule_they_recorded():
    # a run records its resolved rule, so a later change of the default rule cannot relabel it; a run from
    # before that recorded none ran the old rule at budget 256
    import json
    from pathlib import Path

    from icecache.bench.vllm import _rule_of, render_results
    from icecache.runtime.budget import Budget

    root = Path(__file__).resolve().parents[1]
    run = json.loads((root / "benchmarks" / "vllm" / "vllm_8k_x16.json").read_text())
    assert _rule_of(Budget(tokens=256, page_size=8, window=24)) == {"sink": 16, "window": 24, "page_size": 8}
    run["settings"].update(_rule_of(Budget(tokens=256, page_size=8, window=24)))
    assert "budget 256 (sink 16, window 24, page 8)" in render_results([run])
    for key in ("sink", "window", "page_size"):
        run["settings"].pop(key)
    assert "budget 256 (sink 16, window 32, page 16)" in render_results([run])


def test_latency_bench_accounts_every_phase_per_batch(smollm, tmp_path):
    from icecache.bench.latency import format_latency, plot_latency, run_latency

    _, tokenizer = smollm
    model = random_model("smollm2-135m", layers=4)
    result = run_latency(model, tokenizer, contexts=(600,), indexes=("exact", "tree"), budget=64, steps=2,
                         warmup=1, batches=(1, 2), floor_context=300)
    rows = result["rows"]
    assert [(r["batch"], r["method"]) for r in rows] == [
        (1, "floor (full KV)"), (2, "floor (full KV)"), (1, "full KV"), (1, "exact"), (1, "tree"),
        (2, "full KV"), (2, "exact"), (2, "tree")]
    for r in rows:
        if r["method"] in ("exact", "tree"):
            parts = ("admit_ms", "search_ms", "transfer_ms", "attention_ms", "other_ms", "model_ms")
            assert sum(r[p] for p in parts) == pytest.approx(r["step_ms"])
            assert all(r[p] > 0 for p in parts), {p: r[p] for p in parts}
            assert r["sparse_layer_kv_ratio"] <= (64 + 32) / 600
        else:
            assert r["model_ms"] == pytest.approx(r["step_ms"])
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * 1e3 / r["step_ms"])
        # the methods ran in turn twice from fresh caches; each row keeps its fastest pass, ratios against
        # full KV's fastest
        assert len(r["step_ms_passes"]) == 2 and r["step_ms"] == pytest.approx(min(r["step_ms_passes"]))
        full = next(f for f in rows if f["method"] in ("full KV", "floor (full KV)") and f["batch"] == r["batch"]
                    and f["context"] == r["context"])
        assert r["ratio"] == pytest.approx(r["step_ms"] / full["step_ms"])
    assert "other ms" in format_latency(result) and "model ms" in format_latency(result)
    plot_latency(result, tmp_path / "latency.png")
    assert (tmp_path / "latency.png").stat().st_size > 0


def test_index_specs_name_variants_of_an_index():
    assert parse_index_spec("tree") == ("tree", {})
    assert parse_index_spec("tree:hot_layout=spans,hot_pages=4,span_share=0.5") == (
        "tree", {"hot_layout": "spans", "hot_pages": 4, "span_share": 0.5})
    with pytest.raises(ValueError, match="option=value"):
        parse_index_spec("tree:hot_pages")


def test_task_suite_tables_are_rendered_from_the_committed_json():
    import json
    from pathlib import Path

    from icecache.bench.tasks import HISTORY, render_suite, sync_readme

    root = Path(__file__).resolve().parents[1]
    results = [json.loads(p.read_text()) for p in sorted((root / "benchmarks" / "tasks_suite").glob("*.json"))]
    assert results
    assert (root / "benchmarks" / "TASKS.md").read_text() == render_suite(results), \
        "benchmarks/TASKS.md is stale: python -m icecache.bench.tasks benchmarks/tasks_suite/*.json > benchmarks/TASKS.md"
    readme = (root / "README.md").read_text()
    assert readme == sync_readme(readme, results), \
        "README's task lines are stale: python -m icecache.bench.tasks benchmarks/tasks_suite/*.json --readme README.md"
    history = [json.loads(p.read_text()) for p in sorted((root / "benchmarks" / "tasks_history").glob("*.json"))]
    assert (root / "benchmarks" / "TASKS_HISTORY.md").read_text() == render_suite(history, HISTORY), \
        "TASKS_HISTORY.md is stale: python -m icecache.bench.tasks benchmarks/tasks_history/*.json > benchmarks/TASKS_HISTORY.md"


def test_suite_questions_are_the_questions_every_committed_run_asked():
    """Replay tools (`replay_questions.py`, `hot_token_ranks.py`) rebuild a run's question from
    `suite_question`; every committed run's records must be exactly what `suite_questions` plans."""
    import json
    from pathlib import Path

    from icecache.bench.tasks import _questions_per_seed, suite_question, suite_questions

    root = Path(__file__).resolve().parents[1]
    checked = 0
    for path in sorted((root / "benchmarks" / "tasks_suite").glob("*.json")):
        run = json.loads(path.read_text())
        s = run["settings"]
        seeds = s["seed"] if isinstance(s["seed"], list) else [s["seed"]]
        planned = {(q.kind, q.context, round(q.depth, 6), q.source, q.seed)
                   for seed, per_seed in zip(seeds, _questions_per_seed(s))
                   for q in suite_questions(s["kinds"], s["contexts"], seed, s["sources"], per_seed)}
        asked = {(r["kind"], r["context"], round(r["depth"], 6), r["source"], r["seed"]) for r in run["records"]}
        assert asked == planned, path.name
        checked += len(asked)
    assert checked > 1000
    third = suite_question(["passkey", "twohop"], "twohop", 2, questions=4, seed=500, sources=["pydoc", "numpy"],
                           context=2048)
    assert (third.seed, third.source, third.depth) == (1502, "pydoc", 0.625)
    with pytest.raises(ValueError, match="pick must be in 0 .. 3"):
        suite_question(["passkey"], "passkey", 4, questions=4, seed=0, sources=["pydoc"], context=2048)
    with pytest.raises(ValueError, match="kind 'vartrack' is not among"):
        suite_question(["passkey"], "vartrack", 0, questions=4, seed=0, sources=["pydoc"], context=2048)


def test_merged_task_runs_count_every_question_once():
    from icecache.bench.tasks import _command, merge_runs, suite_readme_block

    def run(seed: int, answers: list[bool]) -> dict:
        records = []
        for j, ok in enumerate(answers):
            question = {"kind": "passkey", "context": 1000, "depth": 0.25, "source": "pydoc", "seed": seed + j}
            records += [{**question, "method": "full KV", "budget": None, "correct": True},
                        {**question, "method": "tree", "budget": 64, "correct": ok}]
        settings = {"kinds": ["passkey"], "contexts": [1000], "budgets": [64], "model": "smollm2-135m",
                    "frame": "inline", "sources": ["pydoc"], "questions": len(answers), "seed": seed,
                    "indexes": ["tree"], "depths": [0.25]}
        return {"benchmark": "tasks", "settings": settings, "records": records}

    merged = merge_runs([run(0, [True, False]), run(500, [True, True, True])])
    tree = next(r for r in merged["summary"] if r["method"] == "tree")
    assert tree["questions"] == 5 and tree["of_full_kv"] == pytest.approx(4 / 5)
    assert merged["settings"]["seed"] == [0, 500] and merged["settings"]["questions"] == 5
    assert "--seed 0 / 500" in _command(merged)
    with pytest.raises(ValueError, match="distinct seeds"):
        merge_runs([run(0, [True]), run(0, [True])])
    other = run(500, [True])
    other["settings"]["budgets"] = [128]
    with pytest.raises(ValueError, match="budgets"):
        merge_runs([run(0, [True]), other])
    older = run(500, [True])  # a run from before --sink / --window were recorded ran the default rule
    older["settings"]["runtime_options"] = {"select_every": 1}
    merge_runs([run(0, [True]), older])
    window = run(500, [True])
    window["settings"]["runtime_options"] = {"select_every": 1, "sink": 16, "window": 16}
    with pytest.raises(ValueError, match="runtime_options"):
        merge_runs([run(0, [True]), window])
    assert "--window 16" in _command(window) and "--sink" not in _command(window)
    # a run without --window took the budget's default window (16 at budget 64): not the older runs' 32
    by_budget = run(700, [True])
    by_budget["settings"]["runtime_options"] = {"select_every": 1, "sink": 16, "window": None}
    with pytest.raises(ValueError, match="runtime_options"):
        merge_runs([older, by_budget])
    assert "--window" not in _command(by_budget) and "--window 32" in _command(older)
    pages = run(800, [True])  # a run with 8-token pages: not merged with 16-token ones, its command says so
    pages["settings"]["runtime_options"] = {"select_every": 1, "sink": 16, "window": None, "page_size": 8}
    with pytest.raises(ValueError, match="runtime_options"):
        merge_runs([by_budget, pages])
    assert "--page-size 8" in _command(pages) and "--page-size 16" in _command(by_budget)  # ran before the rule
    rule = run(900, [True])  # today's default: window and page size both follow the budget
    rule["settings"]["runtime_options"] = {"select_every": 1, "sink": 16, "window": None, "page_size": None}
    assert "--page-size" not in _command(rule) and "--window" not in _command(rule)
    assert "page 16" in suite_readme_block([by_budget]) and "page" not in suite_readme_block([rule])


def test_task_runs_keep_the_rule_they_recorded_when_the_default_differs():
    # a run records what each budget resolved to; read back, that and not today's default is its rule
    from icecache.bench.tasks import _command, effective_rule, merge_runs, pin_rules, suite_readme_block
    from icecache.runtime.budget import resolved_rules

    def run(seed: int, rules: dict | None) -> dict:
        question = {"kind": "passkey", "context": 1000, "depth": 0.25, "source": "pydoc", "seed": seed}
        records = [{**question, "method": "full KV", "budget": None, "correct": True},
                   {**question, "method": "tree", "budget": 128, "correct": True}]
        settings = {"kinds": ["passkey"], "contexts": [1000], "budgets": [128], "model": "smollm2-135m",
                    "frame": "inline", "sources": ["pydoc"], "questions": 1, "seed": seed, "indexes": ["tree"],
                    "depths": [0.25], "runtime_options": {"select_every": 1, "sink": 16, "window": None,
                                                          "page_size": None}}
        return {"benchmark": "tasks", "settings": {**settings, **({"rules": rules} if rules else {})},
                "records": records}

    other_default = run(0, {"128": {"sink": 16, "window": 24, "page_size": 4}})  # made under another default
    assert effective_rule(other_default["settings"], 128)["page_size"] == 4
    assert "--window 24 --page-size 4" in _command(other_default)
    assert "window 24 and page 4 at budget 128)" in suite_readme_block([other_default])
    today = pin_rules(run(500, None))  # a run that left both to today's default, pinned
    assert today["settings"]["rules"] == resolved_rules([128])
    assert "--page-size" not in _command(today) and "page" not in suite_readme_block([today])
    with pytest.raises(ValueError, match="runtime_options"):
        merge_runs([today, other_default])


def test_committed_runs_record_every_rule_they_left_to_a_default():
    # benchmark JSON whose options leave the window or page size to the budget's default must say what it
    # resolved to (`settings["rules"]`): otherwise changing a default would silently rename what they ran
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for path in sorted((root / "benchmarks").rglob("*.json")):
        result = json.loads(path.read_text())
        if not isinstance(result, dict) or "settings" not in result:
            continue
        s = result["settings"]
        options = {**s, **(s.get("runtime_options") or {})}
        if any(key in options and options[key] is None for key in ("window", "page_size")):
            budgets = s.get("budgets") or [s["budget"]]
            assert sorted(map(int, s.get("rules", {}))) == sorted(budgets), path.relative_to(root)


def test_joined_runs_take_each_budget_from_the_run_with_todays_rule():
    from icecache.bench.tasks import _command, join_budgets
    from icecache.runtime.budget import resolved_rules

    def run(budgets, options, answers, full=(True, True)):
        records = []
        for j, (full_ok, ok) in enumerate(zip(full, answers)):
            question = {"kind": "passkey", "context": 1000, "depth": 0.25 + j / 4, "source": "pydoc", "seed": j}
            records.append({**question, "method": "full KV", "budget": None, "correct": full_ok, "output": "x"})
            records += [{**question, "method": "tree", "budget": b, "correct": ok} for b in budgets]
        settings = {"kinds": ["passkey"], "contexts": [1000], "budgets": budgets, "model": "smollm2-135m",
                    "frame": "inline", "sources": ["pydoc"], "questions": 2, "seed": 0, "indexes": ["tree"],
                    "depths": [0.25], "runtime_options": options}
        return {"benchmark": "tasks", "settings": settings, "records": records}

    today = {"select_every": 1, "sink": 16, "window": None, "page_size": None}
    older = run([64, 128, 256], today, [False, True])  # its budget 64 ran an earlier rule, 128 / 256 today's
    older["settings"]["rules"] = {**resolved_rules([128, 256]), "64": {"sink": 16, "window": 32, "page_size": 16}}
    pages = run([64], today, [True, True])
    joined = join_budgets([older, pages])
    assert joined["settings"]["budgets"] == [64, 128, 256]
    assert [r["correct"] for r in joined["records"] if r["budget"] == 64] == [True, True]  # from the page-8 run
    assert len([r for r in joined["records"] if r["method"] == "full KV"]) == 2
    assert "--window" not in _command(joined) and "--page-size" not in _command(joined)
    assert join_budgets([older])["settings"]["budgets"] == [128, 256]  # its budget 64 ran another rule
    with pytest.raises(ValueError, match="full-KV answers"):
        join_budgets([older, run([64], pages["settings"]["runtime_options"], [True, True], full=(True, False))])
    with pytest.raises(ValueError, match="both ran budget 64"):
        join_budgets([pages, pages])


def test_added_rows_and_relabelled_defaults_keep_the_questions_paired(tmp_path):
    from icecache.bench.tasks import add_rows, readme_methods, relabel, suite_readme_block

    def run(method, budgets, answers, full=(True, True)):
        records = []
        for j, (full_ok, ok) in enumerate(zip(full, answers)):
            question = {"kind": "passkey", "context": 1000, "depth": 0.25 + j / 4, "source": "pydoc", "seed": j}
            records.append({**question, "method": "full KV", "budget": None, "correct": full_ok})
            records += [{**question, "method": method, "budget": b, "correct": ok} for b in budgets]
        settings = {"kinds": ["passkey"], "contexts": [1000], "budgets": budgets, "questions": 2, "seed": 0,
                    "indexes": [method], "runtime_options": {"select_every": 1, "sink": 16, "window": None,
                                                             "page_size": None}}
        return {"benchmark": "tasks", "settings": settings, "records": records}

    base = run("tree", [64, 128], [False, True])
    variant = run("tree:span_reach=16", [128], [True, True])
    # the default changed at budget 128: the old rows keep the name that reproduces them, the new take "tree"
    adopted = add_rows(relabel(base, {"tree": "tree:span_reach=8"}, [128]),
                       relabel(variant, {"tree:span_reach=16": "tree"}))
    kept = {(r["method"], r["budget"]): r["of_full_kv"] for r in adopted["summary"]}
    assert kept[("tree", 64)] == 0.5 and kept[("tree", 128)] == 1.0 and kept[("tree:span_reach=8", 128)] == 0.5
    assert adopted["settings"]["indexes"] == ["tree", "tree:span_reach=8"] and len(adopted["records"]) == 8
    assert adopted["added"][0]["methods"] == ["tree"] and adopted["relabelled"][0]["budgets"] == [128]
    # the README line shows the old default's rows beside today's until today's cover every budget
    assert readme_methods(adopted) == ("tree", "tree:span_reach=8", "exact") and readme_methods(base) == ("tree", "exact")
    assert "tree 0.50 / 1.00; tree:span_reach=8 - / 0.50" in suite_readme_block([adopted])
    # a second default change renames both earlier defaults' rows; the line follows them, newest first
    again = relabel(adopted, {"tree": "tree:follow_copy=False", "tree:span_reach=8": "tree:span_reach=8,follow_copy=False"})
    assert readme_methods(again) == ("tree", "tree:follow_copy=False", "tree:span_reach=8,follow_copy=False", "exact")
    with pytest.raises(ValueError, match="already has rows"):
        add_rows(base, run("tree", [128], [True, True]))
    with pytest.raises(ValueError, match="full-KV answers"):
        add_rows(base, run("exact", [128], [True, True], full=(True, False)))
    with pytest.raises(ValueError, match="merge rows"):
        relabel(add_rows(base, variant), {"tree:span_reach=16": "tree"})
    other_rule = run("exact", [128], [True, True])
    other_rule["settings"]["runtime_options"] = {**other_rule["settings"]["runtime_options"], "page_size": 4}
    with pytest.raises(ValueError, match="budget rules"):
        add_rows(base, other_rule)
    # the same through the module's command line, each written file carrying a note of how it came together
    import json

    from icecache.bench.tasks import main

    for name, result in (("base", base), ("variant", variant)):
        (tmp_path / f"{name}.json").write_text(json.dumps(result))
    assert main(["--relabel", str(tmp_path / "old.json"), str(tmp_path / "base.json"), "tree->tree:span_reach=8",
                 "--budgets", "128", "--note", "renamed."]) == 0
    assert main(["--relabel", str(tmp_path / "new.json"), str(tmp_path / "variant.json"), "tree:span_reach=16->tree"]) == 0
    assert main(["--add", str(tmp_path / "out.json"), str(tmp_path / "old.json"), str(tmp_path / "new.json"),
                 "--note", "added."]) == 0
    written = json.loads((tmp_path / "out.json").read_text())
    assert written["summary"] == adopted["summary"] and written["notes"] == "renamed. added."
    with pytest.raises(SystemExit):  # a pair without "->" is a usage error, not a traceback
        main(["--relabel", str(tmp_path / "x.json"), str(tmp_path / "base.json"), "tree"])


def test_latency_tables_are_rendered_from_the_committed_json():
    import json
    from pathlib import Path

    from icecache.bench.latency import render_latency, sync_readme

    root = Path(__file__).resolve().parents[1]
    results = [json.loads(p.read_text()) for p in sorted((root / "benchmarks" / "latency").glob("*.json"))]
    assert results
    assert (root / "benchmarks" / "LATENCY.md").read_text() == render_latency(results), \
        "benchmarks/LATENCY.md is stale: python -m icecache.bench.latency benchmarks/latency/*.json > benchmarks/LATENCY.md"
    readme = (root / "README.md").read_text()
    assert readme == sync_readme(readme, results), \
        "README's latency lines are stale: python -m icecache.bench.latency benchmarks/latency/*.json --readme README.md"
    for result in results:  # every sparse row's parts add up to its step
        for r in result["rows"]:
            if r.get("search_ms") is not None:
                parts = ("admit_ms", "search_ms", "transfer_ms", "attention_ms", "other_ms", "model_ms")
                assert sum(r[p] for p in parts) == pytest.approx(r["step_ms"])


def test_latency_bench_names_a_bad_pass_count():
    from icecache.bench.latency import run_latency

    with pytest.raises(ValueError, match="passes must be a positive int"):
        run_latency(None, None, passes=0)


@pytest.mark.model
def test_recall_bench_reads_the_named_prose_source(smollm, monkeypatch):
    from icecache.bench import recall as recall_bench
    from icecache.tasks import torch_prose

    model, tokenizer = smollm
    read = []
    real_prompt_ids = recall_bench.prompt_ids
    monkeypatch.setattr(recall_bench, "prompt_ids", lambda tok, tokens, prose: read.append(prose) or
                        real_prompt_ids(tok, tokens, prose))
    result = recall_bench.run_recall(model, tokenizer, contexts=(512,), budgets=(64,), indexes=["window", "exact"],
                                     steps=2, layers=[2], source="torch")
    assert read == [torch_prose()] and result["settings"]["prose"] == "torch docstrings"
    recall = {row["index"]: row["recall"] for row in result["rows"]}
    assert 0 <= recall["window"] <= 1 and 0 < recall["exact"] <= recall[recall_bench.CEILING] <= 1


def test_readme_recall_figures_are_the_committed_json():
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def recall(folder: str, index: str) -> str:  # 4k, budget 256
        rows = json.loads((root / "benchmarks" / folder / "recall.json").read_text())["rows"]
        row = next(r for r in rows if (r["context"], r["index"], r["budget"]) == (4096, index, 256))
        return f"{row['recall']:.3f}"

    # today's rule (8-token pages), on pydoc_data and on PyTorch's docstrings
    claim = (f"4k recall {recall('recall_page8', 'tree')} at budget 256, against {recall('recall_page8', 'exact')} "
             f"for `exact`; {recall('recall_page8_torch', 'tree')} against {recall('recall_page8_torch', 'exact')} "
             f"on PyTorch's docstrings")
    assert claim in " ".join((root / "README.md").read_text().split())


def test_host_sync_reports_are_counted_at_their_call_site():
    # on CUDA, torch reports each synchronising call as a warning; here the reports are raised by hand
    import traceback
    import warnings
    from pathlib import Path

    from icecache.bench.syncs import HostSyncRecorder, call_site, format_syncs

    def model_code():
        warnings.warn("called a synchronizing CUDA operation")

    with HostSyncRecorder(cuda=False) as recorder:
        model_code()
        model_code()
    line = model_code.__code__.co_firstlineno + 1
    assert recorder.sites == {f"{Path(__file__).resolve()}:{line}  warnings.warn(\"called a synchronizing CUDA operation\")": 2}
    with pytest.warns(UserWarning, match="unrelated"), HostSyncRecorder(cuda=False) as recorder:
        warnings.warn("unrelated")  # passed on, not counted
    assert not recorder.sites

    # icecache's own innermost frame names the site, not torch's code below it nor the bench loop above it
    package = Path(__file__).resolve().parents[1] / "icecache"
    frames = [traceback.FrameSummary(str(package / "bench" / "syncs.py"), 90, "_count_syncs", line="model(token)"),
              traceback.FrameSummary(str(package / "runtime" / "layer.py"), 243, "select_pages", line="q.cpu()"),
              traceback.FrameSummary("/x/site-packages/torch/functional.py", 7, "f", line="op()")]
    assert call_site(frames) == "icecache/runtime/layer.py:243  q.cpu()"

    result = {"settings": {"context": 4096, "batch": 1, "budget": 256, "steps": 4, "warmup": 2},
              "environment": {"device": "test"},
              "rows": [{"method": "full KV", "syncs_per_step": 1.0, "beyond_full_kv": 0.0, "sites": {"a.py:1  x": 1.0}},
                       {"method": "tree", "syncs_per_step": 3.0, "beyond_full_kv": 2.0,
                        "sites": {"a.py:1  x": 1.0, "icecache/runtime/layer.py:243  q.cpu()": 2.0}}]}
    text = format_syncs(result)
    assert "tree (beyond full KV):" in text and "2.0  icecache/runtime/layer.py:243" in text


def test_host_sync_rows_count_per_step_and_beyond_full_kv():
    from collections import Counter

    from icecache.bench.syncs import _sync_row

    full = Counter({"a.py:1  x": 4})
    row = _sync_row("tree", Counter({"a.py:1  x": 4, "icecache/index/tree.py:9  q.cpu()": 8}), full, steps=4)
    assert row == {"method": "tree", "syncs_per_step": 3.0, "beyond_full_kv": 2.0,
                   "sites": {"icecache/index/tree.py:9  q.cpu()": 2.0, "a.py:1  x": 1.0}}


def test_hot_token_ranks_scores_pages_as_the_tree_does_and_bounds_hold():
    # benchmarks/hot_token_ranks.py: each page's centroid score and two upper bounds on its best token
    import importlib.util
    from pathlib import Path

    from icecache.index import get_index
    from icecache.runtime.layer import SparseLayer

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("hot_token_ranks", root / "benchmarks" / "hot_token_ranks.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    torch.manual_seed(0)
    index = get_index("tree", head_dim=16, page_size=8)
    index.build(torch.randn(2, 400, 16))
    queries = torch.randn(3, 16)
    pages = index.num_pages
    scores = tool.page_scores(index, 1, queries)
    centroids = index._cent[1, :, :pages].float()  # [d, pages]
    assert torch.equal(scores["centroid"], (queries @ centroids).amax(0))
    keys = index._page_keys[1, :pages, :, :16]
    held = index._table[1, :pages] >= 0
    best_token = torch.stack([(keys @ q).masked_fill(~held, -float("inf")).amax(1) for q in queries]).amax(0)
    assert (scores["box bound"] >= best_token - 1e-5).all()
    assert (scores["radius bound"] >= best_token - 0.05).all()  # centroids in bfloat16: a little slack
    top = int(scores["centroid"].argmax())
    assert tool.page_ranks(index, 1, queries, top)["centroid"] == 0
    indexed = torch.softmax(keys[:, :, :].reshape(-1, 16)[: index.num_tokens] @ queries[0], 0)  # any distribution
    shares = tool.mass_shares(index, 1, indexed, torch.tensor([top, -1]), max_pages=2)
    assert 0 <= shares["search"] <= shares["layout"] <= shares["tokens"] <= 1
    assert shares["token order"] <= shares["tokens"]
    original, rows, mass = SparseLayer.step, [], []
    with tool.watch_steps(1, 0.0, rows, mass):
        assert SparseLayer.step is not original
    assert SparseLayer.step is original and rows == [] and mass == []
