"""The `TokenIndex` contract every retrieval structure implements, and the registry that names them.

An index serves one attention layer: every KV head of that layer has its own structure. It owns the
*page layout* (which tokens share a page) and the *search* (which pages a decode query needs). It knows
nothing about transformers, devices tiers or attention: the runtime (`icecache.runtime`) feeds it keys and
turns its page ids into transfers.

Token positions inside an index are local: the first token given to `build` is position 0, and `insert`
continues the numbering. Shapes follow one convention throughout: `[kv_heads, tokens, head_dim]`.

The hooks a strategy implements have one fixed signature each (after faiss' `Index`: a small required
core, per-call inputs in one object):

    _build(keys, context: BuildContext)                  lay out the first tokens
    _insert(keys, start: int) -> changed page ids        add tokens at local positions start, start + 1, ...
    _search(queries, max_pages, context: SearchContext)  best pages, best first

and its options are one frozen dataclass (`Options`, a subclass of `IndexOptions`), checked once in its
`__post_init__` (after kvpress' presses): two indexes with equal options build equal layouts.
"""

from __future__ import annotations

import ast
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, ClassVar, TypeVar

import numpy as np
import torch

__all__ = [
    "TokenIndex",
    "IndexOptions",
    "BuildContext",
    "SearchContext",
    "register_index",
    "get_index",
    "available_indexes",
    "index_class",
    "check_keys",
    "check_queries",
]


def check_keys(keys: torch.Tensor, name: str, head_dim: int, kv_heads: int | None = None,
               shape: str = "[kv_heads, tokens, head_dim]") -> None:
    """Raise a `ValueError`/`TypeError` naming `name` unless `keys` is a finite float `[kv_heads, n, head_dim]`
    (`shape` names the axes in the message)."""
    if not isinstance(keys, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape}, got {type(keys).__name__}")
    if keys.dim() != 3:
        raise ValueError(f"{name} must have 3 dimensions {shape}, got shape {tuple(keys.shape)}")
    if not keys.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32, float16 or bfloat16), got {keys.dtype}")
    if keys.shape[-1] != head_dim:
        raise ValueError(f"{name} has head_dim {keys.shape[-1]}, but the index was created with head_dim={head_dim}")
    if kv_heads is not None and keys.shape[0] != kv_heads:
        raise ValueError(f"{name} has {keys.shape[0]} kv_heads, but the index holds {kv_heads}")
    if keys.numel() and not _all_finite(keys):
        raise ValueError(f"{name} contains NaN or infinite values")


# These checks (and the runtime's one-token copies) run on tiny tensors at every decode step of every layer:
# on the CPU, numpy on a shared view costs a third of torch's per-op overhead.
def _host_view(values: torch.Tensor) -> np.ndarray | None:
    """A numpy view of a CPU tensor numpy can hold (not bfloat16), else None."""
    if values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64, torch.float16):
        return values.detach().numpy()
    return None


def _all_finite(values: torch.Tensor) -> bool:
    view = _host_view(values)
    return bool(np.isfinite(view).all()) if view is not None else bool(torch.isfinite(values).all())


def held_bytes(obj: Any) -> int:
    """Bytes of the tensors and numpy arrays `obj` holds (allocated: spare capacity included), found through
    its attributes, containers and icecache objects; memory shared by several (a numpy view of a tensor, one
    tensor kept twice) is counted once."""
    seen_objects: set[int] = set()
    seen_memory: set[int] = set()
    total = 0

    def visit(value: Any) -> None:
        nonlocal total
        if id(value) in seen_objects:
            return
        seen_objects.add(id(value))
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            if storage.data_ptr() not in seen_memory:
                seen_memory.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(value, np.ndarray):
            while isinstance(value.base, np.ndarray):
                value = value.base
            if isinstance(value.base, torch.Tensor):  # `tensor.numpy()`: the tensor's memory
                visit(value.base)
            elif value.ctypes.data not in seen_memory:  # numpy's own memory, or numba's
                seen_memory.add(value.ctypes.data)
                total += value.nbytes
        elif isinstance(value, (list, tuple)):  # named tuples included
            for item in value:
                visit(item)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif type(value).__module__.startswith("icecache") and hasattr(value, "__dict__"):
            for item in vars(value).values():
                visit(item)

    visit(obj)
    return total


def _all_below_inf(values: torch.Tensor) -> bool:
    """No NaN and no +inf (-inf allowed)."""
    view = _host_view(values)
    return bool((view < np.inf).all()) if view is not None else bool((values < math.inf).all())


def check_queries(queries: torch.Tensor, head_dim: int, kv_heads: int) -> None:
    """Validate decode queries `[kv_heads, group, head_dim]` (every query head sharing a KV head)."""
    check_keys(queries, "queries", head_dim, kv_heads, shape="[kv_heads, group, head_dim]")
    if queries.shape[1] == 0:
        raise ValueError("queries must hold at least one query head per kv head, got group size 0")


# -- options and per-call contexts ------------------------------------------------------------------


@dataclass(frozen=True)
class IndexOptions:
    """An index strategy's options: a frozen dataclass whose fields are the keyword options of
    `get_index(name, ...)` and `IceRuntime(index_options=...)`, checked once, in `__post_init__`.

    A strategy subclasses it with its fields and defaults and overrides `check` (raising `ValueError` that
    names the option and the accepted values); the helpers below cover the usual kinds. Options are
    hashable and compare by value: two indexes with equal options lay out the same tokens identically.
    """

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise a `ValueError` naming the first bad option and the values it accepts."""

    # helpers for `check`
    def require_int(self, name: str, minimum: int, allow_none: bool = False) -> None:
        value = getattr(self, name)
        if value is None and allow_none:
            return
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            extra = " or None (automatic)" if allow_none else ""
            raise ValueError(f"{name} must be an int >= {minimum}{extra}, got {value!r}")

    def require_float(self, name: str, low: float, high: float = math.inf) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            where = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
            raise ValueError(f"{name} must be a number {where}, got {value!r}")

    def require_choice(self, name: str, choices: tuple) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")

    @classmethod
    def names(cls) -> list[str]:
        """The option names, in declaration order."""
        return [f.name for f in fields(cls)]

    @classmethod
    def create(cls, index_name: str, options: dict[str, Any]) -> "IndexOptions":
        """`cls(**options)`, with an unknown option named in a `ValueError` listing the accepted ones."""
        unknown = sorted(set(options) - set(cls.names()))
        if unknown:
            accepted = cls.names() or "none"
            raise ValueError(f"unknown option(s) {unknown} for index {index_name!r}; accepted options: {accepted}")
        return cls(**options)


@dataclass(frozen=True)
class BuildContext:
    """What an index build may use besides the keys.

    Attributes:
        queries: `[kv_heads, positions * group, head_dim]`, the prefill's newest query positions of each KV
            head's group of query heads, position-major (the oldest position first, the prompt's last one
            last; within a position the group's heads in order), or None; for indexes that learn their
            layout from what the prompt attends to.
        scale: the model's softmax scale (`logits = scale * q . k`); None means `1 / sqrt(head_dim)`. The
            hooks always see a number.
        group: query heads per KV head.
    """

    queries: torch.Tensor | None = None
    scale: float | None = None
    group: int = 1

    @classmethod
    def from_query_heads(cls, queries: torch.Tensor | None, kv_heads: int, scale: float | None = None) -> "BuildContext":
        """From the attention's own layout, `[q_heads, positions, head_dim]` (query head `i` serves KV head
        `i // (q_heads / kv_heads)`)."""
        if queries is None:
            return cls(None, scale)
        q_heads, positions, head_dim = queries.shape
        group = q_heads // kv_heads
        by_position = queries.reshape(kv_heads, group, positions, head_dim).transpose(1, 2)
        return cls(by_position.reshape(kv_heads, positions * group, head_dim), scale, group)


@dataclass(frozen=True)
class SearchContext:
    """What a search may use besides the queries and the page count.

    Attributes:
        resident_lse: `[kv_heads, group]` or None: each query head's log-sum-exp of its scaled logits over
            the tokens it attends besides this index (the runtime's sink and window; `-inf` for none). The
            runtime computes it only for indexes that declare `uses_resident_lse`: they rank pages by their
            share of each head's *whole* attention, so a head that spends most of it on the sink weighs less.
        scale: the model's softmax scale; None means `1 / sqrt(head_dim)`. The hooks always see a number.
    """

    resident_lse: torch.Tensor | None = None
    scale: float | None = None


def _check_scale(scale: object, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite float or None (1 / sqrt(head_dim)), got {scale!r}")
    return float(scale)


class TokenIndex(ABC):
    """Abstract retrieval structure over one layer's keys, one structure per KV head.

    Subclasses implement `_build`, `_insert`, `_search` and `page_table`, and declare their options as
    `Options`; the public methods validate their input first, so a bad call raises before anything
    stored is touched.

    Args:
        head_dim: size of each key vector.
        page_size: the most tokens one page holds.
        **options: the strategy's options (fields of its `Options`); available as `self.options`.
    """

    #: registry name, set by `@register_index("name")`
    name: ClassVar[str] = ""
    #: the strategy's options (a frozen `IndexOptions` dataclass; no fields: no options)
    Options: ClassVar[type[IndexOptions]] = IndexOptions
    #: capability: `_search` reads `context.resident_lse`, which the runtime then computes for it
    uses_resident_lse: ClassVar[bool] = False

    def __init__(self, head_dim: int, page_size: int = 16, **options: Any) -> None:
        if not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
        if not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size must be a positive int, got {page_size!r}")
        self.options = self.Options.create(self.name or type(self).__name__, options)
        self.head_dim = head_dim
        self.page_size = page_size
        self.kv_heads: int | None = None
        self.num_tokens = 0

    # -- public API -------------------------------------------------------------------------------

    def build(self, keys: torch.Tensor, context: BuildContext | None = None) -> None:
        """Lay out `keys` `[kv_heads, n_tokens, head_dim]` into pages (n_tokens may be 0), at local
        positions 0 .. n_tokens - 1; `context` (optional) carries the prefill queries and the model's scale."""
        check_keys(keys, "keys", self.head_dim)
        context = BuildContext() if context is None else context
        if not isinstance(context, BuildContext):
            raise TypeError(f"context must be a BuildContext or None, got {type(context).__name__}")
        if context.queries is not None:
            check_keys(context.queries, "context.queries", self.head_dim, keys.shape[0])
            if not isinstance(context.group, int) or context.group < 1 or context.queries.shape[1] % context.group:
                raise ValueError(f"context.group must be a positive int dividing the {context.queries.shape[1]} "
                                 f"queries per KV head, got {context.group!r}")
        context = replace(context, scale=_check_scale(context.scale, self.head_dim))
        self.kv_heads = keys.shape[0]
        self.num_tokens = keys.shape[1]
        self._build(keys, context)

    def insert(self, keys: torch.Tensor, start: int | None = None) -> torch.Tensor:
        """Add new tokens `[kv_heads, m, head_dim]` at local positions `start .. start + m - 1`; `start`
        must be `num_tokens` (the default): positions are never skipped or rewritten.

        Returns the sorted ids of every page whose contents changed (new pages included), over all heads,
        so that the runtime can refresh copies it holds of them.
        """
        self._require_built()
        check_keys(keys, "keys", self.head_dim, self.kv_heads)
        if start is None:
            start = self.num_tokens
        elif start != self.num_tokens:
            raise ValueError(f"start must be num_tokens ({self.num_tokens}): the next free position, got {start!r}")
        return self._insert_unchecked(keys, start)

    def _insert_unchecked(self, keys: torch.Tensor, start: int) -> torch.Tensor:
        """`insert` without the input checks, for the runtime: one token per decode step and layer, the
        model's own keys at the position it tracks."""
        if keys.shape[1] == 0:
            return torch.empty(0, dtype=torch.long)
        changed = self._insert(keys, start)
        self.num_tokens += keys.shape[1]
        return changed

    def search(self, queries: torch.Tensor, max_pages: int, context: SearchContext | None = None) -> torch.Tensor:
        """Best pages for decode `queries` `[kv_heads, group, head_dim]`; `context` (optional) carries the
        resident log-sum-exp and the model's scale (`SearchContext`).

        Returns a LongTensor `[kv_heads, max_pages]` of page ids, best first, `-1` where fewer are returned,
        in host memory or on the queries' device (wherever the index searched: the runtime plans on the host).
        """
        self._require_built()
        check_queries(queries, self.head_dim, self.kv_heads)
        if not isinstance(max_pages, int) or isinstance(max_pages, bool) or max_pages < 0:
            raise ValueError(f"max_pages must be a non-negative int, got {max_pages!r}")
        context = SearchContext() if context is None else context
        if not isinstance(context, SearchContext):
            raise TypeError(f"context must be a SearchContext or None, got {type(context).__name__}")
        lse = context.resident_lse
        if lse is not None:
            expected = tuple(queries.shape[:2])
            if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != expected:
                got = tuple(lse.shape) if isinstance(lse, torch.Tensor) else type(lse).__name__
                raise ValueError(f"context.resident_lse must be a tensor of shape [kv_heads, group] = {expected}, got {got}")
            if not lse.is_floating_point() or not _all_below_inf(lse):
                raise ValueError("context.resident_lse must be a float tensor without NaN or +inf (-inf means no resident tokens)")
        context = replace(context, scale=_check_scale(context.scale, self.head_dim))
        return self._search_unchecked(queries, max_pages, context)

    def _search_unchecked(self, queries: torch.Tensor, max_pages: int, context: SearchContext) -> torch.Tensor:
        """`search` without the input checks, for the runtime: it passes the model's own queries and a
        concrete scale at every layer and step, and checks its inputs once at its own boundary."""
        if max_pages == 0 or self.num_pages == 0:
            return torch.full((self.kv_heads, max_pages), -1, dtype=torch.long, device=queries.device)
        pages = self._search(queries, max_pages, context)
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

    def nbytes(self) -> int:
        """Memory the index holds, in bytes, on whichever device its structures live: its arrays and tensors
        (spare capacity included), key copies among them. A strategy that keeps memory inside a library's
        objects (an hnswlib graph) adds that."""
        return held_bytes(vars(self))

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

    # -- the hooks a strategy implements ----------------------------------------------------------

    @abstractmethod
    def _build(self, keys: torch.Tensor, context: BuildContext) -> None:
        """Lay out `keys` `[kv_heads, n, head_dim]` (n may be 0) at local positions 0 .. n - 1."""

    @abstractmethod
    def _insert(self, keys: torch.Tensor, start: int) -> torch.Tensor:
        """Add `keys` `[kv_heads, m, head_dim]` (m >= 1) at local positions `start ..`; return the sorted ids
        of every page whose contents changed, new pages included."""

    @abstractmethod
    def _search(self, queries: torch.Tensor, max_pages: int, context: SearchContext) -> torch.Tensor:
        """`[kv_heads, <= max_pages]` page ids for `queries` `[kv_heads, group, head_dim]`, best first, no
        page twice (the base class pads to `max_pages` with -1); in host memory or on the queries' device,
        wherever the search ran (a host-side index returns them where it computed them: no copy back)."""

    def _require_built(self) -> None:
        if self.kv_heads is None:
            raise RuntimeError(f"{type(self).__name__}.build() must be called before insert() or search()")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, head_dim={self.head_dim}, page_size={self.page_size}, "
            f"kv_heads={self.kv_heads}, tokens={self.num_tokens}, options={self.options})"
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


def parse_index_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split an index spec, `"name"` or `"name:option=value,option=value"` (values read as Python literals,
    else kept as strings), into the name and its options: `"tree:span_reach=8,search=descent"` ->
    `("tree", {"span_reach": 8, "search": "descent"})`. `get_index`, `IceRuntime(index=...)`, the CLI and the
    benchmarks take specs, so a variant of an index is one string (a benchmark row is named by its spec)."""
    if not isinstance(spec, str):
        raise TypeError(f"index must be a name (str), one of {available_indexes()}, or a spec "
                        f"'name:option=value,...', got {type(spec).__name__}")
    name, _, rest = spec.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = (part.strip() for part in item.partition("="))
        if not eq or not key:
            raise ValueError(f"index option must be written option=value, got {item!r} in {spec!r}")
        if key in options:
            raise ValueError(f"index option {key!r} given twice in {spec!r}")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return name.strip(), options


def resolve_index_spec(spec: str, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """`parse_index_spec(spec)` with keyword `options` added: `(name, options)`. An option given both ways is
    an error rather than a silent override."""
    name, spec_options = parse_index_spec(spec)
    both = sorted(spec_options.keys() & (options or {}).keys())
    if both:
        raise ValueError(f"index option(s) {both} given both in the index spec {spec!r} and as options")
    return name, {**spec_options, **(options or {})}


def index_class(name: str) -> type[TokenIndex]:
    """The class registered under `name` (a plain name, not a spec); a `ValueError` listing the available
    names otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"index must be a name (str), one of {available_indexes()}, got {type(name).__name__}")
    if name not in _REGISTRY:
        raise ValueError(f"unknown index {name!r}; available indexes: {available_indexes()}")
    return _REGISTRY[name]


def get_index(name: str, head_dim: int, page_size: int = 16, **options) -> TokenIndex:
    """Create the index registered as `name` (see `available_indexes()`), or as a spec's name with the spec's
    options (`parse_index_spec`), with `options` added: `get_index("tree", 64, span_reach=8)` and
    `get_index("tree:span_reach=8", 64)` make the same index."""
    name, options = resolve_index_spec(name, options)
    return index_class(name)(head_dim=head_dim, page_size=page_size, **options)
