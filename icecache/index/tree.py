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

Tree building and token routing are many tiny branchy steps, compiled with numba on the host
(`_tree_kernels.py`); search is a few batched torch ops over all heads of the layer.
"""

from __future__ import annotations

import numpy as np
import torch

from ._tree_kernels import balanced_order, insert_tokens
from .base import TokenIndex, register_index
from .token_order import GrowingBuffer


def augment(keys: torch.Tensor, max_norm: float) -> torch.Tensor:
    """`[..., d] -> [..., d + 1]`: `[k, sqrt(M^2 - |k|^2)]`, so L2 neighbours are inner-product neighbours."""
    extra = (max_norm**2 - keys.pow(2).sum(-1, keepdim=True)).clamp(min=0).sqrt()
    return torch.cat([keys, extra], dim=-1)


def balanced_pages(points: torch.Tensor, page_size: int) -> torch.Tensor:
    """Order `points` `[n, d]` so consecutive runs of `page_size` are the leaves of a balanced 2-means
    tree (every leaf a full page but possibly the last). Returns a permutation `[n]`."""
    order = balanced_order(np.ascontiguousarray(points.detach().cpu().float().numpy()), page_size)
    return torch.from_numpy(order)


@register_index("tree")
class TreeIndex(TokenIndex):
    """Balanced 2-means tree over augmented keys; leaves are full pages; hot pages from prefill queries.

    Options:
        hot_pages: pages reserved for the tokens the prefill's last queries attend to most (0 disables;
            capped at a quarter of the pages). Default 8.
        candidate_factor: search rescans `candidate_factor x max_pages` (at least `min_candidates`, default
            16) best-centroid pages exactly. Default 4: on the 16-question task suite it keeps every answer
            full KV gives at budget 256 (0.75 with 2 and 8; 8 and 32 gain nothing more); see
            benchmarks/RESULTS.md.
        norm_headroom: `M` = this x the largest key norm at build; later keys beyond it clamp. Default 1.2.
    """

    uses_build_queries = True

    def __init__(self, head_dim: int, page_size: int = 16, hot_pages: int = 8, candidate_factor: int = 4,
                 norm_headroom: float = 1.2, min_candidates: int = 16) -> None:
        super().__init__(head_dim, page_size)
        if not isinstance(hot_pages, int) or hot_pages < 0:
            raise ValueError(f"hot_pages must be a non-negative int, got {hot_pages!r}")
        if not isinstance(candidate_factor, int) or candidate_factor < 1:
            raise ValueError(f"candidate_factor must be an int >= 1, got {candidate_factor!r}")
        if not norm_headroom >= 1.0:
            raise ValueError(f"norm_headroom must be >= 1.0, got {norm_headroom!r}")
        if not isinstance(min_candidates, int) or min_candidates < 1:
            raise ValueError(f"min_candidates must be an int >= 1, got {min_candidates!r}")
        self.hot_pages, self.candidate_factor, self.norm_headroom = hot_pages, candidate_factor, norm_headroom
        self.min_candidates = min_candidates

    # -- build -----------------------------------------------------------------------------------

    def _build(self, keys: torch.Tensor, queries: torch.Tensor | None) -> None:
        kv_heads, n, d = keys.shape
        keys = keys.detach().float().cpu()  # the tree's bookkeeping lives on the host
        self.max_norm = float(keys.norm(dim=-1).max()) * self.norm_headroom if n else 1.0
        self.aug = GrowingBuffer(augment(keys, self.max_norm))
        cap = max(-(-n // self.page_size) + 2, 8)
        self._table = torch.full((kv_heads, cap, self.page_size), -1, dtype=torch.long)
        self._fill = torch.zeros(kv_heads, cap, dtype=torch.long)
        self._sums = torch.zeros(kv_heads, cap, d + 1)
        self._cent = torch.zeros(kv_heads, cap, d)
        self._pages = np.zeros(kv_heads, dtype=np.int64)
        hot = self._hot_tokens(keys, queries)
        for h in range(kv_heads):
            rest = torch.ones(n, dtype=torch.bool)
            groups = []
            if hot is not None:
                rest[hot[h]] = False
                groups.append(hot[h])
            groups.append(rest.nonzero().flatten())
            for tokens in groups:  # hot tokens, then the rest, each group from a fresh page
                self._append_pages(h, tokens[balanced_pages(self.aug.view[h, tokens], self.page_size)])

    def _hot_tokens(self, keys: torch.Tensor, queries: torch.Tensor | None) -> torch.Tensor | None:
        """`[kv_heads, hot]` token positions most attended by the prefill queries, or None."""
        hot_pages = min(self.hot_pages, (keys.shape[1] // self.page_size) // 4)
        if queries is None or hot_pages == 0:
            return None
        logits = torch.einsum("hmd,hnd->hmn", queries.detach().float().cpu(), keys) * self.scale
        return torch.topk(torch.softmax(logits, dim=-1).sum(1), hot_pages * self.page_size, dim=1).indices

    def _append_pages(self, h: int, tokens: torch.Tensor) -> None:
        ps, count = self.page_size, -(-tokens.numel() // self.page_size)
        first = int(self._pages[h])
        self._ensure_capacity(first + count)
        block = torch.full((count * ps,), -1, dtype=torch.long)
        block[: tokens.numel()] = tokens
        block = block.view(count, ps)
        valid = block >= 0
        self._table[h, first : first + count] = block
        self._fill[h, first : first + count] = valid.sum(1)
        sums = (self.aug.view[h, block.clamp(min=0)] * valid.unsqueeze(-1)).sum(1)
        self._sums[h, first : first + count] = sums
        self._cent[h, first : first + count] = sums[:, : self.head_dim] / valid.sum(1, keepdim=True).clamp(min=1)
        self._pages[h] = first + count

    def _ensure_capacity(self, pages: int) -> None:
        cap = self._table.shape[1]
        if pages <= cap:
            return
        grow = max(pages, 2 * cap) - cap
        pad = lambda t, fill: torch.cat([t, t.new_full((t.shape[0], grow, *t.shape[2:]), fill)], 1)
        self._table, self._fill = pad(self._table, -1), pad(self._fill, 0)
        self._sums, self._cent = pad(self._sums, 0.0), pad(self._cent, 0.0)

    # -- insert ----------------------------------------------------------------------------------

    def _insert(self, keys: torch.Tensor) -> torch.Tensor:
        start, m = self.num_tokens, keys.shape[1]
        self.aug.append(augment(keys.detach().float().cpu(), self.max_norm))
        self._ensure_capacity(int(self._pages.max()) + m)
        changed = np.zeros(self._fill.shape, dtype=np.bool_)
        insert_tokens(self.aug.view.numpy(), start, start + m, self._table.numpy(), self._fill.numpy(),
                      self._sums.numpy(), self._cent.numpy(), self._pages, changed)
        return torch.from_numpy(np.flatnonzero(changed.any(0)))

    # -- search ----------------------------------------------------------------------------------

    @property
    def page_table(self) -> torch.Tensor:
        return self._table[:, : int(self._pages.max(initial=0))]

    @property
    def num_pages(self) -> int:
        return int(self._pages.max(initial=0))

    def centroids(self) -> torch.Tensor:
        """Mean key of every page, `[kv_heads, n_pages, head_dim]` (zeros for empty pages)."""
        return self._cent[:, : self.num_pages]

    def _search(self, queries: torch.Tensor, max_pages: int) -> torch.Tensor:
        q = queries.detach().float().cpu()
        table = self.page_table
        kv_heads, pages, ps = table.shape
        # 1) rank leaves by centroid score, max over the group's query heads
        score = torch.einsum("hgd,hpd->hgp", q, self.centroids()).amax(1)
        score = score.masked_fill(self._fill[:, :pages] == 0, float("-inf"))
        n_cand = min(pages, max(max_pages * self.candidate_factor, self.min_candidates))
        cand = torch.topk(score, n_cand, dim=1).indices  # [kv, C]
        # 2) rescore the candidates' tokens exactly: attention mass per candidate page
        positions = table.gather(1, cand.unsqueeze(-1).expand(-1, -1, ps)).view(kv_heads, -1)  # [kv, C*ps]
        keys = self.aug.view[..., : self.head_dim]
        cand_keys = keys.gather(1, positions.clamp(min=0).unsqueeze(-1).expand(-1, -1, self.head_dim))
        logits = torch.einsum("hgd,hnd->hgn", q, cand_keys) * self.scale
        logits = logits.masked_fill((positions < 0).unsqueeze(1), float("-inf"))
        mass = torch.softmax(logits, dim=-1).nan_to_num(0.0).sum(1).view(kv_heads, n_cand, ps).sum(-1)
        mass = mass.masked_fill(score.gather(1, cand) == float("-inf"), -1.0)  # empty pages last
        best = torch.topk(mass, min(max_pages, n_cand), dim=1).indices
        self._last_rescored = n_cand * ps
        return cand.gather(1, best).to(queries.device)

    def metadata_bytes_per_search(self) -> int:
        # every leaf centroid, plus the candidate pages' keys rescored by the last search
        return self.kv_heads * (self.num_pages + getattr(self, "_last_rescored", 0)) * self.head_dim * 4
