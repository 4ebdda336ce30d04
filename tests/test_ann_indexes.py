"""Specific behaviour of the approximate indexes: quest bounds, hnsw spaces, ivf cluster layout, options."""

import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import icecache


def random_keys(seed: int, kv_heads: int, n: int, head_dim: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(kv_heads, n, head_dim, generator=g) * (0.5 + torch.rand(kv_heads, n, 1, generator=g) * 2)


# -- quest ------------------------------------------------------------------------------------------------


@given(seed=st.integers(0, 10_000), kv_heads=st.integers(1, 3), page_size=st.sampled_from([1, 4, 16]),
       n0=st.integers(0, 80), inserts=st.lists(st.integers(1, 40), max_size=4), group=st.integers(1, 3))
def test_quest_bound_is_an_upper_bound_of_every_key_in_its_page(seed, kv_heads, page_size, n0, inserts, group):
    index = icecache.get_index("quest", head_dim=8, page_size=page_size)
    keys = random_keys(seed, kv_heads, n0 + sum(inserts), 8)
    index.build(keys[:, :n0])
    n = n0
    for m in inserts:
        index.insert(keys[:, n : n + m])
        n += m
    if n == 0:
        return
    queries = random_keys(seed + 1, kv_heads, group, 8)
    bounds = index.page_bounds(queries)  # [h, g, pages]
    assert bounds.shape == (kv_heads, group, index.num_pages)
    logits = torch.einsum("hgd,hnd->hgn", queries, keys[:, :n])  # [h, g, n]
    per_token_bound = bounds[:, :, torch.arange(n) // page_size]
    assert bool((logits <= per_token_bound + 1e-4 * (1 + logits.abs())).all())
    # the bound of a one-token page is that token's logit
    if page_size == 1:
        assert torch.allclose(bounds, logits, atol=1e-4)


def test_quest_incremental_summaries_equal_a_fresh_build():
    keys = random_keys(3, 2, 75, 8)
    grown = icecache.get_index("quest", head_dim=8, page_size=16)
    grown.build(keys[:, :10])
    for a, b in [(10, 11), (11, 30), (30, 31), (31, 75)]:
        grown.insert(keys[:, a:b])
    fresh = icecache.get_index("quest", head_dim=8, page_size=16)
    fresh.build(keys)
    assert torch.equal(grown._min.view, fresh._min.view) and torch.equal(grown._max.view, fresh._max.view)
    q = random_keys(4, 2, 2, 8)
    assert torch.equal(grown.search(q, 3), fresh.search(q, 3))
    assert fresh.metadata_bytes_per_search() == 2 * 2 * 5 * 8 * 4


# -- hnsw -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("space", ["ip", "augmented"])
def test_hnsw_finds_the_page_of_a_planted_key(space):
    keys = random_keys(0, 2, 600, 16)
    q = torch.randn(2, 2, 16, generator=torch.Generator().manual_seed(9))
    planted = [333, 77]
    for h, pos in enumerate(planted):
        keys[h, pos] = 6 * q[h, 0] / q[h, 0].norm() * keys[h].norm(dim=1).max()
    index = icecache.get_index("hnsw", head_dim=16, page_size=16, space=space)
    index.build(keys[:, :500])
    pages = index.search(q, 3)
    assert pages[0, 0].item() == 333 // 16
    assert (pages[1] >= 0).all()
    # a planted key arriving by insert (for "augmented": longer than the radius, so the graph is rebuilt)
    index.insert(keys[:, 500:])
    index.insert(6 * q[:, :1] / q[:, :1].norm(dim=-1, keepdim=True) * 100)  # token 600, page 37
    assert index.search(q, 2)[:, 0].tolist() == [600 // 16, 600 // 16]
    assert index.metadata_bytes_per_search() > 0


@pytest.mark.parametrize("space", ["ip", "augmented"])
def test_hnsw_returns_every_page_when_fewer_tokens_than_asked(space):
    index = icecache.get_index("hnsw", head_dim=8, page_size=4, space=space)
    index.build(random_keys(1, 2, 0, 8))
    index.insert(random_keys(2, 2, 3, 8))  # 3 tokens, 1 page: k is clamped to the count
    assert index.search(random_keys(3, 2, 2, 8), 4).tolist() == [[0, -1, -1, -1]] * 2
    index.insert(random_keys(4, 2, 30, 8))  # 33 tokens, 9 pages: found pages first, then filled
    pages = index.search(random_keys(5, 2, 1, 8), 9)
    assert [sorted(p) for p in pages.tolist()] == [list(range(9))] * 2


# -- ivf --------------------------------------------------------------------------------------------------


def two_blobs(seed: int, n: int, head_dim: int = 8):
    """Keys of two far-apart blobs, interleaved at random; returns keys [2, n, d] and blob labels [2, n]."""
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 2, (2, n), generator=g)
    centre = torch.zeros(head_dim)
    centre[0] = 20.0
    keys = torch.randn(2, n, head_dim, generator=g) + torch.where(label.unsqueeze(-1) == 0, centre, -centre)
    return keys, label


def assert_pages_hold_one_blob(index, label):
    table = index.page_table
    for h in range(table.shape[0]):
        for page in table[h]:
            tokens = page[page >= 0]
            if tokens.numel():
                assert label[h, tokens].unique().numel() == 1, "a page mixes the two blobs"


def test_ivf_layout_keeps_clusters_together():
    keys, label = two_blobs(0, 300)
    index = icecache.get_index("ivf", head_dim=8, page_size=16, nlist=2)
    index.build(keys[:, :200])
    assert_pages_hold_one_blob(index, label)
    assert index.page_fill() >= 0.85  # at most one partial page per list
    changed = index.insert(keys[:, 200:300])  # new tokens join their blob's pages
    assert changed.numel() > 0
    assert_pages_hold_one_blob(index, label)
    assert index.page_fill() >= 0.85
    # a query pointing at blob 0 gets only blob-0 pages, even probing a single list
    index.options = dataclasses.replace(index.options, nprobe=1)  # options are frozen: a new set
    centre = torch.zeros(8)
    centre[0] = 1.0
    pages = index.search(centre.expand(2, 1, 8).contiguous(), 3)
    for h in range(2):
        tokens = index.page_table[h, pages[h]]
        assert bool((label[h, tokens[tokens >= 0]] == 0).all())


def test_ivf_layout_is_cluster_order_not_token_order():
    keys, label = two_blobs(1, 64)
    index = icecache.get_index("ivf", head_dim=8, page_size=4, nlist=2)
    index.build(keys)
    for h in range(2):
        table = index.page_table[h]
        lists = [label[h, p[p >= 0]].unique().tolist() for p in table if (p >= 0).any()]
        assert all(len(x) == 1 for x in lists)
        # the first list's pages come first: one switch between blobs at build
        flat = [x[0] for x in lists]
        assert sum(a != b for a, b in zip(flat, flat[1:])) == 1


def test_ivf_empty_build_and_empty_clusters():
    index = icecache.get_index("ivf", head_dim=8, page_size=4, nlist=4)
    index.build(torch.zeros(2, 0, 8))
    assert index.page_table.shape == (2, 0, 4) and index.metadata_bytes_per_search() == 0
    same = torch.ones(2, 10, 8)  # identical keys: k-means leaves lists without a token
    assert index.insert(same).tolist() == [0, 1, 2]
    assert index.page_table.shape == (2, 3, 4)
    assert int((index._list_pages > 0).sum(1).max()) == 1  # one list holds every token
    pages = index.search(torch.randn(2, 2, 8), 5)
    assert [sorted(p[:3]) for p in pages.tolist()] == [[0, 1, 2]] * 2 and bool((pages[:, 3:] == -1).all())
    index.insert(torch.randn(2, 7, 8))
    stored = index.page_table[0][index.page_table[0] >= 0]
    assert sorted(stored.tolist()) == list(range(17))


def test_ivf_finds_the_page_of_a_planted_key():
    keys = random_keys(5, 1, 640, 16)
    q = torch.randn(1, 1, 16, generator=torch.Generator().manual_seed(2))
    keys[0, 411] = 8 * q[0, 0] / q[0, 0].norm() * keys[0].norm(dim=1).max()
    index = icecache.get_index("ivf", head_dim=16, page_size=16)
    index.build(keys)
    page = index.search(q, 1)[0, 0].item()
    assert 411 in index.page_table[0, page].tolist()
    assert index.metadata_bytes_per_search() > 0


# -- options ----------------------------------------------------------------------------------------------


def test_options_are_validated_with_clear_errors():
    with pytest.raises(ValueError, match=r"space must be one of \['augmented', 'ip'\], got 'cosine'"):
        icecache.get_index("hnsw", head_dim=8, space="cosine")
    for name, option, bad in [("hnsw", "M", 1), ("hnsw", "ef", 0), ("hnsw", "ef_construction", 2.5),
                              ("ivf", "nlist", 0), ("ivf", "nprobe", 0), ("ivf", "niter", "many"),
                              ("ivf", "nprobe", True)]:
        with pytest.raises(ValueError, match=option):
            icecache.get_index(name, head_dim=8, **{option: bad})
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['no_such_option'\] for index 'quest'; accepted options: none"):
        icecache.get_index("quest", head_dim=8, no_such_option=1)
    with pytest.raises(ValueError, match=r"accepted options: \['nlist', 'nprobe', 'niter'\]"):
        icecache.get_index("ivf", head_dim=8, no_such_option=1)
    assert icecache.get_index("ivf", head_dim=8, nlist=None).options.nlist is None
