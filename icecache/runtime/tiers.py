"""Memory tiers of one layer: the host tier (every token), the device tier (what the budget allows) and
the bulk loader that moves selected pages between them through one staging buffer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from ..index.base import _host_view as _numpy_view  # numpy view of a CPU tensor numpy can hold, else None
from ._host_kernels import forget_pages, logsumexp_logits


def _pin(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    # pinned host memory lets the host->device copy run asynchronously; only meaningful with CUDA
    return t.pin_memory() if device.type == "cuda" else t


class HostTier:
    """Every K/V token of one layer, token-major `[kv_heads, capacity, head_dim]`, growing by an eighth."""

    def __init__(self, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.device = device  # the compute device this tier feeds
        self.length = 0
        self.k = _pin(torch.empty(kv_heads, 256, head_dim, dtype=dtype), device)
        self.v = _pin(torch.empty(kv_heads, 256, head_dim, dtype=dtype), device)
        self._views: tuple | None = None

    def arrays(self) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
        """numpy views of K and V `[kv_heads, capacity, head_dim]` (None, None where numpy cannot hold the
        dtype), made once per allocation."""
        if self._views is None:
            self._views = (_numpy_view(self.k), _numpy_view(self.v))
        return self._views

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_views": None}  # a copy gets its own tensors, so its own views

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new tokens `[kv_heads, m, head_dim]` after the existing ones."""
        self.stage(k, v)
        self.commit(k.shape[1])

    def stage(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Copy new tokens `[kv_heads, m, head_dim]` in after the stored ones without storing them yet
        (`commit` does; until then the next `stage` overwrites them). Returns their keys in host memory, so
        a check can read them there: on CUDA the copy to the host is the step's one wait for the GPU, and a
        check on the device would be another."""
        need = self.length + k.shape[1]
        if need > self.k.shape[1]:
            # grow by an eighth: amortised appends with at most an eighth unused (growing by half after a
            # prefill that filled the tier exactly left a third of every layer's host memory unused)
            cap = max(need, self.k.shape[1] * 9 // 8)
            for name in ("k", "v"):
                old = getattr(self, name)
                grown = _pin(torch.empty(old.shape[0], cap, old.shape[2], dtype=old.dtype), self.device)
                grown[:, : self.length] = old[:, : self.length]
                setattr(self, name, grown)
            self._views = None
        host_k, host_v = self.arrays()
        new_k, new_v = _numpy_view(k), _numpy_view(v)
        if host_k is not None and new_k is not None and new_v is not None and k.dtype == self.k.dtype:
            host_k[:, self.length : need] = new_k
            host_v[:, self.length : need] = new_v
        else:  # from the GPU (or in a dtype numpy lacks): V first without waiting, then K waiting for the
            # stream, so both have landed when this returns, at one wait per step (the tier is pinned on CUDA)
            self.v[:, self.length : need].copy_(v, non_blocking=True)
            self.k[:, self.length : need].copy_(k)
        return self.k[:, self.length : need]

    def commit(self, m: int) -> None:
        """Keep the `m` tokens the last `stage` copied in."""
        self.length += m

    def drop_first(self, n: int) -> None:
        """Forget the first `n` tokens (a sequence's left padding); later positions move down by `n`."""
        keep = self.length - n
        self.k[:, :keep] = self.k[:, n : self.length].clone()
        self.v[:, :keep] = self.v[:, n : self.length].clone()
        self.length = keep

    def keys(self, start: int, end: int) -> torch.Tensor:
        """Keys of positions `start .. end - 1` on the compute device, `[kv_heads, end - start, head_dim]`."""
        return self.k[:, start:end].to(self.device, non_blocking=True)  # pinned on CUDA: no wait

    def nbytes(self) -> int:
        return 2 * self.length * self.k.shape[0] * self.k.shape[2] * self.k.element_size()


class DeviceTier:
    """Device memory of one layer, `[kv_heads, slots, page_size, head_dim]` for K and V: sink, window and the
    budget's pages (fewer while the index holds fewer; every page while the whole context fits the budget).

    The first slots hold the resident tokens: the sink, then the window as a ring buffer. The rest are
    retrieval slots, each holding one index page; `slot_page` says which (-1: none), and `active` which
    slots the current step attends to. `slot_page` is bookkeeping and stays in host memory whatever the
    device: a step is planned on the host (as vLLM's metadata builders do), so on CUDA planning reads nothing
    back from the GPU, and the device receives only non-blocking copies (the `active` row, the loaded pages).
    """

    def __init__(self, kv_heads: int, head_dim: int, page_size: int, sink: int, window: int,
                 retrieval_slots: int, dtype: torch.dtype, device: torch.device) -> None:
        self.page_size, self.sink, self.window = page_size, sink, window
        self.sink_pages = -(-sink // page_size)
        self.window_offset = self.sink_pages * page_size  # flat slot where the window ring starts
        self.resident_pages = self.sink_pages + -(-window // page_size)
        slots = self.resident_pages + retrieval_slots
        self.k = torch.zeros(kv_heads, slots, page_size, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.filled = torch.zeros(kv_heads, slots, page_size, dtype=torch.bool, device=device)
        self.slot_page = torch.full((kv_heads, retrieval_slots), -1, dtype=torch.long)  # host: see above
        self.active = torch.zeros(kv_heads, slots, dtype=torch.bool, device=device)
        self.active[:, : self.resident_pages] = True
        self._views: DeviceArrays | None = None

    def arrays(self) -> "DeviceArrays | None":
        """numpy views of the tier's tensors, made once per allocation; None unless on the CPU in a dtype
        numpy holds."""
        if self._views is None and _numpy_view(self.k) is not None:
            self._views = DeviceArrays(self.k.numpy(), self.v.numpy(), self.filled.numpy(), self.active.numpy(),
                                       self.slot_page.numpy())
        return self._views

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_views": None}  # a copy gets its own tensors, so its own views

    @property
    def retrieval_slots(self) -> int:
        return self.slot_page.shape[1]

    def write_resident(self, positions: range, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write sink or window tokens at global `positions` (K/V `[kv_heads, len, head_dim]`)."""
        flat = [p if p < self.sink else self.window_offset + (p - self.sink) % self.window for p in positions]
        kv_heads, head_dim = self.k.shape[0], self.k.shape[-1]
        arrays, new_k, new_v = self.arrays(), _numpy_view(k), _numpy_view(v)
        if arrays is not None and new_k is not None and new_v is not None:
            if len(flat) == 1:  # a decode step's token: plain indexing, no index array
                flat, new_k, new_v = flat[0], new_k[:, 0], new_v[:, 0]
            arrays.k.reshape(kv_heads, -1, head_dim)[:, flat] = new_k
            arrays.v.reshape(kv_heads, -1, head_dim)[:, flat] = new_v
            arrays.filled.reshape(kv_heads, -1)[:, flat] = True
            return
        # the flat slots are made on the host and sent without waiting (a tensor built on CUDA from a list
        # would be a blocking copy: a host synchronisation per layer and step)
        flat = torch.tensor(flat, dtype=torch.long).to(self.k.device, non_blocking=True)
        # window tokens come from the host tier (pinned on CUDA): copied without waiting
        self.k.view(kv_heads, -1, head_dim)[:, flat] = k.to(self.k.device, self.k.dtype, non_blocking=True)
        self.v.view(kv_heads, -1, head_dim)[:, flat] = v.to(self.v.device, self.v.dtype, non_blocking=True)
        self.filled.view(kv_heads, -1)[:, flat] = True

    def resident_logsumexp(self, queries: torch.Tensor, scale: float) -> torch.Tensor:
        """`[kv_heads, group]`: log-sum-exp of `queries` `[kv_heads, group, head_dim]`' scaled logits over
        the resident tokens (sink and window; -inf where none is stored yet)."""
        # this runs every decode step of every layer, inside the search's time: on the CPU, one small compiled
        # kernel costs a fraction of torch's per-op overhead (90 us as torch ops)
        arrays = self.arrays()
        if arrays is not None and self.k.dtype == torch.float32:
            return torch.from_numpy(logsumexp_logits(np.ascontiguousarray(queries.detach().float().numpy()),
                                                     arrays.k, arrays.filled, self.resident_pages, scale))
        keys = self.k[:, : self.resident_pages].flatten(1, 2)  # a view: [kv, resident slots, head_dim]
        stored = self.filled[:, : self.resident_pages].flatten(1, 2)
        logits = torch.matmul(queries.to(keys.dtype), keys.transpose(1, 2)).float()
        logits.masked_fill_(~stored.unsqueeze(1), float("-inf"))
        return torch.logsumexp(logits.mul_(scale), dim=-1)

    def grow_retrieval_slots(self, slots: int) -> None:
        """Make room for `slots` retrieval pages: a tier starts with none and grows with its index, to the
        budget's pages (or to every page while the whole context fits in the budget)."""
        extra = slots - self.retrieval_slots
        if extra <= 0:
            return
        kv, _, ps, d = self.k.shape
        pad = lambda t, fill: torch.cat([t, torch.full((kv, extra, *t.shape[2:]), fill, dtype=t.dtype, device=t.device)], 1)
        self.k, self.v = pad(self.k, 0), pad(self.v, 0)
        self.filled, self.active = pad(self.filled, False), pad(self.active, False)
        self.slot_page = pad(self.slot_page, -1)
        self._views = None

    def invalidate(self, page_ids: torch.Tensor) -> None:
        """Forget cached copies of pages whose contents changed in the index."""
        if not page_ids.numel():
            return
        arrays = self.arrays()
        if arrays is not None:  # every decode step: one compiled call, not three torch ops
            forget_pages(arrays.slot_page, page_ids.cpu().numpy())
            return
        stale = torch.isin(self.slot_page, page_ids.cpu())
        self.slot_page[stale] = -1

    def assign(self, page_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map this step's selection `[kv_heads, n]` (-1 padded, in host memory) onto retrieval slots,
        keeping cached pages.

        Returns `(miss, slot)`, both `[kv_heads, n]` in host memory: which selected pages must be loaded, and
        the retrieval slot each selected page occupies. Marks exactly the selected slots active (on the
        device, by one non-blocking copy).
        """
        selected = page_ids >= 0
        if page_ids.shape[1] == 0 or self.retrieval_slots == 0:
            self.active[:, self.resident_pages :] = False
            return selected, torch.zeros_like(page_ids)
        match = (page_ids.unsqueeze(2) == self.slot_page.unsqueeze(1)) & selected.unsqueeze(2)  # [kv, n, slots]
        hit = match.any(2)
        hit_slot = match.float().argmax(2)
        kept = match.any(1)  # slots whose page is selected again
        miss = selected & ~hit
        # free slots first, in slot order (stable sort of the kept flags)
        free_slots = torch.sort(kept.to(torch.int8), dim=1, stable=True).indices
        miss_rank = (torch.cumsum(miss.long(), 1) - 1).clamp(min=0)
        slot = torch.where(hit, hit_slot, free_slots.gather(1, miss_rank.clamp(max=free_slots.shape[1] - 1)))
        slot = torch.where(selected, slot, torch.zeros_like(slot))
        active = torch.zeros_like(self.slot_page, dtype=torch.bool)
        active.scatter_(1, slot, selected)
        self.active[:, self.resident_pages :].copy_(active, non_blocking=True)
        return miss, slot

    def attention_mask(self) -> torch.Tensor:
        """bool `[kv_heads, slots, page_size]`: slots that hold a token and are attended this step."""
        return self.filled & self.active.unsqueeze(2)

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class DeviceArrays(NamedTuple):
    """numpy views of a CPU device tier: K, V `[kv_heads, slots, page_size, head_dim]`, filled `[kv_heads,
    slots, page_size]`, active `[kv_heads, slots]`, slot_page `[kv_heads, retrieval slots]`."""

    k: np.ndarray
    v: np.ndarray
    filled: np.ndarray
    active: np.ndarray
    slot_page: np.ndarray


#: the phases of a sparse layer's decode step, in order
PHASES = ("admit", "search", "transfer", "attention")


@dataclass
class TransferStats:
    """What the bulk loader moved (summed over layers and steps when aggregated)."""

    steps: int = 0
    pages_selected: int = 0
    pages_loaded: int = 0
    bytes_moved: int = 0
    #: wall time of the sparse layers' decode work: `admit` (window and index updates), `search`, `transfer`
    #: (slot assignment and page loads), `attention`, and `layer`, the whole of it (phases and what lies
    #: between them)
    seconds: dict = field(default_factory=lambda: dict.fromkeys(PHASES + ("layer",), 0.0))

    def runtime_overhead(self) -> float:
        """Seconds of the sparse layers' work outside every phase (checks, bookkeeping, Python)."""
        return self.seconds["layer"] - sum(self.seconds[p] for p in PHASES)

    @property
    def hit_rate(self) -> float:
        """Share of selected pages already resident on the device."""
        return 1.0 - self.pages_loaded / self.pages_selected if self.pages_selected else 0.0

    def add(self, other: "TransferStats") -> None:
        self.steps += other.steps
        self.pages_selected += other.pages_selected
        self.pages_loaded += other.pages_loaded
        self.bytes_moved += other.bytes_moved
        for key, value in other.seconds.items():
            self.seconds[key] = self.seconds.get(key, 0.0) + value


class BulkLoader:
    """Gathers missing pages from the host tier into one contiguous staging buffer `[2, pages, page_size,
    head_dim]` (K then V), copies it to the device in one non-blocking transfer and scatters it into the
    assigned device slots.

    On CUDA the copy and the scatter run on a side stream; the compute stream waits for them only in
    `wait()`, called right before the attention that reads the slots, so a load issued early (a layer-reuse
    prefetch) overlaps whatever the GPU computes meanwhile."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.staging: torch.Tensor | None = None
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.copied = torch.cuda.Event() if device.type == "cuda" else None
        self.pending = False  # a side-stream load the compute stream has not waited for yet

    def load(self, host: HostTier, tier: DeviceTier, heads: torch.Tensor, slots: torch.Tensor,
             positions: torch.Tensor) -> int:
        """Move pages: `heads`, `slots` `[m]`, global token `positions` `[m, page_size]` (-1 = empty).

        Returns the bytes moved.
        """
        m = heads.shape[0]
        if m == 0:
            return 0
        ps, head_dim = positions.shape[1], host.k.shape[2]
        heads_h, pos_h = heads.cpu(), positions.cpu()  # planned on the host (`SparseLayer.plan`): no copies
        if self.staging is None or self.staging.shape[1] < m:
            self.staging = _pin(torch.empty(2, max(m, 16), ps, head_dim, dtype=host.k.dtype), self.device)
        gather = pos_h.clamp(min=0)
        if self.copied is not None:
            self.copied.synchronize()  # the previous transfer may still be reading the staging buffer
        staged = self.staging[:, :m]
        staged[0] = host.k[heads_h.unsqueeze(1), gather]
        staged[1] = host.v[heads_h.unsqueeze(1), gather]
        if self.stream is None:
            self._scatter(tier, staged.to(self.device), heads, slots, positions)
        else:
            # the side stream must not overwrite slots the compute stream may still be reading
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            for t in (heads, slots):  # made on the compute stream, read on the side stream
                if t.is_cuda:
                    t.record_stream(self.stream)
            with torch.cuda.stream(self.stream):
                self._scatter(tier, staged.to(self.device, non_blocking=True), heads, slots, positions)
                self.copied.record(self.stream)
            self.pending = True
        return staged.numel() * staged.element_size()

    def _scatter(self, tier: DeviceTier, on_device: torch.Tensor, heads: torch.Tensor, slots: torch.Tensor,
                 positions: torch.Tensor) -> None:
        heads_d = heads.to(self.device, non_blocking=True)
        slots_d = slots.to(self.device, non_blocking=True) + tier.resident_pages
        tier.k[heads_d, slots_d] = on_device[0]
        tier.v[heads_d, slots_d] = on_device[1]
        tier.filled[heads_d, slots_d] = positions.to(self.device, non_blocking=True) >= 0

    def wait(self) -> None:
        """Make the compute stream wait for the loads issued so far (no host sync; no-op on CPU)."""
        if self.pending:
            torch.cuda.current_stream(self.device).wait_event(self.copied)
            self.pending = False
