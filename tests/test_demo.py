"""The demo's rows: by default full KV, the default index and `exact`; the command line's checks before any model loads."""

from __future__ import annotations

import pytest
import torch

from icecache.demo import DEMO_INDEXES, format_table, run_demo


def test_demo_shows_the_default_index_beside_full_kv_and_exact(smollm):
    model, tokenizer = smollm
    rows = run_demo(samples=1, context_tokens=600, budgets=(64,), model=model, tokenizer=tokenizer)
    assert DEMO_INDEXES == ("tree", "exact")
    assert [(r.method, r.budget) for r in rows] == [("full KV", "all"), ("tree", "64"), ("exact", "64")]
    assert all(r.total == 1 and r.new_tokens > 0 for r in rows)
    assert rows[0].correct == 1  # full KV finds the pass key in a short prompt
    assert rows[1].device_kv_bytes < rows[0].device_kv_bytes
    assert "| tree" in format_table(rows)


def test_demo_reads_the_haystacks_from_a_text_file(smollm, tmp_path, capsys, monkeypatch):
    import icecache.models
    from icecache.cli import main
    from icecache.tasks import numpy_prose

    prose = tmp_path / "prose.txt"
    prose.write_text(numpy_prose(), encoding="utf-8")
    monkeypatch.setattr(icecache.models, "load_model", lambda name: smollm)
    import icecache.demo

    built_from = []
    real_builder = icecache.demo.TaskBuilder
    monkeypatch.setattr(icecache.demo, "TaskBuilder",
                        lambda tok, prose, frame: built_from.append(prose) or real_builder(tok, prose, frame))
    assert main(["demo", "--prose", str(prose), "--samples", "1", "--context", "600", "--budgets", "64"]) == 0
    assert built_from == [numpy_prose()]
    out = capsys.readouterr().out
    assert f"from {prose} prose" in out and "| full KV" in out and "| exact" in out



@pytest.mark.parametrize("argv, message", [
    (["demo", "--budgets", "8"], "budget=8 is smaller than sink + window"),
    (["demo", "--indexes", "tree:peak_pages=-1"], "peak_pages must be an int >= 0, got -1"),
    (["demo", "--context", "0"], "argument --context: must be >= 1, got 0"),
    (["demo", "--prose", "no/such/prose.txt"], "argument --prose: cannot read 'no/such/prose.txt'"),
    (["bench", "tasks", "--prose", "no/such/prose.txt"], "argument --prose: cannot read 'no/such/prose.txt'"),
    (["bench", "tasks", "--indexes", "tree:bogus=1"], "unknown option(s) ['bogus'] for index 'tree'"),
    (["bench", "recall", "--budgets", "64", "--window", "100"], "use budget >= 116"),
    (["bench", "latency", "--page-size", "0"], "page_size must be >= 1, got 0"),
    (["bench", "prefill", "--index", "nope"], "unknown index 'nope'; available indexes"),
    pytest.param(["bench", "syncs"], "it needs a CUDA device, and torch sees none",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="lists CUDA syncs where there is CUDA")),
])
def test_command_line_refuses_bad_rows_before_loading_a_model(argv, message, capsys, monkeypatch):
    import icecache.models
    from icecache.cli import main

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(icecache.models, "load_model", no_model)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and f"icecache {argv[0]}" in err
