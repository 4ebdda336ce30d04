"""The tree index: semantic layout, full pages, consistent centroids after inserts, hot pages."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import icecache
from icecache.index import BuildContext, SearchContext
from icecache.index.tree import balanced_pages, tree_pages


def blobs(n_per, centers, head_dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    parts = [c + 0.05 * torch.randn(n_per, head_dim, generator=g) for c in centers]
    return torch.cat(parts)


def test_pages_hold_one_cluster_each():
    centers = [torch.full((8,), 3.0), torch.full((8,), -3.0), torch.eye(8)[0] * 5]
    points = blobs(32, centers)  # 96 tokens, 3 clusters of 32 = 2 pages each
    perm = torch.randperm(96, generator=torch.Generator().manual_seed(1))
    index = icecache.get_index("tree", head_dim=8, page_size=16)
    index.build(points[perm].unsqueeze(0))
    cluster = (perm // 32)  # cluster of each local position
    for page in index.page_table[0]:
        members = cluster[page[page >= 0]]
        assert members.unique().numel() == 1
    assert index.page_fill() == 1.0


@given(seed=st.integers(0, 1000), n=st.integers(0, 200), inserts=st.lists(st.integers(1, 20), max_size=6))
def test_centroids_stay_exact_and_pages_stay_full_enough(seed, n, inserts):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, n + sum(inserts), 8, generator=g)
    index = icecache.get_index("tree", head_dim=8, page_size=8)
    index.build(keys[:, :n])
    pos = n
    for m in inserts:
        index.insert(keys[:, pos : pos + m])
        pos += m
    table = index.page_table
    cents = index.centroids()
    for h in range(2):
        for p in range(table.shape[1]):
            members = table[h, p][table[h, p] >= 0]
            if members.numel():
                # stored in bfloat16 (relative precision 2^-9), from running sums
                assert torch.allclose(cents[h, p], keys[h, members].mean(0), atol=1e-2, rtol=1e-2)
            # each page's stored keys are its members' keys, slot by slot, in its first `fill` slots
            slots = table[h, p] >= 0
            assert torch.equal(slots, torch.arange(table.shape[2]) < index._fill[h, p])
            assert torch.equal(index._page_keys[h, p, slots, :8], keys[h, table[h, p][slots]])
    if pos >= 8:
        # build fills pages; a split leaves two halves, so fill never drops below one half
        assert index.page_fill() >= 0.5


def test_bfloat16_bits_round_like_torch():
    # build stores centroids with torch's rounding, inserts with the compiled encoder: they must agree
    import numpy as np

    from icecache.index._tree_kernels import _decode_bf16, _encode_bf16

    values = torch.cat([torch.randn(1000) * 10, torch.tensor([0.0, -0.0, 1e-30, -3e38, 65504.0])])
    bits = np.empty(values.numel(), np.int16)
    _encode_bf16(values.numpy(), bits)
    assert np.array_equal(bits, values.bfloat16().view(torch.int16).numpy())
    decoded = _decode_bf16(bits, np.empty(values.numel(), np.uint32))
    assert np.array_equal(decoded, values.bfloat16().float().numpy())


def test_vectorised_exp_matches_numpy():
    import numpy as np

    from icecache.index._tree_kernels import _exp_nonpositive

    x = -np.random.default_rng(0).random(5000, dtype=np.float32) * 100
    x = np.concatenate([x, np.float32([0, -1e-9, -np.inf])])
    got = x.copy()
    _exp_nonpositive(got, np.empty(x.size, np.int32))
    exact = np.exp(x.astype(np.float64))
    normal = x > -80
    assert np.max(np.abs(got[normal] - exact[normal]) / exact[normal]) < 1e-5
    assert np.all((got[~normal] >= 0) & (got[~normal] < 1e-34))  # -inf (an empty slot) counts as nothing


def test_balanced_pages_is_a_permutation_of_full_pages():
    points = torch.randn(100, 5)
    order = balanced_pages(points, 16)
    assert torch.equal(order.sort().values, torch.arange(100))


@given(seed=st.integers(0, 1000), n=st.integers(1, 300), branching=st.integers(2, 6), depth=st.integers(0, 3))
def test_wide_top_levels_keep_whole_pages(seed, n, branching, depth):
    # capacity-balanced k-means at the top: a permutation, and every page but the last full
    points = torch.randn(n, 5, generator=torch.Generator().manual_seed(seed))
    order = tree_pages(points, 8, branching, depth)
    assert torch.equal(order.sort().values, torch.arange(n))
    index = icecache.get_index("tree", head_dim=5, page_size=8, branching=branching, depth=depth)
    index.build(points.unsqueeze(0))
    assert index.num_pages == -(-n // 8)


@pytest.mark.parametrize("depth", [1, 2])
def test_wide_top_levels_keep_clusters_apart(depth):
    # four well separated clusters of two pages each: a 4-way top split puts each in its own subtree
    centers = [torch.full((8,), 3.0), torch.full((8,), -3.0), torch.eye(8)[0] * 5, torch.eye(8)[1] * 5]
    points = blobs(32, centers)
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(2))
    index = icecache.get_index("tree", head_dim=8, page_size=16, branching=4, depth=depth)
    index.build(points[perm].unsqueeze(0))
    cluster = perm // 32
    for page in index.page_table[0]:
        assert cluster[page[page >= 0]].unique().numel() == 1


@pytest.mark.parametrize("option", [{"branching": 1}, {"branching": 2.5}, {"depth": -1}, {"depth": True}])
def test_bad_tree_shape_options_name_the_option(option):
    with pytest.raises(ValueError, match=next(iter(option))):
        icecache.get_index("tree", head_dim=8, **option)


def test_hot_tokens_get_their_own_pages():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 256, 8, generator=g)
    target = keys[0, 100].clone()
    queries = (target * 10).view(1, 1, 8)
    index = icecache.get_index("tree", head_dim=8, page_size=16, hot_pages=2)
    index.build(keys, BuildContext(queries))
    hot = index.page_table[0, :2].flatten()
    assert 100 in hot.tolist()


def test_span_layout_keeps_the_token_order_page_around_each_hot_token():
    # a needle of 5 consecutive tokens the query attends to: with hot_layout="spans" the first hot tier is
    # the token-order page(s) holding them, in order, so the whole needle is retrieved together
    g = torch.Generator().manual_seed(2)
    keys = 0.1 * torch.randn(1, 512, 8, generator=g)
    needle = torch.arange(203, 208)
    keys[0, needle, 0] += 4.0
    queries = torch.zeros(1, 1, 8)
    queries[0, 0, 0] = 3.0
    index = icecache.get_index("tree", head_dim=8, page_size=16, hot_pages=2, hot_layout="spans")
    index.build(keys, BuildContext(queries))
    first = index.page_table[0, :2].flatten()
    assert first[:16].tolist() == list(range(192, 208))  # the grid page 192..207 around the hottest tokens
    assert set(needle.tolist()) <= set(first.tolist())
    table = index.page_table[0].flatten()
    assert sorted(table[table >= 0].tolist()) == list(range(512))  # every token still exactly once
    with pytest.raises(ValueError, match="hot_layout"):
        icecache.get_index("tree", head_dim=8, hot_layout="nope")


def test_span_pages_follow_the_prompts_newest_positions():
    # 8 prompt positions x 2 query heads: the 7 older positions all read token 100, only the newest reads
    # token 400 (what the answer's first tokens will need). The span page goes to 400's cell; summed over
    # every position, 100 would win, and it still leads the profile tier
    keys = torch.zeros(1, 512, 8)
    keys[0, 100, 0] = keys[0, 400, 1] = 5.0
    old, new = torch.zeros(8), torch.zeros(8)
    old[0] = new[1] = 3.0
    query_heads = torch.stack([old] * 7 + [new]).expand(2, 8, 8)  # [q_heads, positions, head_dim]
    context = BuildContext.from_query_heads(query_heads, kv_heads=1)
    assert context.queries.shape == (1, 16, 8) and context.group == 2 and torch.equal(context.queries[0, -2], new)  # the newest position last
    index = icecache.get_index("tree", head_dim=8, page_size=16, hot_pages=1, hot_tiers=1, span_pages=1,
                               span_reach=0)  # one cell per run (span_reach: its own test)
    index.build(keys, context)
    assert index.page_table[0, 0].tolist() == list(range(400, 416))
    assert 100 in index.page_table[0, 1].tolist()
    everything = icecache.get_index("tree", head_dim=8, page_size=16, hot_pages=1, hot_tiers=1, span_pages=1,
                                    span_queries=8, span_reach=0)  # every position: the older reading wins
    everything.build(keys, context)
    assert everything.page_table[0, 0].tolist() == list(range(96, 112))


def test_span_lead_takes_the_cell_before_when_the_hot_token_starts_its_own():
    # the hot token 193 is the second token of its grid cell 192..207: with span_lead=2 the run also covers
    # 191, so it takes the cell before too (176..207), and a second hot token inside that run (200) opens no
    # run of its own; 300 (12 tokens into its cell) keeps one cell
    keys = torch.zeros(1, 512, 8)
    keys[0, 193, 0] = keys[0, 200, 0] = 5.0
    keys[0, 300, 1] = 4.0
    queries = torch.zeros(1, 1, 8)
    queries[0, 0, 0] = queries[0, 0, 1] = 3.0
    grid = icecache.get_index("tree", head_dim=8, page_size=16, hot_pages=0, span_pages=2, span_reach=0)
    grid.build(keys, BuildContext(queries))
    assert grid.page_table[0, 0].tolist() == list(range(192, 208))
    lead = icecache.get_index("tree", head_dim=8, page_size=16, hot_pages=0, span_pages=2, span_lead=2,
                              span_reach=0)
    lead.build(keys, BuildContext(queries))
    assert lead.page_table[0, :2].flatten().tolist() == list(range(176, 208))
    assert lead.page_table[0, 2].tolist() == list(range(288, 304))
    table = lead.page_table[0].flatten()
    assert sorted(table[table >= 0].tolist()) == list(range(512))  # every token still exactly once
    with pytest.raises(ValueError, match="span_lead"):
        icecache.get_index("tree", head_dim=8, span_lead=-1)


def test_span_reach_takes_the_next_cell_when_the_hot_token_ends_its_cell():
    # hot token 206 leaves 1 token after it in its cell 192..207: with span_reach=8 its run is two cells,
    # 192..223, so the tokens after it stay in token order; 292 (11 tokens left in its cell) keeps one
    # cell; 463 ends its cell and takes 464..479 too. The extra cells come on top of span_pages (runs)
    keys = torch.zeros(1, 512, 8)
    keys[0, 206, 0] = 5.0
    keys[0, 292, 1] = 4.0
    keys[0, 463, 2] = 3.0
    queries = torch.zeros(1, 1, 8)
    queries[0, 0, :3] = 3.0
    reach = icecache.get_index("tree", head_dim=8, page_size=16, hot_pages=0, span_pages=3, span_reach=8)
    reach.build(keys, BuildContext(queries))
    assert reach.page_table[0, :2].flatten().tolist() == list(range(192, 224))
    assert reach.page_table[0, 2].tolist() == list(range(288, 304))
    assert reach.page_table[0, 3:5].flatten().tolist() == list(range(448, 480))
    assert reach._pinned == 5  # every span page is rescored
    table = reach.page_table[0].flatten()
    assert sorted(table[table >= 0].tolist()) == list(range(512))  # every token still exactly once
    grid = icecache.get_index("tree", head_dim=8, page_size=16, hot_pages=0, span_pages=3, span_reach=0)
    grid.build(keys, BuildContext(queries))
    assert grid.page_table[0, 0].tolist() == list(range(192, 208)) and grid._pinned == 3
    # by default a run covers a page's worth of tokens after its hot token: 292 takes 304..319 too
    default = icecache.get_index("tree", head_dim=8, page_size=16, hot_pages=0, span_pages=3)
    default.build(keys, BuildContext(queries))
    assert default.page_table[0, 2:4].flatten().tolist() == list(range(288, 320))
    with pytest.raises(ValueError, match="span_reach"):
        icecache.get_index("tree", head_dim=8, span_reach=-1)


def test_span_pages_come_first_in_token_order_then_the_profile_tiers():
    g = torch.Generator().manual_seed(3)
    keys = 0.1 * torch.randn(1, 512, 8, generator=g)
    keys[0, 200:206, 0] += 4.0  # a needle the query reads, inside grid cell 12 (192..207)
    keys[0, torch.arange(5, 512, 31), 0] += 3.0  # scattered tokens it reads less
    queries = torch.zeros(1, 1, 8)
    queries[0, 0, 0] = 3.0
    index = icecache.get_index("tree", head_dim=8, page_size=16, hot_pages=1, hot_tiers=1, span_pages=1,
                             span_reach=0)  # one cell per run (span_reach: its own test)
    index.build(keys, BuildContext(queries))
    assert index.page_table[0, 0].tolist() == list(range(192, 208))  # the needle's own page, in order
    assert set(index.page_table[0, 1].tolist()) <= set(range(5, 512, 31))  # then the hottest tokens left
    assert index._pinned == 2  # span pages and the first hot tier are always rescored
    table = index.page_table[0].flatten()
    assert sorted(table[table >= 0].tolist()) == list(range(512))
    with pytest.raises(ValueError, match="span_pages"):
        icecache.get_index("tree", head_dim=8, span_pages=-1)


def test_hot_tiers_grow_and_respect_their_share():
    index = icecache.get_index("tree", head_dim=8, page_size=16, hot_pages=2, hot_tiers=3, hot_growth=3,
                               max_hot_share=0.5, span_pages=0)
    assert index._hot_layout(100) == (0, [2, 6, 18])
    assert index._hot_layout(20) == (0, [2, 6, 2])  # cut at half of 20 pages
    assert icecache.get_index("tree", head_dim=8, hot_pages=0, span_pages=0)._hot_layout(100) == (0, [])
    spans = icecache.get_index("tree", head_dim=8, page_size=16, hot_pages=2, max_hot_share=0.5, span_pages=4)
    assert spans._hot_layout(100) == (4, [2, 6, 18]) and spans._hot_layout(20) == (4, [2, 4])  # spans count too
    spans = icecache.get_index("tree", head_dim=8, page_size=16, hot_pages=2, hot_layout="spans", span_pages=1)
    assert spans._hot_layout(100) == (3, [6, 18])  # "spans": the first tier's pages become span pages


def test_tokens_the_same_queries_attend_share_a_page():
    # two groups of 16 hot tokens, each attended by its own query; their keys are interleaved at random so
    # that only the attention profile (which query attends a token) tells the groups apart
    g = torch.Generator().manual_seed(1)
    keys = 0.1 * torch.randn(1, 512, 8, generator=g)
    a, b = torch.zeros(8), torch.zeros(8)
    a[0], b[1] = 3.0, 3.0
    group_a, group_b = torch.arange(0, 64, 4), torch.arange(2, 64, 4)
    keys[0, group_a] += a + 0.3 * torch.randn(16, 8, generator=g)
    keys[0, group_b] += b + 0.3 * torch.randn(16, 8, generator=g)
    queries = torch.stack([a, b]).view(1, 2, 8) * 3
    index = icecache.get_index("tree", head_dim=8, page_size=16, hot_pages=2, hot_tiers=1, span_pages=0)
    index.build(keys, BuildContext(queries))
    first_two = [set(index.page_table[0, p].tolist()) for p in range(2)]
    assert sorted(map(sorted, first_two)) == sorted([group_a.tolist(), group_b.tolist()])


def test_tree_finds_the_planted_key():
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(2, 500, 16, generator=g)
    keys[:, 321] = 4 * torch.ones(16)
    index = icecache.get_index("tree", head_dim=16, page_size=16)
    index.build(keys)
    pages = index.search(torch.ones(2, 3, 16), 2)
    table = index.page_table
    for h in range(2):
        assert 321 in table[h, pages[h]].flatten().tolist()


def reference_masses(index, queries: torch.Tensor, max_pages: int, resident_lse=None,
                     scale: float = 0.3, peak: bool = False) -> list[dict[int, float]]:
    """The tree's search written as plain torch ops: per head, the attention mass of every candidate page
    (centroid ranking plus the best others by the bound `q . c + |q| r`, then an exact softmax per query head over the candidates' tokens and, through
    `resident_lse`, the resident ones); with `peak`, each candidate's most probable token instead (over the
    group's query heads)."""
    table, n_pages = index.page_table, index.num_pages
    pinned = index._pinned  # the first hot tier: always candidates
    n_cand = min(n_pages, max(max_pages * index.options.candidate_factor, index.options.min_candidates) + pinned)
    n_bound = min(n_pages - n_cand, index.options.bound_candidates)  # plus the best others by the bound
    page_node, radii = index._nodes.page_node, index._nodes.radii
    out = []
    for h in range(index.kv_heads):
        per_query = queries[h] @ index.centroids()[h].T  # [g, pages]
        empty = index._fill[h, :n_pages] == 0
        score = per_query.amax(0)
        score[:pinned] = float("inf")
        score = score.masked_fill(empty, float("-inf"))
        cand = torch.topk(score, n_cand).indices
        if n_bound:
            radius = torch.from_numpy(radii[h, page_node[h, :n_pages]]).float()
            bound = (per_query + queries[h].norm(dim=-1, keepdim=True) * radius).amax(0)
            bound = bound.masked_fill(empty, torch.finfo(torch.float32).min)  # below real pages, above taken ones
            bound[cand] = float("-inf")
            cand = torch.cat([cand, torch.topk(bound, n_bound).indices])
        pos = table[h, cand].flatten()
        keys = index._page_keys[h, cand, :, : index.head_dim].reshape(-1, index.head_dim)
        logits = (queries[h] @ keys.T) * scale
        logits = logits.masked_fill(pos < 0, float("-inf"))
        lse = torch.logsumexp(logits, -1)
        if resident_lse is not None:
            lse = torch.logaddexp(lse, resident_lse[h])
        probs = torch.exp(logits - lse.unsqueeze(-1))
        if peak:
            score = probs.amax(0).view(cand.numel(), -1).amax(-1)
        else:
            score = probs.sum(0).view(cand.numel(), -1).sum(-1)
        out.append(dict(zip(cand.tolist(), score.tolist())))
    return out


@given(seed=st.integers(0, 1000), n=st.integers(1, 400), inserts=st.lists(st.integers(1, 30), max_size=4),
       max_pages=st.integers(1, 12), group=st.integers(1, 4), resident=st.booleans())
def test_compiled_search_matches_the_torch_reference(seed, n, inserts, max_pages, group, resident):
    g = torch.Generator().manual_seed(seed)
    index = icecache.get_index("tree", head_dim=8, page_size=4, min_candidates=3, candidate_factor=2,
                               peak_pages=0)  # every page by mass (`peak_pages`: the next test)
    index.build(torch.randn(2, n, 8, generator=g), BuildContext(torch.randn(2, 5, 8, generator=g)))
    for m in inserts:
        index.insert(torch.randn(2, m, 8, generator=g))
    queries = torch.randn(2, group, 8, generator=g)
    # resident tokens' log-sum-exp per query head; -inf (no resident token) for one head
    resident_lse = 3 * torch.randn(2, group, generator=g) if resident else None
    if resident:
        resident_lse[0, 0] = float("-inf")
    pages = index.search(queries, max_pages, SearchContext(resident_lse, scale=0.3))  # not 1 / sqrt(head_dim)
    expected = reference_masses(index, queries, max_pages, resident_lse, scale=0.3)
    for h in range(2):
        chosen = pages[h][pages[h] >= 0].tolist()
        assert len(set(chosen)) == len(chosen) == min(max_pages, len(expected[h]))
        # the same pages up to ties: every returned page is a candidate, and their masses are the best ones
        assert all(p in expected[h] for p in chosen)
        got = sorted((expected[h][p] for p in chosen), reverse=True)
        best = sorted(expected[h].values(), reverse=True)[: len(chosen)]
        assert got == pytest.approx(best, rel=1e-4, abs=1e-6)


@given(seed=st.integers(0, 1000), n=st.integers(1, 400), max_pages=st.integers(1, 6), peak_pages=st.integers(1, 3),
       group=st.integers(1, 4))
def test_peak_pages_come_first_then_pages_by_mass(seed, n, max_pages, peak_pages, group):
    g = torch.Generator().manual_seed(seed)
    index = icecache.get_index("tree", head_dim=8, page_size=4, min_candidates=3, candidate_factor=2,
                               peak_pages=peak_pages)
    index.build(3 * torch.randn(2, n, 8, generator=g), BuildContext(torch.randn(2, 5, 8, generator=g)))
    queries = torch.randn(2, group, 8, generator=g)
    resident_lse = torch.randn(2, group, generator=g)
    pages = index.search(queries, max_pages, SearchContext(resident_lse, scale=0.3))
    peaks = reference_masses(index, queries, max_pages, resident_lse, scale=0.3, peak=True)
    masses = reference_masses(index, queries, max_pages, resident_lse, scale=0.3)
    for h in range(2):
        chosen = pages[h][pages[h] >= 0].tolist()
        lead = min(peak_pages, len(chosen))
        assert len(set(chosen)) == len(chosen) == min(max_pages, len(peaks[h]))
        # up to ties: the first `peak_pages` hold the most probable single tokens, the rest the most mass of
        # what is left
        got = [peaks[h][p] for p in chosen[:lead]]
        assert got == pytest.approx(sorted(peaks[h].values(), reverse=True)[:lead], rel=1e-4, abs=1e-6)
        rest = {p: m for p, m in masses[h].items() if p not in chosen[:lead]}
        got = sorted((rest[p] for p in chosen[lead:]), reverse=True)
        assert got == pytest.approx(sorted(rest.values(), reverse=True)[: len(got)], rel=1e-4, abs=1e-6)


def node_walk(index, h):
    """Every node of head `h` below the root, with the pages below it."""
    parent, child, sibling, page, page_node, sums, counts, centers, radii, n_nodes = index._nodes
    below = {}

    def visit(node):
        pages = [int(page[h, node])] if page[h, node] >= 0 else []
        c = child[h, node]
        while c >= 0:
            assert parent[h, c] == node
            pages += visit(c)
            c = sibling[h, c]
        below[node] = pages
        return pages

    visit(0)
    return below


@given(seed=st.integers(0, 1000), n=st.integers(0, 300), inserts=st.lists(st.integers(1, 30), max_size=5),
       hot=st.sampled_from([0, 2]))
def test_node_bounds_hold_for_every_stored_key(seed, n, inserts, hot):
    g = torch.Generator().manual_seed(seed)
    index = icecache.get_index("tree", head_dim=8, page_size=4, hot_pages=hot)
    index.build(3 * torch.randn(2, n, 8, generator=g), BuildContext(torch.randn(2, 5, 8, generator=g)))
    for m in inserts:
        index.insert(3 * torch.randn(2, m, 8, generator=g))
    keys = index._page_keys[..., :8]
    parent, child, sibling, page, page_node, sums, counts, centers, radii, n_nodes = index._nodes
    table = index.page_table
    for h in range(2):
        below = node_walk(index, h)
        # every page hangs under exactly one leaf, and the walk reaches every node
        assert sorted(p for ps in [below[x] for x in below if page[h, x] >= 0] for p in ps) == \
            list(range(int(index._pages[h])))
        assert len(below) == n_nodes[h]
        for node, pages in below.items():
            members = torch.cat([keys[h, p, : int(index._fill[h, p])] for p in pages]) if pages else keys[h, :0, 0]
            assert counts[h, node] == members.shape[0] == sum(int((table[h, p] >= 0).sum()) for p in pages)
            if members.shape[0]:
                center = torch.from_numpy(centers[h, node])
                assert torch.allclose(center, members.double().mean(0).float(), atol=1e-4)
                # the bound: every key below the node lies within its radius of its centre
                assert (members - center).norm(dim=-1).max() <= radii[h, node] * (1 + 1e-5) + 1e-5


def test_a_split_leaf_gives_its_parent_a_new_child():
    g = torch.Generator().manual_seed(0)
    index = icecache.get_index("tree", head_dim=8, page_size=4, hot_pages=0)
    index.build(torch.randn(1, 16, 8, generator=g))  # 4 full pages under one balanced subtree
    parent, child, sibling, page, page_node, *_ = index._nodes
    leaf_parents = {int(p): int(parent[0, page_node[0, p]]) for p in range(4)}
    index.insert(torch.randn(1, 1, 8, generator=g))  # every leaf is full: the chosen one splits
    assert index.num_pages == 5
    new_leaf = page_node[0, 4]
    siblings = [p for p in range(4) if leaf_parents[p] == parent[0, new_leaf]]
    assert len(siblings) == 2  # the new page's parent is the split page's parent, now with three leaves
    assert sorted(node_walk(index, 0)[int(parent[0, new_leaf])]) == sorted(siblings + [4])


@given(seed=st.integers(0, 1000), n=st.integers(1, 400), inserts=st.lists(st.integers(1, 30), max_size=4),
       n_cand=st.integers(1, 40), group=st.integers(1, 4))
def test_descent_finds_the_best_centroids_a_scan_finds(seed, n, inserts, n_cand, group):
    import numpy as np
    from icecache.index._tree_nodes import descend

    g = torch.Generator().manual_seed(seed)
    index = icecache.get_index("tree", head_dim=8, page_size=4, hot_pages=2)
    index.build(torch.randn(2, n, 8, generator=g), BuildContext(torch.randn(2, 5, 8, generator=g)))
    for m in inserts:
        index.insert(torch.randn(2, m, 8, generator=g))
    parent, child, sibling, page, page_node, sums, counts, centers, radii, n_nodes = index._nodes
    queries = torch.randn(2, group, 8, generator=g).numpy()
    for h in range(2):
        pages = int(index._pages[h])
        leaf_centers = torch.from_numpy(centers[h, page_node[h, :pages]])  # [pages, d]
        scores = (torch.from_numpy(queries[h]) @ leaf_centers.T).max(0).values  # scan's ranking
        want = min(n_cand, pages)
        out = np.empty(n_cand, np.int64)
        found, scored = descend(queries[h], h, n_cand, child, sibling, page, counts, centers, radii, n_nodes, out,
                                np.empty(parent.shape[1], np.float32), np.empty(parent.shape[1], np.int64))
        assert found == want and len(set(out[:found].tolist())) == found
        got = sorted(scores[out[:found]].tolist(), reverse=True)
        assert got == pytest.approx(sorted(scores.tolist(), reverse=True)[:want], rel=1e-4, abs=1e-5)
        assert scored <= n_nodes[h] - 1


@pytest.mark.parametrize("n", [50, 700])
def test_descent_search_returns_the_scan_search_pages(n):
    g = torch.Generator().manual_seed(n)
    keys, build_q = torch.randn(3, n, 8, generator=g), torch.randn(3, 6, 8, generator=g)
    results = []
    for mode in ("scan", "descent"):
        index = icecache.get_index("tree", head_dim=8, page_size=4, search=mode, bound_candidates=0)
        index.build(keys, BuildContext(build_q))
        index.insert(torch.randn(3, 9, 8, generator=torch.Generator().manual_seed(1)))
        queries = torch.randn(2, 3, 3, 8, generator=torch.Generator().manual_seed(2))
        # two steps: the second also rescores the pages after the first's first page (`follow_copy`)
        results.append(torch.stack([index.search(queries[0], 5), index.search(queries[1], 5)]))
    # the same candidates (the scan ranks bfloat16 centroids, so near ties could differ; these seeds have
    # none), hence the same pages, whether the candidates hold every page (n=50) or not (n=700)
    assert torch.equal(results[0], results[1])


def test_the_first_hot_tier_is_rescored_whatever_its_centroid():
    # the needle shares its hot page with tokens pointing away from the query, while whole pages of
    # middling keys point towards it: by centroid the needle's page ranks below them
    g = torch.Generator().manual_seed(5)
    keys = torch.randn(1, 640, 16, generator=g)
    keys[0, :, 0] = torch.where(torch.arange(640) % 2 == 0, -3.0, 2.0)
    needle = 77
    keys[0, needle, 0] = 24.0
    keys[0, needle, 1] = 8.0  # the prefill's queries (along dim 1) attend to it most: a first-tier token
    build_queries = torch.zeros(1, 4, 16)
    build_queries[0, :, 1] = 1.0
    query = torch.zeros(1, 3, 16)
    query[0, :, 0] = 1.0
    found = {}
    for pinned, bound in ((True, 0), (False, 0), (False, 1)):
        index = icecache.get_index("tree", head_dim=16, page_size=16, hot_pages=1, span_pages=0, min_candidates=1,
                                   candidate_factor=1, rescore_hot_tier=pinned, bound_candidates=bound)
        index.build(keys, BuildContext(build_queries))
        assert needle in index.page_table[0, 0].tolist()  # the first hot tier is page 0
        assert index._pinned == (1 if pinned else 0)
        pages = index.search(query, 1)
        found[pinned, bound] = needle in index.page_table[0, pages[0]].flatten().tolist()
    assert found[True, 0] and not found[False, 0]  # the centroid alone misses it
    # one more candidate ranked by the bound on its best token, q . c + |q| r, finds it too
    assert found[False, 1]


@given(seed=st.integers(0, 1000), n=st.integers(0, 300), span_pages=st.integers(0, 6), lead=st.integers(0, 20),
       page_size=st.sampled_from([1, 4, 16]))
def test_span_runs_store_every_token_once(seed, n, span_pages, lead, page_size):
    g = torch.Generator().manual_seed(seed)
    index = icecache.get_index("tree", head_dim=8, page_size=page_size, span_pages=span_pages, span_lead=lead)
    index.build(torch.randn(2, n, 8, generator=g), BuildContext(torch.randn(2, 6, 8, generator=g), group=2))
    table = index.page_table
    for h in range(2):
        stored = table[h][table[h] >= 0]
        assert sorted(stored.tolist()) == list(range(n))
    index.insert(torch.randn(2, 5, 8, generator=g))
    pages = index.search(torch.randn(2, 2, 8, generator=g), 3)
    assert pages.shape == (2, 3)


@given(seed=st.integers(0, 1000), n=st.integers(0, 300), inserts=st.lists(st.integers(1, 30), max_size=5),
       page_size=st.sampled_from([4, 8]))
def test_every_stored_position_maps_to_the_page_holding_it(seed, n, inserts, page_size):
    g = torch.Generator().manual_seed(seed)
    index = icecache.get_index("tree", head_dim=8, page_size=page_size)
    index.build(torch.randn(2, n, 8, generator=g), BuildContext(torch.randn(2, 5, 8, generator=g)))
    for m in inserts:  # routed tokens and split leaves move the map too
        index.insert(torch.randn(2, m, 8, generator=g))
    table = index.page_table
    for h in range(2):
        expected = torch.full((index.num_tokens,), -1)
        held = table[h] >= 0
        expected[table[h][held]] = torch.arange(table.shape[1]).unsqueeze(1).expand_as(table[h])[held]
        assert (expected >= 0).all()  # every stored position sits in exactly one page
        assert torch.equal(index._token_page[h, : index.num_tokens], expected)
        assert (index._token_page[h, index.num_tokens :] == -1).all()


@pytest.mark.parametrize("search", ["scan", "descent"])
def test_follow_copy_rescores_the_page_after_the_previous_steps_first_page(search):
    """A copy step needs the token after the one the previous step read most: with one candidate page (the
    best centroid), the tree finds it only by following; `follow_copy` makes its page a candidate."""
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(1, 200, 8, generator=g)
    options = dict(candidate_factor=1, min_candidates=1, bound_candidates=0, peak_pages=1, search=search)
    plain = icecache.get_index("tree", head_dim=8, page_size=4, follow_copy=False, **options)
    follow = icecache.get_index("tree", head_dim=8, page_size=4, **options)  # the default
    plain.build(keys)
    follow.build(keys)
    page_of = plain._token_page[0]
    context = SearchContext(scale=1.0)
    found = 0
    for t in range(1, 200):
        ask = lambda index, pos: int(index.search(4 * keys[:, pos].unsqueeze(1), 1, context)[0, 0])
        if (keys[0] @ keys[0, t]).argmax() != t or ask(plain, t - 1) != page_of[t - 1] or ask(plain, t) == page_of[t]:
            continue  # wanted: t is the step's most probable token, the previous step finds its own page, and
            # this step misses t's page without following
        assert ask(follow, t - 1) == page_of[t - 1]
        assert ask(follow, t) == page_of[t]
        found += 1
    assert found >= 3  # the situation the option exists for, several times over


def _scan_every_page(point, h, n_pages, fill, sums):
    """The routing the filter must reproduce: every page's float32 mean measured, the first nearest kept."""
    import numba
    import numpy as np

    from icecache.index._tree_nodes import _FAST

    @numba.njit(fastmath=_FAST, cache=True)
    def scan(point, h, n_pages, fill, sums):
        best, best_dist = -1, np.inf
        for p in range(n_pages):
            if fill[h, p] == 0:
                continue
            inv = np.float32(1.0) / np.float32(fill[h, p])
            dist = np.float32(0.0)
            for j in range(point.shape[0]):
                diff = sums[h, p, j] * inv - point[j]
                dist += diff * diff
            if dist < best_dist:
                best, best_dist = p, dist
        return best

    return scan(point, h, n_pages, fill, sums)


@given(seed=st.integers(0, 1000), n=st.integers(1, 300), scale=st.sampled_from([0.01, 1.0, 300.0]),
       duplicates=st.booleans())
def test_insert_routes_to_the_page_a_scan_of_every_mean_picks(seed, n, scale, duplicates):
    """The insert estimates distances from bfloat16 centroids and measures only the pages that can win: it must
    pick what measuring every page's float32 mean picks (the nearest; the first of equals), and that is the
    nearest in float64 up to rounding."""
    import numpy as np

    from icecache.index._tree_kernels import _nearest_leaf, augment_keys

    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, n, 8, generator=g) * scale
    if duplicates:  # pages with equal or nearly equal centroids: ties
        keys = keys[:, torch.arange(n) % 3]
    index = icecache.get_index("tree", head_dim=8, page_size=4)
    index.build(keys)
    arrays = index._arrays()
    probes = torch.cat([keys[:, :5], torch.randn(2, 5, 8, generator=g) * scale], 1)
    points = augment_keys(probes.numpy(), index.max_norm)
    for h in range(2):
        pages = int(index._pages[h])
        fill = arrays.fill[h, :pages]
        means = arrays.sums[h, :pages].astype(np.float64) / np.maximum(fill, 1)[:, None]
        for point in points[h]:
            chosen = _nearest_leaf(point, h, pages, arrays.fill, arrays.sums, arrays.centroid_bits, arrays.route,
                                   index.max_norm ** 2, np.empty(pages, np.float32), np.empty(pages, np.uint32))
            assert chosen == _scan_every_page(point, h, pages, arrays.fill, arrays.sums)
            dist = ((means - point) ** 2).sum(1)
            dist[fill == 0] = np.inf
            assert dist[chosen] <= dist.min() * (1 + 1e-5) + 1e-9 * index.max_norm ** 2


@given(values=st.lists(st.sampled_from([-float("inf"), -1.5, 0.0, 0.25, 2.0, float("inf")]) | st.floats(-1e6, 1e6, width=32),
                       min_size=1, max_size=2000), data=st.data())
def test_top_indices_are_the_k_largest_ties_in_index_order(values, data):
    """The search's candidate selection (Floyd-Rivest): the k largest, those above the k-th value first, then
    ties at it in index order, as a stable sort would take them."""
    import numpy as np

    from icecache.index._tree_kernels import _top_indices

    x = np.array(values, np.float32)
    k = data.draw(st.integers(1, len(values)))
    got = _top_indices(x, k)
    threshold = np.sort(x)[::-1][k - 1]
    above = np.flatnonzero(x > threshold)
    ties = np.flatnonzero(x == threshold)[: k - above.size]
    assert got.tolist() == above.tolist() + ties.tolist()
