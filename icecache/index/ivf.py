"""`ivf`: an inverted-file index whose pages *are* its clusters.

Each KV head's keys are clustered with k-means (faiss) into `nlist` lists, and every list is laid out as
its own consecutive pages: a page only ever holds tokens of one cluster. Retrieval therefore moves pages
of similar keys together instead of token-order neighbours. A search ranks the lists by their centroid,
scores the keys of the best lists exactly and returns the pages holding the best tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._clustering import kmeans_centroids
from .base import BuildContext, IndexOptions, SearchContext, TokenIndex, register_index
from .token_order import GrowingBuffer

#: automatic `nlist`: about this many tokens per list, capped at `MAX_AUTO_NLIST` lists
TOKENS_PER_LIST = 64
MAX_AUTO_NLIST = 1024


@dataclass(frozen=True)
class IvfOptions(IndexOptions):
    """Options of `ivf` (see `IvfIndex`)."""

    nlist: int | None = None
    nprobe: int = 8
    niter: int = 20

    def check(self) -> None:
        self.require_int("nlist", 1, allow_none=True)
        self.require_int("nprobe", 1)
        self.require_int("niter", 1)


@register_index("ivf")
class IvfIndex(TokenIndex):
    """Cluster-ordered pages: per KV head, k-means lists, each list stored as its own run of pages.

    Structure, per KV head: `nlist` centroids; a page table `[kv_heads, n_pages, page_size]` where every
    page holds tokens of a single list (at most one partial page per list, its last); every head is padded
    with empty pages to the same page count. Keys are kept (float32) for exact re-scoring.

    Clustering: L2 k-means (`faiss.Kmeans`, on the GPU when the keys are on CUDA and faiss has GPU support,
    else CPU; callers see no difference) on the raw keys, tokens assigned to the nearest centroid in L2.
    L2 clusters are compact, so a page's keys are close to each other; each centroid is then kept equal to
    the mean of its list's keys (also across inserts), which makes `q . centroid` the mean logit of the
    list: lists are ranked by it. Centroids are not re-trained on insert (no page ever moves); a new token
    joins its nearest centroid's list, filling that list's last page or opening a new page at the end.

    Options (keyword arguments of `get_index("ivf", ...)`):
        nlist: lists per head (default None: `n // 64` tokens at build, at least 1, at most 1024, and never
            more than the tokens). An index built with 0 tokens trains on its first insert.
        nprobe: lists whose keys are scored exactly (default 8). When their pages number fewer than
            `max_pages`, the next lists by centroid rank are added until they do, so `min(max_pages,
            n_pages)` pages always come back.
        niter: k-means iterations (default 20).

    Search: centroid score = max over the group's query heads of `q . c`; candidate tokens of the probed
    lists scored exactly (`q . k`, max over the group); pages ranked by their best token.

    Why: query-independent clustering of keys is the IVF answer to "which tokens are needed together":
    if attention concentrates on a region of key space, its tokens share few pages.
    """

    Options = IvfOptions

    def __init__(self, head_dim: int, page_size: int = 16, **options) -> None:
        super().__init__(head_dim, page_size, **options)
        self._last_candidates: int | None = None

    # -- layout ----------------------------------------------------------------------------------------

    def _build(self, keys: torch.Tensor, context: BuildContext) -> None:
        h, n, d = keys.shape
        dev = keys.device
        self.keys = GrowingBuffer(keys.float())
        self._lists = 0
        self._table = torch.full((h, 0, self.page_size), -1, dtype=torch.long, device=dev)
        self._page_list = torch.full((h, 0), -1, dtype=torch.long, device=dev)  # list of every page (-1: pad)
        self._page_fill = torch.zeros((h, 0), dtype=torch.long, device=dev)
        self._used = [0] * h  # real pages of each head
        self._pages = 0  # padded page count
        if n:
            self._train(self.keys.view)
            self._place(0, n)

    def _train(self, keys: torch.Tensor) -> None:
        """Create the lists from `keys` `[kv_heads, n, d]` (n >= 1): centroids, empty tails, empty sums."""
        h, n, d = keys.shape
        nlist = self.options.nlist if self.options.nlist is not None else max(1, min(n // TOKENS_PER_LIST, MAX_AUTO_NLIST))
        self._lists = min(nlist, n)
        self._centroids = torch.stack([kmeans_centroids(keys[i], self._lists, self.options.niter, seed=1234 + i) for i in range(h)])
        self._sums = torch.zeros_like(self._centroids)
        self._counts = torch.zeros((h, self._lists), dtype=torch.long, device=keys.device)
        self._tail = torch.full((h, self._lists), -1, dtype=torch.long, device=keys.device)  # last page of list
        self._list_pages = torch.zeros((h, self._lists), dtype=torch.long, device=keys.device)
        self._grow_pages(1)  # so that tail look-ups always have a page to read

    def _assign(self, keys: torch.Tensor) -> torch.Tensor:
        """Nearest centroid (L2) of every key `[kv_heads, m, d]` -> `[kv_heads, m]`."""
        c = self._centroids
        return (2 * torch.einsum("hmd,hld->hml", keys, c) - (c * c).sum(-1).unsqueeze(1)).argmax(-1)

    def _grow_pages(self, need: int) -> None:
        cap = self._table.shape[1]
        if need <= cap:
            return
        cap = max(need, 2 * cap, 4)
        h, dev = self.kv_heads, self._table.device
        table = torch.full((h, cap, self.page_size), -1, dtype=torch.long, device=dev)
        page_list = torch.full((h, cap), -1, dtype=torch.long, device=dev)
        fill = torch.zeros((h, cap), dtype=torch.long, device=dev)
        old = self._table.shape[1]
        table[:, :old], page_list[:, :old], fill[:, :old] = self._table, self._page_list, self._page_fill
        self._table, self._page_list, self._page_fill = table, page_list, fill

    def _place(self, start: int, end: int) -> torch.Tensor:
        """Lay out the stored tokens `start .. end - 1`; returns the ids of the pages they went to."""
        keys = self.keys.view[:, start:end]
        assign = self._assign(keys)  # [h, m]
        h, m = assign.shape
        L, ps, dev = self._lists, self.page_size, assign.device
        changed = []
        for i in range(h):
            a = assign[i]
            order = torch.argsort(a, stable=True)
            a_sorted, positions = a[order], order + start
            count = torch.bincount(a, minlength=L)
            rank = torch.arange(m, device=dev) - (torch.cumsum(count, 0) - count)[a_sorted]  # rank in its list
            tail = self._tail[i]
            tail_fill = torch.where(tail >= 0, self._page_fill[i].gather(0, tail.clamp(min=0)), ps)
            free = ps - tail_fill  # free slots in each list's last page
            new_pages = (count - free).clamp(min=0).add_(ps - 1).div_(ps, rounding_mode="floor")
            first_new = self._used[i] + torch.cumsum(new_pages, 0) - new_pages
            in_tail = rank < free[a_sorted]
            over = rank - free[a_sorted]
            page = torch.where(in_tail, tail[a_sorted], first_new[a_sorted] + over.div(ps, rounding_mode="floor"))
            slot = torch.where(in_tail, tail_fill[a_sorted] + rank, over.remainder(ps))
            added = int(new_pages.sum())
            self._grow_pages(self._used[i] + added)
            self._table[i, page, slot] = positions
            self._page_fill[i].index_add_(0, page, torch.ones_like(page))
            self._page_list[i, self._used[i] : self._used[i] + added] = torch.repeat_interleave(
                torch.arange(L, device=dev), new_pages)
            self._tail[i] = torch.where(new_pages > 0, first_new + new_pages - 1, tail)
            self._list_pages[i] += new_pages
            self._used[i] += added
            changed.append(torch.unique(page))
        self._pages = max(self._used)
        # keep every non-empty centroid at the mean of its list's keys
        self._sums.scatter_add_(1, assign.unsqueeze(-1).expand(-1, -1, self.head_dim), keys)
        self._counts.scatter_add_(1, assign, torch.ones_like(assign))
        filled = self._counts > 0
        self._centroids = torch.where(filled.unsqueeze(-1), self._sums / self._counts.clamp(min=1).unsqueeze(-1),
                                      self._centroids)
        return torch.unique(torch.cat(changed)).cpu()

    def _insert(self, keys: torch.Tensor, start: int) -> torch.Tensor:
        self.keys.append(keys.float())
        end = start + keys.shape[1]
        if self._lists == 0:  # built with no tokens: the first tokens train the lists
            self._train(self.keys.view[:, start:end])
        return self._place(start, end)

    @property
    def page_table(self) -> torch.Tensor:
        return self._table[:, : self._pages]

    @property
    def num_pages(self) -> int:
        return self._pages

    # -- search ------------------------------------------------------------------------------------------

    def _search(self, queries: torch.Tensor, max_pages: int, context: SearchContext) -> torch.Tensor:
        h, P, L, ps = self.kv_heads, self._pages, self._lists, self.page_size
        keys = self.keys.view
        dev = keys.device
        q = queries.float().to(dev)
        arange_l = torch.arange(L, device=dev).expand(h, L)

        # rank the lists by centroid (empty lists last)
        cscore = torch.einsum("hgd,hld->hgl", q, self._centroids).amax(1)
        cscore = cscore.masked_fill(self._list_pages == 0, -math.inf)
        list_order = torch.sort(cscore, dim=1, descending=True, stable=True).indices
        list_rank = torch.empty_like(list_order).scatter_(1, list_order, arange_l)
        cum = torch.cumsum(self._list_pages.gather(1, list_order), 1)  # pages of the best r lists
        probe = torch.maximum((cum < max_pages).sum(1) + 1, torch.tensor(self.options.nprobe, device=dev)).clamp(max=L)
        candidates = cum.gather(1, (probe - 1).unsqueeze(1)).squeeze(1)  # pages of the probed lists, per head

        # every page by list rank (padding pages last): the first `candidates` pages are the probed ones
        page_list = self._page_list[:, :P]
        page_rank = torch.where(page_list >= 0, list_rank.gather(1, page_list.clamp(min=0)), L)
        by_list = torch.sort(page_rank, dim=1, stable=True).indices
        C = int(candidates.max())
        cand = by_list[:, :C]
        positions = self._table[:, :P].gather(1, cand.unsqueeze(-1).expand(-1, -1, ps))  # [h, C, ps]
        cand_keys = keys.gather(1, positions.clamp(min=0).view(h, C * ps, 1).expand(-1, -1, self.head_dim))
        scores = torch.einsum("hgd,hnd->hgn", q, cand_keys).amax(1).view(h, C, ps)
        best = scores.masked_fill(positions < 0, -math.inf).amax(2)
        best = best.masked_fill(torch.arange(C, device=dev) >= candidates.unsqueeze(1), -math.inf)
        ranked = cand.gather(1, torch.sort(best, dim=1, descending=True, stable=True).indices)
        self._last_candidates = int((positions >= 0).logical_and(
            (torch.arange(C, device=dev) < candidates.unsqueeze(1)).unsqueeze(-1)).sum())
        return torch.cat([ranked, by_list[:, C:]], dim=1)[:, :max_pages].to(queries.device)

    def metadata_bytes_per_search(self) -> int:
        """Centroids (all heads) + the probed tokens' keys and page-table entries of the last search.

        Before any search, the probed tokens are estimated as `nprobe` average-sized lists per head.
        """
        if self.kv_heads is None or self._lists == 0:
            return 0
        tokens = self._last_candidates
        if tokens is None:
            tokens = self.kv_heads * min(self.options.nprobe, self._lists) * self.num_tokens // self._lists
        return self.kv_heads * self._lists * self.head_dim * 4 + tokens * (self.head_dim * 4 + 8)
