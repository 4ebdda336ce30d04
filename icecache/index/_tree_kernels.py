"""Host-side tree bookkeeping for the `tree` index, compiled with numba.

Building the balanced tree and routing single tokens into leaves are many tiny, branchy steps (per
node, per token): in Python or as small torch ops they cost milliseconds; compiled they cost microseconds.
Arrays are float32/int64 numpy views of the index's torch tensors, so nothing is copied.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._tree_nodes import _FAST, add_key_to_ancestors, descend, leaf_stats, open_leaf


class TreeArrays(NamedTuple):
    """numpy views of a `TreeIndex`'s tensors, one argument to the compiled kernels (numba types a NamedTuple
    of arrays field by field; made once per allocation: building the views at every decode step and layer
    cost more than some of the kernels' work)."""

    table: np.ndarray  # [kv, cap, page_size] int64: each page's local positions, -1 in empty slots
    token_page: np.ndarray  # [kv, token_cap] int64: each local position's page, -1 past the last
    fill: np.ndarray  # [kv, cap] int64: a page's tokens sit in its first `fill` slots
    sums: np.ndarray  # [kv, cap, d + 1] float32: each page's running sum of augmented keys
    centroid_bits: np.ndarray  # [kv, d, cap] int16: each page's mean key, bfloat16 bits, column by column
    page_keys: np.ndarray  # [kv, cap, page_size, d + 1] float32: each page's augmented keys, slot by slot
    route: np.ndarray  # [kv, cap, 4] float32: per page, of its augmented mean c = sums / fill: c[d], |c|^2, |c[:d]|, 0


_LLOYD_ITERS = 2
_POWER_ITERS = 2


@numba.njit(cache=True)
def _dot(a: np.ndarray, b: np.ndarray) -> float:
    # np.dot would pull in scipy's BLAS through numba; these vectors are tiny anyway
    total = 0.0
    for j in range(a.shape[0]):
        total += a[j] * b[j]
    return total


@numba.njit(cache=True)
def _split_projection(points: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """2-means on `points[idx]`; returns each point's projection on the centroid difference.

    Written as scalar loops into a few preallocated rows: with array expressions every point and
    iteration allocated temporaries, which cost most of a decode-time leaf split (17 points)."""
    m, d = idx.shape[0], points.shape[1]
    mean = np.zeros(d, np.float64)
    for i in range(m):
        for j in range(d):
            mean[j] += points[idx[i], j]
    for j in range(d):
        mean[j] /= m
    # initial direction: power iteration on the centred points (their main spread)
    direction = np.ones(d, np.float64)
    new = np.empty(d, np.float64)
    for _ in range(_POWER_ITERS):
        new[:] = 0.0
        for i in range(m):
            along = 0.0
            for j in range(d):
                along += (points[idx[i], j] - mean[j]) * direction[j]
            for j in range(d):
                new[j] += (points[idx[i], j] - mean[j]) * along
        norm = np.sqrt(_dot(new, new))
        if norm < 1e-12:
            break
        for j in range(d):
            direction[j] = new[j] / norm
    side = np.empty(m, np.bool_)
    for i in range(m):
        along = 0.0
        for j in range(d):
            along += (points[idx[i], j] - mean[j]) * direction[j]
        side[i] = along > 0
    c0 = mean.copy()
    c1 = mean.copy()
    for _ in range(_LLOYD_ITERS):
        n1 = 0
        for i in range(m):
            n1 += side[i]
        n0 = m - n1
        if n0 == 0 or n1 == 0:
            break
        c0[:] = 0.0
        c1[:] = 0.0
        for i in range(m):
            target = c1 if side[i] else c0
            for j in range(d):
                target[j] += points[idx[i], j]
        for j in range(d):
            c0[j] /= n0
            c1[j] /= n1
        for i in range(m):
            d0 = 0.0
            d1 = 0.0
            for j in range(d):
                p = np.float64(points[idx[i], j])
                d0 += (p - c0[j]) ** 2
                d1 += (p - c1[j]) ** 2
            side[i] = d1 < d0
    diff = np.empty(d, np.float64)
    for j in range(d):
        diff[j] = c1[j] - c0[j]
    if _dot(diff, diff) < 1e-20:
        diff = direction
    proj = np.empty(m, np.float64)
    for i in range(m):
        proj[i] = _dot(points[idx[i]], diff)
    return proj


@numba.njit(cache=True)
def balanced_order(points: np.ndarray, page_size: int) -> np.ndarray:
    """Permutation of `points` `[n, d]` whose consecutive `page_size` runs are the leaves of a balanced
    2-means tree: every split cuts at the rank that leaves whole pages on the left."""
    n = points.shape[0]
    order = np.arange(n)
    stack_start = [0]
    stack_size = [n]
    while len(stack_start) > 0:
        start = stack_start.pop()
        size = stack_size.pop()
        if size <= page_size:
            continue
        pages = (size + page_size - 1) // page_size
        left = (pages // 2) * page_size
        seg = order[start : start + size].copy()
        proj = _split_projection(points, seg)
        rank = np.argsort(proj, kind="mergesort")
        order[start : start + size] = seg[rank]
        stack_start.append(start)
        stack_size.append(left)
        stack_start.append(start + left)
        stack_size.append(size - left)
    return order


# Leaf centroids are stored as bfloat16 bits (int16 arrays: numba has no 16-bit floats): they only pick
# candidates, and inside a decode step, where the model's own traffic has evicted the index from the
# caches, scoring every leaf costs mostly memory. Page keys stay float32: the exact rescoring ranks near
# ties, and bfloat16 keys there cost a task answer at budget 64 (benchmarks/RESULTS.md).
@numba.njit(cache=True)
def _encode_bf16(values: np.ndarray, out: np.ndarray) -> None:
    """`out[i]` = bfloat16 bits of float32 `values[i]` (round to nearest even, as torch rounds)."""
    bits = values.copy().view(np.uint32)
    for i in range(bits.shape[0]):
        u = bits[i]
        rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
        out[i] = np.int16(np.uint16(rounded))


@numba.njit(cache=True)
def _decode_bf16(bits: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """float32 values of bfloat16 `bits`, written into the first entries of uint32 `scratch` (returned
    as a float32 view): a shift per value, which vectorises."""
    n = bits.shape[0]
    for i in range(n):
        scratch[i] = np.uint32(np.uint16(bits[i])) << np.uint32(16)
    return scratch[:n].view(np.float32)


@numba.njit(cache=True)
def _refresh_centroid(sums, fill, centroids, route, h, page, head_dim):
    """Centroid of `page` from its running sum, into bfloat16 `centroids` `[kv, d, cap]`, and its routing
    stats into `route` `[kv, cap, 4]` (`TreeArrays.route`)."""
    mean = sums[h, page, :head_dim] / max(fill[h, page], 1)
    _encode_bf16(mean.astype(np.float32), centroids[h, :, page])
    _route_stats(sums, fill, route, h, page, head_dim)


@numba.njit(cache=True)
def _route_stats(sums, fill, route, h, page, head_dim):
    """`route[h, page]` = (c[d], |c|^2, |c[:d]|, 0) of the page's augmented mean `c = sums / fill`."""
    inv = np.float32(1.0) / np.float32(max(fill[h, page], 1))
    head, full = 0.0, 0.0
    for j in range(sums.shape[2]):
        c = np.float64(sums[h, page, j] * inv)
        full += c * c
        if j < head_dim:
            head += c * c
    route[h, page, 0] = sums[h, page, head_dim] * inv
    route[h, page, 1] = full
    route[h, page, 2] = np.sqrt(head)
    route[h, page, 3] = 0.0


@numba.njit(cache=True)
def refresh_routes(sums, fill, route, h, first, end, head_dim):
    """`route` stats of pages `first .. end - 1` of head `h` from their running sums (a build's new pages)."""
    for page in range(first, end):
        _route_stats(sums, fill, route, h, page, head_dim)


# Routing a token compares it with every leaf's centroid. From the bfloat16 centroids (which the search reads
# next anyway) each leaf's distance is known within `_ROUTE_REL * 2|x||c| + _ROUTE_ABS * M^2` (bfloat16 keeps
# 8 significant bits: |c - bf16(c)| <= 2^-8 |c|; 2^-7 and the absolute term cover float32 rounding with room to
# spare), so only the leaves whose interval reaches the best one's are measured exactly on the float32 sums,
# in page order: the same leaf as measuring every one, for a bit over half the bytes (144 per page, not 260)
_ROUTE_REL = np.float32(2.0 ** -7)
_ROUTE_ABS = np.float32(1e-4)


@numba.njit(cache=True, fastmath=_FAST)
def _nearest_leaf(point, h, n_pages, fill, sums, centroids, route, max_norm_sq, approx, scratch):
    """The page of head `h` whose centroid (augmented mean, `sums / fill`) is nearest to augmented `point`
    `[d + 1]`, ties to the lowest page id; -1 when no page holds a token. `approx` `[>= n_pages]` float32 and
    `scratch` `[>= n_pages]` uint32 are scratch."""
    head_dim = centroids.shape[1]
    # `x . c` of every leaf: the search's scan for a group of one query
    score_leaves(point[:head_dim].reshape((1, head_dim)), centroids, h, n_pages,
                 approx[:n_pages].reshape((1, n_pages)), scratch)
    norm = np.float32(0.0)
    for j in range(head_dim):
        norm += point[j] * point[j]
    reach = np.float32(2.0) * np.sqrt(norm) * _ROUTE_REL
    slack = _ROUTE_ABS * np.float32(max_norm_sq)
    xd = point[head_dim]
    # |x - c|^2 - |x|^2 = |c|^2 - 2 x . c; an interval `approx[p] +- err` around it per leaf
    ceiling = np.float32(np.inf)
    for p in range(n_pages):
        err = reach * route[h, p, 2] + slack
        est = route[h, p, 1] - np.float32(2.0) * (approx[p] + route[h, p, 0] * xd)
        if fill[h, p] == 0:
            est = np.float32(np.inf)
        approx[p] = est - err
        ceiling = min(ceiling, est + err)
    best, best_dist = -1, np.inf
    dim = point.shape[0]
    for p in range(n_pages):
        if fill[h, p] == 0 or approx[p] > ceiling:
            continue
        # float32 throughout, one division per page (a float64 accumulator kept the loop from vectorizing)
        inv = np.float32(1.0) / np.float32(fill[h, p])
        dist = np.float32(0.0)
        for j in range(dim):
            diff = sums[h, p, j] * inv - point[j]
            dist += diff * diff
        if dist < best_dist:
            best, best_dist = p, dist
    return best


@numba.njit(cache=True)
def augment_keys(keys: np.ndarray, max_norm: float) -> np.ndarray:
    """float32 `[kv, m, d] -> [kv, m, d + 1]`: `[k, sqrt(M^2 - |k|^2)]` (`tree.augment` for the one-token
    inserts of decode steps: one compiled call instead of six numpy ops)."""
    kv, m, d = keys.shape
    out = np.empty((kv, m, d + 1), np.float32)
    bound = np.float32(max_norm) * np.float32(max_norm)
    for h in range(kv):
        for i in range(m):
            norm = np.float32(0.0)
            for j in range(d):
                out[h, i, j] = keys[h, i, j]
                norm += keys[h, i, j] * keys[h, i, j]
            out[h, i, d] = np.sqrt(max(bound - norm, np.float32(0.0)))
    return out


@numba.njit(cache=True, fastmath=_FAST)
def insert_tokens(new_keys, start, arrays, n_pages, changed, nodes, max_norm_sq):
    """Route new tokens (augmented rows `new_keys` `[kv, m, d + 1]`, positions `start .. start + m - 1`)
    into the nearest leaf of each head; a full leaf splits in two by balanced 2-means (one half keeps the
    page, the other opens page `n_pages[h]`). Keeps every array of `arrays` (`TreeArrays`) in step with the
    page table (the running sums route tokens and give the bfloat16 centroids), and marks touched pages in
    `changed` `[kv, capacity]`. The node hierarchy `nodes` (`_tree_nodes`) follows: the leaf's stats are
    recomputed, its ancestors count the key, and a split's new leaf joins the old leaf's parent. Capacity
    must already fit `n_pages + m` pages and `start + m` positions. `max_norm_sq` is `M^2` of the
    augmentation (every augmented key has norm `M`), the scale of the routing's rounding slack."""
    table, token_page, fill, sums, centroids, page_keys, route = arrays
    node_parent, first_child, next_sibling, node_page, page_node, nsums, counts, centers, radii, n_nodes = nodes
    kv_heads, _, page_size = table.shape
    dim = new_keys.shape[2]
    head_dim = centroids.shape[1]
    most = n_pages.max() + new_keys.shape[1]
    approx = np.empty(most, np.float32)
    scratch = np.empty(most, np.uint32)
    for i in range(new_keys.shape[1]):
        pos = start + i
        for h in range(kv_heads):
            point = new_keys[h, i]
            best = _nearest_leaf(point, h, n_pages[h], fill, sums, centroids, route, max_norm_sq, approx, scratch)
            if best < 0:  # empty head: open the first page, a leaf under the root
                best = n_pages[h]
                n_pages[h] += 1
                open_leaf(h, 0, best, node_parent, first_child, next_sibling, node_page, page_node, n_nodes)
            if fill[h, best] < page_size:
                for s in range(page_size):
                    if table[h, best, s] < 0:
                        table[h, best, s] = pos
                        page_keys[h, best, s] = point
                        break
                token_page[h, pos] = best
                fill[h, best] += 1
                sums[h, best] += point
                _refresh_centroid(sums, fill, centroids, route, h, best, head_dim)
                changed[h, best] = True
                leaf = page_node[h, best]
                leaf_stats(h, leaf, best, fill, page_keys, nsums, counts, centers, radii)
                add_key_to_ancestors(h, node_parent[h, leaf], point, node_parent, nsums, counts, centers, radii)
                continue
            # split: the full leaf plus the new token, halves by balanced 2-means
            members = np.empty(page_size + 1, np.int64)
            members[:page_size] = table[h, best]
            members[page_size] = pos
            sub = np.empty((page_size + 1, dim), page_keys.dtype)
            sub[:page_size] = page_keys[h, best]
            sub[page_size] = point
            half = (page_size + 2) // 2
            order = balanced_order(sub, half)
            new = n_pages[h]
            n_pages[h] += 1
            table[h, best] = -1
            table[h, new] = -1
            page_keys[h, best] = 0.0
            page_keys[h, new] = 0.0
            sums[h, best] = 0.0
            sums[h, new] = 0.0
            for r in range(page_size + 1):
                page = best if r < half else new
                slot = r if r < half else r - half
                table[h, page, slot] = members[order[r]]
                token_page[h, members[order[r]]] = page
                page_keys[h, page, slot] = sub[order[r]]
                sums[h, page] += sub[order[r]]
            fill[h, best] = half
            fill[h, new] = page_size + 1 - half
            _refresh_centroid(sums, fill, centroids, route, h, best, head_dim)
            _refresh_centroid(sums, fill, centroids, route, h, new, head_dim)
            changed[h, best] = True
            changed[h, new] = True
            leaf = page_node[h, best]
            parent = node_parent[h, leaf]
            sibling = open_leaf(h, parent, new, node_parent, first_child, next_sibling, node_page, page_node,
                                n_nodes)
            leaf_stats(h, leaf, best, fill, page_keys, nsums, counts, centers, radii)
            leaf_stats(h, sibling, new, fill, page_keys, nsums, counts, centers, radii)
            add_key_to_ancestors(h, parent, point, node_parent, nsums, counts, centers, radii)


@numba.njit(cache=True)
def _select(a: np.ndarray, left: int, right: int, k: int) -> None:
    """Floyd-Rivest selection, in place: afterwards `a[k]` is the value a sort of `a[left : right + 1]` would
    put there. A sample's pivots land next to the k-th value, so one partition pass does most of the work:
    2.5-3x faster than numba's `np.partition` on 4096 scores with ties and infinities (13-17 -> 5 us). The
    algorithm's recursion (select k in a sample window first) runs on an explicit stack: numba's on-disk
    cache crashes on recursive functions."""
    lo = np.empty(64, np.int64)  # windows shrink by n^(1/3): a few levels
    hi = np.empty(64, np.int64)
    sampled = np.zeros(64, np.bool_)
    depth = 0
    lo[0], hi[0] = left, right
    while depth >= 0:
        left, right = lo[depth], hi[depth]
        if right <= left:
            depth -= 1
            continue
        if right - left > 600 and not sampled[depth]:
            sampled[depth] = True  # first make a[k] the k-th of a sample window around k
            n = right - left + 1
            i = k - left + 1
            z = np.log(n)
            s = 0.5 * np.exp(2.0 * z / 3.0)
            sd = 0.5 * np.sqrt(z * s * (n - s) / n) * (1.0 if i - n / 2 >= 0 else -1.0)
            depth += 1
            lo[depth] = max(left, int(k - i * s / n + sd))
            hi[depth] = min(right, int(k + (n - i) * s / n + sd))
            sampled[depth] = False
            continue
        sampled[depth] = False
        t = a[k]
        i, j = left, right
        a[left], a[k] = a[k], a[left]
        if a[right] > t:
            a[right], a[left] = a[left], a[right]
        while i < j:
            a[i], a[j] = a[j], a[i]
            i += 1
            j -= 1
            while a[i] < t:
                i += 1
            while a[j] > t:
                j -= 1
        if a[left] == t:
            a[left], a[j] = a[j], a[left]
        else:
            j += 1
            a[j], a[right] = a[right], a[j]
        if j <= k:
            lo[depth] = j + 1
        if k <= j:
            hi[depth] = j - 1


@numba.njit(cache=True)
def _top_indices(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the `k` largest `values` (no NaN) in index order, those above the k-th largest value first,
    then ties at it (selection in O(n), not a full sort)."""
    n = values.shape[0]
    if k <= 0:
        return np.empty(0, np.int64)
    work = values.copy()
    _select(work, 0, n - 1, n - k)
    threshold = work[n - k]
    out = np.empty(k, np.int64)
    taken = 0
    for i in range(n):
        if values[i] > threshold:
            out[taken] = i
            taken += 1
    for i in range(n):  # ties at the threshold fill what is left
        if taken == k:
            break
        if values[i] == threshold:
            out[taken] = i
            taken += 1
    return out


_LOG2E = np.float32(1.4426950408889634)
_LOWEST = np.float32(np.finfo(np.float32).min)


@numba.njit(cache=True, fastmath=_FAST)
def _exp_nonpositive(x: np.ndarray, bits: np.ndarray) -> None:
    """In place `x = exp(x)` for `x <= 0` (float32, relative error below 4e-6; below -87 gives ~1e-38,
    which no page ranking notices): a polynomial for 2^f on [-0.5, 0.5] and the exponent written as bits,
    so the loop vectorises (a scalar `exp` call per token cost a quarter of the search). `bits` is int32
    scratch of the same length."""
    n = x.shape[0]
    for i in range(n):
        t = max(x[i], np.float32(-87.0)) * _LOG2E
        k = np.floor(t + np.float32(0.5))
        f = t - k
        p = np.float32(1.5403530e-4)
        p = p * f + np.float32(1.3333558e-3)
        p = p * f + np.float32(9.6181291e-3)
        p = p * f + np.float32(5.5504109e-2)
        p = p * f + np.float32(2.4022651e-1)
        p = p * f + np.float32(6.9314718e-1)
        p = p * f + np.float32(1.0)
        x[i] = p
        bits[i] = (np.int32(k) + np.int32(127)) << 23
    scale = bits.view(np.float32)
    for i in range(n):
        x[i] *= scale[i]


@intrinsic
def _prefetch(typingctx, array, index):
    """Ask the CPU to start loading the cache line holding element `index` of the C-contiguous `array` (flat
    order) into its caches: `llvm.prefetch`, a hint with no effect on results."""

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        byte_ptr = ir.IntType(8).as_pointer()
        address = builder.bitcast(builder.gep(data, [args[1]]), byte_ptr)
        i32 = ir.IntType(32)
        hint = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [byte_ptr, i32, i32, i32]),
                                              "llvm.prefetch.p0")
        builder.call(hint, [address, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])  # read, keep, data
        return context.get_dummy_value()

    return types.void(array, index), codegen


# candidate pages whose keys are requested this many pages before they are scored: inside a decode step the
# model's own traffic has evicted them, and each page is a jump the hardware prefetcher cannot guess. Scoring
# 96 candidate pages x 3 heads x 28 layers from cold memory took 6.1-6.5 ms per step, 3.9-4.4 ms with 2 or 4
# pages ahead (benchmarks/prefetch_rescore.py; the same logits bit for bit)
_PAGES_AHEAD = 4


@numba.njit(cache=True)
def _prefetch_page(page_keys, h, page):
    block = page_keys[h, page]  # [page_size, d + 1], contiguous
    flat = block.reshape(-1)
    for i in range(0, flat.shape[0], 16):  # 16 float32 = one 64-byte line
        _prefetch(flat, i)


@numba.njit(cache=True, fastmath=_FAST)
def candidate_logits(q, h, cand, n_cand, fill, page_keys, scale, logits, top, pages_ahead):
    """`logits[g, c * page_size + s]` = `scale * q[g] . key` for slot `s` of candidate page `cand[c]` of KV head
    `h` (-inf for empty slots), and `top[g]` their max; each page's keys prefetched `pages_ahead` pages before
    it is scored (0: none)."""
    group, dim = q.shape
    page_size = page_keys.shape[2]
    top[:] = -np.inf
    for c in range(min(pages_ahead, n_cand)):
        _prefetch_page(page_keys, h, cand[c])
    for c in range(n_cand):
        if c + pages_ahead < n_cand and pages_ahead > 0:
            _prefetch_page(page_keys, h, cand[c + pages_ahead])
        used = fill[h, cand[c]]  # a page's tokens sit in its first `fill` slots
        base = c * page_size
        for s in range(page_size):
            if s >= used:
                for g in range(group):
                    logits[g, base + s] = -np.inf
                continue
            key = page_keys[h, cand[c], s]
            for g in range(group):
                a = np.float32(0.0)
                for j in range(dim):
                    a += q[g, j] * key[j]
                a *= scale
                logits[g, base + s] = a
                top[g] = max(top[g], a)


@numba.njit(cache=True, fastmath=_FAST)
def _rescore(q, h, cand, n_cand, fill, page_keys, scale, resident_lse, logits, bits, top, mass, peak, peak_pages,
             out):
    """Scores the tokens of the candidate pages `cand[:n_cand]` exactly (a softmax per query head over them
    plus the resident tokens) and writes into `out` the candidates holding the most attention mass,
    summed over the group, best first; empty pages rank last. With `peak_pages > 0`, the first
    `peak_pages` of `out` are instead the candidates holding the most probable single tokens (`peak`
    `[n_cand]` scratch: a page's best token probability over the group), the rest by mass."""
    group = q.shape[0]
    page_size = page_keys.shape[2]
    k = out.shape[0]
    # 1) logits of every token of the candidates, a page at a time
    candidate_logits(q, h, cand, n_cand, fill, page_keys, scale, logits, top, _PAGES_AHEAD)
    # 2) softmax per query head over the candidate tokens (and the resident ones); mass per page, summed
    # over the group
    mass[:] = 0.0
    peak[:] = 0.0
    for g in range(group):
        row = logits[g, : n_cand * page_size]
        for i in range(row.shape[0]):
            row[i] -= top[g]
        _exp_nonpositive(row, bits)
        total = np.exp(resident_lse[h, g] - top[g]) if resident_lse[h, g] > -np.inf else 0.0
        for i in range(row.shape[0]):
            total += row[i]
        inv = 1.0 / total
        for c in range(n_cand):
            m = np.float32(0.0)
            best = np.float32(0.0)
            for s in range(page_size):
                m += row[c * page_size + s]
                best = max(best, row[c * page_size + s])
            mass[c] += m * inv
            peak[c] = max(peak[c], best * inv)
    for c in range(n_cand):
        if fill[h, cand[c]] == 0:
            mass[c] = -1.0  # empty pages last
            peak[c] = -1.0
    # the pages of the single most probable tokens first: a copy step needs its one next token, which a page
    # of many moderately attended tokens can outweigh in mass (a scan per page taken, not a sort: per step,
    # layer and head)
    taken = min(peak_pages, k)
    for t in range(taken):
        best_c = 0
        for c in range(1, n_cand):
            if peak[c] > peak[best_c]:
                best_c = c
        out[t] = cand[best_c]
        peak[best_c] = -np.inf
        mass[best_c] = -2.0  # taken: below every other page
    best_idx = np.argsort(-mass[:n_cand])[: k - taken]
    for j in range(k - taken):
        out[taken + j] = cand[best_idx[j]]


@numba.njit(cache=True, fastmath=_FAST)
def _best_of_group(partial, fill, n_pages, empty, score):
    """`score[p]` = max over the query heads of `partial[:, p]`; `empty` for pages holding no token."""
    for p in range(n_pages):
        best = partial[0, p]
        for g in range(1, partial.shape[0]):
            best = max(best, partial[g, p])
        score[p] = best if fill[p] > 0 else empty


@numba.njit(cache=True, fastmath=_FAST)
def _best_of_group_and_bound(partial, norms, radii, page_node, fill, n_pages, score, bound):
    """`_best_of_group` into `score`, and into `bound` the max over the query heads of `partial[g, p] +
    norms[g] * radii[page_node[p]]`; empty pages get -inf and `_LOWEST` (below every real page, above the
    taken ones, so none is taken twice)."""
    for p in range(n_pages):
        r = radii[page_node[p]]
        best = partial[0, p]
        reach = partial[0, p] + norms[0] * r
        for g in range(1, partial.shape[0]):
            best = max(best, partial[g, p])
            reach = max(reach, partial[g, p] + norms[g] * r)
        full = fill[p] > 0
        score[p] = best if full else -np.inf
        bound[p] = reach if full else _LOWEST


@numba.njit(cache=True, fastmath=_FAST)
def score_leaves(q, centroids, h, n_pages, partial, scratch):
    """Writes `q_g . centroid_p` into `partial` `[group, >= n_pages]` for the first `n_pages` leaves of KV
    head `h`: q `[group, dim]` float32, centroids `[kv, dim, pages]` bfloat16 bits column by column (so one
    dimension of every leaf is one contiguous read), `scratch` `[>= n_pages]` uint32 for one decoded column.
    The search's first stage and, at 32k, most of its memory traffic (`benchmarks/centroid_scan.py`)."""
    group, dim = q.shape
    partial[:, :n_pages] = 0.0
    for j in range(dim):
        column = _decode_bf16(centroids[h, j, :n_pages], scratch)
        for g in range(group):
            qj = q[g, j]
            row = partial[g]
            for p in range(n_pages):
                row[p] += qj * column[p]


@numba.njit(cache=True)
def _followed_pages(table, token_page, h, page, out):
    """Writes into `out` `[page_size]` the pages holding the successors (position + 1) of the tokens of
    `page` of KV head `h` (-1 where a slot is empty, the successor is not indexed yet, or `page` is -1):
    `follow_copy`. In the compiled search: as numpy ops on every layer's cold arrays it cost 48 us per
    layer and step at 8k, an eighth of the search."""
    out[:] = -1
    if page < 0:
        return
    last = token_page.shape[1]
    for s in range(table.shape[2]):
        t = table[h, page, s]
        if t >= 0 and t + 1 < last:
            out[s] = token_page[h, t + 1]  # -1 past the last indexed token


@numba.njit(cache=True, fastmath=_FAST)
def search_pages(queries, arrays, nodes, n_pages, n_cand, max_pages, scale, resident_lse, pinned, n_bound, peak_pages,
                 follow_from):
    """The tree's search for every KV head in one compiled pass (`TreeIndex._search`).

    queries `[kv, g, d]`; `arrays` a `TreeArrays` (bfloat16 centroids column by column, each page's augmented
    keys stored together, so a candidate page is one contiguous read); `nodes` the node hierarchy
    (`_tree_nodes.TreeNodes`). Ranks the first `n_pages` leaves by `max_g q_g . centroid`, takes the best
    `n_cand - n_bound` (pages `0 .. pinned - 1` always among them) and the best `n_bound` others by
    `max_g q_g . c + |q_g| r` (each leaf's centre and radius), rescores their tokens exactly (a softmax per
    query head over the candidates' tokens plus the resident tokens, whose log-sum-exp `resident_lse`
    `[kv, g]` the runtime gives, -inf for none), and returns the `min(max_pages, n_cand)` candidates holding
    the most attention mass, best first (after the `peak_pages` holding the most probable single tokens, see
    `_rescore`), `[kv, k]` int64. Empty pages rank last. The pages holding the successors of the tokens of
    page `follow_from[h]` (`[kv]`, -1 for none) are candidates too, like the pinned ones. Inner loops run
    along contiguous memory (pages in step 1, a key's dimensions in step 2, candidate tokens in step 3), so
    they vectorise.
    """
    table, token_page, fill, _, centroids, page_keys, _ = arrays
    page_node, radii = nodes.page_node, nodes.radii
    kv_heads, group, dim = queries.shape
    page_size = page_keys.shape[2]
    k = min(max_pages, n_cand)
    out = np.empty((kv_heads, k), np.int64)
    score = np.empty(n_pages, np.float32)
    bound = np.empty(n_pages, np.float32)
    norms = np.empty(group, np.float64)
    partial = np.empty((group, n_pages), np.float32)
    scratch = np.empty(n_pages, np.uint32)  # one decoded row of centroids
    logits = np.empty((group, n_cand * page_size), np.float32)
    bits = np.empty(n_cand * page_size, np.int32)
    top = np.empty(group, np.float32)
    mass = np.empty(n_cand, np.float64)
    peak = np.empty(n_cand, np.float32)
    n_centroid = n_cand - n_bound
    cand = np.empty(n_cand, np.int64)
    follow = np.empty(page_size, np.int64)
    for h in range(kv_heads):
        q = queries[h]
        # 1) centroid score of every leaf, max over the group's query heads
        score_leaves(q, centroids, h, n_pages, partial, scratch)
        if n_bound > 0:
            # 2) and the bound on each leaf's best token, `q . c + |q| r`, in the same pass: a page clustered
            # with dissimilar keys can hold the one token a step needs, far below its centroid's rank
            for g in range(group):
                norm = 0.0
                for j in range(dim):
                    norm += q[g, j] * q[g, j]
                norms[g] = np.sqrt(norm)
            _best_of_group_and_bound(partial, norms, radii[h], page_node[h], fill[h], n_pages, score, bound)
        else:
            _best_of_group(partial, fill[h], n_pages, -np.inf, score)
        for p in range(min(pinned, n_pages)):  # always candidates, whatever their centroid says
            if fill[h, p] > 0:
                score[p] = np.inf
        _followed_pages(table, token_page, h, follow_from[h], follow)
        for p in follow:
            if p >= 0 and p < n_pages and fill[h, p] > 0:
                score[p] = np.inf
        cand[:n_centroid] = _top_indices(score, n_centroid)  # unordered: the rescoring ranks them
        if n_bound > 0:
            for i in range(n_centroid):
                bound[cand[i]] = -np.inf  # already a candidate
            cand[n_centroid:] = _top_indices(bound, n_bound)
        _rescore(q, h, cand, n_cand, fill, page_keys, scale, resident_lse, logits, bits, top, mass, peak, peak_pages,
                 out[h])
    return out


@numba.njit(cache=True)
def search_pages_descent(queries, arrays, nodes, n_pages, n_cand, max_pages, scale, resident_lse, pinned, peak_pages,
                         follow_from):
    """`search_pages` with the candidates found by a best-first descent of the node hierarchy
    (`_tree_nodes.descend`: the same top-`n_cand` leaves by centroid score, found without scoring the
    subtrees whose bound cannot reach them) instead of a scan of every leaf; the pinned pages and the
    followed pages (`follow_from`, as in `search_pages`) come first. Returns the pages `[kv, k]` and the number of nodes
    scored, summed over the heads."""
    table, token_page, fill, _, _, page_keys, _ = arrays
    node_parent, first_child, next_sibling, node_page, page_node, nsums, counts, centers, radii, n_nodes = nodes
    kv_heads, group, dim = queries.shape
    page_size = page_keys.shape[2]
    k = min(max_pages, n_cand)
    out = np.empty((kv_heads, k), np.int64)
    cand = np.empty(n_cand, np.int64)
    ranked = np.empty(n_cand, np.int64)
    heap_keys = np.empty(node_parent.shape[1], np.float32)
    heap_items = np.empty(node_parent.shape[1], np.int64)
    logits = np.empty((group, n_cand * page_size), np.float32)
    bits = np.empty(n_cand * page_size, np.int32)
    top = np.empty(group, np.float32)
    mass = np.empty(n_cand, np.float64)
    peak = np.empty(n_cand, np.float32)
    taken = np.zeros(n_pages, np.bool_)
    follow = np.empty(page_size, np.int64)
    scored_total = 0
    for h in range(kv_heads):
        q = queries[h]
        # the pinned and followed pages first, then the descent's best leaves not already in, as the scan
        # ranks them
        found = 0
        for p in range(min(pinned, n_pages, n_cand)):
            if fill[h, p] > 0:
                cand[found] = p
                taken[p] = True
                found += 1
        _followed_pages(table, token_page, h, follow_from[h], follow)
        for p in follow:
            if found < n_cand and p >= 0 and p < n_pages and fill[h, p] > 0 and not taken[p]:
                cand[found] = p
                taken[p] = True
                found += 1
        leaves, scored = descend(q, h, n_cand, first_child, next_sibling, node_page, counts, centers, radii,
                                 n_nodes, ranked, heap_keys, heap_items)
        scored_total += scored
        for i in range(leaves):
            if found == n_cand:
                break
            if not taken[ranked[i]]:
                cand[found] = ranked[i]
                taken[ranked[i]] = True
                found += 1
        for i in range(found):
            taken[cand[i]] = False
        p = 0
        while found < n_cand and p < n_pages:  # a head with fewer pages: pad with empty ones, as the scan
            if fill[h, p] == 0:
                cand[found] = p
                found += 1
            p += 1
        _rescore(q, h, cand, found, fill, page_keys, scale, resident_lse, logits, bits, top, mass, peak, peak_pages,
                 out[h])
    return out, scored_total
