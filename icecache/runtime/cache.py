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
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from ..index.base import TokenIndex
from .layer import SparseLayer

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


#: attention layer types (transformers' `config.layer_types`) whose cache keeps only a recent window
SLIDING_LAYER_TYPES = ("sliding_attention", "chunked_attention")


def layer_plan(config, dense_layers: int) -> list[tuple[str, dict]]:
    """Per decoder layer, what the cache holds: `("sparse", {})`, `("dense", {})` or `("sliding",
    {"sliding_window": w})`, read from the config's declared layer types (`layer_types`, `sliding_window`;
    never the model's name). The first `dense_layers` layers stay dense; sliding-window layers keep their
    window (dense attention over it, no index, no offload) wherever they are."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layer_types, layer_kwargs = get_layer_types_and_kwargs(text_config)
    plan = []
    for i, (kind, kwargs) in enumerate(zip(layer_types, layer_kwargs)):
        if kind in SLIDING_LAYER_TYPES:
            plan.append(("sliding", {"sliding_window": kwargs["sliding_window"]}))
        elif kind == "full_attention":
            plan.append(("dense" if i < dense_layers else "sparse", {}))
        else:
            raise ValueError(f"layer {i} of this model has attention type {kind!r}; IceRuntime supports "
                             f"'full_attention' and sliding-window layers {SLIDING_LAYER_TYPES}")
    return plan


class IceCache(Cache):
    """The transformers `Cache` of one generation: per layer, as `layer_plan` says, a full-KV layer (the
    first `dense_layers`), a sliding-window layer (transformers' own, for layers the config declares
    sliding) or a sparse layer."""

    def __init__(self, plan: list[tuple[str, dict]], make_layer: Callable[..., SparseLayer],
                 select_every: int = 1, index_signature: tuple | None = None) -> None:
        self.index_signature = index_signature  # see IceRuntime.index_signature
        layers: list = []
        sparse_seen = 0
        group_leader = None
        for kind, kwargs in plan:
            if kind == "sparse":
                # with select_every > 1 the first sparse layer of each group searches, the others reuse it
                leader = group_leader if sparse_seen % select_every else None
                layer = IceCacheLayer(make_layer, leader)
                if leader is None:
                    group_leader = layer
                sparse_seen += 1
            elif kind == "sliding":
                layer = DynamicSlidingWindowLayer(**kwargs)
            else:
                layer = DynamicLayer()
            layers.append(layer)
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
        for i, (mine, theirs) in enumerate(zip(self.layers, source.layers)):
            if getattr(theirs, "is_sliding", False):
                if not getattr(mine, "is_sliding", False):
                    raise ValueError(f"layer {i} of the source keeps only a sliding window; this cache needs "
                                     "all its tokens (seed from a cache of the same model)")
                self.layers[i] = copy.deepcopy(theirs)  # its window and the count of tokens seen
                continue
            keys, values, queries = layer_tokens(theirs)
            if isinstance(mine, IceCacheLayer):
                built = None
                if (isinstance(theirs, IceCacheLayer) and signature is not None and mine.leader is None
                        and theirs.sparse.leader is None and theirs.sparse.index_signature == signature):
                    theirs.sparse.admit()  # the donor builds its index now if its prefill has not yet
                    built = copy.deepcopy(theirs.sparse.index)  # same layout either way: copy, don't rebuild
                mine.lazy_initialization(keys[None], values[None], built)
                mine.sparse.scale = theirs.sparse.scale if isinstance(theirs, IceCacheLayer) else None
                mine.sparse.store(keys, values)
                mine.sparse.admit(queries)
            else:
                mine.update(keys[None], values[None])  # a sliding layer keeps its window of them
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
    """A plain transformers `DynamicCache` (full KV) holding the same tokens as `source`: what
    `model.generate` builds by itself (sliding-window layers keep their window)."""
    layers = []
    for layer in source.layers:
        if getattr(layer, "is_sliding", False):
            layers.append(copy.deepcopy(layer))
            continue
        keys, values, _ = layer_tokens(layer)
        full = DynamicLayer()
        full.update(keys[None].clone(), values[None].clone())
        layers.append(full)
    cache = DynamicCache()
    cache.layers, cache.layer_class_to_replicate = layers, None  # exactly these layers, no more
    return cache


def icecache_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                       **kwargs) -> tuple[torch.Tensor, None]:
    """Attention function for `AttentionInterface`: dense SDPA for prefill chunks, the paged sparse path for
    decode steps of sparse layers. `query` is `[1, q_heads, q_len, head_dim]`; `scaling` is the model's own
    softmax scale (e.g. Gemma 3's `query_pre_attn_scalar ** -0.5`), used by the kernel and the index."""
    layer: IceCacheLayer | None = kwargs.pop(_LAYER_KWARG, None)
    if layer is not None and layer.decoding:
        layer.decoding = False
        out = layer.sparse.decode(query[0, :, 0, :], scaling)
        return out.view(1, 1, *out.shape), None  # [batch, q_len, heads, head_dim]
    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                          dropout=dropout, **kwargs)
    if layer is not None:
        # prefill (or one chunk of it): keep the newest queries for the index build, which waits for the
        # first decode step, so a chunked prefill builds one index over the whole prompt
        layer.sparse.note_prefill_queries(query[0], scaling)
    return out, weights


AttentionInterface.register(ATTENTION_NAME, icecache_attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
