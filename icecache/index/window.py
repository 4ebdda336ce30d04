"""`window`: StreamingLLM-style recency (the floor every index must beat).

Pages in token order; `search` ignores the queries and returns the most recent pages, so the whole
budget goes to the attention sink and the most recent tokens. With a budget at least the context it
keeps everything.
"""

from __future__ import annotations

import torch

from .base import SearchContext, register_index
from .token_order import TokenOrderIndex


@register_index("window")
class WindowIndex(TokenOrderIndex):
    """Select the newest pages, newest first."""

    stores_keys = False

    def _search(self, queries: torch.Tensor, max_pages: int, context: SearchContext) -> torch.Tensor:
        n_pages = self.num_pages
        # newest first; made in host memory, where the runtime plans (it reads nothing from the device)
        newest = torch.arange(n_pages - 1, max(n_pages - max_pages, 0) - 1, -1, dtype=torch.long)
        return newest.unsqueeze(0).expand(self.kv_heads, -1)
