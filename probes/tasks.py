"""Task labels: which of the K "tasks" the residual stream of a position is on at each layer.

A position's saturation layers ``s_1..s_K`` (0-based block indices, from ``analyze``) cut
the layers into tasks (1-based, as ranks are): the state at layer ``l`` is on **task i**
when ``s_{i-1} < l <= s_i``, task 1 covering every layer up to ``s_1``. Equivalently, for a
position whose ``s`` are strictly increasing,

    task(l) = 1 + #{j : s_j < l}            (the number of ranks already settled, plus one)

so at ``l = s_i`` the state is still on task ``i`` (the layer where rank i settles is the
last layer of its task).

Positions whose ``s`` are not strictly increasing (ties count as out of order) give empty
or overlapping ranges under the paper's definition. Two stated rules decide what they get:

- ``in-order`` (default): only positions whose ranks settle strictly in order are labelled;
  every other position contributes no state at all. Ranks that settle only at the output
  (``s_j = L-1``) are not compared with each other: they follow the ranks that settle before
  the output (``m`` of them, as in :mod:`probes.order_stats`), and the position is in order
  when ``s_1 < ... < s_m`` with ``s_{m+1} = ... = s_K = L-1``. Their ties at ``L-1`` only
  leave the last tasks' ranges empty, which is what the paper's ranges do. (Comparing them
  too, i.e. asking for ``s_1 < ... < s_K`` over all K, keeps almost nothing on a real model:
  3 of 2,048 positions of the SmolLM2 demo; pass ``n_layers=None`` to
  :func:`in_order_mask` for that strict reading.)
- ``count``: every position is labelled with ``task(l) = 1 + #{j : s_j < l}``, capped at K.
  For in-order positions this is the range rule above.

Layers beyond ``s_K`` (all K ranks settled before the output): ``in-order`` drops them,
since the paper's ranges end at ``s_K``; ``count`` gives them task K (the cap). Layers below
``min_layer`` are dropped under both rules (the paper starts at layer 5). ``min_layer`` is
an ``int`` block index, or a ``float`` in (0, 1) meaning ``floor(fraction * L)``.

Example:
    >>> import numpy as np
    >>> s = np.array([[2, 4, 6], [5, 3, 6], [3, 7, 7]])  # L = 8: in order, not, in order
    >>> task_table(s, np.arange(8), "in-order", n_layers=8)
    array([[1, 1, 1, 2, 2, 3, 3, 0],
           [0, 0, 0, 0, 0, 0, 0, 0],
           [1, 1, 1, 1, 2, 2, 2, 2]])
    >>> task_table(s, np.arange(8), "count")
    array([[1, 1, 1, 2, 2, 3, 3, 3],
           [1, 1, 1, 1, 2, 2, 3, 3],
           [1, 1, 1, 1, 2, 2, 2, 2]])
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np
from jaxtyping import Bool, Int

from probes.errors import InvalidOptionError

LABEL_RULES = ("in-order", "count")
DEFAULT_MIN_LAYER = 5
#: Label 0 in :func:`task_table` means "no task" (the state is not used).
NO_TASK = 0


def check_rule(rule: str) -> str:
    """Refuse an unknown label rule.

    Args:
        rule: A label rule name.

    Returns:
        ``rule`` unchanged, when it is one of :data:`LABEL_RULES`.

    Raises:
        InvalidOptionError: ``rule`` is not ``in-order`` or ``count``.
    """
    if rule not in LABEL_RULES:
        raise InvalidOptionError(
            f"unknown label rule {rule!r}; choose one of {', '.join(LABEL_RULES)}")
    return rule


def resolve_min_layer(min_layer: int | float, n_layers: int) -> int:
    """The first block index whose states are labelled.

    Args:
        min_layer: An ``int`` block index in ``0..L-1``, or a ``float`` in (0, 1) meaning
            ``floor(min_layer * L)`` (any other float, 7.0 included, is refused).
        n_layers: L.

    Returns:
        The 0-based first layer.

    Raises:
        InvalidOptionError: ``min_layer`` is not a number, is a float outside (0, 1), or
            gives a layer outside ``0..L-1``.

    Example:
        >>> resolve_min_layer(5, 30), resolve_min_layer(0.2, 30)
        (5, 6)
    """
    if isinstance(min_layer, bool) or not isinstance(min_layer, numbers.Real):
        raise InvalidOptionError(f"--min-layer must be a number, got {min_layer!r}")
    if isinstance(min_layer, numbers.Integral):
        first = int(min_layer)
    elif 0 < float(min_layer) < 1:
        first = math.floor(float(min_layer) * n_layers + 1e-9)
    else:
        raise InvalidOptionError(
            f"--min-layer must be a layer index 0..{n_layers - 1} or a fraction in (0, 1), "
            f"got {min_layer}")
    if not 0 <= first < n_layers:
        raise InvalidOptionError(
            f"--min-layer {min_layer} gives layer {first}, outside 0..{n_layers - 1}")
    return first


def in_order_mask(s: Int[np.ndarray, "n k"], n_layers: int | None = None
                  ) -> Bool[np.ndarray, " n"]:
    """Positions whose saturation layers are strictly increasing (ties are out of order).

    Args:
        s: Saturation layers ``[n, K]``.
        n_layers: L. When given, ranks that settle only at the output layer ``L-1`` are not
            compared with each other (see the module docstring); None compares all K.

    Returns:
        ``[n]`` booleans (all True when K < 2).

    Example:
        >>> s = np.array([[1, 2, 3], [1, 1, 3], [3, 2, 4], [1, 4, 4]])
        >>> in_order_mask(s).tolist(), in_order_mask(s, n_layers=5).tolist()
        ([True, False, False, False], [True, False, False, True])
    """
    s = np.asarray(s)
    if s.shape[1] < 2:
        return np.ones(len(s), dtype=bool)
    rising = np.diff(s, axis=1) > 0
    if n_layers is None:
        return np.all(rising, axis=1)
    settles_early = s[:, 1:] != n_layers - 1
    # A step j -> j+1 must rise when some rank from j+1 on settles before the output (that
    # is, up to rank m); after m every rank sits at L-1 and their ties do not count.
    later_early = np.flip(np.cumsum(np.flip(settles_early, 1), 1), 1) > 0
    return np.all(rising | ~later_early, axis=1)


def task_table(
    s: Int[np.ndarray, "n k"], layers: Int[np.ndarray, " m"], rule: str = "in-order",
    n_layers: int | None = None,
) -> Int[np.ndarray, "n m"]:
    """Task (1..K) of each position at each of the given layers; 0 where it has none.

    Args:
        s: Saturation layers ``s_1..s_K`` per position (0-based).
        layers: The layers to label (0-based block indices).
        rule: ``in-order`` or ``count`` (see the module docstring).
        n_layers: L, which ``in-order`` needs to tell the ranks that settle only at the
            output (None: the strict reading over all K ranks).

    Returns:
        ``[n, m]`` tasks, 1-based, with :data:`NO_TASK` (0) for unlabelled states.
    """
    check_rule(rule)
    s = np.asarray(s, dtype=np.int64)
    layers = np.asarray(layers, dtype=np.int64)
    k = s.shape[1]
    # Number of ranks already settled at layer l: those with s_j < l.
    settled = (s[:, None, :] < layers[None, :, None]).sum(axis=2)
    task = 1 + settled
    if rule == "count":
        return np.minimum(task, k)
    keep = in_order_mask(s, n_layers)[:, None] & (task <= k)  # beyond s_K: no task
    return np.where(keep, task, NO_TASK)


@dataclass(frozen=True)
class TaskStates:
    """The labelled states of a run: one row per (position, layer) that has a task.

    Attributes:
        row: Row of the position in ``saturation.csv``.
        layer: 0-based block index of the state.
        task: 1-based task.
        group: The position's window id (CV groups: a window never straddles folds).
        rule: The label rule used.
        min_layer: The first layer labelled.
        top_k: K.
    """

    row: Int[np.ndarray, " m"]
    layer: Int[np.ndarray, " m"]
    task: Int[np.ndarray, " m"]
    group: Int[np.ndarray, " m"]
    rule: str
    min_layer: int
    top_k: int

    def __len__(self) -> int:
        return len(self.task)

    @property
    def n_positions(self) -> int:
        """Positions that contribute at least one state."""
        return len(np.unique(self.row))

    def task_counts(self) -> dict[int, int]:
        """States per task, for every task 1..K (0 where a task has none).

        Returns:
            ``{task: number of states}`` for tasks 1..K.
        """
        counts = np.bincount(self.task, minlength=self.top_k + 1)
        return {t: int(counts[t]) for t in range(1, self.top_k + 1)}

    def describe(self) -> dict[str, Any]:
        """Counts for a report: states, positions, windows and states per task.

        Returns:
            A JSON-ready dict with ``rule``, ``n_states``, ``n_positions``, ``n_windows`` and
            ``task_counts`` (keys are the tasks as strings).
        """
        return {"rule": self.rule, "n_states": len(self), "n_positions": self.n_positions,
                "n_windows": len(np.unique(self.group)),
                "task_counts": {str(t): c for t, c in self.task_counts().items()}}


def task_states(
    s: Int[np.ndarray, "n k"], windows: Int[np.ndarray, " n"], n_layers: int,
    rule: str = "in-order", min_layer: int | float = DEFAULT_MIN_LAYER,
) -> TaskStates:
    """Every labelled (position, layer) state of a run, in row-major order.

    Args:
        s: Saturation layers ``[n, K]`` (0-based), one row per position.
        windows: Window id of each position (the CV group).
        n_layers: L; states are taken at layers ``min_layer..L-1``.
        rule: ``in-order`` or ``count``.
        min_layer: First layer (``int``) or fraction of L (``float`` in (0, 1)).

    Returns:
        A :class:`TaskStates`.

    Example:
        >>> st = task_states(np.array([[1, 2], [2, 2]]), np.array([0, 1]), n_layers=4,
        ...                  rule="count", min_layer=1)
        >>> st.layer.tolist(), st.task.tolist(), st.group.tolist()
        ([1, 2, 3, 1, 2, 3], [1, 2, 2, 1, 1, 2], [0, 0, 0, 1, 1, 1])
    """
    s = np.asarray(s, dtype=np.int64)
    first = resolve_min_layer(min_layer, n_layers)
    layers = np.arange(first, n_layers)
    table = task_table(s, layers, rule, n_layers)
    rows, cols = np.nonzero(table != NO_TASK)
    return TaskStates(row=rows.astype(np.int64), layer=layers[cols],
                      task=table[rows, cols].astype(np.int64),
                      group=np.asarray(windows, dtype=np.int64)[rows], rule=rule,
                      min_layer=first, top_k=int(s.shape[1]))


def rule_counts(
    s: Int[np.ndarray, "n k"], windows: Int[np.ndarray, " n"], n_layers: int,
    min_layer: int | float = DEFAULT_MIN_LAYER,
) -> dict[str, dict[str, Any]]:
    """What each label rule keeps on the same positions (reported beside the chosen one).

    Args:
        s: Saturation layers ``[n, K]`` (0-based), one row per position.
        windows: Window id of each position ``[n]``.
        n_layers: L.
        min_layer: First layer (``int``) or fraction of L (``float`` in (0, 1)).

    Returns:
        ``{rule: TaskStates.describe()}`` for every rule in :data:`LABEL_RULES`.

    Example:
        >>> counts = rule_counts(np.array([[1, 2], [2, 2]]), np.array([0, 1]), 4, 1)
        >>> counts["in-order"]["n_states"], counts["count"]["n_states"]
        (2, 6)
    """
    return {rule: task_states(s, windows, n_layers, rule, min_layer).describe()
            for rule in LABEL_RULES}
