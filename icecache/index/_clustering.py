"""Clustering shared by the index strategies: L2 k-means (faiss) and its balanced, page-aligned form."""

from __future__ import annotations

import numba
import numpy as np
import torch


def kmeans_centroids(x: torch.Tensor, k: int, niter: int, seed: int, nredo: int = 1) -> torch.Tensor:
    """`k` centroids `[k, d]` of the rows of `x` (L2 k-means with faiss; on a GPU when faiss has one);
    the best of `nredo` runs."""
    if k == 1:
        return x.mean(0, keepdim=True)
    import faiss

    use_gpu = x.is_cuda and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    data = np.ascontiguousarray(x.detach().float().cpu().numpy())
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # these clusterings are small: threads cost more than they save
    try:
        kmeans = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, nredo=nredo, verbose=False,
                              min_points_per_centroid=1, gpu=1 if use_gpu else False)
        try:
            kmeans.train(data)
        except Exception:  # a GPU that faiss cannot use after all: the CPU gives the same answer
            if not use_gpu:
                raise
            kmeans = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, nredo=nredo, verbose=False,
                                  min_points_per_centroid=1)
            kmeans.train(data)
    finally:
        faiss.omp_set_num_threads(threads)
    return torch.from_numpy(kmeans.centroids.copy()).to(x.device)


@numba.njit(cache=True)
def _capacitated_assign(dist: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """Label each row of `dist` `[n, k]` with a cluster, cluster `c` taking at most `capacity[c]` rows
    (`sum(capacity) >= n`): rows that lose most by missing their nearest cluster choose first, each
    taking its nearest cluster with room left."""
    n, k = dist.shape
    regret = np.empty(n)
    for i in range(n):
        best, second = np.inf, np.inf
        for c in range(k):
            d = dist[i, c]
            if d < best:
                best, second = d, best
            elif d < second:
                second = d
        regret[i] = second - best if k > 1 else 0.0
    left = capacity.copy()
    labels = np.empty(n, np.int64)
    for i in np.argsort(-regret, kind="mergesort"):
        choice, choice_dist = -1, np.inf
        for c in range(k):
            if left[c] > 0 and dist[i, c] < choice_dist:
                choice, choice_dist = c, dist[i, c]
        labels[i] = choice
        left[choice] -= 1
    return labels


def balanced_kmeans_groups(points: torch.Tensor, page_size: int, branching: int, niter: int = 10,
                           seed: int = 0, nredo: int = 3) -> list[torch.Tensor]:
    """Split the rows of `points` `[n, f]` into at most `branching` groups of whole pages (the last group
    may end in a partial page) by k-means with capacities: each group's size is its share of the pages.
    Returns the row ids of each group, `[size_i]`, in group order. A few k-means restarts (`nredo`): one
    split shapes a whole subtree, and a single run often merges two clusters while cutting one in two."""
    n = points.shape[0]
    pages = -(-n // page_size)
    k = min(branching, pages)
    if k <= 1:
        return [torch.arange(n)]
    base, extra = divmod(pages, k)
    sizes = np.array([(base + (c < extra)) * page_size for c in range(k)], dtype=np.int64)
    sizes[-1] -= sizes.sum() - n  # the partial page goes last
    centroids = kmeans_centroids(points, k, niter, seed, nredo).cpu()
    dist = torch.cdist(points.float().cpu(), centroids).pow(2).numpy().astype(np.float64)
    labels = torch.from_numpy(_capacitated_assign(dist, sizes))
    return [torch.nonzero(labels == c).flatten() for c in range(k)]
