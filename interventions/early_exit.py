"""Token-level early exit: stop at the first layer where a policy says "the top-1 is fixed".

For every position the layers are walked 0..L-1 and the position *exits* at the first layer
where its policy says stop; its prediction is the lens argmax at that layer (the full model
where no layer says stop). Exiting after layer l uses ``l + 1`` layers. Policies:

- ``probe``: a task probe says the state is past task 1 (task >= 2: the top-1 is fixed);
  the argmax rule (threshold ``None``) and a sweep of thresholds ``t`` on the probe's
  probability of task 1 (exit when ``P(task 1) <= t``). The probe only speaks from its
  first trained layer on;
- ``softmax``: ``p1 - p2 >= t`` of the lens distribution (CALM's softmax response);
- ``state``: ``cos(h_l, h_{l-1}) >= t`` of consecutive residual streams (CALM's
  hidden-state saturation; from layer 1 on);
- ``stable``: the lens argmax has not changed over the last ``n`` layers;
- ``static``: always exit after layer ``j``;
- ``oracle``: exit at the true ``s_1`` (consistent with the full model by construction);
- ``full``: no exit.

Metrics per (policy, threshold): accuracy against the true next token, consistency with the
full model's top-1 (CALM's textual consistency), mean layers used, speedup
``L / mean layers``, n. Every (policy, threshold) builds its own exit and prediction arrays
(the authors' script shared one buffer between methods).

The probe is never evaluated on its training windows: :func:`split_windows` shuffles the
window ids with the seed and keeps ``train_fraction`` of them for training; the probe is
re-fitted there with the settings of the run's ``probe`` (label rule, first layer, features,
estimator parameters), and every policy is evaluated on the other windows only.

Example:
    >>> import numpy as np
    >>> sig = LayerSignals(
    ...     argmax=np.array([[3, 5, 5, 5], [7, 7, 2, 2]]), margin=np.zeros((2, 4)),
    ...     cosine=np.zeros((2, 4)), p_task1=np.full((2, 4), np.nan),
    ...     gold=np.array([5, 2]), s1=np.array([1, 2]))
    >>> evaluate(sig, "static", 1)["consistency"], evaluate(sig, "oracle")["consistency"]
    (0.5, 1.0)
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from probes.analysis import AnalysisResult, check_same_model, library_versions
from probes.corpus import Window
from probes.errors import InvalidOptionError, ProbeError, RunFolderError
from probes.lens import LogitLens
from probes.models import LoadedModel, load_model
from probes.plots import report_html, summary_table_html
from probes.residuals import iter_batches, run_residuals
from probes.runfolder import staged_folder, write_json, write_text
from probes.tasks import task_table

POLICIES = ("probe", "softmax", "state", "stable", "static", "oracle", "full")
#: Threshold grids wide enough to trace each policy's whole curve.
DEFAULT_THRESHOLDS: dict[str, list[Any]] = {
    "probe": [None, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5,
              0.6, 0.7, 0.8, 0.9, 0.95, 0.98],
    "softmax": [0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.94, 0.97, 0.99,
                0.995, 0.999, 0.9999],
    "state": [0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.986, 0.99, 0.993, 0.995, 0.998, 0.999],
    "stable": [1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20],
}
CONSISTENCY_LEVELS = (0.95, 0.99)


@dataclass
class LayerSignals:
    """Everything the policies read, per evaluation position and layer.

    Attributes:
        argmax: Lens argmax token ``[n, L]``.
        margin: ``p1 - p2`` of the lens softmax ``[n, L]``.
        cosine: ``cos(h_l, h_{l-1})`` ``[n, L]`` (NaN at layer 0).
        p_task1: The probe's probability of task 1 ``[n, L]`` (NaN where it does not speak).
        gold: The true next token ``[n]`` (-1 where the text ends).
        s1: The true top-1 saturation layer ``[n]``.
        probe_task: The probe's most probable task ``[n, L]`` (0 where it does not speak;
            None: no probe).
    """

    argmax: Int[np.ndarray, "n L"]
    margin: Float[np.ndarray, "n L"]
    cosine: Float[np.ndarray, "n L"]
    p_task1: Float[np.ndarray, "n L"]
    gold: Int[np.ndarray, " n"]
    s1: Int[np.ndarray, " n"]
    probe_task: Int[np.ndarray, "n L"] | None = None

    @property
    def n_layers(self) -> int:
        """L."""
        return int(self.argmax.shape[1])

    @property
    def full_top1(self) -> Int[np.ndarray, " n"]:
        """The full model's top-1 (the lens at the last layer is the model)."""
        return self.argmax[:, -1]


def check_thresholds(policy: str, values: Sequence[Any], n_layers: int) -> list[Any]:
    """Refuse a policy name or thresholds outside the policy's range.

    Args:
        policy: One of :data:`POLICIES`.
        values: Thresholds to check: probabilities in [0, 1] (``probe``, also None for its
            argmax rule; ``softmax``), cosines in [-1, 1] (``state``), whole numbers of
            layers in ``1..L-1`` (``stable``) or layers in ``0..L-1`` (``static``).
        n_layers: L.

    Returns:
        The thresholds, ``stable`` and ``static`` ones as ``int``.

    Raises:
        InvalidOptionError: An unknown policy, or a threshold outside its range.
    """
    if policy not in POLICIES:
        raise InvalidOptionError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
    out = []
    for value in values:
        if policy in ("probe", "softmax"):
            if value is not None and not 0 <= float(value) <= 1:
                raise InvalidOptionError(f"{policy} thresholds must be in [0, 1], got {value}")
        elif policy == "state":
            if not -1 <= float(value) <= 1:
                raise InvalidOptionError(f"state thresholds are cosines in [-1, 1], got {value}")
        elif policy == "stable":
            if int(value) != float(value) or not 1 <= int(value) <= n_layers - 1:
                raise InvalidOptionError(
                    f"stable needs a whole number of layers in 1..{n_layers - 1}, got {value}")
            value = int(value)
        elif policy == "static":
            if int(value) != float(value) or not 0 <= int(value) <= n_layers - 1:
                raise InvalidOptionError(
                    f"static exits after a layer in 0..{n_layers - 1}, got {value}")
            value = int(value)
        out.append(value)
    return out


def default_thresholds(policy: str, n_layers: int) -> list[Any]:
    """The sweep of a policy (static: every layer).

    Args:
        policy: One of :data:`POLICIES`.
        n_layers: L.

    Returns:
        ``0..L-1`` for ``static``, ``[None]`` for ``oracle`` and ``full``, else the
        :data:`DEFAULT_THRESHOLDS` grid (``stable``: only steps up to ``L-1``).
    """
    if policy == "static":
        return list(range(n_layers))
    if policy in ("oracle", "full"):
        return [None]
    grid = DEFAULT_THRESHOLDS[policy]
    return [v for v in grid if policy != "stable" or v <= n_layers - 1]


def _first_true(stop: np.ndarray) -> np.ndarray:
    """Index of the first True per row; L-1 where none (no exit: the full model)."""
    any_stop = stop.any(axis=1)
    return np.where(any_stop, stop.argmax(axis=1), stop.shape[1] - 1)


def exit_layers(signals: LayerSignals, policy: str, threshold: Any = None) -> np.ndarray:
    """The exit layer of every position under one policy and threshold (a new array).

    Args:
        signals: The signals of the evaluation positions.
        policy: One of :data:`POLICIES`.
        threshold: The policy's threshold (see :func:`check_thresholds`); None for
            ``oracle``, ``full`` and the probe's argmax rule.

    Returns:
        ``[n]`` 0-based exit layers; ``L-1`` (the full model) where the policy never stops.

    Raises:
        ProbeError: The probe's argmax rule, without probe predictions in ``signals``.
        InvalidOptionError: An unknown policy.

    Example:
        >>> sig = LayerSignals(
        ...     argmax=np.array([[3, 5, 5, 5], [7, 7, 2, 2]]),
        ...     margin=np.array([[0.1, 0.6, 0.8, 0.9], [0.2, 0.3, 0.4, 0.9]]),
        ...     cosine=np.full((2, 4), np.nan), p_task1=np.full((2, 4), np.nan),
        ...     gold=np.array([5, 2]), s1=np.array([1, 2]))
        >>> exit_layers(sig, "softmax", 0.5).tolist()  # first layer with p1 - p2 >= 0.5
        [1, 3]
        >>> exit_layers(sig, "stable", 1).tolist()  # argmax unchanged for 1 layer
        [2, 1]
    """
    n, n_layers = signals.argmax.shape
    if policy == "full":
        return np.full(n, n_layers - 1)
    if policy == "oracle":
        return signals.s1.astype(np.int64).copy()
    if policy == "static":
        return np.full(n, int(threshold))
    if policy == "softmax":
        return _first_true(signals.margin >= float(threshold))
    if policy == "state":
        return _first_true(np.nan_to_num(signals.cosine, nan=-2.0) >= float(threshold))
    if policy == "stable":
        steps = int(threshold)
        same = signals.argmax[:, 1:] == signals.argmax[:, :-1]  # same[:, l-1]: l vs l-1
        stop = np.zeros((n, n_layers), dtype=bool)
        for layer in range(steps, n_layers):
            stop[:, layer] = same[:, layer - steps: layer].all(axis=1)
        return _first_true(stop)
    if policy == "probe":
        p1 = signals.p_task1
        if threshold is None:
            if signals.probe_task is None:
                raise ProbeError("the probe's predictions were not computed")
            stop = signals.probe_task >= 2  # the probe says task 1 is done
        else:
            stop = np.nan_to_num(p1, nan=2.0) <= float(threshold)
        return _first_true(stop)
    raise InvalidOptionError(f"unknown policy {policy!r}")


def evaluate(signals: LayerSignals, policy: str, threshold: Any = None) -> dict[str, Any]:
    """Accuracy, consistency, mean layers used, speedup and n of one (policy, threshold).

    The returned ``predictions`` and ``exits`` arrays belong to this call alone.

    Args:
        signals: The signals of the evaluation positions.
        policy: One of :data:`POLICIES`.
        threshold: The policy's threshold (None where it takes none).

    Returns:
        ``policy``, ``threshold``, ``accuracy`` (over positions with a gold token; None if
        none), ``consistency``, ``mean_layers``, ``speedup``, ``n``, and the per-position
        ``predictions`` and ``exits`` ``[n]``.
    """
    exits = exit_layers(signals, policy, threshold)
    rows = np.arange(len(exits))
    predictions = signals.argmax[rows, exits].copy()
    has_gold = signals.gold >= 0
    layers_used = exits + 1  # exiting after block l has run l + 1 blocks
    mean_layers = float(layers_used.mean()) if len(exits) else float("nan")
    return {
        "policy": policy,
        "threshold": threshold,
        "accuracy": float((predictions[has_gold] == signals.gold[has_gold]).mean())
        if has_gold.any() else None,
        "consistency": float((predictions == signals.full_top1).mean()) if len(exits) else None,
        "mean_layers": mean_layers,
        "speedup": signals.n_layers / mean_layers if len(exits) else None,
        "n": len(exits),
        "predictions": predictions,
        "exits": exits,
    }


def pareto_frontier(table: pd.DataFrame) -> pd.DataFrame:
    """Points not beaten on both consistency and speedup by another point.

    Args:
        table: Rows with ``consistency`` and ``speedup`` columns (rows with NaN in either
            are left out).

    Returns:
        The frontier rows, by increasing speedup.
    """
    points = table.dropna(subset=["consistency", "speedup"]).sort_values(
        ["speedup", "consistency"], ascending=[False, False])
    keep, best = [], -1.0
    for index, row in points.iterrows():
        if row["consistency"] > best:
            keep.append(index)
            best = row["consistency"]
    return points.loc[keep].sort_values("speedup")


def best_speedups(table: pd.DataFrame, levels: Sequence[float] = CONSISTENCY_LEVELS
                  ) -> dict[str, dict[str, Any]]:
    """Per policy, the largest speedup whose consistency reaches each level (None if none).

    Args:
        table: The ``results.csv`` table (``policy``, ``threshold``, ``consistency``,
            ``speedup``, ``accuracy``).
        levels: Consistency levels to reach.

    Returns:
        ``{policy: {"consistency_<level>": {speedup, threshold, consistency, accuracy} or
        None}}``.
    """
    out: dict[str, dict[str, Any]] = {}
    for policy, group in table.groupby("policy", sort=False):
        entry: dict[str, Any] = {}
        for level in levels:
            ok = group[group["consistency"] >= level - 1e-12]
            key = f"consistency_{level}"
            if ok.empty:
                entry[key] = None
            else:
                row = ok.sort_values(["speedup", "consistency"], ascending=False).iloc[0]
                entry[key] = {"speedup": float(row["speedup"]),
                              "threshold": _json_threshold(row["threshold"]),
                              "consistency": float(row["consistency"]),
                              "accuracy": _json_float(row["accuracy"])}
        out[str(policy)] = entry
    return out


def _json_threshold(value: Any) -> Any:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return value.item() if isinstance(value, np.generic) else value


def _json_float(value: Any) -> float | None:
    return None if value is None or pd.isna(value) else float(value)


def split_windows(window_ids: Sequence[int], train_fraction: float, seed: int
                  ) -> tuple[list[int], list[int]]:
    """A seeded shuffle of the window ids: (probe-training windows, evaluation windows).

    Args:
        window_ids: The run's window ids.
        train_fraction: Share of windows for training, in (0, 1) (rounded to whole windows).
        seed: Seed of the shuffle (Python's :class:`random.Random`).

    Returns:
        The two lists of window ids, each sorted.

    Raises:
        InvalidOptionError: ``train_fraction`` outside (0, 1), or too few windows to leave
            at least one on each side.

    Example:
        >>> split_windows(range(10), 0.5, seed=0)
        ([1, 3, 5, 7, 8], [0, 2, 4, 6, 9])
    """
    ids = sorted(int(w) for w in window_ids)
    if not 0 < train_fraction < 1:
        raise InvalidOptionError(f"--train-fraction must be in (0, 1), got {train_fraction}")
    n_train = round(len(ids) * train_fraction)
    if len(ids) < 2 or n_train < 1 or n_train >= len(ids):
        raise InvalidOptionError(
            f"too few windows to hold some out for evaluation: the run has {len(ids)} "
            f"window(s) and --train-fraction {train_fraction} gives {n_train} for training; "
            "analyze more tokens or a smaller --window")
    shuffled = ids[:]
    random.Random(seed).shuffle(shuffled)
    return sorted(shuffled[:n_train]), sorted(shuffled[n_train:])


# ---------------------------------------------------------------------------- signals


@dataclass
class ProbeSettings:
    """How the run's probe was trained (read from ``DIR/probe/probe.json``).

    Attributes:
        params: The probe's estimator parameters (``TaskProbe.get_params()``).
        label_rule: ``in-order`` or ``count``.
        min_layer: First layer the probe was trained on.
        features: ``raw`` or ``normed``.
    """

    params: dict[str, Any]
    label_rule: str
    min_layer: int
    features: str

    @staticmethod
    def from_run(run_dir: Path, model: LoadedModel) -> ProbeSettings:
        """Read the settings of the probe saved in ``run_dir/probe/``.

        Args:
            run_dir: The run folder.
            model: The run's model (the probe must have been trained on it).

        Returns:
            The :class:`ProbeSettings`.

        Raises:
            ProbeError: The run has no probe, or the probe is for another model or is corrupt.
        """
        from probes.probe import load_probe

        path = Path(run_dir) / "probe" / "probe.safetensors"
        if not path.exists():
            raise ProbeError(
                f"the run has no probe ({path} is missing); train one first with "
                f"`topk-saturation probe --run {run_dir}`, or leave out the probe policy")
        probe = load_probe(path, model=model.info.spec, d_model=model.info.d_model)
        meta = dict(probe.meta_)
        return ProbeSettings(probe.get_params(), str(meta.get("label_rule", "in-order")),
                             int(meta.get("min_layer") or 0), str(meta.get("features", "raw")))


def _features(lens: LogitLens, rows: torch.Tensor, features: str) -> np.ndarray:
    if features == "normed":
        rows = lens.normalize(rows)
    return rows.float().cpu().numpy()


def _lens_signals(lens: LogitLens, resid: torch.Tensor, chunk: int = 512
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Lens argmax and top-2 softmax margin for every row of every layer."""
    n_layers, n = resid.shape[0], resid.shape[1]
    argmax = np.zeros((n, n_layers), dtype=np.int64)
    margin = np.zeros((n, n_layers), dtype=np.float64)
    for layer in range(n_layers):
        for start in range(0, n, chunk):
            logits = lens.logits(resid[layer, start: start + chunk]).float()
            top = torch.topk(torch.softmax(logits, dim=-1), 2, dim=-1)
            argmax[start: start + chunk, layer] = top.indices[:, 0].cpu().numpy()
            margin[start: start + chunk, layer] = (top.values[:, 0] - top.values[:, 1]).cpu()
    return argmax, margin


def _cosines(resid: torch.Tensor) -> np.ndarray:
    cos = torch.nn.functional.cosine_similarity(resid[1:].float(), resid[:-1].float(), dim=-1)
    out = np.full((resid.shape[1], resid.shape[0]), np.nan)
    out[:, 1:] = cos.T.cpu().numpy()
    return out


@dataclass
class EarlyExitResult:
    """What :func:`run_early_exit` returns.

    Attributes:
        table: One row per (policy, threshold): the metrics (``results.csv``).
        summary: Best speedups at each consistency level, the frontier, the split.
        signals: The evaluation signals (for further policies from Python).
        figures: Figures by name.
    """

    table: pd.DataFrame
    summary: dict[str, Any]
    signals: LayerSignals
    figures: dict[str, go.Figure] = field(default_factory=dict)


def collect(
    model: LoadedModel, run: AnalysisResult, train_windows: list[int], eval_windows: list[int],
    settings: ProbeSettings | None, progress: bool = True,
) -> tuple[LayerSignals, dict[str, Any]]:
    """Fit the probe on the training windows and compute every signal on the others.

    Args:
        model: The run's model.
        run: The loaded analysis run.
        train_windows: Window ids whose states train the probe.
        eval_windows: Window ids the signals are computed on.
        settings: How to fit the probe (None: no probe; ``p_task1`` stays NaN).
        progress: Show progress bars.

    Returns:
        ``(signals, info)``: the :class:`LayerSignals` of the evaluation positions (window
        then position order), and facts about the probe fit and
        ``full_top1_mismatches_vs_run`` (positions where the lens top-1 at ``L-1`` differs
        from the run's ``target_1``).

    Raises:
        ProbeError: The training windows hold no labelled states, or lack task 1 or any
            later task.
    """
    lens = LogitLens(model.bridge)
    n_layers = run.n_layers
    table = run.table
    bos = run.summary.get("bos_token_id")
    batch_tokens = int(run.summary["options"]["batch_tokens"])
    by_id = {w.window_id: w for w in run.windows}
    info: dict[str, Any] = {}
    probe = None
    if settings is not None:
        probe, info = _fit_probe(model, run, lens, [by_id[i] for i in train_windows],
                                 settings, bos, batch_tokens, progress)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in
                                          ("argmax", "margin", "cosine", "p1", "task")}
    eval_set = [by_id[i] for i in eval_windows]
    for batch in tqdm(list(iter_batches(eval_set, bos, batch_tokens)), desc="signals",
                      unit="batch", disable=not progress, leave=False):
        _, resid = run_residuals(model.bridge, batch.tokens)
        flat = resid[:, batch.valid_mask().to(resid.device)]
        argmax, margin = _lens_signals(lens, flat)
        parts["argmax"].append(argmax)
        parts["margin"].append(margin)
        parts["cosine"].append(_cosines(flat))
        p1 = np.full((flat.shape[1], n_layers), np.nan)
        task = np.zeros((flat.shape[1], n_layers), dtype=np.int64)
        if probe is not None and settings is not None:
            classes = list(probe.classes_)
            for layer in range(settings.min_layer, n_layers):
                proba = probe.predict_proba(_features(lens, flat[layer], settings.features))
                p1[:, layer] = proba[:, classes.index(1)] if 1 in classes else 0.0
                task[:, layer] = probe.classes_[proba.argmax(axis=1)]
        parts["p1"].append(p1)
        parts["task"].append(task)
        del resid, flat
    rows = table[table["window"].isin(eval_windows)].sort_values(["window", "position"])
    signals = LayerSignals(
        argmax=np.concatenate(parts["argmax"]), margin=np.concatenate(parts["margin"]),
        cosine=np.concatenate(parts["cosine"]), p_task1=np.concatenate(parts["p1"]),
        gold=rows["next_token_id"].to_numpy(), s1=rows["s_1"].to_numpy(),
        probe_task=np.concatenate(parts["task"]) if probe is not None else None,
    )
    mismatch = int((signals.argmax[:, -1] != rows["target_1"].to_numpy()).sum())
    info["full_top1_mismatches_vs_run"] = mismatch
    return signals, info


def _fit_probe(
    model: LoadedModel, run: AnalysisResult, lens: LogitLens, windows: list[Window],
    settings: ProbeSettings, bos: int | None, batch_tokens: int, progress: bool,
) -> tuple[Any, dict[str, Any]]:
    from probes.probe import TaskProbe

    n_layers = run.n_layers
    layers = np.arange(settings.min_layer, n_layers)
    table = run.table
    X_parts, y_parts = [], []
    for batch in tqdm(list(iter_batches(windows, bos, batch_tokens)), desc="probe states",
                      unit="batch", disable=not progress, leave=False):
        _, resid = run_residuals(model.bridge, batch.tokens, layers=layers.tolist())
        flat = resid[:, batch.valid_mask().to(resid.device)]
        ids = [w.window_id for w in batch.windows]
        rows = table[table["window"].isin(ids)].sort_values(["window", "position"])
        s = rows[[f"s_{k}" for k in range(1, run.top_k + 1)]].to_numpy()
        tasks = task_table(s, layers, settings.label_rule, n_layers)
        for j, _layer in enumerate(layers):
            keep = np.nonzero(tasks[:, j] > 0)[0]
            if len(keep):
                X_parts.append(_features(lens, flat[j, torch.as_tensor(keep)],
                                         settings.features))
                y_parts.append(tasks[keep, j])
    if not X_parts:
        raise ProbeError("the probe's training windows hold no labelled states")
    X, y = np.concatenate(X_parts), np.concatenate(y_parts)
    if 1 not in set(y.tolist()) or len(set(y.tolist())) < 2:
        raise ProbeError(f"the training windows give tasks {sorted(set(y.tolist()))}; the probe "
                         "policy needs task 1 and a later task")
    t0 = time.perf_counter()
    probe = TaskProbe(**settings.params).fit(X, y)
    return probe, {"probe_train_states": len(y), "probe_fit_s": round(
        time.perf_counter() - t0, 2), "probe_classes": [int(c) for c in probe.classes_]}


def run_early_exit(
    run_dir: str | Path,
    policies: Sequence[str] = POLICIES,
    thresholds: dict[str, Sequence[Any]] | None = None,
    train_fraction: float = 0.5,
    seed: int = 0,
    model: LoadedModel | None = None,
    progress: bool = True,
    write: bool = True,
) -> EarlyExitResult:
    """Evaluate early-exit policies on held-out windows of a run (see the module docstring).

    Args:
        run_dir: An ``analyze`` run folder (with ``DIR/probe`` for the probe policy).
        policies: Policy names.
        thresholds: Per policy, the thresholds to sweep (default: :data:`DEFAULT_THRESHOLDS`).
        train_fraction: Share of windows that train the probe (the rest are evaluated).
        seed: Seed of the window split.
        model: The run's model (default: loaded from the run's summary).
        progress: Progress bars.
        write: Write ``DIR/early_exit/`` (results.csv, summary.json, report.html).

    Returns:
        An :class:`EarlyExitResult`.

    Raises:
        InvalidOptionError: No policies, an unknown policy, a bad threshold or a bad
            ``train_fraction``.
        RunFolderError: A missing or incomplete run folder, or one from another model.
        ProbeError: The probe policy is asked for and the run has no usable probe.
    """
    policies = list(dict.fromkeys(policies))
    if not policies:
        raise InvalidOptionError("no policies given")
    for policy in policies:
        if policy not in POLICIES:
            raise InvalidOptionError(
                f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
    run = AnalysisResult.load(run_dir)
    n_layers = run.n_layers
    grids = {p: check_thresholds(p, (thresholds or {}).get(p, default_thresholds(p, n_layers)),
                                 n_layers) for p in policies}
    train, held_out = split_windows([w.window_id for w in run.windows], train_fraction, seed)
    if model is None:
        model = load_model(run.summary["model"])
    check_same_model(run.summary, model)
    settings = ProbeSettings.from_run(Path(run_dir), model) if "probe" in policies else None
    t0 = time.perf_counter()
    signals, info = collect(model, run, train, held_out, settings, progress)
    records = []
    for policy in policies:
        for threshold in grids[policy]:
            result = evaluate(signals, policy, threshold)
            result.pop("predictions")
            result.pop("exits")
            records.append(result)
    table = pd.DataFrame(records, columns=["policy", "threshold", "accuracy", "consistency",
                                           "mean_layers", "speedup", "n"])
    frontier = pareto_frontier(table)
    summary: dict[str, Any] = {
        "tool": "topk-saturation", "command": "early-exit", "model": run.summary["model"],
        "n_layers": n_layers, "n_positions": len(signals.gold),
        "split": {"rule": f"window ids shuffled with seed {seed}; {len(train)} windows train "
                          f"the probe, {len(held_out)} are evaluated",
                  "train_windows": train, "eval_windows": held_out},
        "probe": None if settings is None else {
            "label_rule": settings.label_rule, "min_layer": settings.min_layer,
            "features": settings.features, "params": settings.params,
            "note": "re-fitted on the training windows with the settings of DIR/probe", **info},
        "layers_used": "exiting after block l uses l + 1 blocks; speedup = L / mean",
        "best_speedup": best_speedups(table),
        "frontier": [
            {"policy": r["policy"], "threshold": _json_threshold(r["threshold"]),
             "speedup": float(r["speedup"]), "consistency": float(r["consistency"]),
             "accuracy": _json_float(r["accuracy"])} for _, r in frontier.iterrows()],
        "full_model_accuracy": _json_float(table.loc[table["policy"] == "full",
                                                     "accuracy"].max())
        if "full" in policies else None,
        "seconds": round(time.perf_counter() - t0, 2),
        "versions": library_versions(),
    }
    result = EarlyExitResult(table, summary, signals, {"frontier": frontier_figure(table)})
    if write:
        _write(Path(run_dir), result)
    return result


def frontier_figure(table: pd.DataFrame) -> go.Figure:
    """Consistency and accuracy against speedup, one curve per policy; the oracle a point.

    Args:
        table: The ``results.csv`` table.

    Returns:
        A two-panel plotly figure (consistency and accuracy against speedup), with dotted
        lines at the consistency levels.
    """
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=(
        "consistency with the full model", "accuracy on the next token"))
    colors = {"probe": "#EF553B", "softmax": "#636EFA", "state": "#00CC96", "stable": "#AB63FA",
              "static": "#FFA15A", "oracle": "#19D3F3", "full": "#222222"}
    for policy, group in table.groupby("policy", sort=False):
        group = group.sort_values("speedup")
        single = len(group) == 1
        for col, metric in ((1, "consistency"), (2, "accuracy")):
            fig.add_trace(go.Scatter(
                x=group["speedup"], y=group[metric], name=str(policy), legendgroup=str(policy),
                showlegend=col == 1, mode="markers" if single else "lines+markers",
                marker={"color": colors.get(str(policy)), "size": 12 if single else 6,
                        "symbol": "star" if policy == "oracle" else "circle"},
                text=[f"threshold {t}" for t in group["threshold"]],
                hovertemplate="speedup %{x:.2f}<br>" + metric + " %{y:.3f}<br>%{text}"
                              "<extra>" + str(policy) + "</extra>"), row=1, col=col)
    for level in CONSISTENCY_LEVELS:
        fig.add_hline(y=level, line_dash="dot", row=1, col=1,
                      annotation_text=f"{level:.2f}")
    fig.update_xaxes(title_text="speedup (L / mean layers used)")
    fig.update_yaxes(title_text="consistency", row=1, col=1)
    fig.update_yaxes(title_text="accuracy", row=1, col=2)
    fig.update_layout(title="Early exit: consistency and accuracy against speedup",
                      template="plotly_white", height=520)
    return fig


def _write(run_dir: Path, result: EarlyExitResult) -> None:
    if not run_dir.is_dir():
        raise RunFolderError(f"the run folder {run_dir} does not exist")
    with staged_folder(run_dir / "early_exit") as stage:
        write_text(stage / "results.csv", result.table.to_csv(index=False))
        write_json(stage / "summary.json", result.summary)
        rows = []
        for policy, best in result.summary["best_speedup"].items():
            cells = []
            for level in CONSISTENCY_LEVELS:
                b = best.get(f"consistency_{level}")
                cells.append("-" if b is None else f"x{b['speedup']:.2f} (t={b['threshold']})")
            rows.append((policy, " | ".join(f"c>={lvl}: {c}" for lvl, c in
                                            zip(CONSISTENCY_LEVELS, cells))))
        sections: list[tuple[str, Any]] = [
            ("Best speedup at a consistency level", summary_table_html(rows)),
            ("Split", f"<p>{result.summary['split']['rule']}</p>"),
            ("Frontier", result.figures["frontier"]),
        ]
        write_text(stage / "report.html", report_html("topk-saturation early-exit", sections))
