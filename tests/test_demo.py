"""The demo's rows: by default full KV, the default index and `exact`."""

from __future__ import annotations

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

