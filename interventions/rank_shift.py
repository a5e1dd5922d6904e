"""Measuring what an intervention did to the ranks of the original top-K tokens.

For one row (a position after an intervention) with the original targets ``y_1..y_K``:

- ``rank_j``: the new 1-based rank of ``y_j`` in the intervened final logits (1 + the number
  of tokens with a strictly larger logit);
- ``switched``: for an intervention meant to move the position from task k to task k+1,
  whether the former rank-(k+1) token is now at rank k (for k = 1: the second choice
  became the top);
- ``top1_rank``: the new rank of the former top token;
- ``kl``: KL(p_clean || p_intervened) of the next-token distributions, in nats.

Rates come with percentile bootstrap confidence intervals over positions (seeded).

Example:
    >>> import torch
    >>> clean = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    >>> after = torch.tensor([[2.0, 3.0, 1.0, 0.0]])  # the top two swapped
    >>> table = rank_table(clean, after, torch.tensor([[0, 1, 2]]), k=1)
    >>> table[["rank_1", "rank_2", "switched"]].values.tolist()
    [[2, 1, True]]
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor


def new_ranks(logits: Float[Tensor, "rows d_vocab"], token_ids: Int[Tensor, "rows t"]
              ) -> Int[Tensor, "rows t"]:
    """1-based ranks of given tokens in each row of logits.

    Args:
        logits: Logits ``[rows, d_vocab]``.
        token_ids: Tokens to rank per row ``[rows, t]``.

    Returns:
        ``[rows, t]`` ranks on the CPU (1 + the number of strictly larger logits).

    Example:
        >>> logits = torch.tensor([[0.5, 2.0, 1.0, 2.0]])
        >>> new_ranks(logits, torch.tensor([[1, 3, 2, 0]])).tolist()  # tied tokens share rank 1
        [[1, 1, 3, 4]]
    """
    logits = logits.float()
    own = torch.gather(logits, 1, token_ids.to(logits.device))
    return ((logits.unsqueeze(1) > own.unsqueeze(-1)).sum(-1) + 1).cpu()


def kl_divergence(clean: Float[Tensor, "rows d_vocab"], other: Float[Tensor, "rows d_vocab"]
                  ) -> Float[Tensor, " rows"]:
    """KL(softmax(clean) || softmax(other)) per row, in nats.

    Args:
        clean: Reference logits ``[rows, d_vocab]``.
        other: Logits to compare ``[rows, d_vocab]``.

    Returns:
        ``[rows]`` non-negative divergences on the CPU.
    """
    log_p = torch.log_softmax(clean.float(), dim=-1)
    log_q = torch.log_softmax(other.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0).cpu()


def rank_table(
    clean_logits: Float[Tensor, "rows d_vocab"],
    new_logits: Float[Tensor, "rows d_vocab"],
    targets: Int[Tensor, "rows K"],
    k: int = 1,
) -> pd.DataFrame:
    """Per-row rank shift of the original targets (see the module docstring).

    Args:
        clean_logits: Logits without the intervention.
        new_logits: Logits with it.
        targets: Original ``y_1..y_K`` per row (needs K >= k + 1).
        k: The task the intervention starts from (1-based).

    Returns:
        One row per input row: ``rank_1..rank_K``, ``switched``, ``top1_rank``, ``new_top1``,
        ``top1_kept`` and ``kl`` (nats).

    Raises:
        ValueError: ``targets`` has fewer than ``k + 1`` columns.
    """
    if targets.shape[1] < k + 1:
        raise ValueError(f"switching from task {k} needs at least {k + 1} targets")
    ranks = new_ranks(new_logits, targets)
    table = pd.DataFrame({f"rank_{j + 1}": ranks[:, j].numpy() for j in range(ranks.shape[1])})
    table["switched"] = ranks[:, k].numpy() == k
    table["top1_rank"] = ranks[:, 0].numpy()
    table["new_top1"] = new_logits.float().argmax(-1).cpu().numpy()
    table["top1_kept"] = table["new_top1"].to_numpy() == targets[:, 0].cpu().numpy()
    table["kl"] = kl_divergence(clean_logits, new_logits).numpy()
    return table


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95
                 ) -> tuple[float | None, float | None]:
    """Percentile bootstrap interval of the mean of ``values`` (None where empty).

    Args:
        values: The values (e.g. 0/1 outcomes per position).
        n_boot: Number of bootstrap resamples.
        seed: Seed of the resampling.
        level: Coverage of the interval.

    Returns:
        ``(low, high)``, or ``(None, None)`` for no values.

    Example:
        >>> lo, hi = bootstrap_ci(np.array([0, 1] * 50, dtype=float), seed=1)
        >>> 0.35 < lo < 0.5 < hi < 0.65
        True
    """
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return None, None
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def summarize_rates(
    table: pd.DataFrame, by: list[str], rate: str = "switched", seed: int = 0,
    extra: tuple[str, ...] = ("top1_rank", "kl"),
) -> pd.DataFrame:
    """Per group: n, the rate with its bootstrap interval, and the means of ``extra``.

    Args:
        table: Per-row results.
        by: Columns to group by (e.g. ``["kind", "alpha"]``).
        rate: The boolean column whose mean is the rate.
        seed: Seed of the bootstrap.
        extra: Columns whose group means are added as ``mean_<col>`` (where present).

    Returns:
        One row per group, sorted: the ``by`` columns, ``n``, ``rate``, ``ci_low``,
        ``ci_high`` and the ``mean_*`` columns.
    """
    rows = []
    for keys, group in table.groupby(by, sort=True):
        keys = keys if isinstance(keys, tuple) else (keys,)
        values = group[rate].to_numpy(dtype=float)
        lo, hi = bootstrap_ci(values, seed=seed)
        row = dict(zip(by, keys))
        row.update(n=len(group), rate=float(values.mean()) if len(values) else None,
                   ci_low=lo, ci_high=hi)
        for col in extra:
            if col in group:
                row[f"mean_{col}"] = float(group[col].mean())
        rows.append(row)
    return pd.DataFrame(rows)
