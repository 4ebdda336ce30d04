"""Small per-step host computations of the runtime, compiled with numba (torch's per-op overhead on the
CPU, tens of microseconds, would dominate work this small)."""

from __future__ import annotations

import numba
import numpy as np


# reassociation lets the dot products use SIMD lanes
@numba.njit(cache=True, fastmath={"reassoc", "contract"})
def logsumexp_logits(queries: np.ndarray, keys: np.ndarray, stored: np.ndarray, pages: int, scale: float) -> np.ndarray:
    """`[kv, g]` log-sum-exp of `scale * queries [kv, g, d] . key` over the stored keys of the first `pages`
    pages of `keys` `[kv, slots, page_size, d]` (`stored` `[kv, slots, page_size]`; -inf where a head
    stores none). Whole C-contiguous arrays, not a slice of them: numba vectorises the dot products
    only when it knows the layout (3x faster than over a strided view)."""
    kv, group, dim = queries.shape
    page_size = keys.shape[2]
    n = pages * page_size
    out = np.empty((kv, group), np.float32)
    logits = np.empty(n, np.float32)
    for h in range(kv):
        for g in range(group):
            top = np.float32(-np.inf)
            for t in range(n):
                p, s = t // page_size, t % page_size
                if not stored[h, p, s]:
                    logits[t] = -np.inf
                    continue
                acc = np.float32(0.0)
                key = keys[h, p, s]
                for j in range(dim):
                    acc += queries[h, g, j] * key[j]
                logits[t] = acc * scale
                top = max(top, logits[t])
            if top == -np.inf:
                out[h, g] = -np.inf
                continue
            total = 0.0
            for t in range(n):
                total += np.exp(np.float64(logits[t] - top))  # exp(-inf) = 0 for unwritten slots
            out[h, g] = np.log(total) + top
    return out


@numba.njit(cache=True)
def forget_pages(slot_page: np.ndarray, pages: np.ndarray) -> None:
    """`DeviceTier.invalidate`: every retrieval slot of `slot_page` `[kv, slots]` holding one of `pages` `[m]`
    becomes free (-1)."""
    kv, slots = slot_page.shape
    for h in range(kv):
        for s in range(slots):
            for p in pages:
                if slot_page[h, s] == p:
                    slot_page[h, s] = -1
                    break


# -- the compiled CPU decode step: slot assignment + page loads, then attention -----------------------------
# The torch path (DeviceTier.assign, BulkLoader.load, paged_decode_attention_reference) is the reference these
# must equal; on the CPU its few dozen small torch ops per layer and step cost more than the work itself.

@numba.njit(cache=True)
def assign_and_load(page_ids, slot_page, page_table, index_start, host_k, host_v, tier_k, tier_v, filled, active,
                    resident_pages, slots_out, load_heads, load_slots, load_pages, load_positions):
    """`DeviceTier.assign` then `BulkLoader.load` for a selection `page_ids` `[kv, n]` (-1 padded): keep pages
    already in a retrieval slot, give each missing page the next free slot (in slot order), copy its tokens
    (`page_table` `[kv, pages, page_size]` local positions, + `index_start` = host position) from the host
    tier `[kv, capacity, d]` into the device tier `[kv, slots, page_size, d]`, mark exactly the selected slots
    active. Writes each selected page's slot into `slots_out` `[kv, n]` (0 where none is selected) and the misses
    into `load_*` (`[kv * n]`, positions `[kv * n, page_size]`); returns their count."""
    kv, n = page_ids.shape
    retrieval = slot_page.shape[1]
    page_size = page_table.shape[2]
    m = 0
    slot_of = np.empty(n, np.int64)
    kept = np.empty(retrieval, np.bool_)
    for h in range(kv):
        kept[:] = False
        for i in range(n):
            slot_of[i] = -1
            p = page_ids[h, i]
            if p < 0:
                continue
            for s in range(retrieval):
                if slot_page[h, s] == p:
                    slot_of[i] = s
                    kept[s] = True
                    break
        free = 0  # next candidate slot: free slots (not kept) in slot order
        for i in range(n):
            p = page_ids[h, i]
            if p < 0 or slot_of[i] >= 0:
                continue
            while kept[free]:
                free += 1
            s = free
            free += 1
            slot_of[i] = s
            dst = resident_pages + s
            for t in range(page_size):
                local = page_table[h, p, t]
                load_positions[m, t] = local + index_start if local >= 0 else -1
                source = local + index_start if local >= 0 else 0  # as the torch path gathers: row 0, masked
                tier_k[h, dst, t, :] = host_k[h, source, :]
                tier_v[h, dst, t, :] = host_v[h, source, :]
                filled[h, dst, t] = local >= 0
            slot_page[h, s] = p
            load_heads[m], load_slots[m], load_pages[m] = h, s, p
            m += 1
        for s in range(retrieval):
            active[h, resident_pages + s] = False
        for i in range(n):
            slots_out[h, i] = max(slot_of[i], 0)
            if page_ids[h, i] >= 0:
                active[h, resident_pages + slot_of[i]] = True
    return m


@numba.njit(cache=True, fastmath={"reassoc", "contract"})
def paged_attention(query, tier_k, tier_v, filled, active, scale, out):
    """`paged_decode_attention_reference` over the slots that are active and filled: `query` `[q_heads, d]`,
    tiers `[kv, slots, page_size, d]`, float32 softmax; `out` `[q_heads, d]` (zeros where nothing is valid).

    Each KV head's attended rows are listed once and each K / V row is read once for its whole query group
    (inner loops over contiguous rows vectorise): 4x faster than a pass per query head."""
    q_heads, dim = query.shape
    kv, slots, page_size, _ = tier_k.shape
    group = q_heads // kv
    logits = np.empty((group, slots * page_size), np.float32)
    row_slot = np.empty(slots * page_size, np.int64)
    row_token = np.empty(slots * page_size, np.int64)
    top = np.empty(group, np.float32)
    total = np.empty(group, np.float32)
    for h in range(kv):
        n = 0
        for s in range(slots):
            if active[h, s]:
                for t in range(page_size):
                    if filled[h, s, t]:
                        row_slot[n], row_token[n] = s, t
                        n += 1
        first = h * group
        for g in range(group):
            out[first + g, :] = 0.0
            top[g], total[g] = -np.inf, 0.0
        if n == 0:
            continue
        for i in range(n):
            key = tier_k[h, row_slot[i], row_token[i]]
            for g in range(group):
                q = query[first + g]
                acc = np.float32(0.0)
                for j in range(dim):
                    acc += q[j] * key[j]
                logits[g, i] = acc * scale
                top[g] = max(top[g], logits[g, i])
        for i in range(n):
            value = tier_v[h, row_slot[i], row_token[i]]
            for g in range(group):
                w = np.exp(logits[g, i] - top[g])
                total[g] += w
                o = out[first + g]
                for j in range(dim):
                    o[j] += w * value[j]
        for g in range(group):
            inv = np.float32(1.0) / total[g]
            for j in range(dim):
                out[first + g, j] *= inv
