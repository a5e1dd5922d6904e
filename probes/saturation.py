"""Saturation layers: the layer from which each of the final top-K tokens holds its rank.

Definitions (layers are 0-based block indices 0..L-1; ranks are 1-based, rank 1 = top):

- targets ``y_1..y_K``: the final output's top-K tokens at a position, in order;
- rank-k match at layer l: the k-th largest lens logit at layer l is ``y_k`` (the exact rank,
  not membership in the top K);
- ``s_k``: the first layer of the final run of rank-k matches, so that rank k matches at
  every layer ``s_k..L-1``. ``0 <= s_k <= L-1``; a rank held from layer 0 gives 0, and
  ``s_k = L-1`` means "only at the output".

Two implementations that must agree:

- :func:`saturation_from_matches` is the definition applied to a full match matrix
  (used on hand-made sequences and by the brute-force reference :func:`brute_force_saturation`);
- :func:`saturation_layers` is the engine. Because ``s_k`` only depends on the final run of
  matches, it walks the layers from the last one backwards, and a position leaves the walk
  as soon as all K runs have broken, so that only the rows still alive are decoded, with the
  exact top-k of :class:`probes.lens.LogitLens` (never a full sort).

Example:
    >>> import numpy as np
    >>> ranks = np.array([[3], [1], [2], [1], [1]])  # the rank of y_1 at layers 0..4
    >>> saturation_from_matches(ranks == 1)
    array([3])
"""

from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from probes.lens import LogitLens


def saturation_from_matches(matches: Bool[np.ndarray, "layer ..."]) -> np.ndarray:
    """``s`` from a boolean match matrix whose first axis is the layer.

    Args:
        matches: ``matches[l, ...]`` is True where the rank matches at layer l.

    Returns:
        The first layer of the final run of True values, per entry. An entry whose last
        layer does not match gets ``L`` (no final run; the engine never produces this,
        since the last layer is the output itself).

    Example:
        >>> m = np.array([[True, False], [True, True], [True, True]])
        >>> saturation_from_matches(m)  # held from layer 0 -> 0; from layer 1 -> 1
        array([0, 1])
    """
    matches = np.asarray(matches, dtype=bool)
    n_layers = matches.shape[0]
    # Count the trailing run of True values: reverse the layer axis and find the first False.
    rev = matches[::-1]
    broken = ~rev
    run = np.where(broken.any(axis=0), broken.argmax(axis=0), n_layers)
    return (n_layers - run).astype(np.int64)


def targets_from_logits(
    logits: Float[Tensor, "n d_vocab"], k: int
) -> Int[Tensor, "n k"]:
    """``y_1..y_K``: the top-K token ids of the final logits, in order.

    Args:
        logits: Final-layer logits ``[n, d_vocab]`` (any float dtype; compared in float32).
        k: K, how many targets per row.

    Returns:
        ``[n, K]`` token ids, largest logit first.
    """
    return torch.topk(logits.float(), k, dim=-1).indices


def saturation_layers(
    lens: LogitLens,
    resid: Float[Tensor, "layer n d_model"],
    targets: Int[Tensor, "n k"],
) -> Int[Tensor, "n k"]:
    """The engine: ``s_k`` for every row, by a backward walk over the layers.

    Args:
        lens: The model's logit lens.
        resid: Residual stream after every block, ``resid[l]`` for layer l = 0..L-1.
        targets: ``y_1..y_K`` per row, from the final logits (the lens at layer L-1).

    Returns:
        ``s`` as int64 ``[n, K]``, 0-based layers.
    """
    n_layers, n_rows = resid.shape[0], resid.shape[1]
    k = targets.shape[1]
    s = torch.full((n_rows, k), n_layers - 1, dtype=torch.long)
    alive = torch.ones((n_rows, k), dtype=torch.bool)  # final run still unbroken
    targets = targets.cpu()
    # Layer L-1 is the output: every rank matches there by definition, so the walk starts
    # one layer below it.
    for layer in range(n_layers - 2, -1, -1):
        rows = alive.any(dim=1).nonzero().squeeze(1)
        if rows.numel() == 0:
            break
        _, top_ids = lens.topk(resid[layer, rows.to(resid.device)], k)
        still = alive[rows] & (top_ids.cpu() == targets[rows])
        s_rows = s[rows]
        s_rows[still] = layer
        s[rows] = s_rows
        alive[rows] = still
    return s


def brute_force_saturation(
    lens: LogitLens,
    resid: Float[Tensor, "layer n d_model"],
    targets: Int[Tensor, "n k"],
) -> np.ndarray:
    """Reference ``s``: full-vocabulary lens at every layer, ranks by a full argsort.

    Slow and memory-hungry by design (it is the straightforward recipe); for tests and the
    benchmark only.

    Args:
        lens: The model's logit lens.
        resid: Residual stream after every block ``[L, n, d_model]``.
        targets: ``y_1..y_K`` per row ``[n, K]``.

    Returns:
        ``s`` as int64 ``[n, K]``, 0-based layers (as :func:`saturation_from_matches`).
    """
    n_layers = resid.shape[0]
    k = targets.shape[1]
    matches = np.zeros((n_layers, resid.shape[1], k), dtype=bool)
    for layer in range(n_layers):
        logits = lens.logits(resid[layer]).float()
        order = torch.argsort(logits, dim=-1, descending=True)[:, :k]
        matches[layer] = (order.cpu() == targets.cpu()).numpy()
    return saturation_from_matches(matches)
