"""Steering: add ``alpha * v`` to the residual stream, interactively or as a dose-response.

Interactive use is a context manager over TransformerLens hooks, removed on exit whatever
happens inside::

    with steer(model, layer=12, vector=v, alpha=0.5):
        logits = model.bridge(tokens)

The dose-response experiment (:func:`direction_sweep`) steers one position at a time (each
row re-runs its position against the clean cache of its window, see
:mod:`interventions.rerun`, so that steering a position never leaks into another
measurement), over a whole alpha grid and its controls: the reversed direction and
``n_random`` seeded random directions of the same norm.

Example:
    >>> import torch
    >>> from probes.models import load_model
    >>> m = load_model("random:gpt2?n_layers=2&d_model=32&n_heads=2")
    >>> tokens = torch.tensor([[50256, 10, 11, 12]])
    >>> with torch.no_grad():
    ...     clean = m.bridge(tokens)
    ...     with steer(m, layer=0, vector=torch.ones(32), alpha=0.0):
    ...         same = m.bridge(tokens)
    >>> bool(torch.equal(clean, same))
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from interventions.directions import TaskDirection, random_directions
from interventions.rank_shift import rank_table, summarize_rates
from interventions.rerun import clean_window, rerun
from probes.corpus import Window
from probes.errors import InvalidOptionError
from probes.lens import LogitLens
from probes.models import LoadedModel
from probes.residuals import resid_hook_name
from probes.saturation import saturation_layers, targets_from_logits


def _bridge(model: LoadedModel | torch.nn.Module) -> torch.nn.Module:
    return model.bridge if isinstance(model, LoadedModel) else model


def check_layers(layers: Sequence[int], n_layers: int) -> list[int]:
    """Refuse layers outside 0..L-1.

    Args:
        layers: 0-based block indices.
        n_layers: L.

    Returns:
        The layers as ``int``, in their given order.

    Raises:
        InvalidOptionError: A layer outside ``0..L-1``.
    """
    bad = [int(x) for x in layers if not 0 <= int(x) < n_layers]
    if bad:
        raise InvalidOptionError(
            f"layer(s) {bad} are outside 0..{n_layers - 1} (layers are 0-based block indices)")
    return [int(x) for x in layers]


@contextlib.contextmanager
def steer(
    model: LoadedModel | torch.nn.Module,
    layer: int | Sequence[int],
    vector: Float[Tensor, " d_model"],
    alpha: float | Float[Tensor, " batch"] = 1.0,
    positions: Sequence[int] | slice | None = None,
) -> Iterator[torch.nn.Module]:
    """Add ``alpha * vector`` after the given block(s) while the block is open.

    Args:
        model: A LoadedModel or its bridge.
        layer: Block index (0-based) or indices whose ``hook_resid_post`` is steered.
        vector: The direction, already scaled as wanted (see ``TaskDirection.delta``).
        alpha: A float, or one value per batch row (to run an alpha grid in one batch).
        positions: Sequence indices of the model input to steer (default: all).

    Yields:
        The bridge, for convenience.

    Raises:
        InvalidOptionError: A layer outside ``0..L-1``.
    """
    bridge = _bridge(model)
    layers = check_layers([layer] if isinstance(layer, int) else list(layer),
                          int(bridge.cfg.n_layers))
    index = slice(None) if positions is None else positions

    def add(activation: Tensor, hook: object) -> Tensor:
        delta = vector.to(activation)
        if isinstance(alpha, Tensor):
            scaled = alpha.to(activation).reshape(-1, 1, 1) * delta
        else:
            scaled = float(alpha) * delta
        out = activation.clone()
        out[:, index] = out[:, index] + scaled  # a per-row alpha broadcasts over positions
        return out

    with bridge.hooks(fwd_hooks=[(resid_hook_name(x), add) for x in layers]):
        yield bridge


def steered_logits(
    model: LoadedModel | torch.nn.Module, tokens: torch.Tensor, layer: int | Sequence[int],
    vector: Float[Tensor, " d_model"], alphas: Sequence[float],
    positions: Sequence[int] | slice | None = None,
) -> Float[Tensor, "alpha batch seq d_vocab"]:
    """Logits for every alpha of a grid, in one batched forward pass.

    Args:
        model: A LoadedModel or its bridge.
        tokens: Model input ``[batch, seq]``.
        layer: Block index (0-based) or indices to steer after.
        vector: The direction, already scaled as wanted.
        alphas: The grid of multipliers of ``vector``.
        positions: Sequence indices of the model input to steer (default: all).

    Returns:
        ``[len(alphas), batch, seq, d_vocab]`` logits.

    Raises:
        InvalidOptionError: A layer outside ``0..L-1``.

    Example:
        >>> from probes.models import load_model
        >>> m = load_model("random:llama?n_layers=3&d_model=32&n_heads=4&n_kv_heads=2&d_mlp=64")
        >>> tokens = torch.tensor([[m.info.bos_token_id, 10, 11, 12]])
        >>> logits = steered_logits(m, tokens, layer=1, vector=torch.ones(32), alphas=[0.0, 2.0])
        >>> tuple(logits.shape)  # alpha batch seq d_vocab
        (2, 1, 4, 50257)
        >>> bool(torch.allclose(logits[0], m.bridge(tokens), atol=1e-5))  # alpha 0: unsteered
        True
    """
    bridge = _bridge(model)
    grid = torch.tensor(list(alphas), dtype=torch.float32)
    batch = tokens.shape[0]
    tiled = tokens.repeat(len(grid), 1)
    per_row = grid.repeat_interleave(batch)
    with torch.no_grad(), steer(bridge, layer, vector, per_row, positions):
        logits = bridge(tiled)
    return logits.reshape(len(grid), batch, *logits.shape[1:])


@dataclass
class SweepResult:
    """A dose-response sweep.

    Attributes:
        table: One row per (position, direction, alpha): ids, new ranks of the original
            targets, ``switched``, ``top1_rank``, ``kl``, the new saturation layers.
        summary: Per (kind, alpha): n, switch rate, bootstrap interval, mean top-1 rank and
            KL; kinds are ``direction``, ``reversed`` and ``random``.
    """

    table: pd.DataFrame
    summary: pd.DataFrame


def direction_sweep(
    model: LoadedModel,
    windows: Sequence[Window],
    selected: pd.DataFrame,
    direction: TaskDirection,
    layer: int,
    alphas: Sequence[float],
    top_k: int,
    n_random: int = 10,
    seed: int = 0,
    progress: bool = True,
    chunk: int = 32,
) -> SweepResult:
    """Steer each selected position alone, over an alpha grid, with its controls.

    Args:
        model: The model.
        windows: The run's windows (by ``window_id``).
        selected: Rows ``(window, position, target_1..target_K)``: positions in task
            ``direction.k`` at ``layer``.
        direction: The task direction (unit vector and scale).
        layer: Where to add it (0-based block output).
        alphas: Strengths in units of the typical residual norm.
        top_k: K (targets per row).
        n_random: Random directions of the same norm (seeded).
        seed: Seed of the random directions and the bootstrap.
        progress: Show a progress bar.
        chunk: Rows per forward pass.

    Returns:
        A :class:`SweepResult`.

    Raises:
        InvalidOptionError: A layer outside ``0..L-1``, an empty alpha grid, or no selected
            positions.
    """
    n_layers = model.info.n_layers
    check_layers([layer], n_layers)
    if not alphas:
        raise InvalidOptionError("the alpha grid is empty")
    if selected.empty:
        raise InvalidOptionError(f"no positions are in task {direction.k} at layer {layer}")
    by_id = {w.window_id: w for w in windows}
    kinds: list[tuple[str, int, Tensor]] = [("direction", 0, direction.vector),
                                            ("reversed", 0, -direction.vector)]
    for i, v in enumerate(random_directions(model.info.d_model, n_random, seed)):
        kinds.append(("random", i, v))
    lens = LogitLens(model.bridge)
    frames = []
    groups = list(selected.groupby("window", sort=True))
    for window_id, rows in tqdm(groups, desc="steering", unit="window", disable=not progress,
                                leave=False):
        clean = clean_window(model.bridge, by_id[int(window_id)], model.info.bos_token_id)
        positions = rows["position"].to_numpy()
        settings = [(kind, idx, vec, a) for kind, idx, vec in kinds for a in alphas]
        pos_col = np.tile(positions, len(settings))
        deltas = torch.cat([
            (float(a) * direction.scale * vec).expand(len(positions), -1)
            for _, _, vec, a in settings
        ])
        out = rerun(model.bridge, clean, pos_col, add={layer: deltas}, chunk=chunk)
        targets = torch.as_tensor(
            np.tile(rows[[f"target_{j}" for j in range(1, top_k + 1)]].to_numpy(),
                    (len(settings), 1)))
        table = rank_table(clean.logits[torch.as_tensor(pos_col)], out.logits, targets,
                           k=direction.k)
        new_s = saturation_layers(lens, out.resid, targets_from_logits(out.logits, top_k))
        for j in range(top_k):
            table[f"new_s_{j + 1}"] = new_s[:, j].numpy()
        table.insert(0, "window", int(window_id))
        table.insert(1, "position", pos_col)
        table.insert(2, "kind", np.repeat([s[0] for s in settings], len(positions)))
        table.insert(3, "direction_index", np.repeat([s[1] for s in settings], len(positions)))
        table.insert(4, "alpha", np.repeat([float(s[3]) for s in settings], len(positions)))
        frames.append(table)
    table = pd.concat(frames, ignore_index=True)
    summary = summarize_rates(table, ["kind", "alpha"], seed=seed)
    return SweepResult(table, summary)


def sweep_summary_json(result: SweepResult, direction: TaskDirection, layer: int,
                       extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """JSON of a sweep: per alpha, the direction's switch rate and the controls'.

    Args:
        result: The sweep.
        direction: The direction swept (its ``k``, ``source`` and ``scale`` are recorded).
        layer: The steered layer.
        extra: More keys merged into the output.

    Returns:
        ``layer``, ``k``, ``source``, ``scale``, ``per_alpha`` (per alpha: the direction's
        ``n``, ``switch_rate``, ``ci``, ``mean_top1_rank``, ``mean_kl``, and the same under
        ``reversed_control`` and ``random_control``), ``best_alpha`` (highest switch rate)
        and ``extra``.
    """
    per_alpha = []
    summary = result.summary
    for alpha in sorted(summary["alpha"].unique()):
        entry: dict[str, Any] = {"alpha": float(alpha)}
        for kind, key in (("direction", "direction"), ("reversed", "reversed_control"),
                          ("random", "random_control")):
            row = summary[(summary["kind"] == kind) & (summary["alpha"] == alpha)]
            if row.empty:
                continue
            r = row.iloc[0]
            block = {"n": int(r["n"]), "switch_rate": r["rate"],
                     "ci": [r["ci_low"], r["ci_high"]],
                     "mean_top1_rank": r.get("mean_top1_rank"), "mean_kl": r.get("mean_kl")}
            if kind == "direction":
                entry.update(block)
            else:
                entry[key] = block
        per_alpha.append(entry)
    best = max(per_alpha, key=lambda e: (e.get("switch_rate") or 0.0), default=None)
    return {"layer": layer, "k": direction.k, "source": direction.source,
            "scale": direction.scale, "per_alpha": per_alpha,
            "best_alpha": best["alpha"] if best else None, **(extra or {})}
