"""`icecache bench recall`: how much of the real attention each index retrieves under the shared budget.

For each context length the model reads real prose and greedily decodes `steps` tokens with full KV;
every layer's keys, values and queries are captured. Each (index, budget, layer) then replays exactly
what the runtime does (`SparseLayer`: build at prefill, one insert per decode step as a token leaves
the window, search, bulk load) and is scored against the exact attention of the same query:

- recall: of the exact attention probability outside sink + window (summed over the query heads of a
  KV head), the share on retrieved tokens. Sink and window are the same for every index, so only this
  part tells indexes apart.
- top-k recall: share of the exact top-`budget` tokens that were attended.
- output error: `||o_sparse - o_full|| / ||o_full||`.
- pages, KV bytes moved per step (device-cache misses), index metadata bytes read per search, page fill,
  build time and search time per step.

Rows `tokens (ceiling)` (the best `budget - sink - window` single tokens: what a perfect layout could
reach) and `window` (the floor) bracket the page-based indexes.
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from ..index import available_indexes, get_index, parse_index_spec
from ..runtime import Budget, SparseLayer, layer_plan
from ..runtime.budget import resolved_rules
from ..tasks import prose_source
from .capture import Capture, capture
from .common import environment, prompt_ids, table

CEILING = "tokens (ceiling)"


def _attended_positions(layer: SparseLayer, seen: int) -> torch.Tensor:
    """bool `[kv_heads, seen]`: positions the layer's last decode step attended to."""
    b = layer.budget
    mask = torch.zeros(layer.kv_heads, seen, dtype=torch.bool)
    mask[:, : min(b.sink, seen)] = True
    mask[:, max(b.sink, seen - b.window): seen] = True
    tier, table_ = layer.tier, layer.index.page_table
    active = tier.active[:, tier.resident_pages:].cpu()
    for h in range(layer.kv_heads):
        pages = tier.slot_page[h].cpu()[active[h]]
        pos = table_[h, pages].flatten().cpu()
        mask[h, pos[pos >= 0] + layer.index_start] = True
    return mask


def evaluate_layer(cap: Capture, layer_idx: int, index: str, budget: Budget,
                   index_options: dict | None = None) -> dict:
    """Replay one layer's decode steps through `SparseLayer` with `index` ("tokens (ceiling)" for the
    token-level ceiling) and score every step against exact attention."""
    keys, values = cap.keys[layer_idx], cap.values[layer_idx]
    queries = cap.decode_queries[layer_idx]
    kv_heads, _, head_dim = keys.shape
    group = queries.shape[1] // kv_heads
    n, scale = cap.prompt_tokens, cap.scaling[layer_idx]  # the model's own softmax scale
    ceiling = index == CEILING
    layer = SparseLayer(get_index("exact" if ceiling else index, head_dim=head_dim, page_size=budget.page_size,
                                  **(index_options or {})),
                        budget, kv_heads, head_dim, torch.float32, torch.device("cpu"))
    layer.store(keys[:, :n], values[:, :n])
    layer.scale = scale
    start = time.perf_counter()
    layer.admit(cap.prefill_queries[layer_idx])
    build_seconds = time.perf_counter() - start

    sums = {"recall": 0.0, "topk_recall": 0.0, "output_error": 0.0, "pages": 0.0, "metadata_bytes": 0.0}
    for step in range(cap.steps):
        seen = n + step + 1
        layer.store(keys[:, seen - 1: seen], values[:, seen - 1: seen])
        q = queries[step]
        out = layer.decode(q, scale)
        logits = torch.einsum("hgd,hnd->hgn", q.view(kv_heads, group, head_dim), keys[:, :seen]) * scale
        probs = torch.softmax(logits, dim=-1)  # [kv, g, seen]
        mass = probs.sum(1)  # [kv, seen]
        retrievable = torch.zeros(seen, dtype=torch.bool)
        retrievable[budget.sink: max(budget.sink, seen - budget.window)] = True
        if ceiling:  # best single retrievable tokens, no pages
            attended = torch.zeros(kv_heads, seen, dtype=torch.bool)
            attended[:, : budget.sink] = True
            attended[:, max(budget.sink, seen - budget.window):] = True
            k = min(budget.retrieval_tokens, int(retrievable.sum()))
            best = torch.topk(mass.masked_fill(~retrievable, -1.0), k, dim=1).indices
            attended.scatter_(1, best, True)
            sparse_probs = probs * attended.unsqueeze(1)
            out = torch.einsum("hgn,hnd->hgd", sparse_probs / sparse_probs.sum(-1, keepdim=True),
                               values[:, :seen]).reshape(-1, head_dim)
        else:
            attended = _attended_positions(layer, seen)
            sums["pages"] += float((layer.tier.active[:, layer.tier.resident_pages:]).sum()) / kv_heads
            sums["metadata_bytes"] += layer.index.metadata_bytes_per_search()
        retrievable_mass = (mass * retrievable).sum(1)
        sums["recall"] += float(((mass * retrievable * attended).sum(1) / retrievable_mass.clamp(min=1e-12)).mean())
        top = torch.topk(mass, min(budget.tokens, seen), dim=1).indices
        sums["topk_recall"] += float(attended.gather(1, top).float().mean())
        full = torch.einsum("hgn,hnd->hgd", probs, values[:, :seen]).reshape(-1, head_dim)
        sums["output_error"] += float(((out - full).norm(dim=-1) / full.norm(dim=-1)).mean())
    steps = cap.steps
    result = {k: v / steps for k, v in sums.items()}
    result.update({  # None where a measure has no meaning for the token-level ceiling
        "kv_bytes_moved_per_step": None if ceiling else layer.stats.bytes_moved / steps,
        "page_fill": None if ceiling else layer.index.page_fill(),
        "build_ms": None if ceiling else build_seconds * 1e3,
        "search_ms": None if ceiling else layer.stats.seconds["search"] / steps * 1e3,
    })
    return result


def run_recall(model, tokenizer, contexts=(4096,), budgets=(64, 128, 256, 512), indexes=None, steps: int = 32,
               layers=None, page_size: int | None = None, sink: int = 16, window: int | None = None, prose: str | None = None,
               dense_layers: int = 2, index_options: dict | None = None, source: str = "pydoc") -> dict:
    """Run the recall benchmark; returns a JSON-ready dict with per-layer and averaged rows. The model reads
    `prose` (a text) or else the named `source` (`icecache.tasks.PROSE_SOURCES`)."""
    indexes = list(indexes or available_indexes())
    index_options = index_options or {}
    rows = []
    for context in contexts:
        ids = prompt_ids(tokenizer, context, prose if prose is not None else prose_source(source))
        cap = capture(model, ids, steps)
        # the layers icecache retrieves for (full attention past the dense ones), every third by default
        sparse_ids = [i for i, (kind, _) in enumerate(layer_plan(model.config, dense_layers)) if kind == "sparse"]
        layer_ids = list(layers) if layers else sparse_ids[::3] if len(sparse_ids) > 6 else sparse_ids
        names = indexes + [CEILING]
        bar = tqdm(total=len(names) * len(budgets) * len(layer_ids), desc=f"recall @{context}", unit="layer")
        for name in names:
            for b in budgets:
                budget = Budget(b, page_size, sink, window)
                per_layer = {}
                base, options = (name, {}) if name == CEILING else parse_index_spec(name)
                for l in layer_ids:
                    per_layer[l] = evaluate_layer(cap, l, base, budget, {**index_options.get(base, {}), **options})
                    bar.update(1)
                mean = {k: None if first is None else sum(r[k] for r in per_layer.values()) / len(per_layer)
                        for k, first in next(iter(per_layer.values())).items()}
                rows.append({"context": context, "index": name, "budget": b, **mean, "layers": per_layer})
        bar.close()
    return {"benchmark": "recall", "environment": environment(),
            "settings": {"contexts": list(contexts), "budgets": list(budgets), "steps": steps,
                         "page_size": page_size, "sink": sink, "window": window, "layers": layer_ids,
                         "rules": resolved_rules(budgets, sink=sink, window=window, page_size=page_size),
                         "prose": "user text" if prose is not None
                         else "pydoc_data.topics" if source == "pydoc" else f"{source} docstrings"},
            "rows": rows}


COLUMNS = [("context", "context", "d"), ("index", "index", ""), ("budget", "budget", "d"),
           ("recall", "recall", ".3f"), ("topk_recall", "top-k recall", ".3f"),
           ("output_error", "out err", ".3f"), ("pages", "pages", ".1f"),
           ("kv_kib_per_step", "KV KiB/step", ".1f"), ("metadata_kib", "meta KiB/search", ".1f"),
           ("page_fill", "fill", ".2f"), ("build_ms", "build ms", ".1f"), ("search_ms", "search ms", ".2f")]


def format_recall(result: dict) -> str:
    rows = []
    for r in result["rows"]:
        moved = r["kv_bytes_moved_per_step"]
        rows.append({**r, "kv_kib_per_step": None if moved is None else moved / 1024,
                     "metadata_kib": r["metadata_bytes"] / 1024})
    return table(rows, COLUMNS)


def plot_recall(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = result["settings"]["contexts"]
    fig, axes = plt.subplots(1, len(contexts), figsize=(5 * len(contexts), 4), squeeze=False)
    for ax, context in zip(axes[0], contexts):
        rows = [r for r in result["rows"] if r["context"] == context]
        for name in dict.fromkeys(r["index"] for r in rows):
            pts = sorted((r["budget"], r["recall"]) for r in rows if r["index"] == name)
            ax.plot(*zip(*pts), marker="o", label=name, linestyle="--" if name == CEILING else "-")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("budget (tokens per KV head)")
        ax.set_ylabel("retrievable attention recall")
        ax.set_title(f"{context}-token context")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
