"""Task labels from saturation layers: both rules, out-of-order and tied positions, layers
beyond s_K, min_layer."""

from __future__ import annotations

import numpy as np
import pytest

from probes.errors import InvalidOptionError
from probes.tasks import (
    NO_TASK,
    check_rule,
    in_order_mask,
    resolve_min_layer,
    rule_counts,
    task_states,
    task_table,
)

LAYERS = np.arange(10)


def test_in_order_position_follows_the_ranges():
    s = np.array([[2, 5, 7]])
    expected = [1, 1, 1, 2, 2, 2, 3, 3, NO_TASK, NO_TASK]  # layers 8, 9 > s_K: no task
    assert task_table(s, LAYERS, "in-order")[0].tolist() == expected
    # count agrees up to s_K and caps the rest at K
    assert task_table(s, LAYERS, "count")[0].tolist() == [*expected[:8], 3, 3]


def test_layer_equal_to_s_i_is_still_task_i():
    s = np.array([[3, 6]])
    table = task_table(s, np.array([3, 4, 6, 7]), "count")
    assert table[0].tolist() == [1, 2, 2, 2]


def test_range_definition_matches_on_random_in_order_positions():
    rng = np.random.default_rng(0)
    for _ in range(200):
        s = np.sort(rng.choice(30, size=5, replace=False))[None, :]
        table = task_table(s, np.arange(30), "in-order")[0]
        for layer in range(30):
            bounds = [-1, *s[0].tolist()]
            tasks = [i for i in range(1, 6) if bounds[i - 1] < layer <= bounds[i]]
            assert table[layer] == (tasks[0] if tasks else NO_TASK)


@pytest.mark.parametrize("s", [[5, 3, 8], [4, 4, 8], [9, 9, 9], [7, 2, 1]])
def test_out_of_order_and_tied_positions_get_nothing_under_in_order(s):
    assert not in_order_mask(np.array([s]))[0]
    assert (task_table(np.array([s]), LAYERS, "in-order") == NO_TASK).all()


def test_count_rule_on_out_of_order_positions():
    table = task_table(np.array([[5, 3, 8], [4, 4, 8], [7, 2, 1]]), LAYERS, "count")
    # [5, 3, 8]: rank 2 settles (layer 3) before rank 1 (layer 5)
    assert table[0].tolist() == [1, 1, 1, 1, 2, 2, 3, 3, 3, 3]
    # a tie jumps two tasks at once
    assert table[1].tolist() == [1, 1, 1, 1, 1, 3, 3, 3, 3, 3]
    # reversed order: the count still rises by one per settled rank, capped at K = 3
    assert table[2].tolist() == [1, 1, 2, 3, 3, 3, 3, 3, 3, 3]


def test_every_rank_at_the_last_layer():
    s = np.array([[9, 9, 9]])
    assert task_table(s, LAYERS, "count")[0].tolist() == [1] * 10


def test_task_states_rows_layers_groups_and_min_layer():
    s = np.array([[2, 5, 7], [5, 3, 8], [1, 2, 3]])
    windows = np.array([0, 0, 1])
    states = task_states(s, windows, n_layers=10, rule="in-order", min_layer=3)
    # position 0: layers 3..7; position 1 out of order; position 2: layer 3 only
    assert states.row.tolist() == [0, 0, 0, 0, 0, 2]
    assert states.layer.tolist() == [3, 4, 5, 6, 7, 3]
    assert states.task.tolist() == [2, 2, 2, 3, 3, 3]
    assert states.group.tolist() == [0, 0, 0, 0, 0, 1]
    assert states.n_positions == 2
    assert states.task_counts() == {1: 0, 2: 3, 3: 3}
    counts = rule_counts(s, windows, 10, 3)
    assert counts["in-order"]["n_states"] == 6
    assert counts["count"]["n_states"] == 3 * 7
    assert counts["count"]["n_positions"] == 3


@pytest.mark.parametrize(("value", "expected"), [(5, 5), (0, 0), (0.2, 6), (0.5, 15),
                                                 (np.int64(4), 4)])
def test_min_layer_int_or_fraction(value, expected):
    assert resolve_min_layer(value, 30) == expected


@pytest.mark.parametrize("value", [30, -1, 1.5, 0.0, 1.0, 7.0, -0.2, "5", True])
def test_bad_min_layer(value):
    with pytest.raises(InvalidOptionError, match="min-layer"):
        resolve_min_layer(value, 30)


def test_unknown_rule():
    with pytest.raises(InvalidOptionError, match="unknown label rule"):
        check_rule("paper")
    with pytest.raises(InvalidOptionError):
        task_table(np.array([[1, 2]]), LAYERS, "strict")


@pytest.mark.parametrize("s, expected", [
    ([3, 9, 9], True),    # m = 1: ranks 2, 3 settle only at the output (L - 1 = 9)
    ([9, 9, 9], True),    # m = 0: every layer is task 1
    ([3, 5, 9], True),
    ([5, 3, 9], False),   # out of order before the output
    ([3, 9, 5], False),   # rank 2 at the output, rank 3 earlier: m = 3, 9 > 5
    ([3, 3, 9], False),   # a tie before the output
])
def test_in_order_ignores_ties_at_the_output(s, expected):
    assert in_order_mask(np.array([s]), n_layers=10)[0] == expected
    assert in_order_mask(np.array([s]))[0] == (s == [3, 5, 9])  # the strict reading


def test_in_order_labels_ranks_settling_at_the_output():
    # s_1 = 3, ranks 2 and 3 only at the output: task 1 up to layer 3, task 2 after.
    table = task_table(np.array([[3, 9, 9]]), LAYERS, "in-order", n_layers=10)
    assert table[0].tolist() == [1, 1, 1, 1, 2, 2, 2, 2, 2, 2]
    states = task_states(np.array([[3, 9, 9], [5, 3, 9]]), np.array([0, 1]), 10, "in-order", 0)
    assert states.n_positions == 1 and len(states) == 10
