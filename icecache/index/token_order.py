"""Shared base for indexes whose pages hold tokens in arrival order (exact, window, quest, hnsw).

Page `p` holds local positions `p * page_size .. (p + 1) * page_size - 1`; only the last page can be
partly filled. Subclasses only decide how to rank pages (`_search`) and may keep per-page summaries up to
date in `_on_append`.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .base import BuildContext, TokenIndex


class GrowingBuffer:
    """A `[heads, n, dim]` tensor that grows along dim 1 by an eighth, as the host tier does (amortised, no copy
    per append; doubling left half of an index's key copy unused after the first decode token)."""

    def __init__(self, like: torch.Tensor) -> None:
        self._data = like.new_empty((like.shape[0], max(16, like.shape[1]), like.shape[2]))
        self.length = 0
        self.append(like)

    def append(self, rows: torch.Tensor) -> None:
        need = self.length + rows.shape[1]
        if need > self._data.shape[1]:
            grown = self._data.new_empty((self._data.shape[0], max(need, self._data.shape[1] * 9 // 8), self._data.shape[2]))
            grown[:, : self.length] = self._data[:, : self.length]
            self._data = grown
        self._data[:, self.length : need].copy_(rows, non_blocking=True)  # from the pinned host tier on CUDA
        self.length = need

    @property
    def view(self) -> torch.Tensor:
        """The stored rows, `[heads, length, dim]` (a view: do not keep it across appends)."""
        return self._data[:, : self.length]


class TokenOrderIndex(TokenIndex):
    """Pages in token order; keeps every key (unless `stores_keys` is False) so subclasses can score them."""

    stores_keys: ClassVar[bool] = True

    def _build(self, keys: torch.Tensor, context: BuildContext) -> None:
        self.keys = GrowingBuffer(keys.float()) if self.stores_keys else None
        self._table: torch.Tensor | None = None
        self._on_append(0, keys.shape[1])

    def _insert(self, keys: torch.Tensor, start: int) -> torch.Tensor:
        if self.keys is not None:
            self.keys.append(keys.float())
        self._table = None
        self._on_append(start, start + keys.shape[1])
        # the page that held the old tail changes, and every page after it is new
        first = start // self.page_size
        last = (start + keys.shape[1] - 1) // self.page_size
        return torch.arange(first, last + 1, dtype=torch.long)

    def _on_append(self, start: int, end: int) -> None:
        """Hook: tokens `start .. end - 1` were just stored (keys in `self.keys.view`)."""
        self._table = None

    @property
    def page_table(self) -> torch.Tensor:
        if self._table is None:
            n, ps = self.num_tokens, self.page_size
            n_pages = -(-n // ps)
            positions = torch.arange(n_pages * ps, dtype=torch.long).view(n_pages, ps)
            positions[positions >= n] = -1
            self._table = positions.unsqueeze(0).expand(self.kv_heads, n_pages, ps)
        return self._table

    @property
    def num_pages(self) -> int:
        return -(-self.num_tokens // self.page_size)

    def page_token_mass(self, token_scores: torch.Tensor) -> torch.Tensor:
        """Sum per-token scores `[kv_heads, n]` over each page -> `[kv_heads, n_pages]`."""
        n, ps = token_scores.shape[1], self.page_size
        padded = torch.nn.functional.pad(token_scores, (0, self.num_pages * ps - n))
        return padded.view(token_scores.shape[0], -1, ps).sum(-1)
