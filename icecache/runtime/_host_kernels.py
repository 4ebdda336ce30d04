"""Small per-step host computations of the runtime, compiled with numba (torch's per-op overhead on the
CPU, tens of microseconds, would dominate work this small)."""

from __future__ import annotations

import numba
import numpy as np


# reassociation lets the dot products use SIMD lanes
@numba.njit(cache=True, fastmath={"reassoc", "contract"})
def logsumexp_logits(queries: np.ndarray, keys: np.ndarray, stored: np.ndarray, scale: float) -> np.ndarray:
    """`[kv, g]` log-sum-exp over the `stored` `[kv, n]` keys of `scale * queries [kv, g, d] . keys [kv, n, d]`
    (-inf where a head stores none)."""
    kv, group, dim = queries.shape
    n = keys.shape[1]
    out = np.empty((kv, group), np.float32)
    logits = np.empty(n, np.float64)
    for h in range(kv):
        for g in range(group):
            top = -np.inf
            for t in range(n):
                if not stored[h, t]:
                    continue
                acc = np.float32(0.0)
                for j in range(dim):
                    acc += queries[h, g, j] * keys[h, t, j]
                logits[t] = acc * scale
                top = max(top, logits[t])
            if top == -np.inf:
                out[h, g] = -np.inf
                continue
            total = 0.0
            for t in range(n):
                if stored[h, t]:
                    total += np.exp(logits[t] - top)
            out[h, g] = np.log(total) + top
    return out
