"""icecache: memory-efficient KV-cache management for long-context LLM inference.

    >>> import icecache
    >>> icecache.available_indexes()
    >>> rt = icecache.IceRuntime(index="tree", budget=256)
    >>> cache = rt.new_cache(model)
    >>> model.generate(input_ids, cache=cache, max_new_tokens=32, do_sample=False)
"""

from .index import TokenIndex, available_indexes, get_index, register_index
from .runtime import Budget, IceCache, IceRuntime

__version__ = "0.1.0"

__all__ = ["Budget", "IceCache", "IceRuntime", "TokenIndex", "available_indexes", "get_index", "register_index",
           "__version__"]
