"""Hybrid local/global attention (Gemma 3's layout) and the model's own softmax scale, on a tiny random
Gemma 3: sliding-window layers keep transformers' window layer, full-attention layers become sparse."""

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig

import icecache
from icecache.runtime import chunked_prefill, full_kv_copy, layer_plan


def tiny_gemma(query_pre_attn_scalar: int = 9) -> Gemma3ForCausalLM:
    # query_pre_attn_scalar != head_dim: a runtime that assumed 1/sqrt(head_dim) would give other tokens
    config = Gemma3TextConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=24,
                              layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
                              query_pre_attn_scalar=query_pre_attn_scalar, max_position_embeddings=512)
    torch.manual_seed(0)
    return Gemma3ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_gemma()


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 97, (1, 150), generator=torch.Generator().manual_seed(1))


def test_layer_plan_reads_the_config_layer_types(model):
    plan = layer_plan(model.config, dense_layers=2)
    assert [kind for kind, _ in plan] == ["sliding", "sliding", "sparse"] * 2  # dense_layers=2 are sliding
    assert plan[0][1] == {"sliding_window": 24}
    assert [k for k, _ in layer_plan(model.config, dense_layers=3)][2] == "dense"
    llama = LlamaConfig(num_hidden_layers=4)
    assert [k for k, _ in layer_plan(llama, dense_layers=1)] == ["dense", "sparse", "sparse", "sparse"]


def test_soft_capped_attention_is_refused_before_the_model_is_touched():
    config = Gemma2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, attn_logit_softcapping=50.0)
    gemma2 = Gemma2ForCausalLM(config).eval()
    before = gemma2.config._attn_implementation
    with pytest.raises(ValueError, match="attn_logit_softcapping=50.0"):
        icecache.IceRuntime(index="tree", budget=64).new_cache(gemma2)
    assert gemma2.config._attn_implementation == before


@pytest.mark.parametrize("name", icecache.available_indexes())
def test_budget_covering_the_context_reproduces_full_kv(model, prompt, name):
    expected = model.generate(prompt, max_new_tokens=12, do_sample=False)
    runtime = icecache.IceRuntime(index=name, budget=prompt.shape[1] + 16, page_size=4, sink=4, window=8)
    out = model.generate(prompt, cache=runtime.new_cache(model), max_new_tokens=12, do_sample=False)
    assert torch.equal(out, expected)


def test_chunked_prefill_builds_one_index_over_the_whole_prompt(model, prompt):
    expected = model.generate(prompt, max_new_tokens=10, do_sample=False, prefill_chunk_size=32)
    runtime = icecache.IceRuntime(index="tree", budget=prompt.shape[1] + 16, page_size=4, sink=4, window=8)
    cache = runtime.new_cache(model)
    out = model.generate(prompt, cache=cache, max_new_tokens=10, do_sample=False, prefill_chunk_size=32)
    assert torch.equal(out, expected)
    for layer in cache.sparse_layers:
        assert layer.index.num_tokens == out.shape[1] - 1 - 4 - 8  # everything between sink and window
        assert layer.scale == pytest.approx(9 ** -0.5)


def test_the_index_builds_and_searches_with_the_model_scale(model, prompt, monkeypatch):
    from icecache.index.tree import TreeIndex

    scales = []  # the scale every build and search of the tree was given
    build, search = TreeIndex._build, TreeIndex._search
    monkeypatch.setattr(TreeIndex, "_build", lambda self, k, ctx: (scales.append(ctx.scale), build(self, k, ctx))[1])
    monkeypatch.setattr(TreeIndex, "_search", lambda self, q, n, ctx: (scales.append(ctx.scale), search(self, q, n, ctx))[1])
    runtime = icecache.IceRuntime(index="tree", budget=32, page_size=4, sink=4, window=8)  # small: it searches
    cache = runtime.new_cache(model)
    model.generate(prompt, cache=cache, max_new_tokens=4, do_sample=False)
    assert len(scales) == 4 * len(cache.sparse_layers)  # per sparse layer: a build, then 3 decode-step searches
    assert scales == pytest.approx([9 ** -0.5] * len(scales))  # the model's, not 1 / sqrt(head_dim)


def test_small_budget_keeps_sparse_layers_within_budget_plus_window(model, prompt):
    runtime = icecache.IceRuntime(index="exact", budget=32, page_size=4, sink=4, window=8)
    cache = runtime.new_cache(model)
    logits = chunked_prefill(model, cache, prompt, chunk_size=64)
    assert logits.shape == (1, 1, 97)  # only the last position's logits
    model.generate(prompt, cache=cache, max_new_tokens=4, do_sample=False)
    report = runtime.report(cache)
    kinds = [l.kind for l in report.layers]
    assert kinds == ["sliding", "sliding", "sparse"] * 2
    for layer in report.layers:
        if layer.kind == "sparse":
            assert layer.device_kv_bytes <= (32 + 8) / layer.tokens * layer.full_kv_bytes
        else:  # a sliding layer keeps its window, as in transformers' own cache
            assert layer.device_kv_bytes == layer.full_kv_bytes
            assert layer.full_kv_bytes == 2 * 23 * 32 * 4  # window - 1 tokens, 1 KV head, head_dim 32, fp32


@pytest.mark.parametrize("name", ["tree", "exact"])
def test_the_device_tier_grows_with_the_index_up_to_the_budget(model, prompt, name):
    # a prompt shorter than the budget: the device holds sink, window and the index's pages, not the budget
    for budget, expect_all in ((1024, True), (32, False)):
        runtime = icecache.IceRuntime(index=name, budget=budget, page_size=4, sink=4, window=8)
        cache = runtime.new_cache(model)
        model.generate(prompt, cache=cache, max_new_tokens=4, do_sample=False)
        for row in cache.sparse_layers:
            pages = row.index.num_pages if expect_all else runtime.budget.max_pages
            assert row.tier.retrieval_slots == pages
        if expect_all:  # the budget covers the context: the device holds about what full KV holds
            report = runtime.report(cache)
            sparse = [l for l in report.layers if l.kind == "sparse"]
            # (partly filled tree pages and whole pages for sink and window: 1.02-1.05 here; budget-sized: 6.7)
            assert sum(l.device_kv_bytes for l in sparse) <= 1.3 * sum(l.full_kv_bytes for l in sparse)


def test_full_kv_copy_and_seeding_keep_the_sliding_window(model, prompt):
    from icecache.runtime import generate_after_prefill, shared_prefill

    expected = model.generate(prompt, max_new_tokens=8, do_sample=False)[:, prompt.shape[1]:]
    base, first = shared_prefill(model, prompt, chunk_size=40)
    full = full_kv_copy(base)
    assert full.layers[0].get_seq_length() == prompt.shape[1] and full.layers[0].keys.shape[2] == 23
    assert torch.equal(generate_after_prefill(model, full, prompt, first, 8), expected)
    runtime = icecache.IceRuntime(index="quest", budget=prompt.shape[1] + 16, page_size=4, sink=4, window=8)
    seeded = runtime.new_cache(model, prefill=base)
    assert torch.equal(generate_after_prefill(model, seeded, prompt, first, 8), expected)


def test_padded_batch_on_hybrid_layers_matches_each_prompt_alone(model):
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, 97, (n,), generator=g) for n in (120, 70, 95)]
    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), p]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(width - len(p)), torch.ones(len(p))]) for p in prompts]).long()
    make = lambda: icecache.IceRuntime(index="tree", budget=24, page_size=4, sink=4, window=8).new_cache(model)
    out = model.generate(ids, attention_mask=mask, cache=make(), max_new_tokens=8, do_sample=False)[:, width:]
    for b, p in enumerate(prompts):
        alone = model.generate(p[None], cache=make(), max_new_tokens=8, do_sample=False)[0, len(p):]
        assert torch.equal(out[b], alone)


def test_crop_is_refused_before_any_layer_changes(model, prompt):
    runtime = icecache.IceRuntime(index="tree", budget=64, page_size=4, sink=4, window=8)
    cache = runtime.new_cache(model)
    model.generate(prompt, cache=cache, max_new_tokens=3, do_sample=False)
    lengths = [layer.get_seq_length() for layer in cache.layers]
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(-2)
    assert [layer.get_seq_length() for layer in cache.layers] == lengths
