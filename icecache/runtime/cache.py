"""transformers integration through its own extension points: a `Cache` whose sparse layers hold the
paged state, and an attention function registered as `"icecache"` in `AttentionInterface`.

The model's attention module calls `cache.update(key, value, layer_idx, kwargs=kwargs)` and then the
attention function with that same `kwargs`; `IceCacheLayer.update` puts itself there, so the attention
function finds its layer without globals and without patching model code.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from ..index.base import TokenIndex
from .layer import BUILD_QUERY_POSITIONS, SparseLayer

ATTENTION_NAME = "icecache"
_LAYER_KWARG = "icecache_layer"


class IceCacheLayer(CacheLayerMixin):
    """A transformers cache layer backed by a `SparseLayer` (created at the first update)."""

    is_compileable = False
    is_croppable = False

    def __init__(self, make_layer: Callable[..., SparseLayer], leader: "IceCacheLayer | None" = None) -> None:
        super().__init__()
        self._make_layer = make_layer
        self.leader = leader  # layer reuse: share this layer's index and page choice
        self.sparse: SparseLayer | None = None
        self.decoding = False  # True between update() and attention() of a one-token step

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor,
                            index: TokenIndex | None = None) -> None:
        _, kv_heads, _, head_dim = key_states.shape
        leader = self.leader.sparse if self.leader is not None else None
        self.sparse = self._make_layer(kv_heads, head_dim, key_states.dtype, key_states.device, leader, index)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               kwargs: dict | None = None, **_) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new K/V `[1, kv_heads, m, head_dim]`; return what the attention function needs."""
        if key_states.dim() != 4 or key_states.shape[0] != 1:
            raise ValueError(
                f"IceRuntime serves one sequence at a time: key_states must be [1, kv_heads, tokens, head_dim], "
                f"got shape {tuple(key_states.shape)} (batch size {key_states.shape[0]}); run sequences one by one"
            )
        if kwargs is None:
            raise RuntimeError(
                "this model's attention does not pass its kwargs to cache.update(); IceRuntime supports "
                "Llama-family models of transformers >= 5 (Llama, Mistral, Qwen2/3, SmolLM2)"
            )
        if not key_states.is_floating_point() or not bool(torch.isfinite(key_states).all()):
            raise ValueError(f"key_states must be finite floating-point values (got dtype {key_states.dtype}, "
                             "with NaN/inf or non-float entries); nothing was stored")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        layer = self.sparse
        before = layer.num_tokens
        layer.store(key_states[0], value_states[0])
        kwargs[_LAYER_KWARG] = self
        self.decoding = key_states.shape[2] == 1 and before > 0
        if self.decoding:
            return key_states, value_states  # unused: decode attention reads the device tier
        if before == 0:
            return key_states, value_states
        # a later multi-token chunk attends densely to everything stored so far
        dev = key_states.device
        return (layer.host.k[:, : layer.num_tokens].to(dev).unsqueeze(0),
                layer.host.v[:, : layer.num_tokens].to(dev).unsqueeze(0))

    def get_seq_length(self) -> int:
        return 0 if self.sparse is None else self.sparse.num_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.sparse = None
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("IceRuntime does not support beam search (batch size 1 only)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            raise ValueError(f"IceRuntime serves one sequence at a time; got num_return_sequences={repeats}")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if len(indices) != 1:
            raise ValueError("IceRuntime serves one sequence at a time")


class IceCache(Cache):
    """The transformers `Cache` of one generation: `dense_layers` full-KV layers, then sparse layers."""

    def __init__(self, num_layers: int, dense_layers: int, make_layer: Callable[..., SparseLayer],
                 select_every: int = 1, index_signature: tuple | None = None) -> None:
        self.index_signature = index_signature  # see IceRuntime.index_signature
        layers: list = [DynamicLayer() for _ in range(min(dense_layers, num_layers))]
        for i in range(dense_layers, num_layers):
            # with select_every > 1 the first sparse layer of each group searches, the others reuse it
            leader = layers[i - (i - dense_layers) % select_every] if (i - dense_layers) % select_every else None
            layers.append(IceCacheLayer(make_layer, leader))
        super().__init__(layers=layers)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if key_states.shape[0] != 1:  # check before any layer stores anything
            raise ValueError(
                f"IceRuntime serves one sequence at a time (batch size 1), got batch size {key_states.shape[0]}"
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def seed_from(self, source: Cache) -> "IceCache":
        """Fill this empty cache with the tokens of an already prefilled `source` (an `IceCache` or any
        transformers cache of the same model), building every sparse layer's index from them.

        Lets one dense prefill serve several runtimes (indexes, budgets) on the same prompt.
        """
        if self.get_seq_length() != 0:
            raise ValueError("seed_from() needs an empty cache; create one with IceRuntime.new_cache(model)")
        if len(source.layers) != len(self.layers):
            raise ValueError(f"source has {len(source.layers)} layers, this cache {len(self.layers)}")
        signature = self.index_signature
        for mine, theirs in zip(self.layers, source.layers):
            keys, values, queries = layer_tokens(theirs)
            if isinstance(mine, IceCacheLayer):
                built = None
                if (isinstance(theirs, IceCacheLayer) and signature is not None and mine.leader is None
                        and theirs.sparse.leader is None and theirs.sparse.index_signature == signature):
                    built = copy.deepcopy(theirs.sparse.index)  # same layout either way: copy, don't rebuild
                mine.lazy_initialization(keys[None], values[None], built)
                mine.sparse.store(keys, values)
                mine.sparse.admit(queries)
            else:
                mine.update(keys[None], values[None])
        return self

    @property
    def sparse_layers(self) -> list[SparseLayer]:
        """The initialised sparse layers, in model order."""
        return [l.sparse for l in self.layers if isinstance(l, IceCacheLayer) and l.sparse is not None]


def layer_tokens(layer: CacheLayerMixin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Every stored K/V token of one cache layer, `[kv_heads, tokens, head_dim]` each, plus the prefill
    queries an IceCache layer kept for its index (None otherwise)."""
    if isinstance(layer, IceCacheLayer):
        sparse = layer.sparse
        n = sparse.num_tokens
        return sparse.host.keys(0, n), sparse.host.v[:, :n].to(sparse.host.device), sparse.prefill_queries
    if layer.keys is None or layer.keys.numel() == 0:
        raise ValueError("the source cache holds no tokens: prefill it first")
    if layer.keys.shape[0] != 1:
        raise ValueError(f"the source cache has batch size {layer.keys.shape[0]}; IceRuntime serves batch size 1")
    return layer.keys[0], layer.values[0], None


def full_kv_copy(source: Cache) -> DynamicCache:
    """A plain transformers `DynamicCache` (full KV) holding the same tokens as `source`."""
    cache = DynamicCache()
    for i, layer in enumerate(source.layers):
        keys, values, _ = layer_tokens(layer)
        cache.update(keys[None], values[None], i)
    return cache


def icecache_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                       **kwargs) -> tuple[torch.Tensor, None]:
    """Attention function for `AttentionInterface`: dense SDPA for prefill (then index build), the
    paged sparse path for decode steps of sparse layers. `query` is `[1, q_heads, q_len, head_dim]`."""
    layer: IceCacheLayer | None = kwargs.pop(_LAYER_KWARG, None)
    if layer is not None and layer.decoding:
        layer.decoding = False
        out = layer.sparse.decode(query[0, :, 0, :], scaling)
        return out.view(1, 1, *out.shape), None  # [batch, q_len, heads, head_dim]
    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                          dropout=dropout, **kwargs)
    if layer is not None:
        sparse = layer.sparse
        recent = query[0, :, -BUILD_QUERY_POSITIONS:, :]  # [q_heads, m, head_dim]
        prefill_queries = recent.reshape(sparse.kv_heads, -1, sparse.head_dim)
        sparse.admit(prefill_queries)
    return out, weights


AttentionInterface.register(ATTENTION_NAME, icecache_attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
