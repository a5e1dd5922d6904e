"""Order statistics on constructed cases."""

from __future__ import annotations

import numpy as np
import pytest

from probes.order_stats import (
    fully_in_order,
    order_statistics,
    permutation_null,
    settled_ranks,
    strict_tau,
)

L = 10


def test_m_is_last_rank_settling_before_output():
    s = np.array([[3, 9, 5, 9, 9], [9, 9, 9, 9, 9], [1, 2, 3, 4, 5]])
    assert settled_ranks(s, L).tolist() == [3, 0, 5]


def test_tau_perfect_reversed_and_ties():
    s = np.array([
        [1, 2, 3, 4, 5],   # fully in order: tau 1
        [5, 4, 3, 2, 1],   # reversed: tau -1
        [2, 2, 2, 9, 9],   # m = 3, all ties: discordant, tau -1
        [1, 3, 2, 9, 9],   # m = 3: pairs (1,2)+ (1,3)+ (2,3)-: tau 1/3
        [1, 2, 9, 9, 9],   # m = 2: left out
    ])
    tau = strict_tau(s, L)
    np.testing.assert_allclose(tau[:4], [1, -1, -1, 1 / 3])
    assert np.isnan(tau[4])


def test_tau_within_m_counts_ranks_saturating_at_output():
    # m = 3 although s_2 = L-1: the pair (2, 3) is discordant, (1, 2) concordant.
    s = np.array([[3, 9, 5, 9, 9]])
    np.testing.assert_allclose(strict_tau(s, L), [(2 - 1) / 3])


def test_fully_in_order():
    s = np.array([[1, 2, 3, 9, 9], [1, 1, 3, 9, 9], [1, 2, 3, 4, 9]])
    assert fully_in_order(s, L).tolist() == [True, False, True]


def test_permutation_p_small_for_ordered_data():
    rng = np.random.default_rng(0)
    base = np.sort(rng.integers(0, 9, size=(300, 5)), axis=1)
    base[:, 0] = np.minimum(base[:, 0], 2)
    base = base + np.arange(5)  # strictly increasing, some reaching L-1 or beyond
    base = np.minimum(base, L - 1)
    summary, null = order_statistics(base, L, n_permutations=500, seed=1)
    assert summary["mean_tau"] > 0.8
    assert summary["p_value"] == pytest.approx(1 / 501)
    assert null.max() < summary["mean_tau"]


def test_permutation_p_large_for_shuffled_data():
    rng = np.random.default_rng(1)
    s = np.stack([rng.permutation(5) + 2 for _ in range(400)])
    summary, _ = order_statistics(s, L, n_permutations=500, seed=2)
    assert abs(summary["mean_tau"]) < 0.1
    assert summary["p_value"] > 0.05


def test_permutation_is_seeded():
    s = np.stack([np.random.default_rng(i).permutation(5) for i in range(50)])
    a = permutation_null(s, L, 100, seed=3)
    b = permutation_null(s, L, 100, seed=3)
    c = permutation_null(s, L, 100, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_summary_fields_and_means():
    s = np.array([[1, 2, 3, 9, 9], [3, 4, 5, 9, 9]])
    summary, _ = order_statistics(s, L, n_permutations=10)
    assert summary["mean_s"] == [2.0, 3.0, 4.0, 9.0, 9.0]
    assert summary["se_s"][0] == pytest.approx(1.0)
    assert summary["n_scored"] == 2 and summary["frac_in_order"] == 1.0
    assert summary["adjacent_tests"][0]["ranks"] == [1, 2]


def test_no_scored_positions():
    summary, null = order_statistics(np.full((4, 5), L - 1), L, n_permutations=10)
    assert summary["n_scored"] == 0 and summary["mean_tau"] is None
    assert summary["p_value"] is None and len(null) == 0
