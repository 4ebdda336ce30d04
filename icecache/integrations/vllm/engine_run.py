"""Run token-id prompts through vLLM, stock and with icecache, in one process; used by the tests and the
`icecache bench vllm` benchmark from the vLLM environment:

    .venv-vllm/bin/python -m icecache.integrations.vllm.engine_run JOB.json OUT.json

`JOB.json` holds `{"model": folder, "max_model_len": n, "configs": [null | {IceRuntime options}, ...],
"batches": [[{"ids": [...], "max_tokens": n}, ...], ...], "kv_cache_gib": g, "engine": {LLM options}}`. Each config gets one engine;
each batch is submitted at once (concurrent requests, continuously batched). `OUT.json` receives, per
config, the greedy token ids of every request, the wall time of every batch, (with icecache's step
timer) the attention seconds of every pure-decode step, and the engine process's peak resident memory.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def _children_peak_rss() -> int | None:
    """Peak resident memory in bytes (Linux `VmHWM`) of the largest child process: vLLM's engine core, which
    holds the model, vLLM's KV cache and icecache's per-request state. None where it cannot be read."""
    import psutil  # a vLLM dependency

    peaks = []
    for child in psutil.Process().children(recursive=True):
        try:
            status = Path(f"/proc/{child.pid}/status").read_text()
        except OSError:
            continue
        peaks += [int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:")]
    return max(peaks, default=None)


def run(job: dict) -> list[dict]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(job.get("kv_cache_gib", 1)))
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from . import engine_kwargs

    results = []
    for config in job["configs"]:
        timing = Path(tempfile.mkdtemp()) / "steps.jsonl"
        os.environ["ICECACHE_VLLM_STEP_TIMES"] = str(timing)  # read by the backend in the worker process
        start = time.perf_counter()
        kwargs = engine_kwargs(**config) if config is not None else {}
        llm = LLM(model=job["model"], max_model_len=job.get("max_model_len", 4096), enforce_eager=True,
                  dtype="float32", seed=0, **job.get("engine", {}), **kwargs)
        started = time.perf_counter() - start
        batches = []
        for batch in job["batches"]:
            prompts = [TokensPrompt(prompt_token_ids=r["ids"]) for r in batch]
            params = [SamplingParams(temperature=0.0, max_tokens=r["max_tokens"], ignore_eos=r.get("ignore_eos", False))
                      for r in batch]
            t0 = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            batches.append({"seconds": time.perf_counter() - t0,
                            "tokens": [list(o.outputs[0].token_ids) for o in outputs],
                            "prompt_tokens": sum(len(r["ids"]) for r in batch)})
        peak_rss = _children_peak_rss()
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        steps = [json.loads(line) for line in timing.read_text().splitlines()] if timing.exists() else []
        results.append({"config": config, "startup_seconds": started, "batches": batches, "steps": steps,
                        "engine_peak_rss_bytes": peak_rss})
    return results


if __name__ == "__main__":
    job_path, out_path = sys.argv[1], sys.argv[2]
    Path(out_path).write_text(json.dumps(run(json.loads(Path(job_path).read_text()))))
