"""`icecache bench syncs`: the host synchronisations of a decode step on CUDA, listed by call site.

A decode step on a GPU should queue its work and return; every synchronising call (a device-to-host copy,
`.item()`, `nonzero`, a blocking stream wait) stalls the host until the GPU has caught up, and the next
layer's launches wait with it. PyTorch reports each one while `torch.cuda.set_sync_debug_mode("warn")` is
on (as a warning; not every synchronising operation is covered, see its docstring). `HostSyncRecorder`
attributes each report to its call site, the innermost frame in icecache's own code (else the innermost
frame outside torch: the model's code), and `run_syncs` counts them per decode step, full KV beside every
index, after one shared prefill, so the sites an index adds are the rows full KV does not have.

Some syncs are inherent to a host-side index: the tree, HNSW and IVF search on the host, so each sparse layer
copies its queries to the host and its page ids back. The list is what a GPU session works from.
"""

from __future__ import annotations

import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch

from ..index import available_indexes
from ..runtime import IceRuntime, full_kv_copy, shared_prefill
from .common import environment, prompt_ids, table

FULL = "full KV"
_PACKAGE = str(Path(__file__).resolve().parents[1])  # .../icecache
_BENCH = str(Path(__file__).resolve().parent)  # the decode loop below is not a site


def call_site(frames: list[traceback.FrameSummary]) -> str:
    """`path:line  code` of the innermost frame of `frames` (outermost first, as `traceback.extract_stack`
    gives them) in icecache's own code outside `icecache/bench`, else the innermost outside torch and the
    warnings module; paths inside the package are relative to it."""
    def inside(frame, root):
        return str(Path(frame.filename).resolve()).startswith(root)

    ours = [f for f in frames if inside(f, _PACKAGE) and not inside(f, _BENCH)]
    if ours:
        frame = ours[-1]
    else:
        outside = [f for f in frames if "/torch/" not in f.filename and not f.filename.endswith("warnings.py")]
        frame = (outside or frames)[-1]
    path = str(Path(frame.filename).resolve())
    if path.startswith(_PACKAGE):
        path = "icecache/" + path[len(_PACKAGE) + 1:]
    return f"{path}:{frame.lineno}  {(frame.line or '').strip()}"


class HostSyncRecorder:
    """Context manager: counts the synchronising calls PyTorch reports inside it, by `call_site`
    (`sites`, a Counter). On CUDA it switches `torch.cuda.set_sync_debug_mode("warn")` on and back off;
    `cuda=False` only listens (for reports raised some other way, e.g. in tests)."""

    def __init__(self, cuda: bool | None = None) -> None:
        self.cuda = torch.cuda.is_available() if cuda is None else cuda
        self.sites: Counter[str] = Counter()

    def _show(self, message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" in str(message).lower():
            self.sites[call_site(traceback.extract_stack()[:-1])] += 1
        else:
            self._previous_show(message, category, filename, lineno, file, line)

    def __enter__(self) -> "HostSyncRecorder":
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("always")  # every occurrence, not the first per site
        self._previous_show, warnings.showwarning = warnings.showwarning, self._show
        if self.cuda:
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.set_sync_debug_mode("default")
        self._warnings.__exit__(*exc)  # restores showwarning and the filters


@torch.no_grad()
def _count_syncs(model, cache, first_token: torch.Tensor, steps: int, warmup: int) -> Counter:
    """Synchronising calls per call site over `steps` greedy decode steps, after `warmup` unrecorded ones."""
    token = first_token
    for _ in range(warmup):
        token = model(token, cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
    with HostSyncRecorder() as recorder:
        for _ in range(steps):
            token = model(token, cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
    return recorder.sites


def _sync_row(method: str, sites: Counter, full_sites: Counter, steps: int) -> dict:
    beyond = sum(n for site, n in sites.items() if site not in full_sites)
    return {"method": method, "syncs_per_step": sum(sites.values()) / steps, "beyond_full_kv": beyond / steps,
            "sites": {site: n / steps for site, n in sites.most_common()}}


def run_syncs(model, tokenizer, context: int = 4096, indexes=None, budget: int = 256, steps: int = 4,
              warmup: int = 2, batch: int = 1, runtime_options: dict | None = None, prose: str | None = None) -> dict:
    """Host synchronisations per decode step on CUDA, full KV beside every index (one shared prefill of
    `context` tokens; a batch decodes `batch` copies of the prompt). Each row: `syncs_per_step` and
    `sites` (call site -> count per step); `beyond_full_kv` counts the syncs at sites full KV does not have."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise ValueError(f"bench syncs lists CUDA host synchronisations: the model must be on a CUDA device, "
                         f"got {device.type!r}")
    indexes = list(indexes or available_indexes())
    runtime_options = runtime_options or {}
    base, first = shared_prefill(model, prompt_ids(tokenizer, context, prose).to(device), budget)
    tokens = first.repeat(batch, 1)
    full = full_kv_copy(base)
    full.batch_repeat_interleave(batch)
    full_sites = _count_syncs(model, full, tokens, steps, warmup)
    del full
    rows = [_sync_row(FULL, full_sites, full_sites, steps)]
    for name in indexes:
        cache = IceRuntime(index=name, budget=budget, **runtime_options).new_cache(model, prefill=base)
        cache.batch_repeat_interleave(batch)
        rows.append(_sync_row(name, _count_syncs(model, cache, tokens, steps, warmup), full_sites, steps))
        del cache
    return {"environment": environment(), "rows": rows,
            "settings": {"context": context, "budget": budget, "steps": steps, "warmup": warmup, "batch": batch,
                         "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                         **runtime_options}}


COLUMNS = [("method", "method", "s"), ("syncs_per_step", "syncs / step", ".1f"),
           ("beyond_full_kv", "at sites full KV lacks", ".1f")]


def format_syncs(result: dict) -> str:
    """The per-method table, then each method's call sites (count per step) not already listed for full KV."""
    s = result["settings"]
    lines = [f"host synchronisations per decode step, context {s['context']}, batch {s['batch']}, budget "
             f"{s['budget']}, {s['steps']} steps after {s['warmup']} warm-up ({result['environment']['device']})",
             "", table(result["rows"], COLUMNS)]
    full = next((r["sites"] for r in result["rows"] if r["method"] == FULL), {})
    for row in result["rows"]:
        listed = row["sites"] if row["method"] == FULL else {k: v for k, v in row["sites"].items() if k not in full}
        if listed:
            lines += ["", f"{row['method']}:" if row["method"] == FULL else f"{row['method']} (beyond full KV):"]
            lines += [f"  {n:6.1f}  {site}" for site, n in listed.items()]
    return "\n".join(lines)
