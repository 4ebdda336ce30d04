"""The decoder families IceRuntime names as supported, tiny and random-weight: with a budget covering the
context every index reproduces full KV's greedy tokens (Qwen2 with sliding-window layers beside full ones,
Qwen3's and OLMo 2's normalised queries and keys, Qwen2's projection biases)."""

import functools

import pytest
import torch
import transformers

import icecache

_SHAPE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2)

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**_SHAPE),
    "mistral": lambda: transformers.MistralConfig(**_SHAPE, sliding_window=None),
    "qwen2-sliding": lambda: transformers.Qwen2Config(**_SHAPE, use_sliding_window=True, sliding_window=48,
                                                      max_window_layers=2),
    "qwen3": lambda: transformers.Qwen3Config(**_SHAPE, head_dim=32),
    "olmo2": lambda: transformers.Olmo2Config(**_SHAPE),
}


@functools.cache
def tiny(name: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The model, a 160-token prompt and full KV's greedy continuation."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[name]()).eval()
    prompt = torch.randint(3, 128, (1, 160), generator=torch.Generator().manual_seed(1))
    return model, prompt, model.generate(prompt, max_new_tokens=10, do_sample=False)


@pytest.mark.parametrize("index", icecache.available_indexes())
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_budget_covering_the_context_reproduces_full_kv(arch, index):
    model, prompt, expected = tiny(arch)
    runtime = icecache.IceRuntime(index=index, budget=prompt.shape[1] + 16, page_size=4, sink=4, window=8,
                                  dense_layers=1)
    cache = runtime.new_cache(model)
    out = model.generate(prompt, cache=cache, max_new_tokens=10, do_sample=False)
    assert torch.equal(out, expected)
    assert cache.sparse_layers and all(layer.index.num_tokens > 0 for layer in cache.sparse_layers)


def test_non_finite_keys_are_refused_with_every_sequence_intact():
    """A decode step whose keys hold a NaN in one sequence of the batch stores nothing in any sequence (the
    keys are checked in the host tier before a single one is kept), and decoding then goes on exactly as
    without the refused call; a first call refused leaves the layer as if never called."""
    model, prompt, _ = tiny("llama")
    runtime = icecache.IceRuntime(index="tree", budget=48, page_size=4, sink=4, window=8, dense_layers=1)
    cache, control = runtime.new_cache(model), runtime.new_cache(model)
    batch = torch.cat([prompt, prompt.flip(1)])
    with torch.no_grad():
        model(batch, past_key_values=cache)
        model(batch, past_key_values=control)
    layer = cache.layers[1]
    stored = [row.num_tokens for row in layer.rows]
    keys = torch.randn(2, 2, 1, 16)
    keys[1, 0, 0, 3] = float("nan")
    with pytest.raises(ValueError, match="finite.*nothing was stored"):
        cache.update(keys, torch.randn(2, 2, 1, 16), 1, kwargs={})
    assert [row.num_tokens for row in layer.rows] == stored and layer.get_seq_length() == prompt.shape[1]
    step = torch.tensor([[5], [7]])
    for _ in range(4):  # decoding goes on as in a cache that never saw the refused call
        with torch.no_grad():
            ours = model(step, past_key_values=cache).logits[:, -1]
            theirs = model(step, past_key_values=control).logits[:, -1]
        assert torch.equal(ours, theirs)
        step = ours.argmax(-1, keepdim=True)

    empty = runtime.new_cache(model)
    with pytest.raises(ValueError, match="finite"):
        empty.update(torch.full((1, 2, 3, 16), float("inf")), torch.zeros(1, 2, 3, 16), 1, kwargs={})
    assert not empty.layers[1].is_initialized and empty.layers[1].rows == []
