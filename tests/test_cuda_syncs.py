"""The runtime on CUDA. A sparse layer there gives what the same layer gives on the CPU, and its decode step
waits for the GPU only where data must cross: the new token's K/V copied to the host tier (one wait for both),
and (for an index that searches on the device) its page ids copied back for the plan. Everything else the
runtime does per step (slot assignment, miss list, staging, `active` row, window writes, index inserts) is
planned on the host and reaches the device by non-blocking copies. An index's own crossings (the tree sends its
queries to the host) are its business: `icecache bench syncs` lists them.

Runs where there is CUDA (`benchmarks/gpu_check.sh`); skipped elsewhere."""

import math

import pytest
import torch

import icecache
from icecache.bench.syncs import HostSyncRecorder
from icecache.kernels import paged_decode_attention
from icecache.runtime import Budget, SparseLayer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisations exist only on CUDA")

#: the runtime's own files, and the sites in them where a step may wait: (file, a piece of the line's code)
RUNTIME_FILES = ("icecache/runtime/layer.py", "icecache/runtime/tiers.py", "icecache/runtime/cache.py")
ALLOWED = (("icecache/runtime/tiers.py", ".copy_(k)"),  # the new token's K (and V before it) to the host tier
           ("icecache/runtime/layer.py", "page_ids.cpu()"),  # page ids of an index that searched on the device
           ("icecache/runtime/layer.py", "table[heads"))  # the rows of a page table kept there (ivf)


def _layer(name, device, budget, head_dim=64, page_size=8, kv_heads=2):
    """A sparse layer of one index on `device` (sink 16, window 32), attending with `paged_decode_attention`
    (the Triton kernel on CUDA)."""
    index = icecache.get_index(name, head_dim=head_dim, page_size=page_size)
    return SparseLayer(index, Budget(budget, page_size, 16, 32), kv_heads, head_dim, torch.float32, device,
                       kernel=paged_decode_attention)


@pytest.mark.parametrize("name", icecache.available_indexes())
def test_the_runtime_waits_for_the_gpu_only_where_data_crosses(name):
    device, kv_heads, group, head_dim = torch.device("cuda"), 2, 3, 64
    layer = _layer(name, device, 128)
    g = torch.Generator(device).manual_seed(0)
    k, v = (torch.randn(kv_heads, 1040, head_dim, device=device, generator=g) for _ in range(2))
    queries = torch.randn(16, kv_heads * group, head_dim, device=device, generator=g)
    layer.store(k[:, :1024], v[:, :1024])
    layer.admit(queries[:1].expand(4, -1, -1).transpose(0, 1).contiguous())
    for t in range(4):  # warm-up: the index is built and the retrieval slots grown
        layer.store(k[:, 1024 + t : 1025 + t], v[:, 1024 + t : 1025 + t])
        layer.decode(queries[t])
    with HostSyncRecorder(cuda=True) as recorder:
        for t in range(4, 16):
            layer.store(k[:, 1024 + t : 1025 + t], v[:, 1024 + t : 1025 + t])
            layer.decode(queries[t])
    runtime_sites = [site for site in recorder.sites if site.startswith(RUNTIME_FILES)]
    unexpected = [site for site in runtime_sites
                  if not any(site.startswith(path) and code in site for path, code in ALLOWED)]
    assert not unexpected, f"{name}: the runtime waits for the GPU at {unexpected} (all sites: {dict(recorder.sites)})"


@pytest.mark.parametrize("budget", [2048, 128])
@pytest.mark.parametrize("name", icecache.available_indexes())
def test_a_layer_on_cuda_gives_what_it_gives_on_the_cpu(name, budget):
    """Budget 2048 covers the context (every page, no search): equal within float error for every index;
    budget 128 searches: the tree, which searches on the host from the same numbers, picks the same pages."""
    if budget < 2048 and name != "tree":
        pytest.skip("a device-side search may break near-ties another way than the CPU's")
    g = torch.Generator().manual_seed(1)
    kv_heads, group, head_dim, prefill, steps = 2, 3, 64, 1000, 12
    k, v = (torch.randn(kv_heads, prefill + steps, head_dim, generator=g) for _ in range(2))
    queries = torch.randn(steps, kv_heads * group, head_dim, generator=g) * 2
    outputs = []
    for device in (torch.device("cpu"), torch.device("cuda")):
        layer = _layer(name, device, budget)
        layer.store(k[:, :prefill].to(device), v[:, :prefill].to(device))
        layer.admit(queries[:1].transpose(0, 1).contiguous().to(device))
        out = []
        for t in range(steps):
            layer.store(k[:, prefill + t : prefill + t + 1].to(device), v[:, prefill + t : prefill + t + 1].to(device))
            out.append(layer.decode(queries[t].to(device), 1 / math.sqrt(head_dim)).cpu())
        outputs.append(torch.stack(out))
    assert (outputs[1] - outputs[0]).abs().max().item() < 1e-4
