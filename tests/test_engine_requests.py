"""Per-request sparse state for a continuously batching engine (icecache.runtime.requests), without the
engine: a small simulated scheduler with paged blocks, chunked prompts, requests that end and blocks that
are handed to new requests."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import icecache
from icecache.runtime.requests import BatchRow, RequestLayers, RequestTracker

KV_HEADS, GROUP, HEAD_DIM, BLOCK = 2, 3, 16, 8


class SimulatedEngine:
    """Requests with prompts and decode lengths; blocks from a LIFO free list (so freed blocks come back at
    once); each step runs decode rows first, then at most one prompt chunk per waiting request."""

    def __init__(self, prompts: list[int], decodes: list[int], chunk: int, blocks: int = 512, seed: int = 0):
        self.gen = torch.Generator().manual_seed(seed)
        self.free = list(range(blocks))
        self.todo = list(zip(prompts, decodes))
        self.live: dict[int, dict] = {}  # request number -> state
        self.chunk, self.next_id = chunk, 0

    def admit(self, count: int) -> None:
        for _ in range(count):
            if not self.todo or -(-sum(self.todo[0]) // BLOCK) > len(self.free) - self.reserved():
                return
            prompt, decode = self.todo.pop(0)
            self.live[self.next_id] = dict(prompt=prompt, decode=decode, done=0, blocks=[], k=[], v=[])
            self.next_id += 1

    def reserved(self) -> int:
        """Blocks the live requests will still take."""
        return sum(-(-(r["prompt"] + r["decode"]) // BLOCK) - len(r["blocks"]) for r in self.live.values())

    def step(self):
        """One batch: ([(request, new tokens, computed)], block_table, query_start_loc, seq_lens)."""
        rows = []
        for rid, r in self.live.items():
            total = r["prompt"] + r["decode"]
            if r["done"] >= total:
                continue
            new = 1 if r["done"] >= r["prompt"] else min(self.chunk, r["prompt"] - r["done"])
            rows.append((r["done"] >= r["prompt"], rid, new))
        rows.sort(key=lambda t: not t[0])  # decode rows first, as vLLM reorders them
        batch = []
        for _, rid, new in rows:
            r = self.live[rid]
            need = -(-(r["done"] + new) // BLOCK) - len(r["blocks"])
            r["blocks"] += [self.free.pop() for _ in range(need)]
            batch.append((rid, new, r["done"]))
        width = max(len(self.live[rid]["blocks"]) for rid, _, _ in batch)
        table = np.full((len(batch), width), -1, dtype=np.int64)
        for i, (rid, _, _) in enumerate(batch):
            table[i, : len(self.live[rid]["blocks"])] = self.live[rid]["blocks"]
        starts = np.cumsum([0] + [new for _, new, _ in batch]).tolist()
        seq_lens = [done + new for _, new, done in batch]
        return batch, table, starts, seq_lens

    def finish(self, batch) -> None:
        for rid, new, _ in batch:
            r = self.live[rid]
            r["done"] += new
            if r["done"] >= r["prompt"] + r["decode"]:
                self.free += r.pop("blocks")[::-1]
                del self.live[rid]


def dense_attention(q, k, v, scale):
    """q [q_heads, d], k/v [kv_heads, n, d] -> [q_heads, d]."""
    kk = k.repeat_interleave(GROUP, 0)
    vv = v.repeat_interleave(GROUP, 0)
    w = torch.softmax(torch.einsum("hd,hnd->hn", q, kk) * scale, -1)
    return torch.einsum("hn,hnd->hd", w, vv)


def run_engine(engine: SimulatedEngine, runtime: icecache.IceRuntime, check_dense: bool):
    tracker = RequestTracker()
    layers = RequestLayers(lambda: runtime._make_layer(KV_HEADS, HEAD_DIM, torch.float32, torch.device("cpu")))
    scale = 1 / math.sqrt(HEAD_DIM)
    engine.admit(2)
    outputs, most_held = {}, 0
    while engine.live or engine.todo:
        batch, table, starts, seq_lens = engine.step()
        step = tracker.step(table, starts, seq_lens, BLOCK)
        tokens = starts[-1]
        q = torch.randn(tokens, KV_HEADS * GROUP, HEAD_DIM, generator=engine.gen)
        k = torch.randn(tokens, KV_HEADS, HEAD_DIM, generator=engine.gen)
        v = torch.randn(tokens, KV_HEADS, HEAD_DIM, generator=engine.gen)
        out = torch.full_like(q, float("nan"))
        layers.forward(step, q, k, v, scale, out)
        for i, (rid, new, done) in enumerate(batch):
            r = engine.live[rid]
            r["k"].append(k[starts[i]:starts[i + 1]])
            r["v"].append(v[starts[i]:starts[i + 1]])
            row = step.rows[i]
            assert (row.start, row.end, row.computed) == (starts[i], starts[i + 1], done)
            if row.decode:
                outputs.setdefault(rid, []).append(out[row.start])
                if check_dense:
                    keys = torch.cat(r["k"]).transpose(0, 1)
                    values = torch.cat(r["v"]).transpose(0, 1)
                    torch.testing.assert_close(out[row.start], dense_attention(q[row.start], keys, values, scale),
                                               atol=1e-5, rtol=1e-5)
            else:
                assert torch.isnan(out[row.start:row.end]).all()  # prompt rows are the engine's to attend
        most_held = max(most_held, sum(sparse.num_tokens for sparse in layers.requests.values()))
        engine.finish(batch)
        engine.admit(1)
    return outputs, most_held, layers


@pytest.mark.parametrize("name", icecache.available_indexes())
def test_budget_above_the_context_is_dense_attention_for_every_request(name):
    engine = SimulatedEngine(prompts=[70, 23, 120, 41], decodes=[5, 9, 3, 6], chunk=32)
    runtime = icecache.IceRuntime(index=name, budget=256, page_size=4, sink=4, window=8)
    run_engine(engine, runtime, check_dense=True)


@settings(max_examples=15)
@given(prompts=st.lists(st.integers(2, 90), min_size=1, max_size=6), decodes=st.data(),
       chunk=st.integers(4, 64), seed=st.integers(0, 2**16))
def test_any_schedule_attends_densely_and_frees_every_request(prompts, decodes, chunk, seed):
    lengths = decodes.draw(st.lists(st.integers(1, 6), min_size=len(prompts), max_size=len(prompts)))
    engine = SimulatedEngine(prompts, lengths, chunk, blocks=40, seed=seed)
    runtime = icecache.IceRuntime(index="exact", budget=512, page_size=4, sink=4, window=8)
    _, most_held, _ = run_engine(engine, runtime, check_dense=True)
    # an ended request is released once one of its blocks serves another: icecache never holds more tokens
    # than the engine's cache has room for
    assert most_held <= 40 * BLOCK


def test_sparse_rows_match_one_sparse_layer_per_request():
    """Under a small budget, each request decodes exactly as its own SparseLayer fed the same tokens."""
    engine = SimulatedEngine(prompts=[300, 180, 260], decodes=[6, 6, 6], chunk=64, seed=3)
    runtime = icecache.IceRuntime(index="tree", budget=32, page_size=4, sink=4, window=8)
    outputs, _, _ = run_engine(engine, runtime, check_dense=False)
    # replay request 0 alone through one SparseLayer, with the same tokens
    engine2 = SimulatedEngine(prompts=[300, 180, 260], decodes=[6, 6, 6], chunk=64, seed=3)
    solo = {}
    tracker, layers = RequestTracker(), {}
    engine2.admit(2)
    while engine2.live or engine2.todo:
        batch, table, starts, seq_lens = engine2.step()
        tokens = starts[-1]
        q = torch.randn(tokens, KV_HEADS * GROUP, HEAD_DIM, generator=engine2.gen)
        k = torch.randn(tokens, KV_HEADS, HEAD_DIM, generator=engine2.gen)
        v = torch.randn(tokens, KV_HEADS, HEAD_DIM, generator=engine2.gen)
        for i, (rid, new, done) in enumerate(batch):
            sparse = layers.setdefault(rid, runtime._make_layer(KV_HEADS, HEAD_DIM, torch.float32, torch.device("cpu")))
            s, e = starts[i], starts[i + 1]
            sparse.store(k[s:e].transpose(0, 1), v[s:e].transpose(0, 1))
            if new == 1 and done > 0:
                solo.setdefault(rid, []).append(sparse.decode(q[s], 1 / math.sqrt(HEAD_DIM)))
            else:
                sparse.note_prefill_queries(q[s:e].transpose(0, 1), 1 / math.sqrt(HEAD_DIM))
        engine2.finish(batch)
        engine2.admit(1)
    assert solo.keys() == outputs.keys()
    for rid in solo:
        torch.testing.assert_close(torch.stack(outputs[rid]), torch.stack(solo[rid]), atol=1e-6, rtol=1e-6)


def test_tracker_rows_restarts_and_releases():
    tracker = RequestTracker()
    step = tracker.step(np.array([[5, 6], [9, -1]]), [0, 10, 13], [10, 3], 8)
    assert step.rows == (BatchRow(5, 0, 10, 0), BatchRow(9, 10, 13, 0)) and step.released == ()
    assert all(r.fresh and not r.decode for r in step.rows)
    step = tracker.step(np.array([[5, 6]]), [0, 1], [11], 8)  # request 9 not scheduled: kept
    assert step.rows[0].decode and step.released == ()
    step = tracker.step(np.array([[5, 6], [3, -1]]), [0, 1, 4], [12, 4], 8)  # request 9 still may be waiting
    assert step.released == ()
    step = tracker.step(np.array([[5, 6], [3, 9]]), [0, 1, 5], [13, 9], 8)  # its block 9 now serves request 3
    assert step.released == (9,)
    step = tracker.step(np.array([[5, -1]]), [0, 4], [4], 8)  # block 5 starts over: a new request (or preempted)
    assert step.rows[0].fresh


def test_a_request_it_never_saw_start_is_a_clear_error():
    runtime = icecache.IceRuntime(index="exact", budget=64, page_size=4, sink=4, window=8)
    layers = RequestLayers(lambda: runtime._make_layer(KV_HEADS, HEAD_DIM, torch.float32, torch.device("cpu")))
    step = RequestTracker().step(np.array([[7]]), [0, 1], [20], BLOCK)  # a decode row, 19 tokens cached elsewhere
    q, kv = torch.randn(1, KV_HEADS * GROUP, HEAD_DIM), torch.randn(1, KV_HEADS, HEAD_DIM)
    with pytest.raises(RuntimeError, match="(?i)prefix caching"):
        layers.forward(step, q, kv, kv, 0.25, torch.empty_like(q))
    assert len(layers) == 0
