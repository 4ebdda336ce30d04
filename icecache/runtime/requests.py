"""Sparse state per request for a continuously batching engine (vLLM), with no engine imports.

An engine hands each attention layer a flat batch: the new tokens of many requests one after another
(`query_start_loc`), each request's length (`seq_lens`) and its KV blocks (`block_table`), but no request
ids. `RequestTracker` turns that into one immutable `EngineStep` per step (which rows decode, which start a
request, which requests ended), and `RequestLayers` keeps one `SparseLayer` per live request for one
attention layer and runs the step's rows through them: new K/V stored, prefill queries noted for the index
build, decode rows attended sparsely (sink + window + retrieved pages) exactly as `IceRuntime` does.

A request is known by its first KV block: it keeps that block while it lives, and a block is only handed to
another request after the first one ended (or was preempted, which restarts it from token 0). So a row that
starts at token 0 begins a request, and a remembered request whose first block shows up in another
request's block table has ended. This needs prefix caching off (a cached prefix shares blocks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .layer import SparseLayer


@dataclass(frozen=True)
class BatchRow:
    """One request's share of a step's flat batch.

    Attributes:
        key: the request's identity within the engine (its first KV block).
        start, end: its new tokens are positions `start .. end - 1` of the flat batch.
        computed: its tokens already in the engine's cache before this step.
    """

    key: int
    start: int
    end: int
    computed: int

    @property
    def decode(self) -> bool:
        """One new token after a prompt: attended sparsely. Every other row (a prompt, or a chunk of one)
        is attended densely by the engine."""
        return self.end - self.start == 1 and self.computed > 0

    @property
    def fresh(self) -> bool:
        """The row starts its request (a new one, or a preempted one computed again from token 0)."""
        return self.computed == 0


@dataclass(frozen=True)
class EngineStep:
    """What every sparse layer needs to know about one engine step, decided once per step.

    Attributes:
        rows: the batch's requests, in batch order.
        released: keys of requests that ended since the previous step (their state is freed).
    """

    rows: tuple[BatchRow, ...]
    released: tuple[int, ...] = ()

    @property
    def decode_rows(self) -> tuple[BatchRow, ...]:
        return tuple(r for r in self.rows if r.decode)

    @property
    def dense_rows(self) -> tuple[BatchRow, ...]:
        return tuple(r for r in self.rows if not r.decode)


class RequestTracker:
    """Follows an engine's requests from its batches (see the module docstring). One per KV cache group.

    A request missing from a batch may only be waiting for its turn, so its state is kept until one of the
    blocks it held shows up in another request's block table: only then has it surely ended. So the requests
    icecache holds never span more blocks than the engine's cache has: its host copies are bounded by the
    engine's own KV cache size.
    """

    def __init__(self) -> None:
        self.blocks: dict[int, np.ndarray] = {}  # key -> the blocks the request held when last seen

    def step(self, block_table: np.ndarray, query_start_loc: Sequence[int], seq_lens: Sequence[int],
             block_size: int) -> EngineStep:
        """The `EngineStep` of a batch: `block_table` `[requests, max_blocks]`, `query_start_loc`
        `[requests + 1]` (flat-batch offsets) and `seq_lens` `[requests]` (tokens after this step), as the
        engine passes them; `block_size` tokens per KV block."""
        starts = [int(s) for s in query_start_loc]
        lens = [int(n) for n in seq_lens]
        rows = tuple(BatchRow(int(block_table[r, 0]), starts[r], starts[r + 1], lens[r] - (starts[r + 1] - starts[r]))
                     for r in range(len(lens)))
        held = {row.key: block_table[r, : -(-lens[r] // block_size)].copy() for r, row in enumerate(rows)}
        absent = self.blocks.keys() - held.keys()
        released: list[int] = []
        if absent:
            in_use = np.concatenate(list(held.values()) or [np.empty(0, dtype=np.int64)])
            released = sorted(k for k in absent if np.isin(self.blocks[k], in_use).any())
        for key in released:
            del self.blocks[key]
        self.blocks.update(held)
        return EngineStep(rows, tuple(released))


class RequestLayers:
    """One attention layer's `SparseLayer` per live request of an engine.

    Args:
        make_layer: returns an empty `SparseLayer` for one request (`IceRuntime._make_layer` with the layer's
            geometry bound), so every request gets the runtime's index, budget and kernel.
    """

    def __init__(self, make_layer: Callable[[], SparseLayer]) -> None:
        self._make_layer = make_layer
        self.requests: dict[int, SparseLayer] = {}

    def forward(self, step: EngineStep, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                scale: float, output: torch.Tensor) -> None:
        """Run one step's rows through this layer: store every row's new K/V, note prefill queries, and
        write each decode row's sparse attention into `output`.

        Args:
            query: `[tokens, q_heads, head_dim]` the flat batch's queries.
            key, value: `[tokens, kv_heads, head_dim]` the flat batch's new K/V.
            scale: the model's softmax scale.
            output: `[tokens, q_heads, head_dim]`; decode rows are written, other rows are left to the engine.
        """
        for released in step.released:
            self.requests.pop(released, None)
        for row in step.rows:
            if row.fresh:
                self.requests[row.key] = self._make_layer()
            sparse = self.requests.get(row.key)
            if sparse is None or sparse.num_tokens != row.computed:
                held = "nothing" if sparse is None else f"{sparse.num_tokens} tokens"
                raise RuntimeError(
                    f"icecache lost track of a request: the engine has {row.computed} tokens cached for it, icecache "
                    f"holds {held}. Prefix caching must be off with icecache (vLLM: enable_prefix_caching=False, "
                    "--no-enable-prefix-caching)")
            sparse.store(key[row.start:row.end].transpose(0, 1), value[row.start:row.end].transpose(0, 1))
            if row.decode:
                output[row.start] = sparse.decode(query[row.start], scale).to(output.dtype)
            else:
                sparse.note_prefill_queries(query[row.start:row.end].transpose(0, 1), scale)

    def __len__(self) -> int:
        return len(self.requests)
