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

from ..index.base import TokenIndex, _all_finite as all_finite
from .layer import SparseLayer

ATTENTION_NAME = "icecache"
_LAYER_KWARG = "icecache_layer"


class IceCacheLayer(CacheLayerMixin):
    """A transformers cache layer: one `SparseLayer` per sequence of the batch (created at the first update),
    each with its own host tier, index, device tier and budget.

    Left padding (a padded batch, `attention_mask` with zeros in front) is learnt from the prefill chunks'
    masks (a long padding can fill whole chunks of a chunked prefill): each sequence drops its padding tokens,
    so its sink is its own first real tokens and its index never holds a pad. The layer still counts padded
    positions (`get_seq_length`), as transformers' masks do.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, make_layer: Callable[..., SparseLayer], leader: "IceCacheLayer | None" = None) -> None:
        super().__init__()
        self._make_layer = make_layer
        self.leader = leader  # layer reuse: each sequence shares the leader's index and page choice
        self.rows: list[SparseLayer] = []  # one per sequence, in batch order
        # left-padding tokens per sequence, once a prefill mask told (None: every position so far is padding)
        self.padding: list[int | None] | None = None
        self.length = 0  # positions per sequence, padding included
        self.decoding = False  # True between update() and attention() of a one-token step

    @property
    def sparse(self) -> SparseLayer:
        """The one sequence's `SparseLayer` (batch size 1)."""
        if len(self.rows) != 1:
            raise ValueError(f"this cache layer holds {len(self.rows)} sequences; use .rows[i]")
        return self.rows[0]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor,
                            index: TokenIndex | None = None) -> None:
        batch, kv_heads, _, head_dim = key_states.shape
        leaders = self.leader.rows if self.leader is not None else [None] * batch
        self.rows = [self._make_layer(kv_heads, head_dim, key_states.dtype, key_states.device, leaders[b], index)
                     for b in range(batch)]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               kwargs: dict | None = None, **_) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new K/V `[batch, kv_heads, m, head_dim]`; return what the attention function needs."""
        if key_states.dim() != 4:
            raise ValueError(f"key_states must be [batch, kv_heads, tokens, head_dim], got shape "
                             f"{tuple(key_states.shape)}")
        if kwargs is None:
            raise RuntimeError(
                "this model's attention does not pass its kwargs to cache.update(); IceRuntime supports "
                "transformers >= 5 decoders that do (Llama, Mistral, Qwen2/3, SmolLM2, Gemma 3)"
            )
        if key_states.shape[2] == 1 and self.length and self.padding and None in self.padding:
            raise ValueError(f"sequence {self.padding.index(None)} of the batch had only padding in its prefill "
                             "chunks (attention_mask 0 throughout): give every sequence a token before decoding; "
                             "nothing was stored")
        if not key_states.is_floating_point():
            raise ValueError(f"key_states must be finite floating-point values, got dtype {key_states.dtype}; "
                             "nothing was stored")
        first = not self.is_initialized
        if first:
            self.lazy_initialization(key_states, value_states)
        # copied to each sequence's host tier first and checked there (on CUDA, one wait for the GPU per layer
        # and step instead of two), kept only once every sequence's keys are finite
        staged = [row.host.stage(key_states[b], value_states[b]) for b, row in enumerate(self.rows)]
        if not all(all_finite(keys) for keys in staged):
            if first:
                self.reset()
            raise ValueError(f"key_states must be finite floating-point values (got dtype {key_states.dtype}, "
                             "with NaN/inf entries); nothing was stored")
        for row in self.rows:
            row.host.commit(key_states.shape[2])
        before, self.length = self.length, self.length + key_states.shape[2]
        kwargs[_LAYER_KWARG] = self
        self.decoding = key_states.shape[2] == 1 and before > 0
        if self.decoding or before == 0:
            return key_states, value_states  # decode reads the device tier; a first chunk attends to itself
        # a later multi-token chunk attends densely to everything stored so far, padding in front as before
        return self._padded_tokens(key_states.device)

    def _padded_tokens(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Every stored K/V `[batch, kv_heads, length, head_dim]`, each sequence left-padded with zeros."""
        if len(self.rows) == 1 and not any(self.padding or ()):
            row = self.rows[0]
            return (row.host.k[:, : row.num_tokens].to(device).unsqueeze(0),
                    row.host.v[:, : row.num_tokens].to(device).unsqueeze(0))
        k = self.rows[0].host.k.new_zeros(len(self.rows), self.rows[0].kv_heads, self.length, self.rows[0].head_dim)
        v = torch.zeros_like(k)
        for b, row in enumerate(self.rows):
            n = row.num_tokens
            k[b, :, self.length - n:] = row.host.k[:, :n]
            v[b, :, self.length - n:] = row.host.v[:, :n]
        return k.to(device), v.to(device)

    def note_prefill(self, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float | None) -> None:
        """After a prefill chunk's dense attention: learn each sequence's left padding from the mask (and drop
        those tokens) once a chunk shows where it ends, and keep each sequence's newest real queries for its
        index build."""
        chunk = query.shape[2]
        start = self.length - chunk  # position of the chunk's first query
        if self.padding is None or None in self.padding:
            seen = left_padding(attention_mask, len(self.rows), self.length)
            before = self.padding or [None] * len(self.rows)
            self.padding = [old if old is not None else new for old, new in zip(before, seen)]
            for row, old, new in zip(self.rows, before, self.padding):
                if old is None and new:
                    row.drop_first(new)  # nothing is placed before the first decode step
        for b, row in enumerate(self.rows):
            pad = self.padding[b]
            if pad is None or pad >= start + chunk:
                continue  # this chunk is all padding for this sequence
            row.note_prefill_queries(query[b, :, max(pad - start, 0):], scaling)

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.rows, self.padding, self.length = [], None, 0
        self.is_initialized = False

    # batch reshuffles (beam search, num_return_sequences) go through IceCache, which keeps every layer's
    # copy of one sequence together (layer reuse links them); a layer alone cannot do it
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("reorder an IceCache, not one of its layers")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("repeat an IceCache, not one of its layers")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("select from an IceCache, not one of its layers")


def left_padding(attention_mask: torch.Tensor | None, batch: int, keys: int) -> list[int | None]:
    """Leading masked positions among the first `keys` key positions, per sequence, read off the last query
    row of a prefill chunk's 4-D mask (bool: True = attend; float: 0 = attend); None for a sequence with every
    one of them masked (its padding goes on into the next chunk). No mask: no padding."""
    if attention_mask is None:
        return [0] * batch
    last = attention_mask[..., -1, :keys]  # [batch or 1, 1, keys]
    allowed = last if last.dtype == torch.bool else last == 0
    allowed = allowed.reshape(allowed.shape[0], -1).expand(batch, -1)
    first = allowed.to(torch.int8).argmax(1).tolist()
    return [int(i) if any_allowed else None for i, any_allowed in zip(first, allowed.any(1).tolist())]


class GrowingLayer(DynamicLayer):
    """transformers' full-KV `DynamicLayer` for IceCache's dense layers, appending into spare capacity
    instead of concatenating: `DynamicLayer.update` allocates and copies the whole `[batch, kv_heads, tokens,
    head_dim]` K and V at every decode step (at 32k tokens on the CPU, 12-22 ms per layer and step against
    6-7 ms for the attention itself). `keys` / `values` are views of the first `tokens` positions of buffers
    that grow by an eighth (at least 256 tokens); whatever batch reshuffles or copies put in their place is
    adopted at the next update."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None  # K, V with room to grow

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new K/V `[batch, kv_heads, m, head_dim]`; return all of them, `[batch, kv_heads, tokens, head_dim]`."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        need = length + key_states.shape[-2]
        buffers = self._buffers
        # our buffers hold the layer's tokens only while `keys` still starts where they do (a crop keeps that;
        # batch reshuffles and copies make new tensors)
        ours = buffers is not None and self.keys.data_ptr() == buffers[0].data_ptr()
        if (not ours or need > buffers[0].shape[-2] or buffers[0].shape[:2] != key_states.shape[:2]
                or buffers[0].dtype != key_states.dtype or buffers[1].shape[-1] != value_states.shape[-1]):
            capacity = need + max(need // 8, 256)  # decode steps append one token each
            grown = []
            for old, new in ((self.keys, key_states), (self.values, value_states)):
                buffer = new.new_empty(*new.shape[:2], capacity, new.shape[-1])
                if length:
                    buffer[:, :, :length] = old
                grown.append(buffer)
            buffers = self._buffers = (grown[0], grown[1])
        buffers[0][:, :, length:need] = key_states
        buffers[1][:, :, length:need] = value_states
        self.keys, self.values = buffers[0][:, :, :need], buffers[1][:, :, :need]
        return self.keys, self.values


#: attention layer types (transformers' `config.layer_types`) whose cache keeps only a recent window
SLIDING_LAYER_TYPES = ("sliding_attention", "chunked_attention")


def layer_plan(config, dense_layers: int) -> list[tuple[str, dict]]:
    """Per decoder layer, what the cache holds: `("sparse", {})`, `("dense", {})` or `("sliding",
    {"sliding_window": w})`, read from the config's declared layer types (`layer_types`, `sliding_window`;
    never the model's name). The first `dense_layers` layers stay dense; sliding-window layers keep their
    window (dense attention over it, no index, no offload) wherever they are."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    softcap = getattr(text_config, "attn_logit_softcapping", None)
    if softcap:  # the kernel, the indexes' ranking and the resident log-sum-exp all score by a plain softmax
        raise ValueError(f"this model soft-caps its attention logits (config.attn_logit_softcapping={softcap}, "
                         "as Gemma 2 does), which IceRuntime does not support; models without it (Llama, Mistral, "
                         "Qwen2/3, Gemma 3, ...) work")
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
                layer = GrowingLayer()
            layers.append(layer)
        super().__init__(layers=layers)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        # checked here, before layer 0 stores anything: a dense layer would fail halfway through the model
        held = self.batch_size
        if held and key_states.shape[0] != held:
            raise ValueError(f"key_states has batch size {key_states.shape[0]}, but this cache holds {held} "
                             "sequences; nothing was stored (use a new cache per batch)")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    @property
    def batch_size(self) -> int:
        """Sequences this cache holds (0 before the first update)."""
        for layer in self.layers:
            if isinstance(layer, IceCacheLayer) and layer.is_initialized:
                return len(layer.rows)
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                return layer.keys.shape[0]
        return 0

    def _reshuffle(self, rows: list[int], reorder_dense: Callable[[CacheLayerMixin], None]) -> None:
        """New batch made of the sequences `rows` (repeats allowed): the sparse layers' `SparseLayer`s move
        (a repeated sequence is deep-copied once across all layers, keeping layer-reuse links), the other
        layers reshuffle their own tensors with `reorder_dense`."""
        ice = [l for l in self.layers if isinstance(l, IceCacheLayer) and l.is_initialized]
        taken: set[int] = set()
        new_rows: list[list[SparseLayer]] = [[] for _ in ice]
        for r in rows:
            sequence = [l.rows[r] for l in ice]
            if r in taken:
                sequence = copy.deepcopy(sequence)  # one memo: followers keep pointing at their leader's copy
            taken.add(r)
            for column, row in zip(new_rows, sequence):
                column.append(row)
        for layer, column in zip(ice, new_rows):
            layer.rows = column
            if layer.padding is not None:
                layer.padding = [layer.padding[r] for r in rows]
        for layer in self.layers:
            if not isinstance(layer, IceCacheLayer) and layer.is_initialized:
                reorder_dense(layer)

    def crop(self, max_length: int) -> None:
        """Refused, before any layer changes: a sparse layer's tokens have moved into its index, and no index
        removes tokens (assisted and prompt-lookup decoding crop their cache: generate without them)."""
        raise NotImplementedError("an IceCache cannot be cropped: its sparse layers' tokens are already in their "
                                  "indexes; nothing was removed (assisted or prompt-lookup decoding needs a cache "
                                  "that crops: run it with full KV)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: the batch becomes sequences `beam_idx`."""
        self._reshuffle(beam_idx.tolist(), lambda layer: layer.reorder_cache(beam_idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        """`num_return_sequences` / beams: each sequence `repeats` times in a row."""
        batch = next((len(l.rows) for l in self.layers if isinstance(l, IceCacheLayer) and l.is_initialized), 0)
        self._reshuffle([b for b in range(batch) for _ in range(repeats)],
                        lambda layer: layer.batch_repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the sequences `indices`."""
        self._reshuffle(torch.as_tensor(indices).tolist(), lambda layer: layer.batch_select_indices(indices))

    def seed_from(self, source: Cache) -> "IceCache":
        """Fill this empty cache with the tokens of an already prefilled `source` (an `IceCache` or any
        transformers cache of the same model), building every sparse layer's index from them.

        Lets one dense prefill serve several runtimes (indexes, budgets) on the same prompt.
        """
        if self.get_seq_length() != 0:
            raise ValueError("seed_from() needs an empty cache; create one with IceRuntime.new_cache(model)")
        batches = {len(l.rows) for l in source.layers if isinstance(l, IceCacheLayer) and l.is_initialized}
        if batches - {1}:
            raise ValueError("seed_from() copies a single-sequence cache; the source holds a batch")
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
                mine.length, mine.padding = keys.shape[1], [0]
                mine.sparse.admit(queries)
            else:
                mine.update(keys[None], values[None])  # a sliding layer keeps its window of them
        return self

    @property
    def sparse_layers(self) -> list[SparseLayer]:
        """The initialised sparse layers' `SparseLayer`s, in model order (each layer's sequences in batch
        order)."""
        return [row for l in self.layers if isinstance(l, IceCacheLayer) for row in l.rows]


def layer_tokens(layer: CacheLayerMixin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Every stored K/V token of one cache layer, `[kv_heads, tokens, head_dim]` each, plus the prefill
    queries an IceCache layer kept for its index (None otherwise)."""
    if isinstance(layer, IceCacheLayer):
        sparse = layer.sparse  # one sequence
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
    decode steps of sparse layers. `query` is `[batch, q_heads, q_len, head_dim]`; `scaling` is the model's own
    softmax scale (e.g. Gemma 3's `query_pre_attn_scalar ** -0.5`), used by the kernel and the index."""
    layer: IceCacheLayer | None = kwargs.pop(_LAYER_KWARG, None)
    if layer is not None and layer.decoding:
        layer.decoding = False
        # each sequence attends to its own sink, window and pages: [batch, q_heads, head_dim]
        out = torch.stack([row.decode(query[b, :, 0, :], scaling) for b, row in enumerate(layer.rows)])
        return out.unsqueeze(1), None  # [batch, q_len, heads, head_dim]
    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                          dropout=dropout, **kwargs)
    if layer is not None:
        # prefill (or one chunk of it): learn the padding, keep the newest queries for the index build, which
        # waits for the first decode step, so a chunked prefill builds one index over the whole prompt
        layer.note_prefill(query, attention_mask, scaling)
    return out, weights


AttentionInterface.register(ATTENTION_NAME, icecache_attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
