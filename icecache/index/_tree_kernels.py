"""Host-side tree bookkeeping for the `tree` index, compiled with numba.

Building the balanced tree and routing single tokens into leaves are many tiny, branchy steps (per
node, per token): in Python or as small torch ops they cost milliseconds; compiled they cost microseconds.
Arrays are float32/int64 numpy views of the index's torch tensors, so nothing is copied.
"""

from __future__ import annotations

import numba
import numpy as np

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
    """2-means on `points[idx]`; returns each point's projection on the centroid difference."""
    m, d = idx.shape[0], points.shape[1]
    mean = np.zeros(d, np.float64)
    for i in range(m):
        mean += points[idx[i]]
    mean /= m
    # initial direction: power iteration on the centred points (their main spread)
    direction = np.ones(d, np.float64)
    for _ in range(_POWER_ITERS):
        new = np.zeros(d, np.float64)
        for i in range(m):
            c = points[idx[i]] - mean
            new += c * _dot(c, direction)
        norm = np.sqrt(_dot(new, new))
        if norm < 1e-12:
            break
        direction = new / norm
    side = np.empty(m, np.bool_)
    for i in range(m):
        side[i] = _dot(points[idx[i]] - mean, direction) > 0
    c0 = mean.copy()
    c1 = mean.copy()
    for _ in range(_LLOYD_ITERS):
        s0 = np.zeros(d, np.float64)
        s1 = np.zeros(d, np.float64)
        n0 = 0
        n1 = 0
        for i in range(m):
            if side[i]:
                s1 += points[idx[i]]
                n1 += 1
            else:
                s0 += points[idx[i]]
                n0 += 1
        if n0 == 0 or n1 == 0:
            break
        c0 = s0 / n0
        c1 = s1 / n1
        for i in range(m):
            p = points[idx[i]]
            side[i] = np.sum((p - c1) ** 2) < np.sum((p - c0) ** 2)
    diff = c1 - c0
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


@numba.njit(cache=True)
def _refresh_centroid(sums, fill, centroids, h, page, head_dim):
    if fill[h, page] > 0:
        centroids[h, page] = sums[h, page, :head_dim] / fill[h, page]
    else:
        centroids[h, page] = 0.0


@numba.njit(cache=True)
def insert_tokens(aug_keys, start, end, table, fill, sums, centroids, n_pages, changed):
    """Route tokens `start .. end - 1` (rows of `aug_keys` `[kv, n, d + 1]`) into the nearest leaf of each
    head; a full leaf splits in two by balanced 2-means (one half keeps the page, the other opens page
    `n_pages[h]`). Marks touched pages in `changed` `[kv, capacity]`. Capacity must already fit
    `n_pages + (end - start)` pages."""
    kv_heads, _, page_size = table.shape
    dim = aug_keys.shape[2]
    head_dim = centroids.shape[2]
    for pos in range(start, end):
        for h in range(kv_heads):
            point = aug_keys[h, pos]
            best, best_dist = -1, np.inf
            for p in range(n_pages[h]):
                if fill[h, p] == 0:
                    continue
                dist = 0.0
                for j in range(dim):
                    diff = sums[h, p, j] / fill[h, p] - point[j]
                    dist += diff * diff
                if dist < best_dist:
                    best, best_dist = p, dist
            if best < 0:  # empty head: open the first page
                best = n_pages[h]
                n_pages[h] += 1
            if fill[h, best] < page_size:
                for s in range(page_size):
                    if table[h, best, s] < 0:
                        table[h, best, s] = pos
                        break
                fill[h, best] += 1
                sums[h, best] += point
                _refresh_centroid(sums, fill, centroids, h, best, head_dim)
                changed[h, best] = True
                continue
            # split: the full leaf plus the new token, halves by balanced 2-means
            members = np.empty(page_size + 1, np.int64)
            members[:page_size] = table[h, best]
            members[page_size] = pos
            half = (page_size + 2) // 2
            sub = aug_keys[h][members]
            order = balanced_order(sub, half)
            new = n_pages[h]
            n_pages[h] += 1
            table[h, best] = -1
            table[h, new] = -1
            sums[h, best] = 0.0
            sums[h, new] = 0.0
            for i in range(page_size + 1):
                token = members[order[i]]
                page = best if i < half else new
                slot = i if i < half else i - half
                table[h, page, slot] = token
                sums[h, page] += aug_keys[h, token]
            fill[h, best] = half
            fill[h, new] = page_size + 1 - half
            _refresh_centroid(sums, fill, centroids, h, best, head_dim)
            _refresh_centroid(sums, fill, centroids, h, new, head_dim)
            changed[h, best] = True
            changed[h, new] = True
