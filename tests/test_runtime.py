"""The paged runtime on random K/V: equivalence with dense attention, budget rule, transfers, errors."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import icecache
from icecache.kernels import dense_decode_attention, paged_decode_attention_reference
from icecache.runtime import Budget, SparseLayer
from icecache.runtime.budget import describe_rules, resolved_rules

INDEXES = icecache.available_indexes()


def make_layer(name, budget, kv_heads=2, head_dim=16, page_size=4, sink=4, window=8):
    index = icecache.get_index(name, head_dim=head_dim, page_size=page_size)
    return SparseLayer(index, Budget(budget, page_size, sink, window), kv_heads, head_dim, torch.float32,
                       torch.device("cpu"))


def run_decode(layer, k, v, q_steps, prefill):
    """Prefill `prefill` tokens, then decode the rest one by one; yield (query, output, tokens so far)."""
    layer.store(k[:, :prefill], v[:, :prefill])
    layer.admit(q_steps[0].view(layer.kv_heads, -1, layer.head_dim))
    for t in range(prefill, k.shape[1]):
        layer.store(k[:, t : t + 1], v[:, t : t + 1])
        q = q_steps[t - prefill]
        yield q, layer.decode(q), t + 1


@pytest.mark.parametrize("name", INDEXES)
@given(seed=st.integers(0, 10_000), prefill=st.integers(1, 70), steps=st.integers(1, 20), group=st.integers(1, 3))
def test_budget_at_least_context_equals_dense_attention(name, seed, prefill, steps, group):
    g = torch.Generator().manual_seed(seed)
    kv_heads, head_dim, n = 2, 16, prefill + steps
    k, v = torch.randn(kv_heads, n, head_dim, generator=g), torch.randn(kv_heads, n, head_dim, generator=g)
    queries = torch.randn(steps, kv_heads * group, head_dim, generator=g) * 2
    layer = make_layer(name, budget=max(n, 12))  # budget >= context (and >= sink + window)
    for q, out, seen in run_decode(layer, k, v, queries, prefill):
        expected = dense_decode_attention(q, k[:, :seen], v[:, :seen])
        assert (out - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", INDEXES)
@given(seed=st.integers(0, 10_000), prefill=st.integers(1, 120), steps=st.integers(1, 30),
       budget=st.integers(12, 60))
def test_selection_never_exceeds_budget(name, seed, prefill, steps, budget):
    g = torch.Generator().manual_seed(seed)
    n = prefill + steps
    k, v = torch.randn(2, n, 16, generator=g), torch.randn(2, n, 16, generator=g)
    queries = torch.randn(steps, 2, 16, generator=g)
    layer = make_layer(name, budget=budget)
    for _, out, seen in run_decode(layer, k, v, queries, prefill):
        attended = layer.tier.attention_mask().sum(dim=(1, 2))
        assert bool((attended <= min(budget, seen)).all())
        # sink and window are always attended in full
        assert bool((attended >= min(seen, 4 + 8)).all())
        assert torch.isfinite(out).all()


def test_cached_pages_are_not_moved_again():
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 300, 16, generator=g), torch.randn(2, 300, 16, generator=g)
    q = torch.randn(2, 16, generator=g)
    layer = make_layer("exact", budget=44)  # 4 sink + 8 window + 8 pages of 4
    list(run_decode(layer, k[:, :290], v[:, :290], q.expand(40, 2, 16), 280))
    # the same query every step: after the first step only changed pages move
    assert layer.stats.pages_loaded < layer.stats.pages_selected
    assert 0.0 < layer.stats.hit_rate < 1.0
    assert layer.stats.bytes_moved == layer.stats.pages_loaded * 2 * 4 * 16 * 4


@pytest.mark.parametrize("name", ["exact", "tree"])
def test_followers_prefetch_the_leaders_pages_with_the_same_result(name):
    # layer reuse: a follower loads the leader's plan right after the leader's attention (prefetch); its
    # output must equal a follower that loads them only when its own turn comes
    g = torch.Generator().manual_seed(1)
    kv, d, n, prefill = 2, 16, 160, 120
    budget = Budget(44, 4, 4, 8)
    index = icecache.get_index(name, head_dim=d, page_size=4)
    layers = [SparseLayer(index, budget, kv, d, torch.float32, torch.device("cpu"))]
    layers += [SparseLayer(index, budget, kv, d, torch.float32, torch.device("cpu"), leader=layers[0])
               for _ in range(2)]
    layers[2].prefetch = False  # the reference follower loads at its own turn
    data = [(torch.randn(kv, n, d, generator=g), torch.randn(kv, n, d, generator=g)) for _ in range(2)]
    data.append(data[1])  # both followers hold the same K/V
    q = torch.randn(n - prefill + 1, 2 * kv, d, generator=g)
    for layer, (k, v) in zip(layers, data):
        layer.store(k[:, :prefill], v[:, :prefill])
        layer.admit(q[:1].view(kv, -1, d))
    for t in range(prefill, n):
        outs = []
        for i, (layer, (k, v)) in enumerate(zip(layers, data)):
            layer.store(k[:, t : t + 1], v[:, t : t + 1])
            moved = layer.stats.bytes_moved
            outs.append(layer.decode(q[t - prefill + 1]))
            if i == 1:
                assert layer.stats.bytes_moved == moved  # everything arrived by prefetch
        assert torch.equal(outs[1], outs[2])
        assert not torch.equal(outs[0], outs[1])
    assert layers[1].stats.pages_loaded == layers[2].stats.pages_loaded > 0
    assert layers[1].stats.hit_rate == pytest.approx(layers[2].stats.hit_rate)


def test_budget_rule_errors_name_the_argument():
    with pytest.raises(ValueError, match="budget=40 is smaller than sink \\+ window"):
        Budget(40, 16, 16, 32)
    with pytest.raises(ValueError, match="smaller than one page"):
        Budget(8, 16, 0, 4)
    with pytest.raises(ValueError, match="window"):
        Budget(64, 16, 16, 0)
    with pytest.raises(TypeError, match="budget"):
        Budget(64.0, 16, 16, 32)
    # the window follows the budget unless given: 16 under 128 tokens (a second page at 64), else 32
    assert Budget(64).window == 16 and Budget(64, 16).max_pages == 2 and Budget(64, 16, window=32).max_pages == 1
    assert Budget(127).window == 16 and Budget(128).window == 32 and Budget(256).max_pages == 26
    # pages hold 8 tokens unless told (four retrieved pages at 64)
    assert Budget(64).page_size == 8 and Budget(64).max_pages == 4 and Budget(64, page_size=16).max_pages == 2
    assert Budget(128).page_size == Budget(256).page_size == 8 and Budget(64, 4).page_size == 4
    assert icecache.IceRuntime(index="exact", budget=64).budget.window == 16
    # an index paging otherwise than the budget is refused (pages are copied slot for slot into the tier)
    with pytest.raises(ValueError, match=r"index's page_size \(4\) must equal the budget's page_size \(8\)"):
        SparseLayer(icecache.get_index("window", head_dim=8, page_size=4), Budget(64, 8), 2, 8, torch.float32,
                    torch.device("cpu"))
    # what each budget resolves to, as benchmark JSON records it, and in words
    rules = resolved_rules([64, 256])
    assert rules == {"64": {"sink": 16, "window": 16, "page_size": 8}, "256": {"sink": 16, "window": 32, "page_size": 8}}
    assert describe_rules(rules) == "window 16 and page 8 at budget 64, window 32 and page 8 at budget 256"
    assert describe_rules(resolved_rules([128, 256], window=24, page_size=8)) == "window 24, page 8"
    with pytest.raises(ValueError, match="budget"):
        icecache.IceRuntime(index="exact", budget=24)


def test_runtime_rejects_unknown_indexes_and_accepts_every_registered_one():
    with pytest.raises(ValueError, match="unknown index 'nope'; available indexes: \\['exact'"):
        icecache.IceRuntime(index="nope")
    assert set(INDEXES) >= {"tree", "hnsw", "ivf", "quest", "exact", "window"}
    for name in INDEXES:
        assert icecache.IceRuntime(index=name).index_name == name


def test_reference_attention_masks_and_gqa():
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(2, 3, 4, 8, generator=g), torch.randn(2, 3, 4, 8, generator=g)
    valid = torch.rand(2, 3, 4, generator=g) > 0.4
    valid[:, 0, 0] = True
    q = torch.randn(6, 8, generator=g)
    out = paged_decode_attention_reference(q, k, v, valid)
    for h in range(6):
        kv = h // 3
        kk, vv = k[kv].reshape(-1, 8)[valid[kv].flatten()], v[kv].reshape(-1, 8)[valid[kv].flatten()]
        expected = torch.softmax(kk @ q[h] / 8**0.5, 0) @ vv
        assert torch.allclose(out[h], expected, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        paged_decode_attention_reference(torch.randn(5, 8), k, v, valid)


def test_resident_logsumexp_covers_sink_and_window():
    # the normaliser the runtime hands to mass-ranking indexes: exactly the sink + window tokens' logits
    g = torch.Generator().manual_seed(5)
    budget = Budget(64, 4, sink=4, window=8)
    layer = SparseLayer(icecache.get_index("exact", head_dim=8, page_size=4), budget, 2, 8, torch.float32,
                        torch.device("cpu"))
    keys, values = torch.randn(2, 40, 8, generator=g), torch.randn(2, 40, 8, generator=g)
    layer.store(keys, values)
    layer.admit()
    queries = torch.randn(2, 3, 8, generator=g)
    resident = torch.cat([keys[:, :4], keys[:, 32:]], 1)
    expected = torch.logsumexp(torch.einsum("hgd,hnd->hgn", queries, resident) * 0.5, -1)
    assert torch.allclose(layer.tier.resident_logsumexp(queries, 0.5), expected, atol=1e-5)


def test_resident_logsumexp_skips_slots_not_written_yet():
    # before the window fills, empty resident slots must not count (their zero keys would add exp(0))
    budget = Budget(64, 4, sink=4, window=8)
    layer = SparseLayer(icecache.get_index("exact", head_dim=8, page_size=4), budget, 2, 8, torch.float32,
                        torch.device("cpu"))
    keys = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(6))
    layer.store(keys, torch.zeros_like(keys))
    layer.admit()
    queries = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(7))
    expected = torch.logsumexp(torch.einsum("hgd,hnd->hgn", queries, keys) * 0.5, -1)
    assert torch.allclose(layer.tier.resident_logsumexp(queries, 0.5), expected, atol=1e-5)


@given(ops=st.lists(st.one_of(st.tuples(st.just("update"), st.integers(1, 40)),
                              st.tuples(st.just("crop"), st.integers(1, 5)),
                              st.tuples(st.just("select"), st.integers(0, 1)),
                              st.tuples(st.just("repeat"), st.integers(1, 2)),
                              st.tuples(st.just("copy"), st.just(0))), min_size=1, max_size=25),
       seed=st.integers(0, 1000))
def test_dense_layers_grow_in_place_and_hold_what_transformers_would(ops, seed):
    """IceCache's dense layers (`GrowingLayer`) hold and return exactly what transformers' `DynamicLayer` does
    through appends, crops, batch reshuffles and copies (their buffers are adopted again after each)."""
    import copy

    from transformers.cache_utils import DynamicLayer

    from icecache.runtime.cache import GrowingLayer

    gen = torch.Generator().manual_seed(seed)
    ours, theirs = GrowingLayer(), DynamicLayer()
    batch = 2
    for op, arg in ops:
        if op == "update":
            k, v = torch.randn(batch, 2, arg, 4, generator=gen), torch.randn(batch, 2, arg, 3, generator=gen)
            got, want = ours.update(k, v), theirs.update(k, v)
            assert all(torch.equal(g, w) for g, w in zip(got, want))
        elif theirs.get_seq_length() == 0:
            continue
        elif op == "crop":
            removed = -min(arg, theirs.get_seq_length() - 1)
            ours.crop(removed), theirs.crop(removed)
        elif op == "select":  # a beam-search reorder: same batch size, other rows
            rows = torch.arange(batch).flip(0) if arg else torch.zeros(batch, dtype=torch.long)
            ours.batch_select_indices(rows), theirs.batch_select_indices(rows)
        elif op == "repeat":
            ours.batch_repeat_interleave(arg), theirs.batch_repeat_interleave(arg)
            batch *= arg
        else:
            ours = copy.deepcopy(ours)
        assert ours.get_seq_length() == theirs.get_seq_length()
        if theirs.get_seq_length():
            assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
