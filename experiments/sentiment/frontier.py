"""Best-of-N from a base policy, the oracle point of the reward-vs-KL frontier (DPO paper,
Figure 2 left): its expected reward estimated from samples, and its KL."""

from __future__ import annotations

import math
from collections.abc import Sequence


def expected_best_of_n(scores: Sequence[float], n: int) -> float:
    """Unbiased estimate, from K >= n i.i.d. samples' scores, of E[max of n i.i.d. scores].

    With the scores sorted ascending s_1 <= ... <= s_K, each n-subset's maximum averaged over all
    C(K, n) subsets: sum_i s_i * C(i-1, n-1) / C(K, n) (s_i is the maximum of C(i-1, n-1) of them).
    """
    k = len(scores)
    if not 1 <= n <= k:
        raise ValueError(f"best-of-{n} needs at least {n} samples, got {k}")
    ordered = sorted(scores)
    return sum(s * math.comb(i, n - 1) for i, s in enumerate(ordered)) / math.comb(k, n)


def best_of_n_kl(n: int) -> float:
    """The usual analytic KL(best-of-n || base) = log n - (n - 1) / n (an upper bound on the
    true value; exact when no two samples score the same)."""
    return math.log(n) - (n - 1) / n
