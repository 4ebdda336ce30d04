"""`quest`: Quest (Tang et al., 2024) page bounds over token-order pages.

Every page keeps the elementwise minimum and maximum of its keys. For a query `q`, the largest `q . k` any
key in the page can reach is bounded by `sum_d max(q_d * min_d, q_d * max_d)`; pages are ranked by that
bound (the largest over the query heads of the group). The bound reads `2 * head_dim` numbers per page
instead of `page_size * head_dim` keys, so it is cheap, and it never underestimates a page.
"""

from __future__ import annotations

import torch

from .base import BuildContext, SearchContext, register_index
from .token_order import GrowingBuffer, TokenOrderIndex


@register_index("quest")
class QuestIndex(TokenOrderIndex):
    """Token-order pages ranked by the Quest upper bound of `q . k` (max over the query heads of a group).

    Structure: per KV head, per page, the elementwise `min` and `max` of the page's keys (`[kv_heads,
    n_pages, head_dim]` each). They are kept up to date incrementally: an insert recomputes only the last
    (partial) page and the pages it opens. No options besides `head_dim` and `page_size`.

    Why: the bound is exact-safe (a page holding a key with a large inner product is never ranked below
    its true best key) and costs two vectors per page, which makes it the standard query-aware baseline.
    """

    def _build(self, keys: torch.Tensor, context: BuildContext) -> None:
        empty = keys.new_empty((keys.shape[0], 0, keys.shape[2]), dtype=torch.float32)
        self._min = GrowingBuffer(empty)
        self._max = GrowingBuffer(empty)
        super()._build(keys, context)

    def _on_append(self, start: int, end: int) -> None:
        super()._on_append(start, end)
        if end <= start:
            return
        ps = self.page_size
        first, last = start // ps, (end - 1) // ps
        # every slot of pages first..last; slots past the last token repeat it (no effect on min / max)
        slots = torch.arange(first * ps, (last + 1) * ps, device=self.keys.view.device).clamp_(max=end - 1)
        chunk = self.keys.view[:, slots].view(self.kv_heads, last - first + 1, ps, self.head_dim)
        lo, hi = chunk.amin(2), chunk.amax(2)
        stored = self._min.length  # pages already summarised: page `first` may be among them (partial tail)
        overlap = stored - first
        if overlap > 0:
            self._min.view[:, first:stored] = lo[:, :overlap]
            self._max.view[:, first:stored] = hi[:, :overlap]
        self._min.append(lo[:, max(overlap, 0):])
        self._max.append(hi[:, max(overlap, 0):])

    def page_bounds(self, queries: torch.Tensor) -> torch.Tensor:
        """Quest bound of every page for every query head, `[kv_heads, group, n_pages]`.

        `max(q_d * min_d, q_d * max_d)` is `q_d * max_d` where `q_d >= 0` and `q_d * min_d` otherwise, so
        the bound is two matrix products: `relu(q) . max + min(q, 0) . min`.
        """
        q = queries.float().to(self._max.view.device)
        return (torch.einsum("hgd,hpd->hgp", q.clamp(min=0), self._max.view)
                + torch.einsum("hgd,hpd->hgp", q.clamp(max=0), self._min.view))

    def _search(self, queries: torch.Tensor, max_pages: int, context: SearchContext) -> torch.Tensor:
        scores = self.page_bounds(queries).amax(1)  # [kv_heads, n_pages]
        k = min(max_pages, scores.shape[1])
        return torch.topk(scores, k, dim=1).indices.to(queries.device)

    def metadata_bytes_per_search(self) -> int:
        if self.kv_heads is None:
            return 0
        return 2 * self.kv_heads * self.num_pages * self.head_dim * 4  # min + max, float32
