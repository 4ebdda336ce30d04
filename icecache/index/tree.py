"""`tree`: IceCache's semantic page layout (the paper's method, the library's default).

Per KV head, tokens are split recursively in two by 2-means on keys augmented for maximum inner product
(`k' = [k, sqrt(M^2 - |k|^2)]`), each split cut so that the left side holds whole pages: every leaf of
the resulting binary tree is one full page (fill ~1.0 at build), and siblings get adjacent page ids.
Tokens the prefill's last queries attend to most ("hot" tokens) are laid out in their own pages first,
by the same balanced tree: queries are not keys, and the prompt's own queries say which tokens the
answer will need (see shared FINDINGS).

Search scores every leaf centroid against the group's queries (at these page counts one matmul over the
leaves is cheaper than a descent, and FINDINGS showed loose bounds rank badly), keeps
`candidate_factor x max_pages` candidate pages, scores their tokens exactly and returns the pages holding
the most attention mass. Insert routes a token to the leaf with the nearest centroid; a full leaf splits
in two by 2-means (one half keeps the page id, the other gets a new page).

All level-by-level work is batched in torch over every node and head at once (on the GPU when the keys
are there), so a build is a few dozen tensor ops per level, not one k-means call per node.
"""

from __future__ import annotations

import torch

from .base import TokenIndex, register_index
from .token_order import GrowingBuffer

_LLOYD_ITERS = 4


def augment(keys: torch.Tensor, max_norm: float) -> torch.Tensor:
    """`[..., d] -> [..., d + 1]`: `[k, sqrt(M^2 - |k|^2)]`, so L2 neighbours are inner-product neighbours."""
    extra = (max_norm**2 - keys.pow(2).sum(-1, keepdim=True)).clamp(min=0).sqrt()
    return torch.cat([keys, extra], dim=-1)


def balanced_pages(points: torch.Tensor, page_size: int) -> torch.Tensor:
    """Order `points` `[n, d]` so consecutive runs of `page_size` are the leaves of a balanced 2-means tree.

    Every split is a few Lloyd iterations of 2-means, then a cut along the centroid difference at the
    rank that leaves whole pages on the left; all nodes of a level are processed together.
    Returns a permutation `[n]`.
    """
    n = points.shape[0]
    order = torch.arange(n, device=points.device)
    if n <= page_size:
        return order
    # nodes as (start, size) runs over `order`; split until every node is at most one page
    starts = torch.tensor([0], device=points.device)
    sizes = torch.tensor([n], device=points.device)
    while bool((sizes > page_size).any()):
        split = sizes > page_size
        pages = -(-sizes // page_size)
        left = torch.where(split, (pages // 2) * page_size, sizes)  # whole pages on the left
        node = torch.repeat_interleave(torch.arange(len(sizes), device=points.device), sizes)
        x = points[order]
        side = _two_means(x, node, len(sizes))
        # balanced cut: rank tokens in each node by their projection, left = the lowest `left` ranks
        within = _rank_within(side, node, starts)
        goes_right = within >= left[node]
        key = node * 2 + goes_right.long()
        order = order[torch.argsort(key, stable=True)]
        new_sizes = torch.stack([left, sizes - left], 1).flatten()
        sizes = new_sizes[new_sizes > 0]
        starts = torch.cumsum(sizes, 0) - sizes
    return order


def _two_means(x: torch.Tensor, node: torch.Tensor, nodes: int) -> torch.Tensor:
    """Projection of every point on its node's 2-means centroid difference (higher = second cluster)."""
    d = x.shape[1]
    mean = torch.zeros(nodes, d, device=x.device).index_add_(0, node, x)
    count = torch.bincount(node, minlength=nodes).clamp(min=1).unsqueeze(1).float()
    mean = mean / count
    centered = x - mean[node]
    # initial direction: a cheap power iteration per node (dominant spread of the node's points)
    direction = torch.zeros(nodes, d, device=x.device).index_add_(0, node, centered * centered.norm(dim=1, keepdim=True))
    direction = direction + 1e-6  # deterministic tie-break for nodes of identical points
    for _ in range(2):
        proj = (centered * direction[node]).sum(1, keepdim=True)
        direction = torch.zeros(nodes, d, device=x.device).index_add_(0, node, centered * proj)
    side = (centered * direction[node]).sum(1) > 0
    for _ in range(_LLOYD_ITERS):
        key = node * 2 + side.long()
        sums = torch.zeros(2 * nodes, d, device=x.device).index_add_(0, key, x)
        counts = torch.bincount(key, minlength=2 * nodes).unsqueeze(1).float()
        cent = (sums / counts.clamp(min=1)).view(nodes, 2, d)
        # an empty side keeps the node mean, so the split still cuts along the spread
        empty = counts.view(nodes, 2, 1) == 0
        cent = torch.where(empty, mean.unsqueeze(1), cent)
        side = ((x - cent[node, 1]).pow(2).sum(1) < (x - cent[node, 0]).pow(2).sum(1))
    diff = cent[:, 1] - cent[:, 0]
    degenerate = diff.norm(dim=1) < 1e-12
    diff = torch.where(degenerate.unsqueeze(1), direction, diff)
    return (x * diff[node]).sum(1)


def _rank_within(score: torch.Tensor, node: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Rank of each point's `score` inside its node (0 = lowest)."""
    perm = torch.argsort(score, stable=True)
    perm = perm[torch.argsort(node[perm], stable=True)]
    rank = torch.empty_like(perm)
    rank[perm] = torch.arange(len(perm), device=perm.device)
    return rank - starts[node]


@register_index("tree")
class TreeIndex(TokenIndex):
    """Balanced 2-means tree over augmented keys; leaves are full pages; hot pages from prefill queries.

    Options:
        hot_pages: pages reserved for the tokens the prefill's last queries attend to most (0 disables;
            capped at a quarter of the pages). Default 8.
        candidate_factor: search rescans `candidate_factor x max_pages` best-centroid pages exactly. Default 4.
        norm_headroom: `M` = this x the largest key norm at build; later keys beyond it clamp. Default 1.2.
    """

    uses_build_queries = True

    def __init__(self, head_dim: int, page_size: int = 16, hot_pages: int = 8, candidate_factor: int = 4,
                 norm_headroom: float = 1.2) -> None:
        super().__init__(head_dim, page_size)
        if not isinstance(hot_pages, int) or hot_pages < 0:
            raise ValueError(f"hot_pages must be a non-negative int, got {hot_pages!r}")
        if not isinstance(candidate_factor, int) or candidate_factor < 1:
            raise ValueError(f"candidate_factor must be an int >= 1, got {candidate_factor!r}")
        if not norm_headroom >= 1.0:
            raise ValueError(f"norm_headroom must be >= 1.0, got {norm_headroom!r}")
        self.hot_pages, self.candidate_factor, self.norm_headroom = hot_pages, candidate_factor, norm_headroom

    # -- build -----------------------------------------------------------------------------------

    def _build(self, keys: torch.Tensor, queries: torch.Tensor | None) -> None:
        kv_heads, n, d = keys.shape
        ps, device = self.page_size, keys.device
        keys = keys.float()
        self.keys = GrowingBuffer(keys)
        norms = keys.norm(dim=-1)
        self.max_norm = float(norms.max()) * self.norm_headroom if n else 1.0
        pages = -(-n // ps)
        self._table = torch.full((kv_heads, max(pages, 4), ps), -1, dtype=torch.long, device=device)
        self._fill = torch.zeros(kv_heads, max(pages, 4), dtype=torch.long, device=device)
        self._sums = torch.zeros(kv_heads, max(pages, 4), d + 1, device=device)  # augmented key sums
        self._pages = [0] * kv_heads
        hot = self._hot_tokens(keys, queries)
        for h in range(kv_heads):
            order = []
            rest = torch.ones(n, dtype=torch.bool, device=device)
            if hot is not None:
                rest[hot[h]] = False
                order.append(hot[h][balanced_pages(augment(keys[h, hot[h]], self.max_norm), ps)])
            idx = rest.nonzero().flatten()
            order.append(idx[balanced_pages(augment(keys[h, idx], self.max_norm), ps)])
            for group in order:  # each group starts on a fresh page
                self._append_pages(h, group)

    def _hot_tokens(self, keys: torch.Tensor, queries: torch.Tensor | None) -> torch.Tensor | None:
        """`[kv_heads, hot]` token positions most attended by the prefill queries, or None."""
        n = keys.shape[1]
        hot_pages = min(self.hot_pages, (n // self.page_size) // 4)
        if queries is None or hot_pages == 0:
            return None
        probs = torch.softmax(torch.einsum("hmd,hnd->hmn", queries.float(), keys) * self.scale, dim=-1).sum(1)
        return torch.topk(probs, hot_pages * self.page_size, dim=1).indices

    def _append_pages(self, h: int, tokens: torch.Tensor) -> None:
        ps = self.page_size
        count = -(-tokens.numel() // ps)
        first = self._pages[h]
        self._ensure_capacity(first + count)
        padded = torch.full((count * ps,), -1, dtype=torch.long, device=tokens.device)
        padded[: tokens.numel()] = tokens
        block = padded.view(count, ps)
        self._table[h, first : first + count] = block
        self._fill[h, first : first + count] = (block >= 0).sum(1)
        aug = augment(self.keys.view[h, block.clamp(min=0)], self.max_norm) * (block >= 0).unsqueeze(-1)
        self._sums[h, first : first + count] = aug.sum(1)
        self._pages[h] = first + count

    def _ensure_capacity(self, pages: int) -> None:
        cap = self._table.shape[1]
        if pages <= cap:
            return
        grow = max(pages, 2 * cap) - cap
        kv = self._table.shape[0]
        self._table = torch.cat([self._table, self._table.new_full((kv, grow, self.page_size), -1)], 1)
        self._fill = torch.cat([self._fill, self._fill.new_zeros((kv, grow))], 1)
        self._sums = torch.cat([self._sums, self._sums.new_zeros((kv, grow, self._sums.shape[2]))], 1)

    # -- insert ----------------------------------------------------------------------------------

    def _insert(self, keys: torch.Tensor) -> torch.Tensor:
        start = self.num_tokens
        self.keys.append(keys.float())
        changed: set[int] = set()
        aug = augment(keys.float(), self.max_norm)  # [kv, m, d+1]
        for t in range(keys.shape[1]):
            pos = start + t
            for h in range(self.kv_heads):
                changed.update(self._insert_one(h, pos, aug[h, t]))
        return torch.tensor(sorted(changed), dtype=torch.long)

    def _insert_one(self, h: int, pos: int, point: torch.Tensor) -> list[int]:
        n_pages = self._pages[h]
        if n_pages == 0:
            self._append_pages(h, torch.tensor([pos], device=self._table.device))
            return [0]
        fill = self._fill[h, :n_pages]
        centroids = self._sums[h, :n_pages] / fill.clamp(min=1).unsqueeze(1).float()
        dist = (centroids - point).pow(2).sum(1).masked_fill(fill == 0, float("inf"))
        page = int(torch.argmin(dist))
        if int(fill[page]) < self.page_size:
            self._place(h, page, pos, point)
            return [page]
        return self._split(h, page, pos)

    def _place(self, h: int, page: int, pos: int, point: torch.Tensor) -> None:
        slot = int((self._table[h, page] < 0).nonzero()[0])
        self._table[h, page, slot] = pos
        self._fill[h, page] += 1
        self._sums[h, page] += point

    def _split(self, h: int, page: int, pos: int) -> list[int]:
        """A full leaf plus one token becomes two leaves (2-means halves): `page` and a new page."""
        members = torch.cat([self._table[h, page], torch.tensor([pos], device=self._table.device)])
        half = -(-len(members) // 2)
        order = members[balanced_pages(augment(self.keys.view[h, members], self.max_norm), half)]
        self._table[h, page] = -1
        self._fill[h, page] = 0
        self._sums[h, page] = 0
        self._table[h, page, :half] = order[:half]
        self._fill[h, page] = half
        self._sums[h, page] = augment(self.keys.view[h, order[:half]], self.max_norm).sum(0)
        new = self._pages[h]
        self._append_pages(h, order[half:])
        return [page, new]

    # -- search ----------------------------------------------------------------------------------

    @property
    def page_table(self) -> torch.Tensor:
        return self._table[:, : max(self._pages, default=0)]

    def centroids(self) -> torch.Tensor:
        """Mean key of every page, `[kv_heads, n_pages, head_dim]` (zeros for empty pages)."""
        pages = max(self._pages, default=0)
        fill = self._fill[:, :pages].clamp(min=1).unsqueeze(-1).float()
        return self._sums[:, :pages, : self.head_dim] / fill

    def _search(self, queries: torch.Tensor, max_pages: int) -> torch.Tensor:
        q = queries.float().to(self._table.device)
        table = self.page_table
        kv_heads, pages, ps = table.shape
        # 1) rank leaves by centroid score, max over the group's query heads
        score = torch.einsum("hgd,hpd->hgp", q, self.centroids()).amax(1)
        score = score.masked_fill(self._fill[:, :pages] == 0, float("-inf"))
        n_cand = min(pages, max_pages * self.candidate_factor)
        cand = torch.topk(score, n_cand, dim=1).indices  # [kv, C]
        # 2) rescore the candidates' tokens exactly: attention mass per candidate page
        positions = table.gather(1, cand.unsqueeze(-1).expand(-1, -1, ps))  # [kv, C, ps]
        keys = self.keys.view.gather(1, positions.clamp(min=0).view(kv_heads, -1, 1).expand(-1, -1, self.head_dim))
        logits = torch.einsum("hgd,hnd->hgn", q, keys) * self.scale
        logits = logits.masked_fill((positions < 0).view(kv_heads, 1, -1), float("-inf"))
        mass = torch.softmax(logits, dim=-1).nan_to_num(0.0).sum(1).view(kv_heads, n_cand, ps).sum(-1)
        mass = mass.masked_fill(score.gather(1, cand) == float("-inf"), -1.0)  # empty pages last
        best = torch.topk(mass, min(max_pages, n_cand), dim=1).indices
        self._last_rescored = n_cand * ps
        return cand.gather(1, best)

    def metadata_bytes_per_search(self) -> int:
        # every leaf centroid, plus the candidate pages' keys rescored by the last search
        pages = max(self._pages, default=0)
        return self.kv_heads * (pages + getattr(self, "_last_rescored", 0)) * self.head_dim * 4
