"""`icecache bench prefill`: prefill time and peak memory at long context, icecache beside transformers.

Each (method, context) runs in a fresh Python process, so its peak resident set size (RSS) is its own:
loading the model, reading the prompt and producing the first token. Methods:

- `icecache`: `IceRuntime(index=...)`, the prompt in chunks of `chunk` tokens through the same cache
  (`chunked_prefill`, logits of the last position only), then the first decode step, which builds every
  sparse layer's index; reported as prefill + index build.
- `transformers chunked`: `model.generate(ids, max_new_tokens=1, prefill_chunk_size=chunk)`, transformers'
  own chunked prefill into its own cache.
- `transformers`: `model.generate(ids, max_new_tokens=1)`, one forward over the whole prompt (what a user
  gets by default); skipped above `--max-unchunked` tokens, where it needs tens of GB and many minutes.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

from .common import environment, table

METHODS = ("icecache", "transformers chunked", "transformers")


def _measure(model_name: str, method: str, context: int, chunk: int, index: str, budget: int) -> dict:
    """Runs inside the child process."""
    import torch

    from ..models import load_model
    from ..runtime import IceRuntime, chunked_prefill
    from .common import prompt_ids

    torch.set_grad_enabled(False)
    model, tokenizer = load_model(model_name)
    ids = prompt_ids(tokenizer, context)
    loaded_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    build_s = 0.0
    start = time.perf_counter()
    if method == "icecache":
        runtime = IceRuntime(index=index, budget=budget)
        cache = runtime.new_cache(model)
        logits = chunked_prefill(model, cache, ids, chunk)
        prefill_s = time.perf_counter() - start
        token = logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        model(token, cache=cache, logits_to_keep=1)  # the first decode step builds the indexes
        build_s = time.perf_counter() - start
        report = runtime.report(cache)
        device_mib, full_mib = report.device_kv_bytes / 2**20, report.full_kv_bytes / 2**20
    else:
        out = model.generate(ids, max_new_tokens=1, do_sample=False,
                             prefill_chunk_size=chunk if method == "transformers chunked" else None,
                             return_dict_in_generate=True)
        prefill_s = time.perf_counter() - start
        kv = out.cache if hasattr(out, "cache") else out.past_key_values
        device_mib = full_mib = sum(l.keys.numel() * l.keys.element_size() * 2 for l in kv.layers) / 2**20
    return {"method": method, "context": context, "prefill_s": prefill_s, "index_build_s": build_s,
            "total_s": prefill_s + build_s, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "model_loaded_rss_gib": loaded_rss, "kv_mib": device_mib, "full_kv_mib": full_mib}


# index "tree" is DEFAULT_INDEX spelled out: importing the indexes here would add to the RSS measured in children
def run_prefill(model_name: str, contexts=(8192, 16384, 32000), methods=METHODS, chunk: int = 2048,
                index: str = "tree", budget: int = 256, max_unchunked: int = 16384, progress=print) -> dict:
    """Measure every (method, context) in its own process; returns a JSON-ready dict."""
    rows = []
    for context in contexts:
        for method in methods:
            if method == "transformers" and context > max_unchunked:
                continue
            args = json.dumps({"model_name": model_name, "method": method, "context": context, "chunk": chunk,
                               "index": index, "budget": budget})
            done = subprocess.run([sys.executable, "-m", "icecache.bench.prefill", args], capture_output=True,
                                  text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            if done.returncode != 0:
                row = {"method": method, "context": context, "error": done.stderr.strip().splitlines()[-1:]}
            else:
                row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            progress(json.dumps(row))
    return {"benchmark": "prefill", "environment": environment(),
            "settings": {"model": model_name, "contexts": list(contexts), "chunk": chunk, "index": index,
                         "budget": budget, "max_unchunked": max_unchunked},
            "rows": rows}


COLUMNS = [("context", "context", "d"), ("method", "method", ""), ("prefill_s", "prefill s", ".1f"),
           ("index_build_s", "index build s", ".1f"), ("total_s", "total s", ".1f"),
           ("peak_rss_gib", "peak RSS GiB", ".2f"), ("model_loaded_rss_gib", "RSS after load GiB", ".2f"),
           ("kv_mib", "KV on device MiB", ".1f"), ("full_kv_mib", "full KV MiB", ".1f")]


def format_prefill(result: dict) -> str:
    return table(result["rows"], COLUMNS)


if __name__ == "__main__":  # one measurement, in a fresh process
    print(json.dumps(_measure(**json.loads(sys.argv[1]))))
