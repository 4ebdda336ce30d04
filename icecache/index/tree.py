"""`tree`: IceCache's semantic page layout (the paper's method, the library's default).

Per KV head, tokens are split recursively in two by 2-means on keys augmented for maximum inner product
(`k' = [k, sqrt(M^2 - |k|^2)]`), each split cut so that the left side holds whole pages: every leaf of
the resulting binary tree is one full page (fill ~1.0 at build), and siblings get adjacent page ids.
Tokens the prefill's last queries attend to most ("hot" tokens) are laid out first. The very first pages
(`span_pages`, 4 runs by default) are token-order runs: the page-grid cells around each of the tokens the
prompt's last position attends to most, from the token's own cell to a page's worth of tokens after it
(`span_reach`), so a needle keeps its key, its value and its digits together and in order; a page clustered by role
would bind the keys of several needles and none of their values (benchmarks/RESULTS.md). The next
hottest follow in tiers of growing size (8, 24, 72 pages by default: the hottest tokens pack tightest), and within a tier by the same
balanced 2-means over their *attention profile* (the square root of the attention probability each
prefill query gives them) rather than their keys: queries are not keys, and tokens the same queries
attend to are the ones a decode step needs together (see shared FINDINGS; the profile layout added
+0.02 recall at 4k over key clustering of the same tiers, benchmarks/RESULTS.md). The remaining tokens
are clustered by key.

Above the leaves sits a node hierarchy (`_tree_nodes.py`): the root, one subtree per layout group, then
the balanced splits down to pages. Every node keeps the count, centre and a radius bounding `|k - c|` for
every key below it, so `q . c + |q| r` bounds every token and every page centroid below it.

Search (default `search="scan"`) scores every leaf centroid against the group's queries, keeps
`candidate_factor x max_pages` candidate pages plus the span pages and the first hot tier's pages (grouped
by position or attention, not by key, so their centroids say little about them) plus `bound_candidates`
pages ranked by the bound on their best token (`q . c + |q| r`: a page whose centroid is unremarkable can
still hold one token the step needs), scores their tokens exactly and returns first the page holding
the most probable single token (`peak_pages`), then the pages holding the most attention mass (each
query head's softmax also counting the resident sink and window, through the runtime's `resident_lse`).
`search="descent"` finds the same candidates by a best-first descent from the root that skips subtrees
whose bound cannot reach them; on the model's real 64-dimensional keys the bound prunes almost nothing at 8k (the descent scored 99.9% of the nodes and took 2.5x the scan's
time, benchmarks/RESULTS.md), so the scan stays the default. Insert routes a token to the leaf with the
nearest centroid (estimated for every leaf from the bfloat16 centroids within a bound on their rounding, measured
exactly on the float32 sums only for the few leaves that can win: the same leaf as measuring all of them,
`benchmarks/route_filter.py`); a full leaf splits in two by 2-means (one half keeps the page id, the other gets a new
page and a new leaf under the same parent), and the nodes above count the key, their radii kept valid
without a rescan.

Each page's keys are stored together (`[kv_heads, pages, page_size, d + 1]`, like the page table), so the
search reads a candidate page as one contiguous block; leaf centroids, which only pick candidates, are
stored in bfloat16, so scoring every leaf reads half the bytes. Options `branching` and `depth` widen the
tree's top levels (faiss k-means, capacity-balanced to whole pages); binary stays the default, as wider
top levels lost recall on the recall benchmark (benchmarks/RESULTS.md). Tree building, token routing and the search are
many tiny branchy steps, compiled with numba on the host (`_tree_kernels.py`): as small torch ops the
search cost 0.7 ms per layer at 8k, almost all per-op overhead; compiled it costs about 0.2 ms.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ._clustering import balanced_kmeans_groups
from ._tree_kernels import (TreeArrays, augment_keys, balanced_order, insert_tokens, refresh_routes, search_pages,
                            search_pages_descent)
from ._tree_nodes import TreeNodes, build_nodes
from .base import BuildContext, IndexOptions, SearchContext, TokenIndex, register_index


def _bits(values: torch.Tensor) -> np.ndarray:
    """bfloat16 tensor -> int16 numpy view of its bits, for the compiled kernels (numpy has no bfloat16)."""
    return values.view(torch.int16).numpy()


def augment(keys: np.ndarray, max_norm: float) -> np.ndarray:
    """float32 `[..., d] -> [..., d + 1]`: `[k, sqrt(M^2 - |k|^2)]`, so L2 neighbours are inner-product
    neighbours. numpy: inserts augment one token per decode step and layer, where torch's per-op
    overhead would cost several times the work."""
    keys = np.asarray(keys, dtype=np.float32)
    extra = np.sqrt(np.maximum(np.float32(max_norm) ** 2 - np.square(keys).sum(-1, keepdims=True), 0))
    return np.concatenate([keys, extra.astype(np.float32)], axis=-1)


def balanced_pages(points: torch.Tensor, page_size: int) -> torch.Tensor:
    """Order `points` `[n, d]` so consecutive runs of `page_size` are the leaves of a balanced 2-means
    tree (every leaf a full page but possibly the last). Returns a permutation `[n]`."""
    order = balanced_order(np.ascontiguousarray(points.detach().cpu().float().numpy()), page_size)
    return torch.from_numpy(order)


def tree_pages(points: torch.Tensor, page_size: int, branching: int = 2, depth: int = 0, seed: int = 0) -> torch.Tensor:
    """Like `balanced_pages`, with the top `depth` levels of the tree split `branching` ways by faiss
    k-means with capacities (every child holds whole pages, so no page straddles two subtrees); below
    them, balanced 2-means down to single pages. Returns a permutation `[n]`."""
    if depth == 0 or points.shape[0] <= page_size:
        return balanced_pages(points, page_size)
    groups = balanced_kmeans_groups(points, page_size, branching, seed=seed)
    return torch.cat([g[tree_pages(points[g], page_size, branching, depth - 1, seed + 1)] for g in groups])


@dataclass(frozen=True)
class TreeOptions(IndexOptions):
    """Options of `tree`; each is documented on `TreeIndex`."""

    hot_pages: int = 8
    hot_tiers: int = 3
    hot_growth: int = 3
    max_hot_share: float = 0.4
    candidate_factor: int = 4
    min_candidates: int = 64
    norm_headroom: float = 1.2
    branching: int = 2
    depth: int = 0
    search: str = "scan"
    rescore_hot_tier: bool = True
    bound_candidates: int = 16
    span_pages: int = 4
    span_queries: int = 1
    span_lead: int = 0
    span_reach: int | None = None
    peak_pages: int = 1
    follow_copy: bool = True
    hot_layout: str = "profile"

    def check(self) -> None:
        self.require_int("hot_pages", 0)
        self.require_int("hot_tiers", 1)
        self.require_int("hot_growth", 1)
        self.require_float("max_hot_share", 0.0, 1.0)
        self.require_int("candidate_factor", 1)
        self.require_int("min_candidates", 1)
        self.require_float("norm_headroom", 1.0)
        self.require_int("branching", 2)
        self.require_int("depth", 0)
        self.require_choice("search", ("scan", "descent"))
        self.require_choice("rescore_hot_tier", (True, False))
        self.require_int("bound_candidates", 0)
        self.require_int("span_pages", 0)
        self.require_int("span_queries", 1)
        self.require_int("span_lead", 0)
        self.require_int("span_reach", 0, allow_none=True)
        self.require_int("peak_pages", 0)
        self.require_choice("follow_copy", (False, True))
        self.require_choice("hot_layout", ("profile", "spans"))


@register_index("tree")
class TreeIndex(TokenIndex):
    """Balanced 2-means tree over augmented keys; leaves are full pages; hot pages from prefill queries.

    Options:
        hot_pages: pages of the first (hottest) tier of tokens the prefill's last queries attend to most
            (0 disables hot tiers). Default 8.
        hot_tiers: number of hot tiers, each `hot_growth` times the previous one's pages (default 3 and 3:
            8, 24, 72 pages); all hot tiers together hold at most `max_hot_share` (default 0.4) of the pages.
        candidate_factor: search rescans `candidate_factor x max_pages` (at least `min_candidates`)
            best-centroid pages exactly. Default 4: on the 16-question task suite it keeps every answer
            full KV gives at budget 256 (0.75 with 2 and 8; 8 and 32 gain nothing more); see
            benchmarks/RESULTS.md.
        min_candidates: default 64. A needle's page often has an unremarkable centroid: at budget 64
            (one retrieved page) 16 candidates kept 3 of the 8 task answers full KV gives, 48 or 64 kept 6,
            rescoring every page 7. From budget 256 up `candidate_factor` already asks for more.
        norm_headroom: `M` = this x the largest key norm at build; later keys beyond it clamp. Default 1.2.
        branching, depth: the top `depth` levels of each layout group's tree split `branching` ways with
            faiss k-means (capacity-balanced: every child holds whole pages); below them, balanced
            2-means down to single pages. Default depth 0 (2-means all the way): on the 4k recall
            benchmark wider top levels gained nothing, and faiss top splits cost task answers
            (benchmarks/RESULTS.md).
        rescore_hot_tier: default True: the first hot tier's pages (`hot_pages` of them) are always
            rescored, on top of the centroid-ranked candidates. Those pages group tokens by the prefill
            queries' attention, not by key, so their key centroid can rank them low while they hold the
            token a step needs most: at 4k, a pass-key page holding 90% of a retrieval head's attention
            ranked 80th by centroid, outside the 64 candidates (benchmarks/RESULTS.md).
        bound_candidates: pages rescored on top of the centroid-ranked candidates, ranked by the bound on
            their best token, `max_g q_g . c + |q_g| r` (leaf centre and radius from the node hierarchy).
            Default 16. A page clustered with dissimilar keys can hold the one token a step needs: at 4k, a
            pass-key digit carrying 0.86 of a head's attention sat in a page ranked 195th of 253 by
            centroid (45th by this bound), so the tree wrote `6049` for `60494` at budget 256. They cost
            no recall (4k: 0.728 with them, 0.727 without). `search="scan"` only.
        span_pages: token-order runs laid out first, before the hot tiers: the page-grid cell
            `[w * page_size, (w + 1) * page_size)` holding each of the hottest tokens not yet covered (and
            the cells up to `span_reach` tokens after it: two pages by default), so
            a needle's tokens stay together and in order (a key and the value after it, the digits of a
            number); they are always rescored, like the first hot tier. Semantic pages bind tokens by
            role, so one page can hold the keys of several needles and none of their values. Default 4: at
            budget 64 they kept more of full KV's answers than the profile tiers alone (4k suite: 0.65
            against 0.58; 2k: 0.81 against 0.70), for 0.01 of 4k recall (benchmarks/RESULTS.md).
        span_queries: the span pages go to the tokens the prompt's newest `span_queries` positions attend
            to most (every query head of the group), not all `BuildContext` positions: the last positions
            ask what the answer's first tokens will. Default 1: with the 64 newest positions summed, the
            hottest tokens were the haystack just before the question (the older positions read their
            neighbours); the last position ranked the pass key's digits first in 5-9 of SmolLM2's 28 sparse
            layers at 4k (0-1 summed) and in 2 of Gemma 3's 3 global layers at 16k (benchmarks/RESULTS.md).
        span_lead: a run also covers the `span_lead` tokens before its hot token (the grid cell before,
            when the token starts its own). Default 0.
        span_reach: a run covers the `span_reach` tokens after its hot token too (the next grid cell,
            when fewer follow the token in its own; a page on top of `span_pages`), so the digits after a
            key's last word are not cut at a page edge. Default None: the page size (a page's worth of
            tokens after the hot token). On Gemma 3 at 16k (one digit per token) the tree wrote `7050` for
            `70503` when the key ended its cell; with `span_reach=8` budget 256 answered 13 of 13 replayed
            16k questions against 7. With 16-token pages, 16 rather than 8 kept 0.95 / 0.95 of full KV's
            answers at budgets 128 / 256 on SmolLM2's 4k suite against 0.91 / 0.93 (2k: 0.935 / 0.963
            against 0.944 / 0.963; benchmarks/RESULTS.md, "A page's worth after the hot token").
        peak_pages: the first `peak_pages` selected pages are the candidates holding the most probable
            single tokens (a page's best token, over the group's query heads), the rest go by attention
            mass. A copy step needs its one next token, which a page of many moderately attended tokens
            can outweigh in mass. Default 1: SmolLM2's 4k suite kept 0.81 / 1.00 / 1.00 of full KV's answers
            at budgets 64 / 128 / 256 against 0.69 / 1.00 / 1.00 by mass alone (`exact` 0.81 / 0.92 / 1.00),
            Gemma 3's 16k suite 0.94 / 0.97 / 1.00 against 0.88 / 1.00 / 1.00 (`exact` 0.97 / 1.00 / 1.00):
            it keeps a copy going (pass keys, two-hop), and can pick another needle's value (multi-key).
            The peak is the best query head's, not the group's sum (2 of 10 replayed questions answered
            with the sum, 5 with the max, benchmarks/RESULTS.md).
        follow_copy: the pages holding the successors (position + 1) of the tokens of the page the previous
            search selected first are candidates too. A model copying a number
            reads its tokens in order: the token after the one a step attends to most is the one the next
            step needs, and a semantic layout can put it in a page whose centroid ranks outside the
            candidates (SmolLM2, 4k: `21983736` for `2198564` at budgets 128 and 256, answered when every
            page is rescored). Default True: through SmolLM2's 2k and 4k suites (315 questions each) it kept
            0.926 / 0.949 / 0.967 and 0.923 / 0.973 / 0.984 of full KV's answers at budgets 64 / 128 / 256,
            against 0.916 / 0.940 / 0.963 and 0.912 / 0.951 / 0.978 without; Gemma 3's 16k variable-tracking
            and two-hop questions 0.89 / 1.00 at budgets 128 / 256 against 0.78 / 0.89 (16 answers gained,
            none lost), for the same 4k recall and 5-6% more page keys read per search (benchmarks/RESULTS.md,
            "Following the copy").
        hot_layout: "profile" (default): the first hot tier groups the hottest tokens by which prefill
            queries attend them. "spans": it becomes `hot_pages` more span pages instead (measured on
            Gemma 3, which spells numbers one digit per token, benchmarks/LONG_CONTEXT.md).
        search: "scan" (default) scores every leaf centroid to pick the candidates; "descent" finds the
            same candidates by a bounded best-first descent of the node hierarchy. Both then rescore the
            candidates exactly. On this model's keys at 8k the bound prunes almost nothing, and the
            descent costs 2.5x the scan (benchmarks/RESULTS.md).
    """

    Options = TreeOptions
    uses_resident_lse = True
    _pinned = 0  # pages 0 .. _pinned - 1 (span pages, the first hot tier) are always rescored

    # -- build -----------------------------------------------------------------------------------

    def _build(self, keys: torch.Tensor, context: BuildContext) -> None:
        queries = context.queries
        kv_heads, n, d = keys.shape
        keys = keys.detach().float().cpu()  # the tree's bookkeeping lives on the host
        self.max_norm = float(keys.norm(dim=-1).max()) * self.options.norm_headroom if n else 1.0
        aug = torch.from_numpy(augment(keys.numpy(), self.max_norm))
        # headroom for the pages decode-time splits open (growing copies every per-page array at once), kept
        # small: the per-page arrays are most of the index's memory (with a quarter spare and doubling, the
        # index held 0.99x of its layer's KV on a 3000-token prompt; 0.85x now)
        cap = -(-n // self.page_size)
        cap += cap // 16 + 8
        self._table = torch.full((kv_heads, cap, self.page_size), -1, dtype=torch.long)
        self._fill = torch.zeros(kv_heads, cap, dtype=torch.long)
        self._sums = torch.zeros(kv_heads, cap, d + 1)
        # centroids column by column, `[kv, d, pages]`: scoring every page streams contiguous memory. In
        # bfloat16: they only pick candidates, and the search reads half the bytes (see _tree_kernels)
        self._cent = torch.zeros(kv_heads, d, cap, dtype=torch.bfloat16)
        # every page's augmented keys stored together, `[kv, pages, page_size, d + 1]` (slot by slot, like
        # the table): search reads a candidate page as one contiguous block instead of 16 scattered rows
        self._page_keys = torch.zeros(kv_heads, cap, self.page_size, d + 1)
        # per page, what routing a token needs besides the bfloat16 centroids (`TreeArrays.route`)
        self._route = torch.zeros(kv_heads, cap, 4)
        self._pages = np.zeros(kv_heads, dtype=np.int64)
        self._views = None
        self._alloc_nodes(kv_heads, cap, d)
        spans, tiers = self._hot_layout(n // self.page_size) if queries is not None else (0, [])
        # always rescored: the span pages and the first profile tier (`hot_pages`), whose centroids say little
        first_tier = tiers[0] if tiers and self.options.hot_layout == "profile" else 0
        span_pages = 0  # the most span pages a head laid out (a run can take a second page: `span_reach`)
        for h in range(kv_heads):
            group_starts = []
            for tokens, features in self._layout_groups(h, keys[h], aug[h], context, spans, tiers):
                # features None: the group is already in its page order (token-order spans)
                order = (torch.arange(tokens.numel()) if features is None else
                         tree_pages(features, self.page_size, self.options.branching, self.options.depth, seed=h))
                if features is None:
                    span_pages = max(span_pages, -(-tokens.numel() // self.page_size))
                group_starts.append(int(self._pages[h]))
                self._append_pages(h, tokens[order], aug[h])
            build_nodes(h, np.array(group_starts, dtype=np.int64), int(self._pages[h]), self._fill.numpy(),
                        self._page_keys.numpy(), self._nodes)
        # a head with fewer span pages also rescores the first pages after its first tier: a few candidates more
        self._pinned = span_pages + first_tier if self.options.rescore_hot_tier else 0
        self._token_page = torch.full((kv_heads, n + n // 16 + 64), -1, dtype=torch.long)
        for h in range(kv_heads):
            table = self._table[h, : int(self._pages[h])]
            held = table >= 0
            self._token_page[h, table[held]] = torch.arange(table.shape[0]).unsqueeze(1).expand_as(table)[held]
        # the page the last search selected first, per head (`follow_copy`); -1: none yet, nothing followed
        self._follow_from = np.full(kv_heads, -1, np.int64)

    def _alloc_nodes(self, kv_heads: int, page_cap: int, d: int) -> None:
        """The node hierarchy (`_tree_nodes`): a root, one subtree per layout group, leaves = pages."""
        self._nodes = TreeNodes.allocate(kv_heads, page_cap, d)

    def _hot_layout(self, pages: int) -> tuple[int, list[int]]:
        """Span pages, then pages of each hot tier, hottest first, within `max_hot_share` of `pages`."""
        left = int(pages * self.options.max_hot_share)
        wanted = self.options.span_pages + (self.options.hot_pages if self.options.hot_layout == "spans" else 0)
        spans = min(wanted, left)
        tiers, left, size = [], left - spans, self.options.hot_pages
        for i in range(self.options.hot_tiers):
            take = min(size, left)
            if take <= 0:
                break
            if not (i == 0 and self.options.hot_layout == "spans"):
                tiers.append(take)
                left -= take
            size *= self.options.hot_growth
        return spans, tiers

    def _layout_groups(self, h: int, keys: torch.Tensor, aug: torch.Tensor, context: BuildContext, spans: int,
                       tiers: list[int]):
        """`(tokens [t], features [t, f] or None)` groups of KV head `h`, each laid out from a fresh page:
        `spans` token-order pages around the hottest tokens (features None: already in page order), the
        hot tiers (`tiers`: pages each) by attention profile, then the rest by augmented key."""
        n = keys.shape[0]
        if not spans and not tiers:
            return [(torch.arange(n), aug)]
        logits = context.queries[h].detach().float().cpu() @ keys.T * context.scale  # [m, n], newest rows last
        probs = torch.softmax(logits, dim=-1)
        profile = probs.sqrt()  # sqrt: profiles compare by Hellinger distance
        order = torch.argsort(probs.sum(0), descending=True)  # hottest first
        groups, start = [], 0
        if spans:
            # the prompt's last positions ask what the answer's first tokens will: their hottest tokens
            newest = probs[-min(self.options.span_queries * context.group, probs.shape[0]):].sum(0)
            runs = self._span_runs(torch.argsort(newest, descending=True), n, spans)
            groups.append((runs, None))
            rest_mask = torch.ones(n, dtype=torch.bool)
            rest_mask[runs[runs >= 0]] = False
            order = order[rest_mask[order]]
        for pages in tiers:
            tokens = order[start : start + pages * self.page_size]
            groups.append((tokens, profile[:, tokens].T.contiguous()))
            start += tokens.numel()
        rest = order[start:].sort().values
        if rest.numel():
            groups.append((rest, aug[rest]))
        return groups

    def _span_runs(self, order: torch.Tensor, n: int, count: int) -> torch.Tensor:
        """Token-order runs of whole pages for the `count` hottest tokens in `order` not yet covered
        (positions, -1 where a run is short): the page-grid cells from `span_lead` tokens before the token
        to `span_reach` after it (what follows a needle's key is its value), less any a previous run took."""
        ps, lead, reach = self.page_size, self.options.span_lead, self.options.span_reach
        reach = ps if reach is None else reach
        runs, taken = [], torch.zeros(n, dtype=torch.bool)
        for t in order.tolist():
            if len(runs) == count:
                break
            if taken[t]:  # covered by an earlier run: no run of its own
                continue
            first, last = max(t - lead, 0) // ps * ps, (min(t + reach, n - 1) // ps + 1) * ps
            run = torch.arange(first, min(last, n))
            run = run[~taken[run]]
            taken[run] = True
            runs.append(torch.nn.functional.pad(run, (0, -run.numel() % ps), value=-1))  # whole pages
        return torch.cat(runs) if runs else torch.empty(0, dtype=torch.long)

    def _append_pages(self, h: int, tokens: torch.Tensor, aug: torch.Tensor) -> None:
        ps, count = self.page_size, -(-tokens.numel() // self.page_size)
        first = int(self._pages[h])
        self._ensure_capacity(first + count)
        block = torch.full((count * ps,), -1, dtype=torch.long)
        block[: tokens.numel()] = tokens
        block = block.view(count, ps)
        valid = block >= 0
        self._table[h, first : first + count] = block
        self._fill[h, first : first + count] = valid.sum(1)
        page_keys = aug[block.clamp(min=0)] * valid.unsqueeze(-1)  # [count, page_size, d + 1]
        self._page_keys[h, first : first + count] = page_keys
        sums = page_keys.sum(1)
        self._sums[h, first : first + count] = sums
        means = sums[:, : self.head_dim] / valid.sum(1, keepdim=True).clamp(min=1)
        self._cent[h, :, first : first + count] = means.T.to(torch.bfloat16)
        refresh_routes(self._sums.numpy(), self._fill.numpy(), self._route.numpy(), h, first, first + count,
                       self.head_dim)
        self._pages[h] = first + count

    def _ensure_capacity(self, pages: int) -> None:
        cap = self._table.shape[1]
        if pages <= cap:
            return
        grow = max(pages, cap + cap // 8) - cap  # by an eighth, as the host tier grows
        def pad(t: torch.Tensor, fill: float, dim: int = 1) -> torch.Tensor:
            shape = list(t.shape)
            shape[dim] = grow
            return torch.cat([t, t.new_full(shape, fill)], dim)

        self._table, self._fill = pad(self._table, -1), pad(self._fill, 0)
        self._sums, self._cent = pad(self._sums, 0.0), pad(self._cent, 0.0, dim=2)
        self._page_keys, self._route = pad(self._page_keys, 0.0), pad(self._route, 0.0)
        self._views = None
        # node arrays: copy into arrays sized for the new page capacity
        old = self._nodes
        self._alloc_nodes(self._table.shape[0], self._table.shape[1], self.head_dim)
        for new, kept in zip(self._nodes, old):
            new[tuple(slice(0, n) for n in kept.shape)] = kept

    def _ensure_token_capacity(self, tokens: int) -> None:
        cap = self._token_page.shape[1]
        if tokens > cap:
            grow = max(tokens, cap + cap // 8) - cap
            self._token_page = torch.cat([self._token_page, self._token_page.new_full((self.kv_heads, grow), -1)], 1)
            self._views = None

    def _arrays(self) -> TreeArrays:
        if self._views is None:
            self._views = TreeArrays(self._table.numpy(), self._token_page.numpy(), self._fill.numpy(),
                                      self._sums.numpy(), _bits(self._cent), self._page_keys.numpy(),
                                      self._route.numpy())
        return self._views

    def __getstate__(self) -> dict:
        # a copy (deepcopy, pickle) gets its own tensors: views of the original's must not travel with it
        return {**self.__dict__, "_views": None}

    # -- insert ----------------------------------------------------------------------------------

    def _insert(self, keys: torch.Tensor, start: int) -> torch.Tensor:
        new_keys = augment_keys(np.ascontiguousarray(keys.detach().float().cpu().numpy()), self.max_norm)
        self._ensure_capacity(self.num_pages + keys.shape[1])
        self._ensure_token_capacity(start + keys.shape[1])
        a = self._arrays()
        changed = np.zeros(a.fill.shape, dtype=np.bool_)
        insert_tokens(new_keys, start, a, self._pages, changed, self._nodes, self.max_norm ** 2)
        return torch.from_numpy(np.flatnonzero(changed.any(0)))

    # -- search ----------------------------------------------------------------------------------

    @property
    def page_table(self) -> torch.Tensor:
        return self._table[:, : self.num_pages]

    @property
    def num_pages(self) -> int:
        return max(self._pages.tolist(), default=0)  # per search: a list's max is 5x cheaper than numpy's here

    def centroids(self) -> torch.Tensor:
        """Mean key of every page (bfloat16 precision, as the search sees it), `[kv_heads, n_pages, head_dim]`
        float32 (zeros for empty pages)."""
        return self._cent[:, :, : self.num_pages].transpose(1, 2).float()

    def _search(self, queries: torch.Tensor, max_pages: int, context: SearchContext) -> torch.Tensor:
        resident_lse, scale = context.resident_lse, context.scale
        # 1) rank leaves by centroid score (max over the group's query heads); 2) rescore the tokens of the
        # best `n_cand` leaves exactly and keep the pages holding the most attention mass. One compiled
        # pass over all heads: as ~10 small torch ops the same search cost 0.7 ms at 8k, mostly per-op
        # overhead (benchmarks/RESULTS.md).
        q = np.ascontiguousarray(queries.detach().float().cpu().numpy())
        pages = self.num_pages
        # the first hot tier's pages are rescored on top of the centroid-ranked candidates
        n_cand = min(pages, max(max_pages * self.options.candidate_factor, self.options.min_candidates) + self._pinned)
        # plus pages ranked by the bound on their best token (scan only)
        n_bound = min(pages - n_cand, self.options.bound_candidates) if self.options.search == "scan" else 0
        n_cand += n_bound
        if resident_lse is None:
            lse = np.full(q.shape[:2], -np.inf, np.float32)
        else:
            lse = np.ascontiguousarray(resident_lse.detach().float().cpu().numpy())
        arrays = self._arrays()
        # `follow_copy`: the pages after the previous search's first page are candidates too (found in the kernel)
        following = bool((self._follow_from >= 0).any())
        n_cand = min(pages, n_cand + (self.page_size if following else 0))
        if self.options.search == "descent":
            best, self._last_scored = search_pages_descent(q, arrays, self._nodes, pages, n_cand, max_pages, scale,
                                                           lse, self._pinned, self.options.peak_pages, self._follow_from)
        else:
            best = search_pages(q, arrays, self._nodes, pages, n_cand, max_pages, scale, lse, self._pinned, n_bound,
                                self.options.peak_pages, self._follow_from)
            self._last_scored = self.kv_heads * pages
        if self.options.follow_copy:
            self._follow_from = best[:, 0].copy()
        self._last_rescored = n_cand * self.page_size
        return torch.from_numpy(best)  # host memory, where the runtime plans the step

    @property
    def num_nodes(self) -> int:
        """Nodes of the hierarchy (root, inner nodes and leaf pages), summed over the KV heads."""
        return int(self._nodes.count.sum())

    @property
    def nodes_scored(self) -> int:
        """Nodes the last search scored against the queries, summed over the KV heads: every leaf for the
        scan, the expanded nodes' children for the descent."""
        return getattr(self, "_last_scored", 0)

    def metadata_bytes_per_search(self) -> int:
        # the scored centroids (bfloat16 leaves for the scan, float32 nodes for the descent), plus the
        # candidate pages' keys rescored by the last search
        if self.options.search == "descent":
            scanned = self.nodes_scored * 4
        else:
            scanned = self.kv_heads * self.num_pages * 2
        return (scanned + self.kv_heads * getattr(self, "_last_rescored", 0) * 4) * self.head_dim
