"""End to end on the real embedded model (SmolLM2-135M-Instruct, offline)."""

import pytest
import torch

import icecache
from icecache.runtime import full_kv_copy

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def prompt_ids(smollm):
    from icecache.tasks import default_prose

    _, tok = smollm
    return tok(default_prose()[:2500], return_tensors="pt").input_ids[:, :300]


@pytest.fixture(scope="module")
def full_kv_tokens(smollm, prompt_ids):
    model, _ = smollm
    return model.generate(prompt_ids, max_new_tokens=12, do_sample=False)


@pytest.mark.parametrize("name", icecache.available_indexes())
def test_generate_with_budget_covering_everything_equals_full_kv(smollm, prompt_ids, full_kv_tokens, name):
    model, _ = smollm
    runtime = icecache.IceRuntime(index=name, budget=prompt_ids.shape[1] + 12)
    cache = runtime.new_cache(model)
    out = model.generate(prompt_ids, cache=cache, max_new_tokens=12, do_sample=False)
    assert torch.equal(out, full_kv_tokens)
    report = runtime.report(cache)
    assert report.transfers.steps == 11 * (model.config.num_hidden_layers - runtime.dense_layers)
    assert report.page_fill > 0.8


def test_shared_prefill_continues_exactly_like_generate(smollm, prompt_ids, full_kv_tokens):
    # the benchmarks' and demo's path (one dense prefill, many runtimes) gives what generate gives
    from icecache.runtime import generate_after_prefill, shared_prefill

    model, _ = smollm
    expected = full_kv_tokens[:, prompt_ids.shape[1]:]
    base, first = shared_prefill(model, prompt_ids)
    full = generate_after_prefill(model, full_kv_copy(base), prompt_ids, first, expected.shape[1])
    runtime = icecache.IceRuntime(index="tree", budget=prompt_ids.shape[1] + 12)
    sparse = generate_after_prefill(model, runtime.new_cache(model, prefill=base), prompt_ids, first,
                                    expected.shape[1])
    assert torch.equal(full, expected) and torch.equal(sparse, expected)


def test_small_budget_decodes_and_keeps_device_tier_small(smollm, prompt_ids):
    model, _ = smollm
    runtime = icecache.IceRuntime(index="exact", budget=64)
    cache = runtime.new_cache(model)
    out = model.generate(prompt_ids, cache=cache, max_new_tokens=6, do_sample=False)
    assert out.shape[1] == prompt_ids.shape[1] + 6
    report = runtime.report(cache)
    assert report.device_kv_bytes < report.full_kv_bytes / 2
    assert report.transfers.bytes_moved > 0


def test_shared_prefill_matches_own_prefill(smollm, prompt_ids, full_kv_tokens):
    model, _ = smollm
    base = icecache.IceRuntime(index="window", budget=64).new_cache(model)
    with torch.no_grad():
        model(prompt_ids[:, :-1], cache=base, logits_to_keep=1)
    full = model.generate(prompt_ids, cache=full_kv_copy(base), max_new_tokens=12, do_sample=False)
    assert torch.equal(full, full_kv_tokens)
    seeded = icecache.IceRuntime(index="exact", budget=400).new_cache(model, prefill=base)
    out = model.generate(prompt_ids, cache=seeded, max_new_tokens=12, do_sample=False)
    assert torch.equal(out, full_kv_tokens)


def test_batch_of_two_is_a_clear_error_and_cache_stays_intact(smollm, prompt_ids):
    model, _ = smollm
    runtime = icecache.IceRuntime(index="exact", budget=128)
    cache = runtime.new_cache(model)
    with torch.no_grad():
        model(prompt_ids[:, :50], cache=cache)
    stored = cache.get_seq_length()
    with pytest.raises(ValueError, match="batch size 2"):
        with torch.no_grad():
            model(prompt_ids[:, 50:52].repeat(2, 1), cache=cache)
    assert cache.get_seq_length() == stored == 50
    # the cache still works after the refused call
    with torch.no_grad():
        model(prompt_ids[:, 50:51], cache=cache)
    assert cache.get_seq_length() == 51


def test_layer_reuse_matches_full_kv_when_budget_covers_everything(smollm, prompt_ids, full_kv_tokens):
    model, _ = smollm
    runtime = icecache.IceRuntime(index="tree", budget=prompt_ids.shape[1] + 12, select_every=3)
    out = model.generate(prompt_ids, cache=runtime.new_cache(model), max_new_tokens=12, do_sample=False)
    assert torch.equal(out, full_kv_tokens)


def test_layer_reuse_searches_once_per_group(smollm, prompt_ids):
    model, _ = smollm
    runtime = icecache.IceRuntime(index="tree", budget=64, select_every=3)
    cache = runtime.new_cache(model)
    model.generate(prompt_ids, cache=cache, max_new_tokens=4, do_sample=False)
    layers = cache.sparse_layers
    leaders = [l for l in layers if l.leader is None]
    assert len(leaders) == -(-len(layers) // 3)
    for layer in layers:
        if layer.leader is not None:
            assert layer.index is layer.leader.index
            assert layer.stats.pages_selected == layer.leader.stats.pages_selected


def test_seeding_from_a_cache_with_the_same_index_copies_it(smollm, prompt_ids):
    model, _ = smollm
    donor = icecache.IceRuntime(index="tree", budget=256).new_cache(model)
    with torch.no_grad():
        model(prompt_ids[:, :-1], cache=donor, logits_to_keep=1)
    copied = icecache.IceRuntime(index="tree", budget=128).new_cache(model, prefill=donor)  # same window: copied
    rebuilt = icecache.IceRuntime(index="tree", budget=128).new_cache(model)
    rebuilt.index_signature = None  # no signature to match: it builds its own indexes from the donor's tokens
    rebuilt.seed_from(donor)
    for a, b in zip(copied.sparse_layers, donor.sparse_layers):
        assert a.index is not b.index and torch.equal(a.index.page_table, b.index.page_table)
    out_copied = model.generate(prompt_ids, cache=copied, max_new_tokens=6, do_sample=False)
    out_rebuilt = model.generate(prompt_ids, cache=rebuilt, max_new_tokens=6, do_sample=False)
    assert torch.equal(out_copied, out_rebuilt)  # copying is only a shortcut: same answers
    assert donor.get_seq_length() == prompt_ids.shape[1] - 1  # the donor is untouched


def test_the_build_queries_are_copies_not_views_of_the_prompt_queries(smollm, prompt_ids):
    # a view of the model's query tensor would keep the whole prompt chunk's queries alive in every layer
    model, _ = smollm
    cache = icecache.IceRuntime(index="tree", budget=64).new_cache(model)
    model.generate(prompt_ids, cache=cache, max_new_tokens=2, do_sample=False)
    rows = [row for layer in cache.layers for row in getattr(layer, "rows", None) or []]
    assert len(rows) == model.config.num_hidden_layers - 2
    for row in rows:
        held = row.prefill_queries
        assert held.shape[1] == min(prompt_ids.shape[1], icecache.runtime.layer.BUILD_QUERY_POSITIONS)
        assert held.untyped_storage().nbytes() == held.numel() * held.element_size()


def test_the_report_counts_host_memory_once_per_index(smollm, prompt_ids):
    model, _ = smollm
    sparse_layers = model.config.num_hidden_layers - 2
    for every in (1, 3):
        runtime = icecache.IceRuntime(index="tree", budget=64, select_every=every)
        cache = runtime.new_cache(model)
        model.generate(prompt_ids, cache=cache, max_new_tokens=3, do_sample=False)
        report = runtime.report(cache)
        sparse = [layer for layer in report.layers if layer.kind == "sparse"]
        # every token's K/V stays on the host; followers share their leader's index, counted once
        assert report.host_kv_bytes == sum(l.host_kv_bytes for l in sparse) >= sum(l.full_kv_bytes for l in sparse)
        assert report.index_bytes == sum(l.index_bytes for l in sparse)
        assert sum(1 for l in sparse if l.index_bytes > 0) == -(-sparse_layers // every)
