"""The compiled CPU decode step (slot assignment, page loads and attention as numba code) against the torch
path it replaces: the same outputs within 1e-5, the same plans and the same device tier, for every index,
with and without the model's own scale, through inserts as tokens leave the window."""

import pytest
import torch

import icecache


def run_layer(name: str, compiled: bool, steps: int = 24, n: int = 700, scale: float | None = None, seed: int = 0):
    runtime = icecache.IceRuntime(index=name, budget=64, page_size=8, sink=8, window=16, compiled=compiled)
    layer = runtime._make_layer(2, 32, torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    layer.store(torch.randn(2, n, 32, generator=g), torch.randn(2, n, 32, generator=g))
    layer.note_prefill_queries(torch.randn(6, 16, 32, generator=g), scale)
    outputs, plans = [], []
    for _ in range(steps):
        layer.store(torch.randn(2, 1, 32, generator=g), torch.randn(2, 1, 32, generator=g))
        out, plan = layer.step(torch.randn(6, 32, generator=g), scale)
        outputs.append(out)
        plans.append(plan)
    return layer, outputs, plans


@pytest.mark.parametrize("scale", [None, 0.3])
@pytest.mark.parametrize("name", icecache.available_indexes())
def test_compiled_step_equals_the_torch_path(name, scale):
    fast, fast_out, fast_plans = run_layer(name, compiled=True, scale=scale)
    slow, slow_out, slow_plans = run_layer(name, compiled=False, scale=scale)
    assert fast.compiled and not slow.compiled
    for a, b in zip(fast_out, slow_out):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(fast_plans, slow_plans):
        for field in ("page_ids", "slots", "load_heads", "load_slots", "load_pages", "load_positions"):
            assert torch.equal(getattr(a, field).cpu(), getattr(b, field).cpu()), field
    for field in ("slot_page", "active", "filled"):
        assert torch.equal(getattr(fast.tier, field), getattr(slow.tier, field)), field
    valid = fast.tier.attention_mask().unsqueeze(-1)
    assert torch.equal(fast.tier.k * valid, slow.tier.k * valid)
    assert fast.stats.bytes_moved == slow.stats.bytes_moved and fast.stats.pages_loaded == slow.stats.pages_loaded


def test_compiled_step_only_where_it_equals_the_reference():
    runtime = icecache.IceRuntime(index="exact", budget=64)
    assert runtime._make_layer(2, 32, torch.float32, torch.device("cpu")).compiled
    assert not runtime._make_layer(2, 32, torch.bfloat16, torch.device("cpu")).compiled
    custom = icecache.IceRuntime(index="exact", budget=64, kernel=lambda q, k, v, m, s: q)
    assert not custom._make_layer(2, 32, torch.float32, torch.device("cpu")).compiled
    with pytest.raises(ValueError, match="compiled"):
        icecache.IceRuntime(compiled="yes")
