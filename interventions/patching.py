"""The cross-position patching experiment of the paper, done exactly.

Pairs: two positions of one window, at most ``max_distance`` tokens apart, with the same
final top-1 token, whose top-1 saturation layers differ by at least ``min_gap``, and both at
or above ``min_layer``. The *early* one saturates at ``s_e``, the *late* one later. For each
layer ``l = s_e - span .. s_e + span`` the early position's residual stream after block l
overwrites the late position's (exactly: the late position is re-run against the clean
cache with its state after block l replaced, see :mod:`interventions.rerun`; no block is
skipped). Success: the late position's new ``s_1`` equals l and its final top-1 is unchanged.

The control patches, at the same layer, the state of a random position of another window
whose final top-1 differs (seeded).

Example:
    >>> import pandas as pd
    >>> table = pd.DataFrame({"window": [0, 0, 0], "position": [0, 5, 9],
    ...                       "target_1": [7, 7, 8], "s_1": [12, 24, 20]})
    >>> find_pairs(table, n_layers=30)[["early_position", "late_position", "gap"]].values.tolist()
    [[0, 5, 12]]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from interventions.rank_shift import summarize_rates
from interventions.rerun import CleanWindow, clean_window, rerun
from probes.corpus import Window
from probes.errors import InvalidOptionError
from probes.lens import LogitLens
from probes.models import LoadedModel
from probes.saturation import saturation_layers, targets_from_logits


def default_gap(n_layers: int) -> int:
    """The paper's 10 layers, or a third of the depth for models shallower than 30 layers.

    Args:
        n_layers: L.

    Returns:
        ``max(1, min(10, L // 3))``.
    """
    return max(1, min(10, n_layers // 3))


def resolve_layer_count(value: float | int | None, n_layers: int) -> int:
    """An int as is; a float in (0, 1) as ``round(value * L)``; None as the default.

    Args:
        value: A whole number of layers, a fraction of L in (0, 1), or None.
        n_layers: L.

    Returns:
        The number of layers (at least 1 for a fraction; :func:`default_gap` for None).

    Raises:
        InvalidOptionError: A negative or non-whole number that is not a fraction in (0, 1).
    """
    if value is None:
        return default_gap(n_layers)
    if isinstance(value, float) and 0 < value < 1:
        return max(1, round(value * n_layers))
    if value < 0 or value != int(value):
        raise InvalidOptionError(f"expected a layer count or a fraction in (0, 1), got {value}")
    return int(value)


def find_pairs(
    table: pd.DataFrame, n_layers: int, min_gap: float | int | None = None,
    max_distance: int = 30, min_layer: float | int | None = None,
) -> pd.DataFrame:
    """All (early, late) pairs of the experiment in a saturation table.

    Args:
        table: Rows with ``window, position, target_1, s_1``.
        n_layers: L.
        min_gap: Least ``s_late - s_early`` (default: :func:`default_gap`).
        max_distance: Most tokens between the two positions.
        min_layer: Least ``s_1`` of both (default: :func:`default_gap`).

    Returns:
        Columns ``window, early_position, late_position, s_early, s_late, gap, top1``.

    Raises:
        InvalidOptionError: A bad ``min_gap`` or ``min_layer`` (see
            :func:`resolve_layer_count`).
    """
    gap = resolve_layer_count(min_gap, n_layers)
    floor = resolve_layer_count(min_layer, n_layers)
    rows = []
    eligible = table[table["s_1"] >= floor]
    for window_id, group in eligible.groupby("window", sort=True):
        pos = group["position"].to_numpy()
        top1 = group["target_1"].to_numpy()
        s1 = group["s_1"].to_numpy()
        for i in range(len(group)):
            for j in range(len(group)):
                if top1[i] != top1[j] or abs(pos[i] - pos[j]) > max_distance:
                    continue
                if s1[j] - s1[i] >= gap:
                    rows.append((int(window_id), int(pos[i]), int(pos[j]), int(s1[i]),
                                 int(s1[j]), int(s1[j] - s1[i]), int(top1[i])))
    return pd.DataFrame(rows, columns=["window", "early_position", "late_position", "s_early",
                                       "s_late", "gap", "top1"])


@dataclass
class PatchResult:
    """The patching experiment.

    Attributes:
        table: One row per (pair, offset, kind): ``kind`` is ``pair`` or ``control``.
        summary: Per (kind, offset): n, success share, bootstrap interval.
    """

    table: pd.DataFrame
    summary: pd.DataFrame


def patch_one(
    model: LoadedModel, clean: CleanWindow, late_position: int, layer: int,
    source_state: torch.Tensor, top_k: int = 5, lens: LogitLens | None = None,
) -> dict[str, Any]:
    """Patch one position's state after ``layer`` and report what happened to it.

    Args:
        model: The model.
        clean: The window's clean run (:func:`interventions.rerun.clean_window`).
        late_position: The position patched (0-based, within the window).
        layer: The block after which its state is replaced.
        source_state: The state written there ``[d_model]``.
        top_k: K, for the new saturation layers.
        lens: The model's logit lens (default: a new one).

    Returns:
        ``new_top1``, ``top1_kept``, ``new_s`` (list over ranks), ``logits``.
    """
    out = rerun(model.bridge, clean, [late_position], replace={layer: source_state[None]})
    lens = lens or LogitLens(model.bridge)
    new_s = saturation_layers(lens, out.resid, targets_from_logits(out.logits, top_k))[0]
    old_top1 = int(clean.logits[late_position].argmax())
    new_top1 = int(out.logits[0].argmax())
    return {"new_top1": new_top1, "top1_kept": new_top1 == old_top1,
            "new_s": new_s.tolist(), "logits": out.logits[0]}


def patching_experiment(
    model: LoadedModel,
    windows: Sequence[Window],
    table: pd.DataFrame,
    pairs: pd.DataFrame,
    span: int = 5,
    top_k: int = 5,
    max_pairs: int | None = 200,
    seed: int = 0,
    progress: bool = True,
) -> PatchResult:
    """Run the experiment on ``pairs`` (from :func:`find_pairs`), with its random control.

    Args:
        model: The run's model.
        windows: The run's windows.
        table: The run's saturation table (``window``, ``position``, ``target_1``; the pool of
            control sources).
        pairs: The pairs to patch.
        span: Layers ``s_e - span .. s_e + span`` are patched (those outside ``0..L-1``
            skipped).
        top_k: K, for the new saturation layers.
        max_pairs: Use a seeded sample of this many pairs when there are more (None: all).
        seed: Seed of the sample and of the control sources.
        progress: Show a progress bar over windows.

    Returns:
        A :class:`PatchResult`: the per-row table (``new_top1``, ``top1_kept``, ``new_s_1``,
        ``success``) and the success rate per ``(kind, offset)`` with bootstrap intervals.

    Raises:
        InvalidOptionError: No pairs, ``span < 0``, or no position with another top-1 for
            the control.
    """
    if pairs.empty:
        raise InvalidOptionError("no position pairs qualify for patching")
    if span < 0:
        raise InvalidOptionError(f"the layer span must be >= 0, got {span}")
    rng = np.random.default_rng(seed)
    if max_pairs is not None and len(pairs) > max_pairs:
        pairs = pairs.iloc[np.sort(rng.choice(len(pairs), max_pairs, replace=False))]
    n_layers = model.info.n_layers
    by_id = {w.window_id: w for w in windows}
    lens = LogitLens(model.bridge)
    sources = _control_sources(table, pairs, rng)
    clean_cache: dict[int, CleanWindow] = {}

    def clean_of(window_id: int) -> CleanWindow:
        if window_id not in clean_cache:
            if len(clean_cache) > 8:
                clean_cache.pop(next(iter(clean_cache)))
            clean_cache[window_id] = clean_window(model.bridge, by_id[window_id],
                                                  model.info.bos_token_id)
        return clean_cache[window_id]

    frames = []
    for window_id, group in tqdm(list(pairs.groupby("window", sort=True)), desc="patching",
                                 unit="window", disable=not progress, leave=False):
        clean = clean_of(int(window_id))
        records: list[dict[str, Any]] = []
        states, layers, positions = [], [], []
        for pair_index, pair in group.iterrows():
            src_window, src_pos = sources[pair_index]
            control_state = clean_of(src_window).resid
            for offset in range(-span, span + 1):
                layer = int(pair["s_early"]) + offset
                if not 0 <= layer < n_layers:
                    continue
                for kind, state, sw, sp in (
                    ("pair", clean.resid[layer, int(pair["early_position"])], int(window_id),
                     int(pair["early_position"])),
                    ("control", control_state[layer, src_pos], src_window, src_pos),
                ):
                    records.append({"window": int(window_id), "pair": int(pair_index),
                                    "early_position": int(pair["early_position"]),
                                    "late_position": int(pair["late_position"]),
                                    "s_early": int(pair["s_early"]),
                                    "s_late": int(pair["s_late"]), "top1": int(pair["top1"]),
                                    "kind": kind, "offset": offset, "layer": layer,
                                    "source_window": sw, "source_position": sp})
                    states.append(state)
                    layers.append(layer)
                    positions.append(int(pair["late_position"]))
        clean = clean_of(int(window_id))  # the control may have evicted it
        out = rerun(model.bridge, clean, positions, patch_layers=layers,
                    patch_values=torch.stack(states))
        new_s = saturation_layers(lens, out.resid, targets_from_logits(out.logits, top_k))
        frame = pd.DataFrame(records)
        frame["new_top1"] = out.logits.argmax(-1).numpy()
        frame["top1_kept"] = frame["new_top1"].to_numpy() == frame["top1"].to_numpy()
        frame["new_s_1"] = new_s[:, 0].numpy()
        frame["success"] = frame["top1_kept"] & (frame["new_s_1"] == frame["layer"])
        frames.append(frame)
    result = pd.concat(frames, ignore_index=True)
    summary = summarize_rates(result, ["kind", "offset"], rate="success", seed=seed, extra=())
    return PatchResult(result, summary)


def _control_sources(table: pd.DataFrame, pairs: pd.DataFrame, rng: np.random.Generator
                     ) -> dict[Any, tuple[int, int]]:
    """A random position of another window (a different top-1) for each pair."""
    out: dict[Any, tuple[int, int]] = {}
    windows = table["window"].to_numpy()
    positions = table["position"].to_numpy()
    top1 = table["target_1"].to_numpy()
    for index, pair in pairs.iterrows():
        pool = np.nonzero((windows != pair["window"]) & (top1 != pair["top1"]))[0]
        if len(pool) == 0:
            pool = np.nonzero(top1 != pair["top1"])[0]
        if len(pool) == 0:
            raise InvalidOptionError("no position with another top-1 token exists for the "
                                     "random patching control")
        pick = int(rng.choice(pool))
        out[index] = (int(windows[pick]), int(positions[pick]))
    return out


def patch_summary_json(result: PatchResult, extra: dict[str, Any] | None = None
                       ) -> dict[str, Any]:
    """JSON of the experiment: per offset l - s_e, the success share and the control's.

    Args:
        result: The experiment's result.
        extra: More keys merged into the output.

    Returns:
        ``n_pairs``, ``per_offset`` (per offset ``l - s_e``: ``n``, ``switch_rate``, ``ci``
        and ``random_control`` with the same keys), ``success_rule`` and ``extra``.
    """
    summary = result.summary
    per_offset = []
    for offset in sorted(summary["offset"].unique()):
        entry: dict[str, Any] = {"offset": int(offset)}
        for kind, key in (("pair", None), ("control", "random_control")):
            row = summary[(summary["kind"] == kind) & (summary["offset"] == offset)]
            if row.empty:
                continue
            r = row.iloc[0]
            block = {"n": int(r["n"]), "switch_rate": r["rate"], "ci": [r["ci_low"], r["ci_high"]]}
            if key is None:
                entry.update(block)
            else:
                entry[key] = block
        per_offset.append(entry)
    return {"n_pairs": int(result.table["pair"].nunique()), "per_offset": per_offset,
            "success_rule": "the late position's new s_1 equals the patched layer and its "
                            "final top-1 is unchanged",
            **(extra or {})}


def rank_trajectories(
    model: LoadedModel, clean: CleanWindow, position: int, layer: int,
    source_state: torch.Tensor, token_id: int,
) -> pd.DataFrame:
    """Rank of one token at every layer of a position, before and after a patch.

    Args:
        model: The model.
        clean: The window's clean run.
        position: The patched (late) position.
        layer: The patched layer.
        source_state: The state written after block ``layer``.
        token_id: The token followed (usually the shared final top-1).

    Returns:
        Columns ``layer, rank_before, rank_after`` (1-based ranks).

    Example:
        >>> from probes.models import load_model
        >>> m = load_model("random:gpt2?n_layers=3&d_model=32&n_heads=2")
        >>> clean = clean_window(m.bridge, Window(0, "d", 0, (10, 11, 12, 13), -1),
        ...                      m.info.bos_token_id)
        >>> top1 = int(clean.logits[3].argmax())
        >>> ranks = rank_trajectories(m, clean, position=3, layer=1,
        ...                           source_state=clean.resid[1, 0], token_id=top1)
        >>> ranks.columns.tolist(), len(ranks), int(ranks["rank_before"].iloc[-1])
        (['layer', 'rank_before', 'rank_after'], 3, 1)
    """
    lens = LogitLens(model.bridge)
    out = rerun(model.bridge, clean, [position], replace={layer: source_state[None]})
    n_layers = clean.resid.shape[0]
    ids = torch.full((n_layers, 1), token_id)
    before = lens.ranks(clean.resid[:, position], ids)[:, 0]
    after = lens.ranks(out.resid[:, 0], ids)[:, 0]
    return pd.DataFrame({"layer": range(n_layers), "rank_before": before.tolist(),
                         "rank_after": after.tolist()})
