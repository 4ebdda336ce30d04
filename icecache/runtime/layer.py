"""One sparse attention layer: the whole IceCache data path, top to bottom.

    prefill      -> dense attention over the prompt (transformers' SDPA), then `admit`: sink and window
                    go to the device tier, everything between them builds the index
    decode step  -> admit the new token (the window's oldest token moves into the index)
                 -> search: the index picks pages for this step's queries
                 -> page table: page ids -> token positions
                 -> bulk load: only pages not already on the device move, through one staging buffer
                 -> gather attention over sink + window + selected pages
                 -> with layer reuse, a leader then prefetches its followers' pages: their copies run on
                    the side stream while the GPU computes this layer and the next ones
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch

from ..index.base import TokenIndex
from ..kernels.reference import paged_decode_attention_reference
from .budget import Budget
from .tiers import BulkLoader, DeviceTier, HostTier, TransferStats

#: prefill queries handed to indexes that learn their layout from them (last positions of the prompt)
BUILD_QUERY_POSITIONS = 64

AttentionKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


class SparseLayer:
    """Paged KV state and sparse decode attention for one transformer layer (batch size 1).

    Args:
        index: an empty `TokenIndex` for this layer.
        budget: the shared budget rule.
        kv_heads, head_dim, dtype, device: the layer's KV geometry and compute device.
        kernel: decode attention over the device tier (default: the torch reference).
        leader: with layer reuse (IceCache(r)), the layer whose index and page choice this layer shares;
            this layer then only loads its own K/V for the leader's pages.
    """

    def __init__(self, index: TokenIndex, budget: Budget, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, kernel: AttentionKernel = paged_decode_attention_reference,
                 profile: bool = False, leader: "SparseLayer | None" = None) -> None:
        self.index, self.budget, self.kernel, self.profile = index, budget, kernel, profile
        self.leader = leader
        self.followers: list[SparseLayer] = []
        self._stale_pages: list[torch.Tensor] = []  # index changes a follower has not applied yet
        self.last_page_ids: torch.Tensor | None = None
        self.index_signature: tuple | None = None  # set by IceRuntime: when an index may be copied
        if leader is not None:
            if leader.index is not index:
                raise ValueError("a follower layer must share its leader's index")
            leader.followers.append(self)
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.host = HostTier(kv_heads, head_dim, dtype, device)
        self.tier = DeviceTier(kv_heads, head_dim, budget.page_size, budget.sink, budget.window,
                               budget.max_pages, dtype, device)
        self.loader = BulkLoader(device)
        self.stats = TransferStats()
        self.admitted = 0  # tokens already placed in sink / window / index
        self.prefill_queries: torch.Tensor | None = None  # the prompt's newest queries, for the index build
        self.scale: float | None = None  # the model's softmax scale, learnt from its first attention call

    # -- token admission (prefill and decode) ------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        return self.host.length

    @property
    def index_start(self) -> int:
        """Global position of the index's local position 0 (the first token after the sink)."""
        return self.budget.sink

    def store(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep new tokens `[kv_heads, m, head_dim]` in the host tier (placed later by `admit`)."""
        self.host.append(k, v)

    def note_prefill_queries(self, queries: torch.Tensor, scale: float | None) -> None:
        """Keep the newest `BUILD_QUERY_POSITIONS` prefill queries `[q_heads, m, head_dim]` (over chunks)
        as `[kv_heads, group * positions, head_dim]` for the index build; note the model's scale."""
        if scale is not None:
            self.scale = float(scale)
        if self.index.kv_heads is not None:
            return  # already built: later chunks are inserted
        recent = queries[:, -BUILD_QUERY_POSITIONS:]
        if self.prefill_queries is not None and recent.shape[1] < BUILD_QUERY_POSITIONS:
            older = self.prefill_queries.view(queries.shape[0], -1, self.head_dim)
            recent = torch.cat([older, recent.to(older.device)], dim=1)[:, -BUILD_QUERY_POSITIONS:]
        self.prefill_queries = recent.detach().reshape(self.kv_heads, -1, self.head_dim)

    def admit(self, prefill_queries: torch.Tensor | None = None) -> None:
        """Place stored-but-unplaced tokens: first `sink` tokens to the sink, the newest `window` to the
        window ring, and every token older than the window into the index (built at the first call, from
        `prefill_queries` or those noted during prefill)."""
        if prefill_queries is None:
            prefill_queries = self.prefill_queries
        sink, window = self.budget.sink, self.budget.window
        start, n = self.admitted, self.num_tokens
        if start < sink:
            end = min(sink, n)
            self.tier.write_resident(range(start, end), self.host.k[:, start:end], self.host.v[:, start:end])
        indexed_end = max(sink, n - window)
        if self.leader is not None:  # the leader keeps the shared index; apply what changed in it
            self._apply_leader_changes()
        elif self.index.kv_heads is None:
            self.prefill_queries = prefill_queries
            self.index.build(self.host.keys(sink, indexed_end), prefill_queries)
        else:
            already = sink + self.index.num_tokens
            if indexed_end > already:
                changed = self.index.insert(self.host.keys(already, indexed_end))
                self.tier.invalidate(changed)
                for follower in self.followers:
                    follower._stale_pages.append(changed)
        first_window = max(start, sink, n - window)
        if first_window < n:
            self.tier.write_resident(range(first_window, n), self.host.k[:, first_window:n],
                                     self.host.v[:, first_window:n])
        self.admitted = n

    # -- decode step ---------------------------------------------------------------------------------

    def decode(self, query: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        """Attention output `[q_heads, head_dim]` of the newest token's `query` `[q_heads, head_dim]`."""
        if scale is not None:
            self.scale = float(scale)
        self.admit()
        if self.scale is not None and self.leader is None and self.index.scale != self.scale:
            self.index.scale = self.scale  # pages are ranked with the model's own softmax scale
        group_queries = query.view(self.kv_heads, -1, self.head_dim)

        clock = self._clock()
        page_ids = self.select_pages(group_queries)
        searched = self._clock()
        self.load_pages(page_ids)
        self.loader.wait()  # the compute stream waits for this layer's copies (prefetched or not)
        loaded = self._clock()
        out = self.kernel(query, self.tier.k, self.tier.v, self.tier.attention_mask(),
                          self.scale if self.scale is not None else 1.0 / math.sqrt(self.head_dim))
        done = self._clock()
        for follower in self.followers:
            follower.prefetch(page_ids)

        self.stats.steps += 1
        self.stats.seconds["search"] += searched - clock
        self.stats.seconds["transfer"] += loaded - searched
        self.stats.seconds["attention"] += done - loaded
        return out

    def prefetch(self, page_ids: torch.Tensor) -> None:
        """Follower only: start loading the leader's page choice for this step before this layer runs.

        Issued right after the leader's attention, so on CUDA the copies overlap the leader's remaining
        compute and the layers between; `decode` then finds the pages resident. Skipped when a page could
        hold a token this layer has not stored yet (a window of 0)."""
        if self.budget.window == 0:
            return
        start = self._clock()
        self._apply_leader_changes()  # before loading: a changed page must not be taken as resident
        self.tier.grow_retrieval_slots(self.leader.tier.retrieval_slots)
        self._load_missing(page_ids)
        self.stats.seconds["transfer"] += self._clock() - start

    def _apply_leader_changes(self) -> None:
        """Follower: forget device copies of pages the leader's index changed since last applied."""
        for changed in self._stale_pages:
            self.tier.invalidate(changed)
        self._stale_pages.clear()

    def select_pages(self, group_queries: torch.Tensor) -> torch.Tensor:
        """Page ids `[kv_heads, n]` (-1 padded) to attend besides sink and window."""
        if self.leader is not None:
            self.tier.grow_retrieval_slots(self.leader.tier.retrieval_slots)
            return self.leader.last_page_ids
        if self.index.num_tokens <= self.budget.retrieval_tokens:
            # everything retrievable fits in the budget: keep every page, no search
            all_pages = torch.arange(self.index.num_pages, dtype=torch.long, device=group_queries.device)
            self.tier.grow_retrieval_slots(self.index.num_pages)
            self.last_page_ids = all_pages.unsqueeze(0).expand(self.kv_heads, -1)
        else:
            # pages are ranked by their share of each query head's *whole* attention, sink and window included
            resident = (self.tier.resident_logsumexp(group_queries, self.index.scale)
                        if self.index.uses_resident_lse else None)
            self.last_page_ids = self.index.search(group_queries, self.budget.max_pages, resident)
        return self.last_page_ids

    def load_pages(self, page_ids: torch.Tensor) -> None:
        """Make the selected pages resident in device slots, moving only those not already there."""
        self._load_missing(page_ids)
        self.stats.pages_selected += int((page_ids >= 0).sum())

    def _load_missing(self, page_ids: torch.Tensor) -> None:
        miss, slot = self.tier.assign(page_ids.to(self.tier.slot_page.device))
        heads, rank = miss.nonzero(as_tuple=True)
        missing_pages = page_ids.to(miss.device)[heads, rank]
        table = self.index.page_table  # gather the rows where the index keeps them, not the whole table
        local = table[heads.to(table.device), missing_pages.to(table.device)]  # [m, page_size]
        positions = torch.where(local >= 0, local + self.index_start, local)
        self.stats.bytes_moved += self.loader.load(self.host, self.tier, heads, slot[heads, rank], positions)
        self.tier.slot_page[heads, slot[heads, rank]] = missing_pages
        self.stats.pages_loaded += int(heads.numel())

    def resident_nbytes(self) -> int:
        """Bytes of K/V this layer holds on the device tier."""
        return self.tier.nbytes()

    def _clock(self) -> float:
        if self.profile and self.tier.k.device.type == "cuda":
            torch.cuda.synchronize(self.tier.k.device)
        return time.perf_counter()
