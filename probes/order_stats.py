"""Do saturation layers come in order? The statistics of the paper, with effect sizes.

Per position, with ``s_1..s_K`` its saturation layers (0-based) and L the number of layers:

- ``m`` = the last rank ``j <= K`` with ``s_j != L-1`` (the ranks that settle before the
  output); positions with ``m < 3`` are left out of the order statistics;
- strict Kendall tau between ``(1..m)`` and ``(s_1..s_m)``, ties counted as discordant:
  ``tau = (concordant - discordant) / pairs``;
- fully in order: ``s_1 < s_2 < ... < s_m``.

Across positions: the mean tau with its standard error, the share of concordant pairs,
the share fully in order, each rank's mean ``s_k`` with its standard error, paired t-tests
between adjacent ranks, and a permutation test: each position's ``s_1..s_m`` is shuffled
(seeded), and ``p = (1 + #{permuted mean tau >= observed}) / (1 + n_permutations)``; the
``+1`` keeps p a valid p-value (never 0 from a finite number of draws).

Example:
    >>> import numpy as np
    >>> s = np.array([[3, 5, 7, 9, 9], [2, 1, 4, 9, 9]])  # L = 10
    >>> strict_tau(s, n_layers=10)  # m = 3 for both; second has one discordant pair
    array([1.        , 0.33333333])
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from jaxtyping import Int
from scipy import stats as sp_stats


def settled_ranks(s: Int[np.ndarray, "n k"], n_layers: int) -> np.ndarray:
    """``m`` per position: the last rank (1-based) with ``s_j != L-1``; 0 if none.

    Args:
        s: Saturation layers ``[n, K]`` (0-based), ranks in columns.
        n_layers: L, the number of layers; ``L-1`` is the output layer.

    Returns:
        ``[n]`` integer ``m`` per position, in ``0..K``.
    """
    s = np.asarray(s)
    early = s != n_layers - 1
    k = s.shape[1]
    last = k - np.argmax(early[:, ::-1], axis=1)
    return np.where(early.any(axis=1), last, 0)


def tau_over_first_m(s: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Strict tau of each row's first ``m`` entries against ``1..m`` (NaN where m < 2).

    Args:
        s: Saturation layers ``[n, K]``.
        m: ``[n]`` number of leading ranks to score per row.

    Returns:
        ``[n]`` float taus in ``[-1, 1]``; ties count as discordant.
    """
    k = s.shape[1]
    i, j = np.triu_indices(k, 1)  # pairs of ranks i < j (0-based)
    in_range = (j[None, :] < m[:, None])  # pair counted when both ranks are <= m
    concordant = (s[:, i] < s[:, j]) & in_range
    discordant = (s[:, i] >= s[:, j]) & in_range  # ties are discordant
    pairs = m * (m - 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, (concordant.sum(1) - discordant.sum(1)) / pairs, np.nan)


def strict_tau(s: Int[np.ndarray, "n k"], n_layers: int, min_m: int = 3) -> np.ndarray:
    """Strict Kendall tau per position; NaN for positions with ``m < min_m``.

    Args:
        s: Saturation layers ``[n, K]`` (0-based).
        n_layers: L, the number of layers.
        min_m: Fewest settled ranks a position needs to be scored (3, as in the paper).

    Returns:
        ``[n]`` float taus, NaN where the position is not scored.
    """
    s = np.asarray(s)
    m = settled_ranks(s, n_layers)
    tau = tau_over_first_m(s, m)
    return np.where(m >= min_m, tau, np.nan)


def fully_in_order(s: Int[np.ndarray, "n k"], n_layers: int) -> np.ndarray:
    """True where ``s_1 < ... < s_m`` (for every position; use with the m >= 3 mask).

    Args:
        s: Saturation layers ``[n, K]`` (0-based).
        n_layers: L, the number of layers.

    Returns:
        ``[n]`` booleans.
    """
    s = np.asarray(s)
    m = settled_ranks(s, n_layers)
    k = s.shape[1]
    steps = np.diff(s, axis=1) > 0  # s_{j+1} > s_j for j = 1..K-1
    needed = np.arange(1, k)[None, :] < m[:, None]
    return np.all(steps | ~needed, axis=1)


def permutation_null(
    s: Int[np.ndarray, "n k"], n_layers: int, n_permutations: int = 1000, seed: int = 0,
    min_m: int = 3, chunk: int = 50,
) -> np.ndarray:
    """Mean strict tau under shuffles of each scored position's ``s_1..s_m``.

    Args:
        s: Saturation layers ``[n, K]`` (0-based).
        n_layers: L, the number of layers.
        n_permutations: Number of shuffles (0 or less gives an empty result).
        seed: Seed of the NumPy generator that draws the shuffles.
        min_m: Fewest settled ranks a position needs to be scored.
        chunk: Shuffles drawn at once (bounds memory to ``chunk * n * K`` keys).

    Returns:
        ``[n_permutations]`` permuted mean taus (empty if no position is scored).
    """
    s = np.asarray(s)
    m = settled_ranks(s, n_layers)
    scored = m >= min_m
    s, m = s[scored], m[scored]
    if len(s) == 0 or n_permutations <= 0:
        return np.zeros(0)
    rng = np.random.default_rng(seed)
    n, k = s.shape
    out = np.empty(n_permutations)
    for start in range(0, n_permutations, chunk):
        reps = min(chunk, n_permutations - start)
        # Random keys, with ranks beyond m pinned last so only the first m are shuffled.
        keys = rng.random((reps, n, k))
        keys[:, np.arange(k)[None, :] >= m[:, None]] = 2.0
        order = np.argsort(keys, axis=2)
        shuffled = np.take_along_axis(np.broadcast_to(s, (reps, n, k)), order, axis=2)
        taus = tau_over_first_m(shuffled.reshape(reps * n, k), np.tile(m, reps)).reshape(reps, n)
        out[start: start + reps] = taus.mean(axis=1)
    return out


def _mean_se(x: np.ndarray) -> tuple[float | None, float | None]:
    x = x[~np.isnan(x)] if x.dtype.kind == "f" else x
    if len(x) == 0:
        return None, None
    se = float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else None
    return float(np.mean(x)), se


def _clean(value: float | None) -> float | None:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    return float(value)


def order_statistics(
    s: Int[np.ndarray, "n k"], n_layers: int, n_permutations: int = 1000, seed: int = 0,
    min_m: int = 3,
) -> tuple[dict[str, Any], np.ndarray]:
    """All order statistics of one group of positions.

    Args:
        s: Saturation layers ``[n, K]``.
        n_layers: L.
        n_permutations: Shuffles for the permutation test (>= 1000 recommended).
        seed: Seed of the shuffles.
        min_m: Positions with fewer settled ranks are left out (3, as in the paper).

    Returns:
        ``(summary, null)``: a JSON-ready dict, and the permuted mean taus.

    Example:
        >>> s = np.array([[1, 2, 3, 9, 9]] * 5 + [[3, 2, 1, 9, 9]])
        >>> summary, _ = order_statistics(s, 10, n_permutations=200)
        >>> summary["n_scored"], round(summary["mean_tau"], 3), summary["frac_in_order"]
        (6, 0.667, 0.8333333333333334)
    """
    s = np.atleast_2d(np.asarray(s, dtype=np.int64))
    k = s.shape[1]
    tau = strict_tau(s, n_layers, min_m)
    scored = ~np.isnan(tau)
    null = permutation_null(s, n_layers, n_permutations, seed, min_m)
    mean_tau, tau_se = _mean_se(tau[scored])
    p_value = None
    if mean_tau is not None and len(null):
        p_value = float((1 + np.sum(null >= mean_tau - 1e-12)) / (1 + len(null)))
    m = settled_ranks(s, n_layers)
    concordant_share = None
    if scored.any():
        concordant_share = float(np.mean((tau[scored] + 1) / 2))
    mean_s, se_s = [], []
    for col in range(k):
        mu, se = _mean_se(s[:, col].astype(float))
        mean_s.append(_clean(mu))
        se_s.append(_clean(se))
    adjacent = []
    for col in range(k - 1):
        diff = (s[:, col + 1] - s[:, col]).astype(float)
        entry: dict[str, Any] = {"ranks": [col + 1, col + 2], "n": len(diff),
                                 "mean_diff": _clean(float(diff.mean())) if len(diff) else None}
        if len(diff) > 1 and np.std(diff) > 0:
            t = sp_stats.ttest_rel(s[:, col + 1], s[:, col])
            entry.update(t=_clean(float(t.statistic)), p=_clean(float(t.pvalue)),
                         cohens_d=_clean(float(diff.mean() / diff.std(ddof=1))))
        else:
            entry.update(t=None, p=None, cohens_d=None)
        adjacent.append(entry)
    summary = {
        "n_positions": len(s),
        "n_scored": int(scored.sum()),
        "mean_tau": _clean(mean_tau),
        "tau_se": _clean(tau_se),
        "frac_concordant_pairs": _clean(concordant_share),
        "frac_in_order": _clean(float(fully_in_order(s, n_layers)[scored].mean()))
        if scored.any() else None,
        "p_value": p_value,
        "n_permutations": len(null),
        "null_mean_tau": _clean(float(null.mean())) if len(null) else None,
        "mean_s": mean_s,
        "se_s": se_s,
        "m_counts": {str(j): int((m == j).sum()) for j in range(k + 1)},
        "adjacent_tests": adjacent,
    }
    return summary, null
