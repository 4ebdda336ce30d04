"""Index strategies. Every module in this package that registers a `TokenIndex` is imported here, so a
new strategy is one new file: `@register_index("name")` on its class makes it available everywhere."""

import importlib
import pkgutil

from .base import (
    BuildContext,
    IndexOptions,
    SearchContext,
    TokenIndex,
    available_indexes,
    get_index,
    index_class,
    parse_index_spec,
    register_index,
    resolve_index_spec,
)

#: the index `IceRuntime`, the demo, the CLI and the vLLM plugin use unless told otherwise: IceCache's tree
DEFAULT_INDEX = "tree"

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["DEFAULT_INDEX", "BuildContext", "IndexOptions", "SearchContext", "TokenIndex", "available_indexes",
           "get_index", "index_class", "parse_index_spec", "register_index",
           "resolve_index_spec"]
