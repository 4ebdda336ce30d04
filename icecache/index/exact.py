"""`exact`: the oracle for token-order pages.

Scores every stored key against the decode queries and returns the pages holding the most attention
probability (summed over the query heads of each KV head). No approximate structure can choose better
token-order pages, so this is the ceiling of Quest-style layouts; it reads every key, so it is no
practical index, only the yardstick.
"""

from __future__ import annotations

import torch

from .base import SearchContext, register_index
from .token_order import TokenOrderIndex


@register_index("exact")
class ExactIndex(TokenOrderIndex):
    """Rank token-order pages by the exact attention mass of their tokens."""

    uses_resident_lse = True

    def token_scores(self, queries: torch.Tensor, context: SearchContext) -> torch.Tensor:
        """Attention probability of every stored token, summed over each group: `[kv_heads, n]`; with
        `context.resident_lse` `[kv_heads, group]` each head's softmax also counts the resident tokens."""
        resident_lse = context.resident_lse
        logits = torch.einsum("hgd,hnd->hgn", queries.float(), self.keys.view) * context.scale
        lse = torch.logsumexp(logits, dim=-1)
        if resident_lse is not None:
            lse = torch.logaddexp(lse, resident_lse.to(lse))
        return torch.exp(logits - lse.unsqueeze(-1)).sum(1)

    def _search(self, queries: torch.Tensor, max_pages: int, context: SearchContext) -> torch.Tensor:
        mass = self.page_token_mass(self.token_scores(queries, context))
        k = min(max_pages, mass.shape[1])
        return torch.topk(mass, k, dim=1).indices

    def metadata_bytes_per_search(self) -> int:
        return self.keys.view.numel() * 4  # every key is read
