"""`hnsw`: token-level approximate maximum-inner-product search with hnswlib, mapped onto token-order pages.

Each KV head has one HNSW graph over its keys. A decode search asks the graph for the best tokens of every
query head of the group, maps each found token to its page (`position // page_size`) and ranks the pages
by their best found token. The layout is token order (the graph only chooses pages, it does not arrange
them), so this index measures how well a token-level ANN search transfers to page retrieval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .base import BuildContext, IndexOptions, SearchContext, register_index
from .token_order import TokenOrderIndex

SPACES = ("augmented", "ip")


@dataclass(frozen=True)
class HnswOptions(IndexOptions):
    """Options of `hnsw` (see `HnswIndex`)."""

    space: str = "augmented"
    M: int = 16
    ef_construction: int = 100
    ef: int = 64

    def check(self) -> None:
        self.require_choice("space", SPACES)
        self.require_int("M", 2)
        self.require_int("ef_construction", 1)
        self.require_int("ef", 1)


@register_index("hnsw")
class HnswIndex(TokenOrderIndex):
    """Token-order pages chosen by an HNSW graph per KV head (hnswlib).

    Options (keyword arguments of `get_index("hnsw", ...)`):
        space: how inner products are searched, one of
            - `"ip"`: hnswlib's inner-product space (distance `1 - q . k`) on the raw keys.
            - `"augmented"` (default): the MIPS-to-L2 reduction. Keys become `k' = [k, sqrt(R^2 - |k|^2)]` and queries
              `q' = [q, 0]`, so `|q' - k'|^2 = |q|^2 + R^2 - 2 q . k`: the nearest key in L2 is the one with
              the largest inner product, and the graph is built in a true metric space (better navigable
              than raw inner product). `R` is a per-head radius of `norm_headroom` (1.2) times the largest
              key norm seen at build; an insert bringing a key longer than `R` rebuilds that head's graph
              with a new `R` (1.2 x the new maximum), so rebuilds are rare (geometric growth).
              Measured on the embedded model's real decode queries (4k context, layers 2, 5, ..., 29, 8
              steps): retrievable recall 0.306 / 0.493 at budgets 128 / 256 against 0.260 / 0.457 for
              `"ip"` (0.271 / 0.457 with `ef=128`), hence the default.
        M: graph degree (hnswlib `M`, default 16).
        ef_construction: candidate list size while building (default 100).
        ef: candidate list size while searching (default 64; hnswlib uses `max(ef, k)`).

    Search: every query head of a KV head's group asks for `k = min(max_pages * page_size, tokens)` tokens;
    found tokens are re-scored exactly (`q . k` with the stored keys, max over the group) and their pages
    ranked by best token. When the found tokens cover fewer than `max_pages` pages, the remaining slots
    are filled with the newest pages not yet chosen (recency, as `window`), so `min(max_pages, n_pages)`
    pages always come back. hnswlib runs with `num_threads=1`.

    Why: HNSW is the usual state of the art for in-memory ANN; it shows what token-level retrieval
    buys when the pages themselves stay in token order.
    """

    Options = HnswOptions
    norm_headroom = 1.2

    def __init__(self, head_dim: int, page_size: int = 16, **options) -> None:
        super().__init__(head_dim, page_size, **options)
        self._last_group = 1
        self._last_k = 0

    # -- graph maintenance -------------------------------------------------------------------------

    def _build(self, keys: torch.Tensor, context: BuildContext) -> None:
        import hnswlib  # noqa: F401  (fail at build, with a clear ImportError, when hnswlib is missing)

        self._graphs: list = [None] * keys.shape[0]
        self._radius = [0.0] * keys.shape[0]
        super()._build(keys, context)

    def _new_graph(self, capacity: int):
        import hnswlib

        dim = self.head_dim + (1 if self.options.space == "augmented" else 0)
        graph = hnswlib.Index(space="l2" if self.options.space == "augmented" else "ip", dim=dim)
        graph.init_index(max_elements=max(64, capacity), M=self.options.M, ef_construction=self.options.ef_construction,
                         random_seed=100)
        graph.set_ef(self.options.ef)
        graph.set_num_threads(1)
        return graph

    def _vectors(self, head: int, keys: torch.Tensor) -> np.ndarray:
        """Keys `[m, head_dim]` of one head as the float32 rows the graph stores."""
        k = keys.detach().float().cpu()
        if self.options.space == "augmented":
            extra = (self._radius[head] ** 2 - (k * k).sum(1, keepdim=True)).clamp_(min=0).sqrt_()
            k = torch.cat([k, extra], dim=1)
        return np.ascontiguousarray(k.numpy(), dtype=np.float32)

    def _add(self, head: int, start: int, end: int) -> None:
        graph = self._graphs[head]
        if graph.get_current_count() + (end - start) > graph.get_max_elements():
            graph.resize_index(max(end, 2 * graph.get_max_elements()))
        graph.add_items(self._vectors(head, self.keys.view[head, start:end]), np.arange(start, end), num_threads=1)

    def _on_append(self, start: int, end: int) -> None:
        super()._on_append(start, end)
        if end <= start:
            return
        new = self.keys.view[:, start:end]
        new_max = new.norm(dim=2).amax(1).tolist() if self.options.space == "augmented" else [0.0] * self.kv_heads
        for h in range(self.kv_heads):
            if self._graphs[h] is None or new_max[h] > self._radius[h]:
                # first tokens of this head, or (augmented) a key outside the radius: (re)build the graph
                if self.options.space == "augmented":
                    self._radius[h] = self.norm_headroom * new_max[h]  # > every stored norm
                self._graphs[h] = self._new_graph(2 * end)
                self._add(h, 0, end)
            else:
                self._add(h, start, end)

    # -- search --------------------------------------------------------------------------------------

    def _query(self, head: int, queries: torch.Tensor, k: int) -> np.ndarray:
        """Labels `[group, <=k]` of the best tokens of one head for every query head (k clamped to count)."""
        graph = self._graphs[head]
        q = queries.detach().float().cpu()
        if self.options.space == "augmented":
            q = torch.cat([q, q.new_zeros(q.shape[0], 1)], dim=1)
        q = np.ascontiguousarray(q.numpy(), dtype=np.float32)
        k = min(k, graph.get_current_count())
        while k > 0:
            try:
                labels, _ = graph.knn_query(q, k=k, num_threads=1)
                return labels.astype(np.int64)
            except RuntimeError:  # the graph could not return k results for every query: ask for fewer
                k //= 2
        return np.empty((q.shape[0], 0), dtype=np.int64)

    def _search(self, queries: torch.Tensor, max_pages: int, context: SearchContext) -> torch.Tensor:
        n_pages, ps = self.num_pages, self.page_size
        keep = min(max_pages, n_pages)
        k = min(max_pages * ps, self.num_tokens)
        self._last_group, self._last_k = queries.shape[1], k
        keys = self.keys.view
        out = []
        for h in range(self.kv_heads):
            labels = torch.from_numpy(self._query(h, queries[h], k)).to(keys.device)  # [group, k']
            q = queries[h].float().to(keys.device)
            scores = torch.einsum("gd,gkd->gk", q, keys[h][labels])  # exact q . k of the found tokens
            best = torch.full((n_pages,), -math.inf, device=keys.device)
            best.scatter_reduce_(0, (labels // ps).flatten(), scores.flatten(), reduce="amax")
            found = torch.isfinite(best)
            order = torch.sort(best, descending=True, stable=True).indices[: int(found.sum())]
            if order.numel() < keep:  # fill with the newest pages not found
                rest = torch.arange(n_pages - 1, -1, -1, device=keys.device)
                rest = rest[~found[rest]][: keep - order.numel()]
                order = torch.cat([order, rest])
            out.append(order[:keep])
        return torch.stack(out).to(queries.device)

    def nbytes(self) -> int:
        """The token-order pages and key copy (`TokenIndex.nbytes`) plus the graphs, as hnswlib allocates them:
        per element slot (`max_elements`, spare room included) its vector, label and `2 * M` layer-0 links; the
        upper levels (about one element in `M`, `M` links each) are left out."""
        dim = self.head_dim + (1 if self.options.space == "augmented" else 0)
        per_slot = dim * 4 + 8 + (2 * self.options.M + 1) * 4
        graphs = [g for g in getattr(self, "_graphs", ()) if g is not None]
        return super().nbytes() + sum(g.get_max_elements() * per_slot for g in graphs)

    def metadata_bytes_per_search(self) -> int:
        """Approximate graph traffic of the last search (all heads).

        Each query head expands about `ef' = max(ef, k)` candidates, each reading up to `2 * M` layer-0
        neighbours (capped at the stored token count): per evaluation one stored vector (`dim * 4` bytes)
        and its 4-byte neighbour id. Before any search, `k = 0` and one query head per group are assumed.
        """
        if self.kv_heads is None:
            return 0
        dim = self.head_dim + (1 if self.options.space == "augmented" else 0)
        evaluations = min(max(self.options.ef, self._last_k) * 2 * self.options.M, self.num_tokens)
        return self.kv_heads * self._last_group * evaluations * (dim * 4 + 4)
