"""Batches: a left-padded batch of prompts of different lengths, each sequence with its own pages and
indexes; beam search and num_return_sequences; what a batch-size mismatch does."""

import pytest
import torch

import icecache
from icecache.runtime.cache import left_padding


def test_left_padding_from_bool_and_float_masks():
    allowed = torch.ones(3, 1, 5, 8, dtype=torch.bool).tril(3)  # causal over 8 keys, 5 queries
    allowed[1, ..., :2] = False
    allowed[2, ..., :4] = False
    assert left_padding(allowed, 3, 8) == [0, 2, 4]
    additive = torch.zeros(3, 1, 5, 8).masked_fill(~allowed, torch.finfo(torch.float32).min)
    assert left_padding(additive, 3, 8) == [0, 2, 4]
    assert left_padding(None, 2, 8) == [0, 0]
    # padding longer than a prefill chunk: unknown (None) until a chunk shows a real token
    assert left_padding(allowed, 3, 3) == [0, 2, None]


@pytest.fixture(scope="module")
def prompts(smollm):
    from icecache.tasks import default_prose

    text = default_prose()
    return [text[:1500], text[3000:3900], text[6000:7200]]  # about 320, 200 and 260 tokens


@pytest.fixture(scope="module")
def padded(smollm, prompts):
    _, tok = smollm
    tok.padding_side = "left"
    return tok(prompts, return_tensors="pt", padding=True)


@pytest.mark.model
@pytest.mark.parametrize("name", icecache.available_indexes())
def test_padded_batch_gives_each_prompt_its_own_answer(smollm, prompts, padded, name):
    model, tok = smollm
    alone = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids
        cache = icecache.IceRuntime(index=name, budget=64).new_cache(model)
        alone.append(model.generate(ids, cache=cache, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:])
    runtime = icecache.IceRuntime(index=name, budget=64)
    cache = runtime.new_cache(model)
    out = model.generate(**padded, cache=cache, max_new_tokens=8, do_sample=False)
    new = out[:, padded.input_ids.shape[1]:]
    for b in range(len(prompts)):
        assert torch.equal(new[b], alone[b]), f"sequence {b}"
    # the budget rule per sequence: each sequence's device tier holds its own budget, whatever its length
    report = runtime.report(cache)
    lengths = padded.attention_mask.sum(1).tolist()
    for layer in report.layers:
        if layer.kind == "sparse":
            assert layer.tokens == lengths[layer.sequence] + 7
            assert layer.device_kv_bytes <= (64 + 32) / layer.tokens * layer.full_kv_bytes


@pytest.mark.model
def test_padding_longer_than_a_prefill_chunk(smollm, prompts, padded):
    """A chunked prefill whose first chunks are all padding for the shorter prompts: each sequence learns its
    padding when a chunk shows its first token, and answers as it does alone."""
    model, tok = smollm
    chunk = 48
    lengths = padded.attention_mask.sum(1).tolist()
    assert padded.input_ids.shape[1] - min(lengths) > 2 * chunk  # two whole chunks of padding for one prompt
    runtime = icecache.IceRuntime(index="tree", budget=64)
    cache = runtime.new_cache(model)
    out = model.generate(**padded, cache=cache, max_new_tokens=8, do_sample=False, prefill_chunk_size=chunk)
    new = out[:, padded.input_ids.shape[1]:]
    for b, prompt in enumerate(prompts):
        ids = tok(prompt, return_tensors="pt").input_ids
        alone = model.generate(ids, cache=icecache.IceRuntime(index="tree", budget=64).new_cache(model),
                               max_new_tokens=8, do_sample=False, prefill_chunk_size=chunk)
        assert torch.equal(new[b], alone[0, ids.shape[1]:]), f"sequence {b}"
    for layer in runtime.report(cache).layers:
        if layer.kind == "sparse":
            assert layer.tokens == lengths[layer.sequence] + 7  # no pad stored


@pytest.mark.model
@pytest.mark.parametrize("select_every", [1, 3])
def test_beam_search_and_several_return_sequences_match_full_kv(smollm, prompts, select_every):
    model, tok = smollm
    ids = tok(prompts[0], return_tensors="pt").input_ids
    kwargs = dict(max_new_tokens=6, do_sample=False, num_beams=3, num_return_sequences=2)
    expected = model.generate(ids, **kwargs)
    runtime = icecache.IceRuntime(index="tree", budget=ids.shape[1] + 16, select_every=select_every)
    assert torch.equal(model.generate(ids, cache=runtime.new_cache(model), **kwargs), expected)


@pytest.mark.model
def test_a_batch_of_another_size_is_refused_with_the_cache_intact(smollm, padded):
    model, _ = smollm
    runtime = icecache.IceRuntime(index="exact", budget=64)
    cache = runtime.new_cache(model)
    model.generate(**padded, cache=cache, max_new_tokens=3, do_sample=False)
    before = cache.get_seq_length()
    with pytest.raises(ValueError, match="batch size 2, but this cache holds 3 sequences; nothing was stored"):
        model(padded.input_ids[:2, -1:], cache=cache)
    assert cache.get_seq_length() == before
    assert all(row.num_tokens == row.admitted for row in cache.sparse_layers[:3])
