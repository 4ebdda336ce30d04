"""Invariants every registered index must keep, checked on random keys with hypothesis."""

import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import icecache
from icecache.index import BuildContext, SearchContext
from icecache.index.base import IndexOptions, TokenIndex

INDEXES = icecache.available_indexes()


def random_keys(seed: int, kv_heads: int, n: int, head_dim: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # keys with uneven norms, like real post-RoPE keys
    return torch.randn(kv_heads, n, head_dim, generator=g) * (0.5 + torch.rand(kv_heads, n, 1, generator=g) * 2)


def assert_layout(index: TokenIndex, n_tokens: int, kv_heads: int) -> None:
    table = index.page_table
    assert table.dtype == torch.long
    assert table.dim() == 3 and table.shape[0] == kv_heads and table.shape[2] == index.page_size
    assert index.num_pages == table.shape[1]
    for h in range(kv_heads):
        stored = table[h][table[h] >= 0]
        assert stored.numel() == n_tokens, "every token stored exactly once"
        assert torch.equal(stored.sort().values, torch.arange(n_tokens)), "every token stored exactly once"
    assert bool((table >= -1).all())


@pytest.mark.parametrize("name", INDEXES)
@given(seed=st.integers(0, 10_000), kv_heads=st.integers(1, 3), page_size=st.sampled_from([1, 4, 16]),
       n0=st.integers(0, 120), inserts=st.lists(st.integers(1, 40), max_size=5),
       group=st.integers(1, 3), max_pages=st.integers(0, 12))
def test_layout_and_search_invariants(name, seed, kv_heads, page_size, n0, inserts, group, max_pages):
    head_dim = 8
    index = icecache.get_index(name, head_dim=head_dim, page_size=page_size)
    keys = random_keys(seed, kv_heads, n0 + sum(inserts), head_dim)
    index.build(keys[:, :n0])
    assert_layout(index, n0, kv_heads)
    n = n0
    for m in inserts:
        before = index.page_table.clone()
        changed = index.insert(keys[:, n : n + m])
        n += m
        assert index.num_tokens == n
        assert_layout(index, n, kv_heads)
        after = index.page_table
        # every page whose contents differ from before must be reported as changed
        common = min(before.shape[1], after.shape[1])
        differs = (before[:, :common] != after[:, :common]).any(2).any(0).nonzero().flatten()
        new_pages = torch.arange(common, after.shape[1])
        assert set(differs.tolist()) | set(new_pages.tolist()) <= set(changed.tolist())
    queries = random_keys(seed + 1, kv_heads, group, head_dim)
    pages = index.search(queries, max_pages)
    assert pages.shape == (kv_heads, max_pages) and pages.dtype == torch.long
    table = index.page_table
    for h in range(kv_heads):
        chosen = pages[h][pages[h] >= 0]
        assert bool((pages[h][len(chosen):] == -1).all()), "-1 only as padding after the chosen pages"
        assert chosen.numel() == len(set(chosen.tolist())), "no page twice"
        assert bool((chosen < index.num_pages).all())
        # heads may hold fewer pages than others (padded with empty pages): count pages with tokens
        holding = (table[h] >= 0).any(1)
        assert int(holding[chosen].sum()) == min(max_pages, int(holding.sum())), "fills the budget"


@pytest.mark.parametrize("name", INDEXES)
def test_bad_input_raises_and_keeps_index(name):
    index = icecache.get_index(name, head_dim=8, page_size=4)
    keys = random_keys(0, 2, 20, 8)
    with pytest.raises(RuntimeError, match="build"):
        index.search(keys[:, :1], 2)
    with pytest.raises(ValueError, match="context.group"):  # 3 queries per KV head are not whole positions of 2
        index.build(keys, BuildContext(random_keys(1, 2, 3, 8), group=2))
    with pytest.raises(ValueError, match="context.queries has 3 kv_heads"):
        index.build(keys, BuildContext(random_keys(1, 3, 4, 8)))
    with pytest.raises(TypeError, match="BuildContext"):
        index.build(keys, random_keys(1, 2, 4, 8))
    assert index.kv_heads is None, "a refused build leaves the index unbuilt"
    index.build(keys)
    table = index.page_table.clone()
    bad = {
        "3 dimensions": keys[0],
        "head_dim": random_keys(0, 2, 5, 6),
        "kv_heads": random_keys(0, 3, 5, 8),
        "floating-point": keys.long(),
        "NaN": torch.full((2, 3, 8), float("nan")),
    }
    for message, value in bad.items():
        with pytest.raises((ValueError, TypeError), match=message):
            index.insert(value)
        assert torch.equal(index.page_table, table) and index.num_tokens == 20, "nothing stored was lost"
    with pytest.raises(ValueError, match="queries"):
        index.search(torch.full((2, 1, 8), float("nan")), 2)
    with pytest.raises(ValueError, match=r"queries must have 3 dimensions \[kv_heads, group, head_dim\]"):
        index.search(keys[0], 2)
    with pytest.raises(ValueError, match="max_pages"):
        index.search(keys[:, :1], -1)
    with pytest.raises(ValueError, match="resident_lse"):
        index.search(keys[:, :1], 2, SearchContext(torch.zeros(2, 3)))
    with pytest.raises(ValueError, match="resident_lse"):
        index.search(keys[:, :1], 2, SearchContext(torch.full((2, 1), float("nan"))))
    with pytest.raises(ValueError, match="scale"):
        index.search(keys[:, :1], 2, SearchContext(scale=-1.0))
    with pytest.raises(TypeError, match="SearchContext"):
        index.search(keys[:, :1], 2, torch.zeros(2, 1))
    with pytest.raises(ValueError, match="start must be num_tokens \\(20\\)"):
        index.insert(keys[:, :2], start=25)
    assert torch.equal(index.page_table, table) and index.num_tokens == 20, "nothing stored was lost"


@pytest.mark.parametrize("name", INDEXES)
def test_resident_attention_only_reweighs_query_heads(name):
    # -inf resident mass (no resident token) must leave every index's choice as without it
    index = icecache.get_index(name, head_dim=8, page_size=4)
    index.build(random_keys(1, 2, 64, 8))
    queries = random_keys(2, 2, 3, 8)
    none = torch.full((2, 3), float("-inf"))
    assert torch.equal(index.search(queries, 3), index.search(queries, 3, SearchContext(none)))


@pytest.mark.parametrize("name", INDEXES)
def test_finite_resident_attention_takes_a_head_out_of_the_ranking(name):
    # a query head whose resident tokens (sink + window) hold almost all its attention weighs ~nothing in a
    # mass-ranking index's page choice; indexes that do not rank by mass ignore resident_lse altogether
    cls = icecache.index.index_class(name)
    index = icecache.get_index(name, head_dim=8, page_size=4)
    index.build(random_keys(3, 1, 64, 8))
    queries = random_keys(4, 1, 2, 8) * 3
    finite = torch.tensor([[60.0, float("-inf")]])
    got = index.search(queries, 3, SearchContext(finite))
    if cls.uses_resident_lse:
        assert torch.equal(got, index.search(queries[:, 1:], 3))  # only the second head counts
    else:
        assert torch.equal(got, index.search(queries, 3))


@pytest.mark.parametrize("name", INDEXES)
def test_options_are_a_frozen_dataclass_checked_at_creation(name):
    cls = icecache.index.index_class(name)
    assert issubclass(cls.Options, IndexOptions) and dataclasses.is_dataclass(cls.Options)
    index = icecache.get_index(name, head_dim=8)
    assert index.options == cls.Options() and hash(index.options) == hash(cls.Options())
    with pytest.raises(dataclasses.FrozenInstanceError):
        index.options.__setattr__("anything", 1)
    with pytest.raises(ValueError, match=f"unknown option.*'nope'.*{name!r}"):
        icecache.get_index(name, head_dim=8, nope=1)
    with pytest.raises(ValueError, match="unknown option.*'nope'"):
        icecache.IceRuntime(index=name, index_options={"nope": 1})  # at once, not at the first forward
    for field in dataclasses.fields(cls.Options):  # a value of the wrong kind names the option
        with pytest.raises(ValueError, match=field.name):
            icecache.get_index(name, head_dim=8, **{field.name: "not a valid value"})


@pytest.mark.parametrize("name", INDEXES)
def test_an_index_reports_the_memory_it_holds(name):
    keys = random_keys(3, 2, 400, 16)
    index = icecache.get_index(name, head_dim=16, page_size=4)
    index.build(keys[:, :200], BuildContext(torch.randn(2, 8, 16), group=4))
    built = index.nbytes()
    index.insert(keys[:, 200:], start=200)
    assert index.nbytes() >= built >= 0
    if name != "window":  # every other index keeps its own float32 copy of the keys it searches
        assert index.nbytes() >= keys.numel() * 4


def test_held_bytes_counts_shared_memory_once():
    from icecache.index.base import held_bytes

    tensor = torch.zeros(10, 4)  # 160 bytes
    array = torch.zeros(5).numpy()  # a tensor's memory (20 bytes) held through a numpy view
    owned = torch.zeros(3, dtype=torch.float64).numpy().copy()  # numpy's own: 24 bytes
    holder = {"a": tensor, "b": (tensor[2:], tensor.numpy()), "c": [owned, owned[1:]], "d": array}
    assert held_bytes(holder) == 160 + 24 + 20


def test_equal_options_make_equal_index_signatures():
    a = icecache.IceRuntime(index="tree", budget=128, index_options={"span_pages": 2, "hot_pages": 4})
    b = icecache.IceRuntime(index="tree", budget=256, index_options={"hot_pages": 4, "span_pages": 2})
    c = icecache.IceRuntime(index="tree", budget=256, index_options={"hot_pages": 4})
    assert a.index_signature == b.index_signature != c.index_signature
    # budget 64's default window (16) leaves the index other tokens than 128's (32): not the same layout
    small = icecache.IceRuntime(index="tree", budget=64, index_options={"span_pages": 2, "hot_pages": 4})
    assert small.index_signature != a.index_signature
    # defaults spelled out are the defaults
    assert icecache.IceRuntime(index_options={"span_pages": 4}).index_signature == icecache.IceRuntime().index_signature


def test_registry_errors_name_the_choices():
    with pytest.raises(ValueError, match="unknown index 'nope'.*exact"):
        icecache.get_index("nope", head_dim=8)
    with pytest.raises(TypeError):
        icecache.get_index(3, head_dim=8)
    with pytest.raises(ValueError, match="head_dim"):
        icecache.get_index("exact", head_dim=0)


def test_an_index_spec_is_the_name_with_its_options():
    spec = "tree:span_reach=8,search=descent"
    assert icecache.parse_index_spec(spec) == ("tree", {"span_reach": 8, "search": "descent"})
    runtime = icecache.IceRuntime(index=spec, budget=128)
    spelled = icecache.IceRuntime(index="tree", budget=128, index_options={"span_reach": 8, "search": "descent"})
    assert (runtime.index_name, runtime.index_options) == ("tree", {"span_reach": 8, "search": "descent"})
    assert runtime.index_signature == spelled.index_signature
    assert icecache.get_index(spec, head_dim=8).options == icecache.get_index("tree", head_dim=8, span_reach=8,
                                                                             search="descent").options
    # the spec's options join index_options; one given both ways is refused rather than overridden
    joined = icecache.IceRuntime(index="tree:span_reach=8", index_options={"search": "descent"})
    assert joined.index_signature == spelled.index_signature
    with pytest.raises(ValueError, match=r"\['span_reach'\] given both"):
        icecache.IceRuntime(index="tree:span_reach=8", index_options={"span_reach": 4})
    with pytest.raises(ValueError, match="unknown option.*'nope'.*'tree'"):
        icecache.IceRuntime(index="tree:nope=1")
    with pytest.raises(ValueError, match="option=value.*'span_reach'"):
        icecache.get_index("tree:span_reach", head_dim=8)
    with pytest.raises(ValueError, match="'span_reach' given twice"):
        icecache.parse_index_spec("tree:span_reach=8,span_reach=4")
    with pytest.raises(ValueError, match="unknown index 'nope'"):
        icecache.IceRuntime(index="nope:a=1")


def test_exact_picks_the_page_with_the_matching_key():
    index = icecache.get_index("exact", head_dim=4, page_size=2)
    keys = torch.zeros(1, 10, 4)
    keys[0, 7] = torch.tensor([5.0, 0, 0, 0])
    index.build(keys)
    pages = index.search(torch.tensor([[[1.0, 0, 0, 0]]]), 1)
    assert pages.tolist() == [[3]]  # token 7 lives on page 3


def test_window_returns_newest_pages_first():
    index = icecache.get_index("window", head_dim=4, page_size=4)
    index.build(torch.randn(2, 10, 4))
    index.insert(torch.randn(2, 7, 4))  # 17 tokens -> 5 pages
    assert index.search(torch.randn(2, 1, 4), 3).tolist() == [[4, 3, 2]] * 2
