"""icecache inside vLLM: an opt-in attention-backend plugin.

Installed with `pip install icecache[vllm]`, the package registers `register` as a `vllm.general_plugins`
entry point, which vLLM runs in every process (engine and workers). It swaps in a backend that subclasses
vLLM's own, and that stays vLLM's backend, unchanged, until a user asks for icecache with vLLM's own
`additional_config`, using the same keys as `IceRuntime`:

    LLM(model=folder, additional_config={"icecache": {"index": "tree", "budget": 256}})
    vllm serve FOLDER --additional-config '{"icecache": {"index": "tree", "budget": 256}}'

Then every full-attention layer past `dense_layers` attends, per decode row and KV head, to the sink, the
window and the pages its request's index selects, under the same budget rule as `IceRuntime`; prompt rows
(prefill and chunked prefill) and sliding-window layers stay vLLM's dense attention. Set
`ICECACHE_VLLM_PLUGIN=0` to keep the plugin from registering anything.

On the CPU the backend overrides `CPU_ATTN` (the CPU platform always picks it). On CUDA nothing is registered
yet: the CUDA backend (a FlashAttention subclass chosen with `--attention-backend CUSTOM`) needs a GPU to be
built and tested on (docs/vllm.md).
"""

from __future__ import annotations

import os
from typing import Any

#: the key of vLLM's `additional_config` that turns icecache on
CONFIG_KEY = "icecache"

PREFIX_CACHING_ERROR = (
    "icecache keeps one index per request and needs vLLM's prefix caching off: pass enable_prefix_caching=False "
    "to LLM(...) (or use icecache.integrations.vllm.engine_kwargs), or --no-enable-prefix-caching to vllm serve")

#: `IceRuntime` options that the vLLM backend does not take (layer reuse and per-phase CUDA timing)
UNSUPPORTED = ("select_every", "profile")


def runtime_from_config(additional_config: Any):
    """The `IceRuntime` that `additional_config["icecache"]` asks for, or None when icecache is off.

    The options are `IceRuntime`'s (index, budget, page_size, sink, window, dense_layers, index_options,
    kernel) and are checked by it, so a bad value fails with the same message as in Python.
    """
    from ...runtime import IceRuntime

    options = (additional_config or {}).get(CONFIG_KEY) if isinstance(additional_config, dict) else None
    if options is None:
        return None
    if not isinstance(options, dict):
        raise ValueError(f"additional_config['{CONFIG_KEY}'] must be a dict of IceRuntime options, "
                         f"got {options!r}")
    for name in UNSUPPORTED:
        if name in options and options[name] not in (1, False):
            raise ValueError(f"additional_config['{CONFIG_KEY}']['{name}'] is not supported under vLLM; "
                             "use IceRuntime with transformers for it")
    return IceRuntime(**{k: v for k, v in options.items() if k not in UNSUPPORTED})


def engine_kwargs(**options: Any) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM` (or `EngineArgs`) that turn icecache on with `IceRuntime` `options`:

        >>> LLM(model=folder, **engine_kwargs(index="tree", budget=256))

    Checks the options at once (the same errors as `IceRuntime`) and switches prefix caching off.
    """
    config = {CONFIG_KEY: dict(options)}
    runtime_from_config(config)
    return {"additional_config": config, "enable_prefix_caching": False}


def register() -> None:
    """The `vllm.general_plugins` entry point: register icecache's backend with vLLM's registry."""
    if os.environ.get("ICECACHE_VLLM_PLUGIN", "1") == "0":
        return
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, "icecache.integrations.vllm.cpu.IceCPUAttentionBackend")
