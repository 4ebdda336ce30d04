"""The `TokenIndex` contract every retrieval structure implements, and the registry that names them.

An index serves one attention layer: every KV head of that layer has its own structure. It owns the
*page layout* (which tokens share a page) and the *search* (which pages a decode query needs). It knows
nothing about transformers, devices tiers or attention: the runtime (`icecache.runtime`) feeds it keys and
turns its page ids into transfers.

Token positions inside an index are local: the first token given to `build` is position 0, and `insert`
continues the numbering. Shapes follow one convention throughout: `[kv_heads, tokens, head_dim]`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Callable, ClassVar, TypeVar

import numpy as np
import torch

__all__ = [
    "TokenIndex",
    "register_index",
    "get_index",
    "available_indexes",
    "index_class",
    "check_keys",
    "check_queries",
]


def check_keys(keys: torch.Tensor, name: str, head_dim: int, kv_heads: int | None = None) -> None:
    """Raise a `ValueError`/`TypeError` naming `name` unless `keys` is a finite float `[kv_heads, n, head_dim]`."""
    if not isinstance(keys, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [kv_heads, tokens, head_dim], got {type(keys).__name__}")
    if keys.dim() != 3:
        raise ValueError(
            f"{name} must have 3 dimensions [kv_heads, tokens, head_dim], got shape {tuple(keys.shape)}"
        )
    if not keys.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32, float16 or bfloat16), got {keys.dtype}")
    if keys.shape[-1] != head_dim:
        raise ValueError(f"{name} has head_dim {keys.shape[-1]}, but the index was created with head_dim={head_dim}")
    if kv_heads is not None and keys.shape[0] != kv_heads:
        raise ValueError(f"{name} has {keys.shape[0]} kv_heads, but the index holds {kv_heads}")
    if keys.numel() and not _all_finite(keys):
        raise ValueError(f"{name} contains NaN or infinite values")


# These checks run on tiny tensors at every decode step of every layer: on the CPU, numpy on a shared view
# costs a third of torch's per-op overhead.
def _host_view(values: torch.Tensor) -> np.ndarray | None:
    if values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64, torch.float16):
        return values.detach().numpy()
    return None


def _all_finite(values: torch.Tensor) -> bool:
    view = _host_view(values)
    return bool(np.isfinite(view).all()) if view is not None else bool(torch.isfinite(values).all())


def _all_below_inf(values: torch.Tensor) -> bool:
    """No NaN and no +inf (-inf allowed)."""
    view = _host_view(values)
    return bool((view < np.inf).all()) if view is not None else bool((values < math.inf).all())


def check_queries(queries: torch.Tensor, head_dim: int, kv_heads: int) -> None:
    """Validate decode queries `[kv_heads, group, head_dim]` (every query head sharing a KV head)."""
    check_keys(queries, "queries", head_dim, kv_heads)
    if queries.shape[1] == 0:
        raise ValueError("queries must hold at least one query head per kv head, got group size 0")


class TokenIndex(ABC):
    """Abstract retrieval structure over one layer's keys, one structure per KV head.

    Subclasses implement `_build`, `_insert`, `_search` and `page_table`; the public methods validate
    their input first, so a bad call raises before anything stored is touched.

    Args:
        head_dim: size of each key vector.
        page_size: the most tokens one page holds.
    """

    #: registry name, set by `@register_index("name")`
    name: ClassVar[str] = ""
    #: True when `_build` takes the prefill queries as a second argument
    uses_build_queries: ClassVar[bool] = False
    #: True when `_search` takes `resident_lse` (indexes that rank pages by attention mass)
    uses_resident_lse: ClassVar[bool] = False

    def __init__(self, head_dim: int, page_size: int = 16) -> None:
        if not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
        if not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size must be a positive int, got {page_size!r}")
        self.head_dim = head_dim
        self.page_size = page_size
        self.kv_heads: int | None = None
        self.num_tokens = 0

    # -- public API -------------------------------------------------------------------------------

    def build(self, keys: torch.Tensor, queries: torch.Tensor | None = None) -> None:
        """Lay out `keys` `[kv_heads, n_tokens, head_dim]` into pages (n_tokens may be 0).

        `queries` `[kv_heads, m, head_dim]` (optional): recent prefill queries of each KV head's group,
        for indexes that learn their layout from them; others ignore it.
        """
        check_keys(keys, "keys", self.head_dim)
        if queries is not None:
            check_keys(queries, "queries", self.head_dim, keys.shape[0])
        self.kv_heads = keys.shape[0]
        self.num_tokens = keys.shape[1]
        if self.uses_build_queries:
            self._build(keys, queries)
        else:
            self._build(keys)

    def insert(self, keys: torch.Tensor) -> torch.Tensor:
        """Add new tokens `[kv_heads, m, head_dim]` at positions `num_tokens .. num_tokens + m - 1`.

        Returns the sorted ids of every page whose contents changed (new pages included), over all heads,
        so that the runtime can refresh copies it holds of them.
        """
        self._require_built()
        check_keys(keys, "keys", self.head_dim, self.kv_heads)
        if keys.shape[1] == 0:
            return torch.empty(0, dtype=torch.long)
        changed = self._insert(keys)
        self.num_tokens += keys.shape[1]
        return changed

    def search(self, queries: torch.Tensor, max_pages: int, resident_lse: torch.Tensor | None = None) -> torch.Tensor:
        """Best pages for decode `queries` `[kv_heads, group, head_dim]`.

        `resident_lse` (optional, `[kv_heads, group]`): for each query head, the log-sum-exp of its scaled
        logits over the tokens it attends besides this index (the runtime's sink and window; `-inf` for
        none). Indexes that rank pages by attention mass (`uses_resident_lse`) use it to normalise each
        query head's softmax over everything it attends, so a head that spends most of its attention on
        the sink weighs less in the page choice; the others ignore it.

        Returns a LongTensor `[kv_heads, max_pages]` of page ids, best first, `-1` where fewer are returned.
        """
        self._require_built()
        check_queries(queries, self.head_dim, self.kv_heads)
        if not isinstance(max_pages, int) or max_pages < 0:
            raise ValueError(f"max_pages must be a non-negative int, got {max_pages!r}")
        if resident_lse is not None:
            expected = tuple(queries.shape[:2])
            if not isinstance(resident_lse, torch.Tensor) or tuple(resident_lse.shape) != expected:
                got = tuple(resident_lse.shape) if isinstance(resident_lse, torch.Tensor) else type(resident_lse).__name__
                raise ValueError(f"resident_lse must be a tensor of shape [kv_heads, group] = {expected}, got {got}")
            if not resident_lse.is_floating_point() or not _all_below_inf(resident_lse):
                raise ValueError("resident_lse must be a float tensor without NaN or +inf (-inf means no resident tokens)")
        if max_pages == 0 or self.num_pages == 0:
            return torch.full((self.kv_heads, max_pages), -1, dtype=torch.long, device=queries.device)
        if self.uses_resident_lse:
            pages = self._search(queries, max_pages, resident_lse)
        else:
            pages = self._search(queries, max_pages)
        if pages.shape[1] < max_pages:  # fewer pages than asked: pad
            pad = torch.full((self.kv_heads, max_pages - pages.shape[1]), -1, dtype=torch.long, device=pages.device)
            pages = torch.cat([pages, pad], dim=1)
        return pages

    @property
    @abstractmethod
    def page_table(self) -> torch.Tensor:
        """LongTensor `[kv_heads, n_pages, page_size]` of local token positions, `-1` in empty slots."""

    @property
    def num_pages(self) -> int:
        """Number of pages per head (heads are padded to the same count with empty pages)."""
        return self.page_table.shape[1]

    def metadata_bytes_per_search(self) -> int:
        """Bytes of index metadata (bounds, centroids, graph, keys) one search reads, all heads together.

        Used by the benchmarks so that an index's own traffic is counted beside the KV it selects.
        """
        return 0

    def page_fill(self) -> float:
        """Average share of a page's slots that hold a token (1.0 = every page full)."""
        if self.num_pages == 0:
            return 1.0
        return self.num_tokens / (self.num_pages * self.page_size)

    # -- for subclasses ---------------------------------------------------------------------------

    @abstractmethod
    def _build(self, keys: torch.Tensor, *queries: torch.Tensor | None) -> None: ...

    @abstractmethod
    def _insert(self, keys: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _search(self, queries: torch.Tensor, max_pages: int) -> torch.Tensor: ...

    def _require_built(self) -> None:
        if self.kv_heads is None:
            raise RuntimeError(f"{type(self).__name__}.build() must be called before insert() or search()")

    @property
    def scale(self) -> float:
        """Softmax scale of the attention this index serves: the model's own (the runtime sets it, e.g.
        Gemma 3's `query_pre_attn_scalar ** -0.5`), `1 / sqrt(head_dim)` until set."""
        return getattr(self, "_scale", None) or 1.0 / math.sqrt(self.head_dim)

    @scale.setter
    def scale(self, value: float) -> None:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"scale must be a positive finite float, got {value!r}")
        self._scale = float(value)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, head_dim={self.head_dim}, page_size={self.page_size}, "
            f"kv_heads={self.kv_heads}, tokens={self.num_tokens})"
        )


# -- registry -------------------------------------------------------------------------------------

_REGISTRY: dict[str, type[TokenIndex]] = {}

T = TypeVar("T", bound=type[TokenIndex])


def register_index(name: str) -> Callable[[T], T]:
    """Class decorator: make a `TokenIndex` subclass available as `get_index(name)`."""

    def decorate(cls: T) -> T:
        if not (isinstance(cls, type) and issubclass(cls, TokenIndex)):
            raise TypeError(f"@register_index({name!r}) must decorate a TokenIndex subclass")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"an index named {name!r} is already registered ({_REGISTRY[name].__name__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def available_indexes() -> list[str]:
    """Names of every registered index strategy, sorted."""
    return sorted(_REGISTRY)


def index_class(name: str) -> type[TokenIndex]:
    """The class registered under `name`; a `ValueError` listing the available names otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"index must be a name (str), one of {available_indexes()}, got {type(name).__name__}")
    if name not in _REGISTRY:
        raise ValueError(f"unknown index {name!r}; available indexes: {available_indexes()}")
    return _REGISTRY[name]


def get_index(name: str, head_dim: int, page_size: int = 16, **options) -> TokenIndex:
    """Create the index registered as `name` (see `available_indexes()`), with its own `options`."""
    return index_class(name)(head_dim=head_dim, page_size=page_size, **options)
