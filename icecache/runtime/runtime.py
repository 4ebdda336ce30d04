"""`IceRuntime`: the user-facing entry point that ties an index strategy, the budget rule and the paged
runtime to a transformers model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..index import DEFAULT_INDEX
from ..index.base import TokenIndex, get_index, held_bytes, index_class, resolve_index_spec
from ..kernels import paged_decode_attention, paged_decode_attention_reference
from .budget import Budget
from transformers.cache_utils import Cache

from .cache import ATTENTION_NAME, IceCache, layer_plan
from .layer import SparseLayer
from .tiers import TransferStats


KERNELS = ("auto", "triton", "reference")


def _resolve_kernel(kernel: str | Callable) -> Callable:
    if callable(kernel):
        return kernel
    if kernel == "auto":
        return paged_decode_attention  # Triton for CUDA tensors, the torch reference elsewhere
    if kernel == "reference":
        return paged_decode_attention_reference
    if kernel == "triton":
        from ..kernels import paged_decode_attention_triton

        return paged_decode_attention_triton
    raise ValueError(f"kernel must be one of {KERNELS} or a callable, got {kernel!r}")


@dataclass
class LayerReport:
    """One decoder layer of a cache: `kind` is "sparse", "dense" or "sliding" (see `layer_plan`)."""

    layer: int
    kind: str
    tokens: int  # tokens this layer has seen
    device_kv_bytes: int  # K/V resident on the device tier
    full_kv_bytes: int  # what transformers' own cache would hold for this layer (a sliding layer: its window)
    sequence: int | None = None  # a sparse layer reports each sequence of the batch; others the whole batch
    host_kv_bytes: int = 0  # a sparse layer's host tier, every token's K/V (allocated, growth room included)
    index_bytes: int = 0  # memory its index holds (`TokenIndex.nbytes`; 0 for a follower: its leader's index)


@dataclass
class RuntimeReport:
    """Totals over the layers of one cache, and each layer's own figures."""

    transfers: TransferStats  # summed over the sparse layers
    device_kv_bytes: int  # K/V resident on the device tier: sparse layers' tiers + dense and sliding layers' KV
    full_kv_bytes: int  # what full KV would hold for the same tokens
    page_fill: float
    layers: list[LayerReport] = field(default_factory=list)
    host_kv_bytes: int = 0  # the sparse layers' host tiers
    index_bytes: int = 0  # their indexes' structures and key copies


class IceRuntime:
    """Sparse, paged KV cache for transformers decoding.

    Args:
        index: registered index name (see `icecache.available_indexes()`), or a spec with options,
            `"tree:span_reach=8"` (`icecache.parse_index_spec`; its options join `index_options`).
        budget: tokens per KV head per decode step (sink + window + retrieved pages).
        page_size: tokens per KV page; None (default): 8 (`default_page_size`: finer pages kept more task
            answers than 16 at budgets 64-256, for a slower search).
        sink: first tokens always attended.
        window: most recent tokens always attended; None (default): 32, or 16 for budgets under 128
            (`default_window`: at budget 64 a second retrieved page kept more answers).
        dense_layers: the first layers keep full KV and full attention (the paper keeps 2).
        select_every: layer reuse (the paper's IceCache(r)): the first of every `select_every` sparse
            layers searches its index; the following ones reuse its index layout and page choice with
            their own K/V. 1 = every layer selects for itself.
        index_options: keyword options for the index class.
        kernel: decode attention over the device tier: "auto" (the Triton kernel on CUDA, the torch
            reference elsewhere), "triton", "reference", or a callable with the reference's signature.
        profile: synchronize CUDA around each phase so per-phase timings are exact (slower).
        compiled: on the CPU (float32, reference kernel), run each decode step's slot assignment, page loads and
            attention as compiled numba code; False runs the torch ops they are tested against.

    Example:
        >>> rt = IceRuntime(index="exact", budget=256)
        >>> cache = rt.new_cache(model)
        >>> model.generate(input_ids, cache=cache, max_new_tokens=32, do_sample=False)
    """

    def __init__(self, index: str = DEFAULT_INDEX, budget: int = 256, page_size: int | None = None, sink: int = 16,
                 window: int | None = None, dense_layers: int = 2, select_every: int = 1,
                 index_options: dict[str, Any] | None = None,
                 kernel: str | Callable = "auto", profile: bool = False, compiled: bool = True) -> None:
        if index_options is not None and not isinstance(index_options, dict):
            raise TypeError(f"index_options must be a dict of the index's options, got {type(index_options).__name__}")
        self.index_spec = index
        self.index_name, index_options = resolve_index_spec(index, index_options)
        # unknown names and bad options fail here, not at the first forward
        self._index_options = index_class(self.index_name).Options.create(self.index_name, index_options)
        self.budget = Budget(tokens=budget, page_size=page_size, sink=sink, window=window)
        if not isinstance(dense_layers, int) or dense_layers < 0:
            raise ValueError(f"dense_layers must be a non-negative int, got {dense_layers!r}")
        self.dense_layers = dense_layers
        if not isinstance(select_every, int) or select_every < 1:
            raise ValueError(f"select_every must be an int >= 1, got {select_every!r}")
        self.select_every = select_every
        self.index_options = index_options
        self.kernel = _resolve_kernel(kernel)
        self.profile = profile
        if not isinstance(compiled, bool):
            raise ValueError(f"compiled must be True or False, got {compiled!r}")
        self.compiled = compiled

    @property
    def index_signature(self) -> tuple:
        """What determines an index's layout: two runtimes with the same signature build the same index
        from the same tokens, whatever their budgets."""
        return (self.index_name, self.budget.page_size, self.budget.sink, self.budget.window,
                self._index_options)

    def _make_layer(self, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                    leader: SparseLayer | None = None, index: TokenIndex | None = None) -> SparseLayer:
        if leader is not None:
            index = leader.index
        elif index is None:
            index = get_index(self.index_name, head_dim=head_dim, page_size=self.budget.page_size,
                              **self.index_options)
        layer = SparseLayer(index, self.budget, kv_heads, head_dim, dtype, device, kernel=self.kernel,
                            profile=self.profile, leader=leader, compiled=self.compiled)
        layer.index_signature = self.index_signature
        return layer

    def new_cache(self, model: torch.nn.Module, prefill: Cache | None = None) -> IceCache:
        """A fresh cache for one generation with `model`, whose attention is routed through icecache.

        Pass it as `cache=` (transformers 5; `past_key_values=` before) to `model.generate` or
        `model(...)`. With `prefill` (a cache that already holds a prompt's K/V, e.g. another runtime's),
        the new cache starts from those tokens and builds its own indexes, so several runtimes can share
        one dense prefill. When `prefill` is an
        IceCache whose indexes this runtime would build identically (same index, options, page size,
        sink and window; any budget), they are copied instead of rebuilt.
        """
        config = getattr(model, "config", None)
        if getattr(config, "num_hidden_layers", None) is None and not hasattr(config, "get_text_config"):
            raise TypeError("model must be a transformers decoder model with a config (Llama, Gemma 3, ...), "
                            f"got {type(model).__name__}")
        plan = layer_plan(config, self.dense_layers)
        if getattr(model.config, "_attn_implementation", None) != ATTENTION_NAME:
            model.set_attn_implementation(ATTENTION_NAME)
        cache = IceCache(plan, self._make_layer, self.select_every, self.index_signature)
        return cache if prefill is None else cache.seed_from(prefill)

    @staticmethod
    def report(cache: IceCache) -> RuntimeReport:
        """Transfer counters, device and host bytes, and page fill of a cache after generation."""
        transfers = TransferStats()
        fills, layers = [], []
        for i, layer in enumerate(cache.layers):
            for b, sparse in enumerate(getattr(layer, "rows", ())):  # a sparse layer: one report per sequence
                transfers.add(sparse.stats)
                if sparse.index.kv_heads is not None:  # built (at the first decode step)
                    fills.append(sparse.index.page_fill())
                index_bytes = sparse.index.nbytes() if sparse.leader is None else 0
                layers.append(LayerReport(i, "sparse", sparse.num_tokens, sparse.resident_nbytes(),
                                          sparse.host.nbytes(), sequence=b, host_kv_bytes=held_bytes(sparse.host),
                                          index_bytes=index_bytes))
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                size = layer.keys.numel() * layer.keys.element_size() * 2
                sliding = getattr(layer, "is_sliding", False)
                layers.append(LayerReport(i, "sliding" if sliding else "dense", layer.get_seq_length(), size, size))
        return RuntimeReport(transfers, sum(l.device_kv_bytes for l in layers), sum(l.full_kv_bytes for l in layers),
                             sum(fills) / len(fills) if fills else 1.0, layers,
                             sum(l.host_kv_bytes for l in layers), sum(l.index_bytes for l in layers))

    def __repr__(self) -> str:
        b = self.budget
        options = f", index_options={self.index_options!r}" if self.index_options else ""
        return (f"IceRuntime(index={self.index_name!r}{options}, budget={b.tokens}, page_size={b.page_size}, "
                f"sink={b.sink}, window={b.window}, dense_layers={self.dense_layers}, "
                f"select_every={self.select_every})")


#: tokens per prefill chunk: bounds the attention scores a chunk materialises (a 2k x 32k block per head)
PREFILL_CHUNK = 2048


@torch.no_grad()
def chunked_prefill(model, cache: Cache, input_ids: torch.Tensor, chunk_size: int | None = PREFILL_CHUNK) -> torch.Tensor:
    """Run the prompt `input_ids` `[1, n]` through `model` into `cache`, `chunk_size` tokens per forward
    (None: one forward), and return the logits of the last position only, `[1, 1, vocab]`.

    Each chunk attends to everything the cache holds before it; sliding-window layers see only their window
    plus the chunk, so they do not pay for the whole context. The same as
    `model.generate(..., prefill_chunk_size=chunk_size)` does inside transformers.
    """
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    n = input_ids.shape[1]
    step = n if chunk_size is None else chunk_size
    logits = None
    for start in range(0, n, step):
        logits = model(input_ids[:, start:start + step], cache=cache, logits_to_keep=1).logits
    return logits


@torch.no_grad()
def shared_prefill(model, input_ids: torch.Tensor, budget: int = 256,
                   chunk_size: int | None = PREFILL_CHUNK) -> tuple[IceCache, torch.Tensor]:
    """One dense prefill of `input_ids` `[1, n]` (chunked, see `chunked_prefill`) to seed many runtimes
    (`new_cache(prefill=...)`) and full-KV copies (`full_kv_copy`) with the same prompt.

    Returns the prefilled cache and the greedy first new token `[1, 1]`, decided by the prefill's own dense
    logits, exactly as `model.generate` on a fresh cache decides it. Continue with `generate_after_prefill`.
    """
    base = IceRuntime(index="window", budget=budget).new_cache(model)
    logits = chunked_prefill(model, base, input_ids, chunk_size)
    return base, logits[:, -1:].argmax(-1)


@torch.no_grad()
def generate_after_prefill(model, cache: Cache, input_ids: torch.Tensor, first_token: torch.Tensor,
                           max_new_tokens: int) -> torch.Tensor:
    """Greedy tokens `[1, max_new_tokens]` (starting with `first_token`) after a prompt whose prefill
    `cache` already holds (a cache seeded from `shared_prefill`): the same tokens `model.generate` gives
    from scratch with that cache's runtime."""
    if max_new_tokens <= 1:
        return first_token[:, :max_new_tokens]
    ids = torch.cat([input_ids, first_token.to(input_ids.device)], dim=1)
    out = model.generate(ids, cache=cache, max_new_tokens=max_new_tokens - 1, do_sample=False)
    return out[:, input_ids.shape[1]:]
