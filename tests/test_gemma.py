"""End to end on the real long-context model, Gemma 3 270M (offline): 18 layers, full attention at layers
5, 11 and 17 and a 512-token sliding window elsewhere, 1 KV head, head_dim 256."""

import pytest
import torch

import icecache
from icecache.runtime import generate_after_prefill, layer_plan, shared_prefill
from icecache.tasks import TaskBuilder, default_prose

pytestmark = pytest.mark.model

CONTEXT = 2048


@pytest.fixture(scope="module")
def prompt_ids(gemma):
    _, tok = gemma
    return tok(default_prose()[:16000], return_tensors="pt").input_ids[:, :CONTEXT]


@pytest.fixture(scope="module")
def full_kv_tokens(gemma, prompt_ids):
    model, _ = gemma
    return model.generate(prompt_ids, max_new_tokens=8, do_sample=False)


def test_layer_plan_follows_the_declared_layer_types(gemma):
    model, _ = gemma
    plan = layer_plan(model.config, dense_layers=2)
    assert [i for i, (kind, _) in enumerate(plan) if kind == "sparse"] == [5, 11, 17]
    assert all(kwargs == {"sliding_window": 512} for kind, kwargs in plan if kind == "sliding")


@pytest.mark.parametrize("name", icecache.available_indexes())
def test_budget_covering_the_context_reproduces_full_kv(gemma, prompt_ids, full_kv_tokens, name):
    model, _ = gemma
    runtime = icecache.IceRuntime(index=name, budget=CONTEXT + 16)
    cache = runtime.new_cache(model)
    out = model.generate(prompt_ids, cache=cache, max_new_tokens=8, do_sample=False, prefill_chunk_size=1024)
    assert torch.equal(out, full_kv_tokens)
    scale = model.config.query_pre_attn_scalar ** -0.5
    assert all(layer.scale == pytest.approx(scale) for layer in cache.sparse_layers)


def test_pass_key_at_small_budget_with_global_layers_within_budget(gemma):
    model, tok = gemma
    task = TaskBuilder(tok, frame="qa").passkey(seed=3, context_tokens=CONTEXT, depth=0.4)
    ids = tok(task.prompt, return_tensors="pt").input_ids
    base, first = shared_prefill(model, ids, chunk_size=1024)
    full = generate_after_prefill(model, icecache.runtime.full_kv_copy(base), ids, first, 8)
    assert task.score(tok.decode(full[0]))  # full KV answers it: the task is fair
    runtime = icecache.IceRuntime(index="exact", budget=64)
    cache = runtime.new_cache(model, prefill=base)
    sparse = generate_after_prefill(model, cache, ids, first, 8)
    assert task.score(tok.decode(sparse[0]))
    for layer in runtime.report(cache).layers:
        if layer.kind == "sparse":
            assert layer.device_kv_bytes <= (64 + 32) / layer.tokens * layer.full_kv_bytes


def test_padded_batch_across_the_sliding_window_matches_each_prompt_alone(gemma):
    """Three prompts of 530-1400 tokens (past the 512-token window), left-padded, prefilled in chunks shorter
    than the longest padding, with a budget covering them: each sequence's greedy tokens are full KV's for
    that prompt alone."""
    model, tok = gemma
    text = default_prose()
    prompts = [text[:2600], text[5000:9500], text[12000:18500]]
    tok.padding_side = "left"
    padded = tok(prompts, return_tensors="pt", padding=True)
    lengths = padded.attention_mask.sum(1).tolist()
    assert min(lengths) > 512 and padded.input_ids.shape[1] - min(lengths) > 512
    cache = icecache.IceRuntime(index="tree", budget=max(lengths) + 16).new_cache(model)
    out = model.generate(**padded, cache=cache, max_new_tokens=8, do_sample=False, prefill_chunk_size=512)
    new = out[:, padded.input_ids.shape[1]:]
    for b, prompt in enumerate(prompts):
        ids = tok(prompt, return_tensors="pt").input_ids
        alone = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
        assert torch.equal(new[b], alone), f"sequence {b}"
