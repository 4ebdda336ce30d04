"""`icecache bench latency`: time per decode step as the context grows, full KV beside each index.

One dense prefill per context is shared by every method; then each method decodes `steps` tokens
(after warm-up steps) and is timed per step, with the sparse path split into search, transfer (bulk
load) and attention (profiled runtime: CUDA is synchronised around each phase). Ratios to full KV are
measured in the same run, on the same machine, back to back.
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from ..index import available_indexes
from ..runtime import IceRuntime, full_kv_copy, shared_prefill
from ..runtime.tiers import TransferStats
from .common import environment, prompt_ids, table

FULL = "full KV"


@torch.no_grad()
def _time_decode(model, cache, first_token: torch.Tensor, steps: int, warmup: int) -> float:
    token = first_token
    for i in range(warmup + steps):
        if i == warmup:
            if token.device.type == "cuda":
                torch.cuda.synchronize()
            for layer in getattr(cache, "sparse_layers", ()):  # phase times, like the step time, skip warm-up
                layer.stats = TransferStats()
            start = time.perf_counter()
        logits = model(token, cache=cache, logits_to_keep=1).logits
        token = logits[:, -1:].argmax(-1)
    if token.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def _prefill_attention_ms(keys: torch.Tensor, q_heads: int) -> float:
    """Time of one layer's dense causal prefill attention (SDPA) over `keys` `[kv_heads, n, head_dim]`."""
    kv_heads, n, head_dim = keys.shape
    q = torch.randn(1, q_heads, n, head_dim, dtype=keys.dtype, device=keys.device)
    k = keys.unsqueeze(0).repeat_interleave(q_heads // kv_heads, dim=1)
    start = time.perf_counter()
    torch.nn.functional.scaled_dot_product_attention(q, k, k, is_causal=True)
    if keys.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def _build_ms(name: str, keys: torch.Tensor, queries: torch.Tensor | None, page_size: int, sink: int,
              window: int) -> float:
    """Time to build `name`'s index over one layer's retrievable keys (what prefill adds per layer)."""
    from ..index import get_index

    index = get_index(name, head_dim=keys.shape[-1], page_size=page_size)
    start = time.perf_counter()
    index.build(keys[:, sink: keys.shape[1] - window], queries)
    return (time.perf_counter() - start) * 1e3


def _sparse_layer_kv_ratio(report) -> float:
    """The largest device-tier share of full KV over the sparse layers (each at most (budget + window) /
    context by the budget rule)."""
    return max((l.device_kv_bytes / l.full_kv_bytes for l in report.layers if l.kind == "sparse"), default=1.0)


def run_latency(model, tokenizer, contexts=(1024, 2048, 4096, 8192), indexes=None, budget: int = 256,
                steps: int = 16, warmup: int = 2, runtime_options: dict | None = None,
                prose: str | None = None) -> dict:
    indexes = list(indexes or available_indexes())
    runtime_options = runtime_options or {}
    device = next(model.parameters()).device
    rows = []
    bar = tqdm(total=len(contexts) * (len(indexes) + 1), desc="latency", unit="run")
    for context in contexts:
        ids = prompt_ids(tokenizer, context, prose).to(device)
        base, first = shared_prefill(model, ids, budget)
        full_step = _time_decode(model, full_kv_copy(base), first, steps, warmup)
        full_bytes = sum(l.keys.numel() * l.keys.element_size() * 2 for l in full_kv_copy(base).layers)
        probe = base.sparse_layers[0]  # one sparse layer's real keys and prefill queries
        probe_keys = probe.host.keys(0, probe.num_tokens)
        rows.append({"context": context, "method": FULL, "step_ms": full_step * 1e3, "ratio": 1.0,
                     "device_kv_mib": full_bytes / 2**20, "sparse_layer_kv_ratio": 1.0,
                     "prefill_ms": _prefill_attention_ms(probe_keys, model.config.num_attention_heads)})
        bar.update(1)
        for name in indexes:
            runtime = IceRuntime(index=name, budget=budget, profile=True, **runtime_options)
            cache = runtime.new_cache(model, prefill=base)
            step = _time_decode(model, cache, first, steps, warmup)
            report = runtime.report(cache)
            done = report.transfers.steps or 1
            layers = sum(1 for _ in cache.sparse_layers) or 1
            per_step = lambda s: s / done * layers * 1e3  # per decode step, all sparse layers together
            rows.append({"context": context, "method": name, "step_ms": step * 1e3, "ratio": step / full_step,
                         "search_ms": per_step(report.transfers.seconds["search"]),
                         "transfer_ms": per_step(report.transfers.seconds["transfer"]),
                         "attention_ms": per_step(report.transfers.seconds["attention"]),
                         "kib_moved_per_step": report.transfers.bytes_moved / done * layers / 1024,
                         "hit_rate": report.transfers.hit_rate,
                         "device_kv_mib": report.device_kv_bytes / 2**20,
                         "sparse_layer_kv_ratio": _sparse_layer_kv_ratio(report),
                         "prefill_ms": _build_ms(name, probe_keys, probe.prefill_queries, runtime.budget.page_size,
                                                 runtime.budget.sink, runtime.budget.window)})
            bar.update(1)
    bar.close()
    return {"benchmark": "latency", "environment": environment(),
            "settings": {"contexts": list(contexts), "budget": budget, "steps": steps, "warmup": warmup,
                         "runtime_options": runtime_options},
            "rows": rows}


COLUMNS = [("context", "context", "d"), ("method", "method", ""), ("step_ms", "ms/token", ".1f"),
           ("ratio", "vs full KV", ".2f"), ("search_ms", "search ms", ".2f"), ("transfer_ms", "transfer ms", ".2f"),
           ("attention_ms", "attention ms", ".2f"), ("kib_moved_per_step", "KiB moved/token", ".0f"),
           ("hit_rate", "hit rate", ".2f"), ("device_kv_mib", "device KV MiB", ".1f"),
           ("sparse_layer_kv_ratio", "sparse layer KV / full", ".3f"),
           ("prefill_ms", "prefill attn / index build ms per layer", ".1f")]


def format_latency(result: dict) -> str:
    return table(result["rows"], COLUMNS)


def plot_latency(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    rows = result["rows"]
    for name in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["context"], r["step_ms"]) for r in rows if r["method"] == name)
        ax.plot(*zip(*pts), marker="o", label=name, linewidth=2.5 if name == FULL else 1.5)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode time per token (ms)")
    ax.set_title(f"budget {result['settings']['budget']} - {result['environment']['device']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
