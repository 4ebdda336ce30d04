"""The tree's node hierarchy above its leaf pages, compiled with numba: bounds, updates and the descent.

Every node holds the running sum and count of the (raw, un-augmented) keys below it, their centre `c`,
and a radius `r` that bounds `|k - c|` for every key `k` below it. So for any query `q`, `q . k <= q . c
+ |q| r` for every key below the node, and, since a child's centre is a mean of keys inside that ball,
the same bound holds for every page centroid below it: a descent can skip a whole subtree without
missing a page the flat scan would rank higher (`descend`).

Nodes of one KV head live in flat arrays `[kv, nodes]` (sums float64, centres float32, radii float64); children form a linked list (`first_child`,
`next_sibling`), so a parent gains a child in O(1) when a leaf splits. `page[h, node]` is the page id of a
leaf node (-1 for an internal one), `page_node[h, page]` the way back.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np

# reassociation and contraction let the dot products use SIMD lanes; no `ninf`: empty slots are -inf
_FAST = {"reassoc", "contract", "arcp", "nsz"}


class TreeNodes(NamedTuple):
    """The hierarchy's arrays, one row per KV head; passed to the compiled kernels as one argument (numba
    types a NamedTuple of arrays field by field)."""

    parent: np.ndarray  # [kv, nodes] int64, -1 for the root
    first_child: np.ndarray  # [kv, nodes] int64, -1 for a leaf
    next_sibling: np.ndarray  # [kv, nodes] int64, -1 for the last child
    page: np.ndarray  # [kv, nodes] int64: a leaf's page id, -1 for an inner node
    page_node: np.ndarray  # [kv, page capacity] int64: each page's leaf node
    sums: np.ndarray  # [kv, nodes, head_dim] float64: sum of the raw keys below
    counts: np.ndarray  # [kv, nodes] int64: keys below
    centers: np.ndarray  # [kv, nodes, head_dim] float32: sums / counts
    radii: np.ndarray  # [kv, nodes] float64: bounds |k - center| for every key k below
    count: np.ndarray  # [kv] int64: nodes in use per head

    @staticmethod
    def allocate(kv_heads: int, page_capacity: int, head_dim: int) -> "TreeNodes":
        """Room for a tree over `page_capacity` pages: at most 2 nodes per page plus the root and group nodes."""
        cap = 2 * page_capacity + 16
        links = [np.full((kv_heads, cap), -1, dtype=np.int64) for _ in range(4)]
        return TreeNodes(*links, np.full((kv_heads, page_capacity), -1, dtype=np.int64),
                         np.zeros((kv_heads, cap, head_dim)), np.zeros((kv_heads, cap), dtype=np.int64),
                         np.zeros((kv_heads, cap, head_dim), dtype=np.float32), np.zeros((kv_heads, cap)),
                         np.zeros(kv_heads, dtype=np.int64))


@numba.njit(cache=True)
def _new_node(h, parent, page, node_parent, first_child, next_sibling, node_page, n_nodes):
    node = n_nodes[h]
    n_nodes[h] += 1
    node_parent[h, node] = parent
    first_child[h, node] = -1
    node_page[h, node] = page
    next_sibling[h, node] = -1
    if parent >= 0:  # the parent gains a child: prepend it to the parent's list
        next_sibling[h, node] = first_child[h, parent]
        first_child[h, parent] = node
    return node


@numba.njit(cache=True)
def leaf_stats(h, node, page, fill, page_keys, sums, counts, centers, radii):
    """Exact sum, count, centre and radius of one leaf from its page's keys."""
    d = centers.shape[2]
    used = fill[h, page]
    sums[h, node] = 0.0
    for s in range(used):
        for j in range(d):
            sums[h, node, j] += page_keys[h, page, s, j]
    counts[h, node] = used
    for j in range(d):
        centers[h, node, j] = sums[h, node, j] / max(used, 1)
    radii[h, node] = _farthest(h, page, page + 1, fill, page_keys, centers[h, node])


@numba.njit(cache=True)
def _farthest(h, first_page, end_page, fill, page_keys, center):
    """Largest distance from `center` to a key of pages `first_page .. end_page - 1` (an exact radius)."""
    d = center.shape[0]
    radius = 0.0
    for p in range(first_page, end_page):
        for s in range(fill[h, p]):
            dist = 0.0
            for j in range(d):
                diff = page_keys[h, p, s, j] - center[j]
                dist += diff * diff
            radius = max(radius, np.sqrt(dist))
    return radius


@numba.njit(cache=True)
def build_nodes(h, group_starts, n_pages, fill, page_keys, nodes):
    """Node hierarchy of KV head `h` over its pages `0 .. n_pages - 1`: a root whose children are the
    layout groups (page ranges starting at `group_starts`), each split in halves down to single pages,
    as the balanced layout split them (left = half the pages, rounded down). Radii are exact. With
    k-means top levels (`depth > 0`) the groups' own splits are not mirrored: halves of a page range are
    still valid nodes (a bound holds for any grouping), only looser."""
    node_parent, first_child, next_sibling, node_page, page_node, sums, counts, centers, radii, n_nodes = nodes
    n_nodes[h] = 0
    root = _new_node(h, -1, -1, node_parent, first_child, next_sibling, node_page, n_nodes)
    cap = node_parent.shape[1]
    lo = np.empty(cap, np.int64)
    hi = np.empty(cap, np.int64)
    lo[root], hi[root] = 0, n_pages
    stack = []
    for i in range(group_starts.shape[0]):
        a = group_starts[i]
        b = group_starts[i + 1] if i + 1 < group_starts.shape[0] else n_pages
        if b > a:
            node = _new_node(h, root, a if b - a == 1 else -1, node_parent, first_child, next_sibling,
                             node_page, n_nodes)
            lo[node], hi[node] = a, b
            stack.append(node)
    while len(stack) > 0:
        node = stack.pop()
        a, b = lo[node], hi[node]
        if b - a == 1:
            continue
        mid = a + (b - a) // 2
        for ca, cb in ((mid, b), (a, mid)):  # prepended: the left half ends up first
            child = _new_node(h, node, ca if cb - ca == 1 else -1, node_parent, first_child, next_sibling,
                              node_page, n_nodes)
            lo[child], hi[child] = ca, cb
            stack.append(child)
    d = centers.shape[2]
    # children have larger ids than their parents: sums bottom-up in reverse id order
    for node in range(n_nodes[h] - 1, -1, -1):
        if node_page[h, node] >= 0:
            page_node[h, node_page[h, node]] = node
            leaf_stats(h, node, node_page[h, node], fill, page_keys, sums, counts, centers, radii)
            continue
        sums[h, node] = 0.0
        counts[h, node] = 0
        child = first_child[h, node]
        while child >= 0:
            sums[h, node] += sums[h, child]
            counts[h, node] += counts[h, child]
            child = next_sibling[h, child]
        for j in range(d):
            centers[h, node, j] = sums[h, node, j] / max(counts[h, node], 1)
        radii[h, node] = _farthest(h, lo[node], hi[node], fill, page_keys, centers[h, node])  # exact


@numba.njit(cache=True)
def add_key_to_ancestors(h, node, key, node_parent, sums, counts, centers, radii):
    """Account one new key in `node` and every node above it. The radius stays a bound without a rescan:
    the centre moves by `delta`, so every old key is within `r + delta` of the new centre."""
    d = centers.shape[2]
    while node >= 0:
        counts[h, node] += 1
        shift = 0.0
        dist = 0.0
        for j in range(d):
            sums[h, node, j] += key[j]
            new = sums[h, node, j] / counts[h, node]
            shift += (new - centers[h, node, j]) ** 2
            centers[h, node, j] = new
            dist += (key[j] - new) ** 2
        radii[h, node] = max(radii[h, node] + np.sqrt(shift), np.sqrt(dist))
        node = node_parent[h, node]


@numba.njit(cache=True)
def open_leaf(h, parent, page, node_parent, first_child, next_sibling, node_page, page_node, n_nodes):
    """A new leaf node for `page` under `parent` (a split's second half, or a first page)."""
    node = _new_node(h, parent, page, node_parent, first_child, next_sibling, node_page, n_nodes)
    page_node[h, page] = node
    return node


@numba.njit(cache=True, fastmath=_FAST)
def _node_score(q, qnorm, h, node, centers, radii, leaf):
    """Leaf: `max_g q_g . c` (the flat scan's ranking). Internal: `max_g q_g . c + |q_g| r`, the bound."""
    group, d = q.shape
    best = -np.inf
    for g in range(group):
        s = np.float32(0.0)
        for j in range(d):
            s += q[g, j] * centers[h, node, j]
        if not leaf:
            s += qnorm[g] * radii[h, node]
        best = max(best, s)
    return best


@numba.njit(cache=True)
def _heap_push(keys, items, size, key, item):
    i = size
    keys[i], items[i] = key, item
    while i > 0:
        parent = (i - 1) // 2
        if keys[parent] >= keys[i]:
            break
        keys[parent], keys[i] = keys[i], keys[parent]
        items[parent], items[i] = items[i], items[parent]
        i = parent
    return size + 1


@numba.njit(cache=True)
def _heap_pop(keys, items, size):
    top = items[0]
    size -= 1
    keys[0], items[0] = keys[size], items[size]
    i = 0
    while True:
        left, right, big = 2 * i + 1, 2 * i + 2, i
        if left < size and keys[left] > keys[big]:
            big = left
        if right < size and keys[right] > keys[big]:
            big = right
        if big == i:
            break
        keys[big], keys[i] = keys[i], keys[big]
        items[big], items[i] = items[i], items[big]
        i = big
    return top, size


@numba.njit(cache=True)
def descend(q, h, n_cand, first_child, next_sibling, node_page, counts, centers, radii, n_nodes, out,
            heap_keys, heap_items):
    """Best-first descent from the root: writes into `out` the pages of the `n_cand` leaves with the
    highest centroid score `max_g q_g . c` (the same pages a scan of every leaf ranks first, ties
    aside), expanding a node only while its bound could still beat them. Returns (pages found, nodes
    scored); fewer pages than `n_cand` only when the head holds fewer."""
    group = q.shape[0]
    qnorm = np.empty(group, np.float32)
    for g in range(group):
        qnorm[g] = np.sqrt(np.sum(q[g] * q[g]))
    size, found, scored = 0, 0, 0
    if n_nodes[h] == 0:
        return 0, 0
    size = _heap_push(heap_keys, heap_items, size, np.inf, 0)
    while size > 0 and found < n_cand:
        node, size = _heap_pop(heap_keys, heap_items, size)
        if node_page[h, node] >= 0:  # a leaf popped: nothing left can outscore it
            out[found] = node_page[h, node]
            found += 1
            continue
        child = first_child[h, node]
        while child >= 0:
            if counts[h, child] > 0:
                leaf = node_page[h, child] >= 0
                size = _heap_push(heap_keys, heap_items, size,
                                  _node_score(q, qnorm, h, child, centers, radii, leaf), child)
                scored += 1
            child = next_sibling[h, child]
    return found, scored
