"""`icecache bench latency`: time per decode step as the context grows, full KV beside each index.

One dense prefill per context is shared by every method; then each method decodes `steps` tokens
(after warm-up steps) and is timed per step, with the sparse path split into search, transfer (bulk
load) and attention (profiled runtime: CUDA is synchronised around each phase). Ratios to full KV are
measured in the same run, on the same machine, back to back.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..index import available_indexes
from ..runtime import IceRuntime, full_kv_copy, shared_prefill
from ..runtime.budget import Budget, default_page_size, resolved_rules
from ..runtime.tiers import TransferStats
from .common import environment, prompt_ids, replace_block, table

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


def _build_ms(name: str, keys: torch.Tensor, queries: torch.Tensor | None, runtime_options: dict,
              budget: int) -> float:
    """Time to build `name`'s index, with the runtime's index options, over one layer's retrievable keys
    (what the first decode step adds per layer): the faster of two builds, as the first method timed pays
    for loading compiled kernels (the tree's 8k build read 341 ms first and 185 ms second)."""
    from ..index import BuildContext, get_index

    probe = IceRuntime(index=name, budget=budget, **runtime_options)
    b = probe.budget
    context = BuildContext.from_query_heads(queries, keys.shape[0])
    times = []
    for _ in range(2):
        index = get_index(probe.index_name, head_dim=keys.shape[-1], page_size=b.page_size, **probe.index_options)
        start = time.perf_counter()
        index.build(keys[:, b.sink: keys.shape[1] - b.window], context)
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def _sparse_layer_kv_ratio(report) -> float:
    """The largest device-tier share of full KV over the sparse layers (each at most (budget + window) /
    context by the budget rule)."""
    return max((l.device_kv_bytes / l.full_kv_bytes for l in report.layers if l.kind == "sparse"), default=1.0)


def _row(context: int, batch: int, method: str, step: float, full_step: float, **extra) -> dict:
    return {"context": context, "batch": batch, "method": method, "step_ms": step * 1e3, "ratio": step / full_step,
            "tokens_per_s": batch / step, **extra}


def _time_full(model, base, tokens: torch.Tensor, steps: int, warmup: int) -> tuple[float, int]:
    """One timed pass of full KV from a fresh copy of the shared prefill `base`: seconds per step and the
    cache's K/V bytes (the copy is freed on return: a batch of 16 at 8k holds GBs)."""
    full = full_kv_copy(base)
    full.batch_repeat_interleave(tokens.shape[0])
    step = _time_decode(model, full, tokens, steps, warmup)
    return step, sum(l.keys.numel() * l.keys.element_size() * 2 for l in full.layers)


def _time_index(model, base, tokens: torch.Tensor, name: str, budget: int, runtime_options: dict, steps: int,
                warmup: int, build_ms: float) -> tuple[float, dict]:
    """One timed pass of index `name` from a fresh cache over the shared prefill `base` (batch = rows of
    `tokens`): seconds per step and the row's phase columns."""
    device = tokens.device

    def fresh(profile: bool):
        runtime = IceRuntime(index=name, budget=budget, profile=profile, **runtime_options)
        cache = runtime.new_cache(model, prefill=base)
        cache.batch_repeat_interleave(tokens.shape[0])
        return runtime, cache

    runtime, cache = fresh(profile=False)
    step = _time_decode(model, cache, tokens, steps, warmup)
    if device.type == "cuda":  # phases from a synchronised pass, so the timed one has no extra syncs
        del cache
        runtime, cache = fresh(profile=True)
        _time_decode(model, cache, tokens, steps, warmup)
    report = runtime.report(cache)
    transfers = report.transfers
    per_layer_steps = transfers.steps / max(1, len(cache.sparse_layers)) or 1
    ms = {k: v / per_layer_steps * 1e3 for k, v in transfers.seconds.items()}
    return step, dict(admit_ms=ms["admit"], search_ms=ms["search"], transfer_ms=ms["transfer"],
                      attention_ms=ms["attention"], other_ms=transfers.runtime_overhead() / per_layer_steps * 1e3,
                      model_ms=step * 1e3 - ms["layer"],
                      kib_moved_per_step=report.transfers.bytes_moved / per_layer_steps / 1024,
                      hit_rate=report.transfers.hit_rate, device_kv_mib=report.device_kv_bytes / 2**20,
                      sparse_layer_kv_ratio=_sparse_layer_kv_ratio(report), prefill_ms=build_ms)


def run_latency(model, tokenizer, contexts=(1024, 2048, 4096, 8192), indexes=None, budget: int = 256,
                steps: int = 16, warmup: int = 2, runtime_options: dict | None = None,
                prose: str | None = None, batches=(1,), floor_context: int = 300, passes: int = 2) -> dict:
    """Time decode steps: full KV beside every index, per context and batch size, in one run.

    Every method is timed the same way (no synchronisation inside the step); on CUDA the per-phase split
    comes from a second, profiled pass (`IceRuntime(profile=True)` synchronises around each phase), on the
    CPU from the same pass. A sparse row's step splits into the sparse layers' phases (admit: window and index
    updates; search; transfer; attention), "other" (the sparse layers' work outside every phase: the
    runtime's own overhead) and "model" (everything else: MLPs, projections, dense and sliding layers, LM
    head); they add up to the step. A full-KV row's step is all "model". A batch of `b`
    decodes `b` copies of one prompt (`IceCache.batch_repeat_interleave`), each with its own pages. The
    floor row is full KV at `floor_context` tokens: what a decode step costs when the context is short.

    The methods run in turn `passes` times (full KV, then each index, then again), each from a fresh cache,
    and each row keeps its method's fastest pass (`step_ms_passes` lists them all): on the CPU, full KV's
    step at 8k, batch 16, took 2676 ms in one pass and 1155 ms in the next (its cache grows by a new tensor
    per layer and step, at the allocator's mercy), so one pass per method can favour either side.
    """
    if not isinstance(passes, int) or passes < 1:
        raise ValueError(f"passes must be a positive int, got {passes!r}")
    indexes = list(indexes or available_indexes())
    runtime_options = runtime_options or {}
    device = next(model.parameters()).device
    rows = []
    bar = tqdm(total=(len(contexts) * (len(indexes) + 1) + 1) * len(batches) * passes, desc="latency", unit="run")
    for batch in batches:
        base, first = shared_prefill(model, prompt_ids(tokenizer, floor_context, prose).to(device), budget)
        times = []
        for _ in range(passes):
            times.append(_time_full(model, base, first.repeat(batch, 1), steps, warmup)[0])
            bar.update(1)
        floor = min(times)
        rows.append(_row(floor_context, batch, "floor (full KV)", floor, floor, model_ms=floor * 1e3,
                         step_ms_passes=[t * 1e3 for t in times]))
    for context in contexts:
        ids = prompt_ids(tokenizer, context, prose).to(device)
        base, first = shared_prefill(model, ids, budget)
        probe = base.sparse_layers[0]  # one sparse layer's real keys and prefill queries
        probe_keys = probe.host.keys(0, probe.num_tokens)
        prefill_attention = _prefill_attention_ms(probe_keys, model.config.num_attention_heads)
        builds = {name: _build_ms(name, probe_keys, probe.prefill_queries, runtime_options, budget)
                  for name in indexes}
        for batch in batches:
            tokens = first.repeat(batch, 1)
            passes_of: dict[str, list[tuple[float, dict]]] = {}
            for _ in range(passes):
                full_step, full_bytes = _time_full(model, base, tokens, steps, warmup)
                passes_of.setdefault(FULL, []).append((full_step, dict(
                    device_kv_mib=full_bytes / 2**20, sparse_layer_kv_ratio=1.0, model_ms=full_step * 1e3,
                    prefill_ms=prefill_attention)))
                bar.update(1)
                for name in indexes:
                    passes_of.setdefault(name, []).append(
                        _time_index(model, base, tokens, name, budget, runtime_options, steps, warmup, builds[name]))
                    bar.update(1)
            full_step = min(step for step, _ in passes_of[FULL])
            for name, timed in passes_of.items():
                step, extra = min(timed, key=lambda t: t[0])
                rows.append(_row(context, batch, name, step, full_step, **extra,
                                 step_ms_passes=[t * 1e3 for t, _ in timed]))
    bar.close()
    return {"benchmark": "latency", "environment": environment(),
            "settings": {"contexts": list(contexts), "budget": budget, "steps": steps, "warmup": warmup,
                         "passes": passes, "batches": list(batches), "floor_context": floor_context,
                         "runtime_options": runtime_options,
                         "rules": resolved_rules([budget], sink=runtime_options.get("sink", 16),
                                                 window=runtime_options.get("window"),
                                                 page_size=runtime_options.get("page_size"))},
            "rows": rows}


COLUMNS = [("context", "context", "d"), ("batch", "batch", "d"), ("method", "method", ""),
           ("step_ms", "ms/step", ".1f"), ("ratio", "vs full KV", ".2f"), ("tokens_per_s", "tokens/s", ".1f"),
           ("admit_ms", "admit ms", ".2f"), ("search_ms", "search ms", ".2f"), ("transfer_ms", "transfer ms", ".2f"),
           ("attention_ms", "attention ms", ".2f"), ("other_ms", "other ms", ".2f"), ("model_ms", "model ms", ".1f"),
           ("kib_moved_per_step", "KiB moved/step", ".0f"), ("hit_rate", "hit rate", ".2f"),
           ("device_kv_mib", "device KV MiB", ".1f"), ("sparse_layer_kv_ratio", "sparse layer KV / full", ".3f"),
           ("prefill_ms", "prefill attn / index build ms per layer", ".1f")]


def format_latency(result: dict) -> str:
    return table(result["rows"], COLUMNS)


def plot_latency(result: dict, path) -> None:
    """ms per decode step against context, one line per method and batch size; full KV and the floor dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    batches = sorted({r.get("batch", 1) for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        mine = [r for r in rows if r.get("batch", 1) == batch]
        for name in dict.fromkeys(r["method"] for r in mine):
            if name.startswith("floor"):
                floor = next(r["step_ms"] for r in mine if r["method"] == name)
                ax.axhline(floor, color="gray", linestyle="--", label=f"floor: full KV at {result['settings'].get('floor_context', 300)} tokens")
                continue
            pts = sorted((r["context"], r["step_ms"]) for r in mine if r["method"] == name)
            ax.plot(*zip(*pts), marker="o", label=name, linestyle="--" if name == FULL else "-",
                    linewidth=2.5 if name == FULL else 1.5)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("decode time per step (ms)")
        ax.set_title(f"batch {batch}, budget {result['settings']['budget']} - {result['environment']['device']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


README_START, README_END = "<!-- latency:start -->", "<!-- latency:end -->"


def _command(result: dict) -> str:
    s = result["settings"]
    model = s.get("model", "smollm2-135m")
    methods = list(dict.fromkeys(r["method"] for r in result["rows"] if r["method"] != FULL
                                 and not r["method"].startswith("floor")))
    return (f"icecache bench latency --model {model} --contexts {' '.join(map(str, s['contexts']))} "
            f"--batch {' '.join(map(str, s.get('batches', [1])))} --indexes {' '.join(methods)} "
            f"--budget {s['budget']} --steps {s['steps']}" + (f" --passes {s['passes']}" if "passes" in s else "")
            + (f" --page-size {page_size}" if (page_size := _budget(s).page_size) != default_page_size(s["budget"])
               else ""))


def _budget(settings: dict) -> Budget:
    """A run's budget rule: what it recorded for its budget (`settings["rules"]`), or for runs from before
    rules were recorded, their window (32) and 16-token pages."""
    recorded = (settings.get("rules") or {}).get(str(settings["budget"]))
    if recorded is not None:
        return Budget(settings["budget"], **recorded)
    options = settings.get("runtime_options") or {}
    if options.get("page_size", 16) is None or options.get("window", 32) is None:
        raise ValueError("the run leaves its rule to a default it did not record: pin it (`settings['rules']`)")
    return Budget(settings["budget"], page_size=options.get("page_size", 16), window=options.get("window", 32))


def render_latency(results: list[dict], plot: str | None = "latency/latency.png") -> str:
    """benchmarks/LATENCY.md from the committed runs, `benchmarks/latency/*.json` in name order (a test
    re-renders it, so the text cannot drift from them), linking `plot` (`combined_plot` of the same runs)."""
    lines = [
        "# Decode latency",
        "",
        "Generated by `icecache.bench.latency.render_latency` from `benchmarks/latency/*.json`; after a new run "
        "(`icecache bench latency ... --out DIR`, its `latency.json` copied there under a new name), re-render "
        "with:",
        "",
        "```bash",
        ".venv/bin/python -m icecache.bench.latency benchmarks/latency/*.json --readme README.md \\",
        "    --plot benchmarks/latency/latency.png > benchmarks/LATENCY.md",
        "```",
        "",
        "Milliseconds per decode step of the whole model, after warm-up steps, full KV and every index timed "
        "the same way, back to back after one shared prefill per context; runs with `--passes N` time the "
        "methods in turn N times, each from a fresh cache, and each row keeps its method's fastest pass "
        "(`step_ms_passes` in the JSON keeps every pass: on this CPU a full-KV step can take twice as long in "
        "one pass as in the next, with the allocator's state, as its cache grows by a new tensor per layer and "
        "step). A sparse row's step splits into the "
        "sparse layers' phases (admit: window write and index insert; search; transfer: slot assignment and "
        "page loads; attention), `other` (the sparse layers' work between the phases: the runtime's own "
        "overhead) and `model` (the rest: projections, MLPs, dense layers, LM head); the six add up to the "
        "step. The floor row is full KV at a short context. The machine is shared: compare ratios within a run.",
        "",
    ]
    if plot:
        lines += [f"![ms per decode step against context, one panel per batch size]({plot})", ""]
    for result in results:
        s, env = result["settings"], result["environment"]
        lines += [f"## {s.get('model', 'smollm2-135m')}, contexts {', '.join(map(str, s['contexts']))}, "
                  f"batch {', '.join(map(str, s.get('batches', [1])))}", "",
                  f"`{_command(result)}` ({s['dtype'] if 'dtype' in s else 'float32'}, sink 16 / window {_budget(s).window} / "
                  f"page {_budget(s).page_size}, {s['steps']} timed steps after {s['warmup']} warm-up, "
                  f"{'the fastest of %d passes' % s['passes'] if s.get('passes', 1) > 1 else 'one pass'}; {env['device']}, "
                  f"{env['threads']} threads, {env['date']}):", "", format_latency(result), ""]
    return "\n".join(lines)


def combined_plot(results: list[dict], path) -> None:
    """One `plot_latency` over the rows of several runs (e.g. real weights up to 8k, random ones past it)."""
    first = results[0]
    plot_latency({**first, "rows": [r for result in results for r in result["rows"]]}, path)


def latency_readme_block(results: list[dict], method: str = "tree") -> str:
    """The README's lines: per run and batch size, `method`'s step against full KV's at each context, and
    where its step goes at the largest context."""
    lines = []
    for result in results:
        model = result["settings"].get("model", "smollm2-135m")
        rows = result["rows"]
        for batch in sorted({r.get("batch", 1) for r in rows}):
            mine = {r["context"]: r for r in rows if r["method"] == method and r.get("batch", 1) == batch}
            full = {r["context"]: r for r in rows if r["method"] == FULL and r.get("batch", 1) == batch}
            if not mine:
                continue
            points = ", ".join(f"{c}: {mine[c]['step_ms']:.0f} ms against {full[c]['step_ms']:.0f} "
                               f"({mine[c]['ratio']:.2f}x, {mine[c]['tokens_per_s']:.1f} vs "
                               f"{full[c]['tokens_per_s']:.1f} tok/s)" for c in sorted(mine))
            top = mine[max(mine)]
            shares = ", ".join(f"{name} {top[key] / top['step_ms']:.0%}" for name, key in (
                ("search", "search_ms"), ("other", "other_ms"), ("model", "model_ms")) if top.get(key) is not None)
            lines.append(f"- {model}, batch {batch}, budget {result['settings']['budget']}: {method} {points}; at "
                         f"{max(mine)} tokens: {shares} of its step")
    return "\n".join(lines)


def sync_readme(text: str, results: list[dict]) -> str:
    """`text` (the README) with its latency block replaced by `latency_readme_block(results)`."""
    return replace_block(text, README_START, README_END, latency_readme_block(results))


if __name__ == "__main__":
    import sys

    # python -m icecache.bench.latency benchmarks/latency/*.json [--readme README.md] [--plot PNG] > benchmarks/LATENCY.md
    args = sys.argv[1:]
    runs = [json.loads(Path(p).read_text()) for p in sorted(a for a in args if a.endswith(".json"))]
    if "--readme" in args:
        readme = Path(args[args.index("--readme") + 1])
        readme.write_text(sync_readme(readme.read_text(), runs))
    if "--plot" in args:
        combined_plot(runs, args[args.index("--plot") + 1])
    print(render_latency(runs), end="")
