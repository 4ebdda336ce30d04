"""Capture a model's real attention inputs: every layer's K/V, the prefill's last queries and the queries
of the following greedy decode steps (full KV, so the capture is what dense decoding sees)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..runtime.layer import BUILD_QUERY_POSITIONS

RECORDER_NAME = "icecache_recorder"
_KWARG = "icecache_recorder"


class RecordingCache(DynamicCache):
    """A full-KV cache that records each layer's queries (through the recorder attention function)."""

    def __init__(self, config=None) -> None:
        super().__init__(config=config)  # with a config, sliding-window layers keep only their window
        self.prefill_queries: dict[int, torch.Tensor] = {}
        self.decode_queries: dict[int, list[torch.Tensor]] = {}
        self.scaling: dict[int, float] = {}

    def update(self, key_states, value_states, layer_idx, *args, kwargs=None, **more):
        if kwargs is not None:
            kwargs[_KWARG] = (self, layer_idx)
        return super().update(key_states, value_states, layer_idx, *args, **more)


def recording_attention(module, query, key, value, attention_mask, **kwargs):
    recorder = kwargs.pop(_KWARG, None)
    if recorder is not None:
        cache, layer_idx = recorder
        q = query[0].detach()  # [q_heads, q_len, head_dim]
        cache.scaling[layer_idx] = kwargs.get("scaling") or query.shape[-1] ** -0.5
        if q.shape[1] > 1:  # a prefill chunk: keep the prompt's newest queries over chunks
            older = cache.prefill_queries.get(layer_idx)
            recent = q if older is None else torch.cat([older, q], dim=1)
            cache.prefill_queries[layer_idx] = recent[:, -BUILD_QUERY_POSITIONS:].clone()
        else:
            cache.decode_queries.setdefault(layer_idx, []).append(q[:, 0].clone())
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(RECORDER_NAME, recording_attention)
AttentionMaskInterface.register(RECORDER_NAME, sdpa_mask)


@dataclass
class Capture:
    """Attention inputs of one prompt: `keys[l]`, `values[l]` `[kv_heads, n + steps, head_dim]`;
    `prefill_queries[l]` `[q_heads, m, head_dim]`; `decode_queries[l]` `[steps, q_heads, head_dim]`."""

    prompt_tokens: int
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    prefill_queries: list[torch.Tensor]
    decode_queries: list[torch.Tensor]
    scaling: list[float]  # each layer's softmax scale, the model's own

    @property
    def steps(self) -> int:
        return self.decode_queries[0].shape[0]


@torch.no_grad()
def capture(model, input_ids: torch.Tensor, steps: int, chunk_size: int | None = 2048) -> Capture:
    """Greedy-decode `steps` tokens after `input_ids` `[1, n]` with full KV (the prompt prefilled in chunks of
    `chunk_size` tokens), recording everything. Sliding-window layers keep (and record) only their window."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(RECORDER_NAME)
    try:
        cache = RecordingCache(model.config)
        model.generate(input_ids, cache=cache, max_new_tokens=steps + 1, min_new_tokens=steps + 1, do_sample=False,
                       prefill_chunk_size=chunk_size)
    finally:
        model.set_attn_implementation(previous)
    layers = range(len(cache.layers))
    # prefill + `steps` decode forwards: keys hold n + steps positions, one decode query per step
    return Capture(
        prompt_tokens=input_ids.shape[1],
        keys=[cache.layers[l].keys[0].float() for l in layers],
        values=[cache.layers[l].values[0].float() for l in layers],
        prefill_queries=[cache.prefill_queries[l].float() for l in layers],
        decode_queries=[torch.stack(cache.decode_queries[l]).float() for l in layers],
        scaling=[cache.scaling[l] for l in layers],
    )
