"""icecache: memory-efficient KV-cache management for long-context LLM inference.

    >>> import icecache
    >>> icecache.available_indexes()
    >>> rt = icecache.IceRuntime(index="tree", budget=256)
    >>> cache = rt.new_cache(model)
    >>> model.generate(input_ids, cache=cache, max_new_tokens=32, do_sample=False)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public names -> the submodule that defines them; imported on first use (PEP 562), so `import icecache` (and the
# vLLM plugin's entry point, which runs in every vLLM process) stays free of torch, numba and faiss until needed
_EXPORTS = {
    "Budget": ".runtime", "IceCache": ".runtime", "IceRuntime": ".runtime",
    "TokenIndex": ".index", "available_indexes": ".index", "get_index": ".index", "register_index": ".index",
    "parse_index_spec": ".index",
    "DEFAULT_INDEX": ".index", "BuildContext": ".index", "SearchContext": ".index", "IndexOptions": ".index",
}

__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:
    from .index import (
        DEFAULT_INDEX,
        BuildContext,
        IndexOptions,
        SearchContext,
        TokenIndex,
        available_indexes,
        get_index,
        parse_index_spec,
        register_index,
    )
    from .runtime import Budget, IceCache, IceRuntime


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'icecache' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
