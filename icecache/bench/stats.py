"""Small-sample statistics for task accuracy: intervals for a proportion and paired comparisons.

Closed forms only (no SciPy): the Wilson score interval and McNemar's exact test, which is a two-sided
binomial test on the discordant pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Z95 = 1.959963984540054


def wilson_interval(successes: int, total: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval `(low, high)` for `successes` out of `total` ((0, 1) when total is 0)."""
    if total == 0:
        return 0.0, 1.0
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(only_first: int, only_second: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs: questions only the first method answers
    and questions only the second answers (1.0 when there are none)."""
    n = only_first + only_second
    if n == 0:
        return 1.0
    k = min(only_first, only_second)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class Paired:
    """One method against another on the same questions."""

    only_this: int  # questions this method answers and the other does not
    only_other: int  # questions the other answers and this one does not
    p_value: float  # McNemar's exact test

    @classmethod
    def compare(cls, this: dict, other: dict) -> "Paired":
        """`this`, `other`: question key -> answered (bool); compared on the questions both saw."""
        common = this.keys() & other.keys()
        a = sum(1 for q in common if this[q] and not other[q])
        b = sum(1 for q in common if other[q] and not this[q])
        return cls(a, b, mcnemar_exact(a, b))
