"""One sparse attention layer: the whole IceCache data path, top to bottom.

    prefill      -> dense attention over the prompt (transformers' SDPA), then `admit`: sink and window
                    go to the device tier, everything between them builds the index
    decode step  -> admit the new token (the window's oldest token moves into the index)
                 -> select: the index picks pages for this step's queries
                 -> plan (`DecodePlan`, on the host): pages -> retrieval slots, the misses' token positions
                 -> load: only pages not already on the device move, through one staging buffer
                 -> attend: gather attention over sink + window + selected pages
                 -> with layer reuse, a leader then hands its plan to its followers, which start loading
                    its pages: on CUDA the copies run on the side stream while the GPU computes on
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

import numpy as np

from ..index.base import BuildContext, SearchContext, TokenIndex
from ..kernels.reference import paged_decode_attention_reference
from ._host_kernels import assign_and_load, paged_attention
from .budget import Budget
from .tiers import BulkLoader, DeviceTier, HostTier, TransferStats

#: prefill queries handed to indexes that learn their layout from them (last positions of the prompt)
BUILD_QUERY_POSITIONS = 64

AttentionKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


@dataclass(frozen=True)
class DecodePlan:
    """One sequence's decode step in one layer, decided before anything moves.

    Attributes:
        page_ids: `[kv_heads, max_pages]` index pages attended besides sink and window, best first, -1
            padded (a follower layer receives its leader's plan and attends the same pages).
        slots: `[kv_heads, max_pages]` the retrieval slot each selected page occupies this step.
        load_heads, load_slots, load_pages: `[m]` the selected pages not resident yet: KV head, slot, page.
        load_positions: `[m, page_size]` their global token positions in the host tier (-1: empty slot).

    Every tensor is in host memory: the plan is made on the host whatever the device, so planning never
    waits for a GPU, and the loads gather from the host tier with it directly.
    """

    page_ids: torch.Tensor
    slots: torch.Tensor
    load_heads: torch.Tensor
    load_slots: torch.Tensor
    load_pages: torch.Tensor
    load_positions: torch.Tensor

    @property
    def selected(self) -> int:
        """Pages selected over all KV heads."""
        if self.page_ids.device.type == "cpu":  # counted at every step of every layer: numpy, not two torch ops
            return int(np.count_nonzero(self.page_ids.numpy() >= 0))
        return int((self.page_ids >= 0).sum())


class SparseLayer:
    """Paged KV state and sparse decode attention for one transformer layer (batch size 1).

    Args:
        index: an empty `TokenIndex` for this layer.
        budget: the shared budget rule.
        kv_heads, head_dim, dtype, device: the layer's KV geometry and compute device.
        kernel: decode attention over the device tier (default: the torch reference).
        leader: with layer reuse (IceCache(r)), the layer whose index and page choice this layer shares;
            this layer then only loads its own K/V for the leader's pages.
        prefetch: a follower starts loading as soon as its leader's plan arrives (False: at its own turn).
        compiled: on the CPU in float32 with the reference kernel, run slot assignment, page loads and
            attention as compiled code (`_host_kernels`); False keeps the torch ops, the reference path.
    """

    def __init__(self, index: TokenIndex, budget: Budget, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, kernel: AttentionKernel = paged_decode_attention_reference,
                 profile: bool = False, leader: "SparseLayer | None" = None, prefetch: bool = True,
                 compiled: bool = True) -> None:
        if index.page_size != budget.page_size:  # pages are copied slot for slot between index and device tier
            raise ValueError(f"the index's page_size ({index.page_size}) must equal the budget's page_size "
                             f"({budget.page_size}); build the index with page_size=budget.page_size")
        self.index, self.budget, self.kernel, self.profile = index, budget, kernel, profile
        from ..kernels import paged_decode_attention

        # the compiled step replaces exactly the torch path it is tested against: CPU tiers, float32, the reference
        self.compiled = (compiled and device.type == "cpu" and dtype == torch.float32
                         and kernel in (paged_decode_attention_reference, paged_decode_attention))
        self.leader, self.prefetch = leader, prefetch
        self.followers: list[SparseLayer] = []
        self._stale_pages: list[torch.Tensor] = []  # index changes a follower has not applied yet
        self._leader_plan: DecodePlan | None = None  # follower: the leader's plan for the current step
        self.index_signature: tuple | None = None  # set by IceRuntime: when an index may be copied
        if leader is not None:
            if leader.index is not index:
                raise ValueError("a follower layer must share its leader's index")
            leader.followers.append(self)
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.host = HostTier(kv_heads, head_dim, dtype, device)
        # retrieval slots grow with what the index holds, up to the budget's pages (`select_pages`): a context
        # shorter than the budget holds about what full KV would on the device, not the whole budget
        self.tier = DeviceTier(kv_heads, head_dim, budget.page_size, budget.sink, budget.window, 0, dtype, device)
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

    def drop_first(self, n: int) -> None:
        """Forget the first `n` stored tokens (left padding), before any was placed."""
        if self.admitted:
            raise RuntimeError("drop_first() must run before tokens are placed (at the first prefill chunk)")
        self.host.drop_first(n)

    def note_prefill_queries(self, queries: torch.Tensor, scale: float | None) -> None:
        """Keep the newest `BUILD_QUERY_POSITIONS` prefill queries `[q_heads, m, head_dim]` (over chunks)
        for the index build; note the model's scale."""
        if scale is not None:
            self.scale = float(scale)
        if self.index.kv_heads is not None:
            return  # already built: later chunks are inserted
        recent = queries[:, -BUILD_QUERY_POSITIONS:]
        if self.prefill_queries is not None and recent.shape[1] < BUILD_QUERY_POSITIONS:
            older = self.prefill_queries
            recent = torch.cat([older, recent.to(older.device)], dim=1)[:, -BUILD_QUERY_POSITIONS:]
        # a copy: a slice would keep the model's (or engine's) query tensor of the whole chunk alive, ~50x
        # these positions per layer (a 3000-token prompt held 194 MB of SmolLM2's queries for 4 MB used)
        self.prefill_queries = recent.detach().clone()

    def admit(self, prefill_queries: torch.Tensor | None = None) -> None:
        """Place stored-but-unplaced tokens: first `sink` tokens to the sink, the newest `window` to the
        window ring, and every token older than the window into the index (built at the first call, from
        `prefill_queries` `[q_heads, positions, head_dim]` or those noted during prefill)."""
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
            context = BuildContext.from_query_heads(prefill_queries, self.kv_heads, self.scale)
            self.index.build(self.host.keys(sink, indexed_end), context)
        else:
            already = sink + self.index.num_tokens
            if indexed_end > already:
                # the model's own keys at the position this layer tracks: checked at the public `insert`, not per
                # step; handed over from the host tier, where a host-side index (the tree) keeps them anyway
                changed = self.index._insert_unchecked(self.host.k[:, already:indexed_end], already - sink)
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
        return self.step(query, scale)[0]

    def step(self, query: torch.Tensor, scale: float | None = None) -> tuple[torch.Tensor, DecodePlan]:
        """One decode step: admit -> select pages -> plan -> load -> attend, then hand the plan to the
        followers. Returns the attention output `[q_heads, head_dim]` and the step's `DecodePlan`."""
        start = self._clock()
        if scale is not None:
            self.scale = float(scale)
        self.admit()
        group_queries = query.view(self.kv_heads, -1, self.head_dim)

        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(self.head_dim)
        clock = self._clock()
        page_ids = self.select_pages(group_queries, scale)
        searched = self._clock()
        if self.compiled:
            plan = self.plan_and_load_compiled(page_ids)
            loaded = self._clock()
            tier = self.tier.arrays()
            out = np.empty(query.shape, dtype=np.float32)
            paged_attention(query.detach().float().contiguous().numpy(), tier.k, tier.v, tier.filled, tier.active,
                            scale, out)
            out = torch.from_numpy(out).to(query.dtype)
        else:
            plan = self.plan(page_ids)
            self.load(plan)
            self.loader.wait()  # the compute stream waits for this layer's copies (prefetched or not)
            loaded = self._clock()
            out = self.kernel(query, self.tier.k, self.tier.v, self.tier.attention_mask(), scale)
        done = self._clock()
        self.stats.steps += 1
        self.stats.pages_selected += plan.selected
        seconds = self.stats.seconds
        seconds["admit"] += clock - start
        seconds["search"] += searched - clock
        seconds["transfer"] += loaded - searched
        seconds["attention"] += done - loaded
        seconds["layer"] += self._clock() - start  # the phases plus what lies between them
        for follower in self.followers:  # their prefetch counts in their own transfer and layer time
            follower.receive(plan)
        return out, plan

    def select_pages(self, group_queries: torch.Tensor, scale: float) -> torch.Tensor:
        """Page ids `[kv_heads, n]` (-1 padded) to attend besides sink and window: the index's search (pages
        ranked with the model's softmax `scale`), all pages when everything retrievable fits the budget, or
        (a follower) the leader's choice."""
        if self.leader is not None:
            if self._leader_plan is None:
                raise RuntimeError("a follower layer decodes after its leader in the same step")
            pages, self._leader_plan = self._leader_plan.page_ids, None
            return pages
        if self.index.num_tokens <= self.budget.retrieval_tokens:
            # everything retrievable fits in the budget: keep every page, no search
            all_pages = torch.arange(self.index.num_pages, dtype=torch.long)  # plans are made on the host
            self.tier.grow_retrieval_slots(self.index.num_pages)
            return all_pages.unsqueeze(0).expand(self.kv_heads, -1)
        self.tier.grow_retrieval_slots(self.budget.max_pages)  # once the context outgrows the budget
        # pages are ranked by their share of each query head's *whole* attention, sink and window included
        resident = self.tier.resident_logsumexp(group_queries, scale) if self.index.uses_resident_lse else None
        # the queries come from the model's own attention call: checked there, not again per layer and step
        return self.index._search_unchecked(group_queries, self.budget.max_pages, SearchContext(resident, scale))

    def plan(self, page_ids: torch.Tensor) -> DecodePlan:
        """Assign this step's pages to retrieval slots (keeping resident ones) and list what must move, on
        the host: page ids from an index that searches on the device cross once, here (a host-side index,
        the tree, returns them there)."""
        page_ids = page_ids.cpu()
        miss, slot = self.tier.assign(page_ids)
        heads, rank = miss.nonzero(as_tuple=True)
        missing_pages = page_ids[heads, rank]
        table = self.index.page_table  # gather the rows where the index keeps them, not the whole table
        local = table[heads.to(table.device), missing_pages.to(table.device)].cpu()  # [m, page_size]
        positions = torch.where(local >= 0, local + self.index_start, local)
        return DecodePlan(page_ids, slot, heads, slot[heads, rank], missing_pages, positions)

    def plan_and_load_compiled(self, page_ids: torch.Tensor) -> DecodePlan:
        """`plan` then `load` in one compiled call (CPU, float32): the same slots, loads and device tier."""
        tier, (host_k, host_v) = self.tier.arrays(), self.host.arrays()
        ids = np.ascontiguousarray(page_ids.numpy())
        kv, width = ids.shape
        slots = np.empty((kv, width), np.int64)
        heads, slot_ids, pages = (np.empty(kv * width, np.int64) for _ in range(3))
        positions = np.empty((kv * width, self.budget.page_size), np.int64)
        m = assign_and_load(ids, tier.slot_page, self.index.page_table.numpy(), self.index_start, host_k, host_v,
                            tier.k, tier.v, tier.filled, tier.active, self.tier.resident_pages, slots, heads,
                            slot_ids, pages, positions)
        self.stats.bytes_moved += 2 * m * self.budget.page_size * self.head_dim * host_k.itemsize
        self.stats.pages_loaded += m
        return DecodePlan(page_ids, torch.from_numpy(slots), torch.from_numpy(heads[:m]),
                          torch.from_numpy(slot_ids[:m]), torch.from_numpy(pages[:m]), torch.from_numpy(positions[:m]))

    def load(self, plan: DecodePlan) -> None:
        """Move the plan's missing pages from the host tier into their device slots (one bulk copy)."""
        self.stats.bytes_moved += self.loader.load(self.host, self.tier, plan.load_heads, plan.load_slots,
                                                   plan.load_positions)
        self.tier.slot_page[plan.load_heads, plan.load_slots] = plan.load_pages
        self.stats.pages_loaded += int(plan.load_heads.numel())

    def receive(self, leader_plan: DecodePlan) -> None:
        """Follower only: the leader's plan for this step. Its page choice is this layer's; the loads start
        now, so on CUDA the copies overlap the leader's remaining compute and the layers between (skipped
        when a page could hold a token this layer has not stored yet: a window of 0)."""
        self._leader_plan = leader_plan
        self.tier.grow_retrieval_slots(self.leader.tier.retrieval_slots)
        self._apply_leader_changes()  # before loading: a changed page must not be taken as resident
        if not self.prefetch or self.budget.window == 0:
            return
        start = self._clock()
        self.load(self.plan(leader_plan.page_ids))
        elapsed = self._clock() - start
        self.stats.seconds["transfer"] += elapsed
        self.stats.seconds["layer"] += elapsed

    def _apply_leader_changes(self) -> None:
        """Follower: forget device copies of pages the leader's index changed since last applied."""
        for changed in self._stale_pages:
            self.tier.invalidate(changed)
        self._stale_pages.clear()

    def resident_nbytes(self) -> int:
        """Bytes of K/V this layer holds on the device tier."""
        return self.tier.nbytes()

    def _clock(self) -> float:
        if self.profile and self.tier.k.device.type == "cuda":
            torch.cuda.synchronize(self.tier.k.device)
        return time.perf_counter()
