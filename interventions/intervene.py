"""``intervene`` on a run folder: the steering dose-response and the patching experiment.

Both read an ``analyze`` run (its saturation table and windows) and reload its model:

- ``method="direction"``: build a task k -> k+1 direction per layer (from class means of the
  residual states, or from the run's trained probe), select the positions that are in task
  k at that layer, and steer each of them alone over an alpha grid with its controls
  (reversed direction, ``n_random`` random directions of the same norm);
- ``method="patch"``: the paper's cross-position patching, with a random-source control.

Files, under ``DIR/interventions/``: ``<method>.csv`` (one row per position and setting),
``<method>.json`` (per alpha or offset: ``n``, ``switch_rate`` and its bootstrap interval,
and the same for the controls) and ``<method>.html`` (the figures). Each file is written
completely before it replaces an older one.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from interventions import plots
from interventions.directions import TaskDirection, class_mean_direction, typical_norm
from interventions.patching import find_pairs, patch_summary_json, patching_experiment
from interventions.steering import check_layers, direction_sweep, sweep_summary_json
from probes.analysis import AnalysisResult, check_same_model, library_versions
from probes.errors import InvalidOptionError, ProbeError, RunFolderError
from probes.models import LoadedModel, load_model
from probes.plots import report_html, summary_table_html
from probes.residuals import RESIDUAL_DIR, iter_batches, load_residuals, run_residuals
from probes.runfolder import write_json, write_text
from probes.tasks import DEFAULT_MIN_LAYER, check_rule, resolve_min_layer, task_table

METHODS = ("direction", "patch")
SOURCES = ("means", "probe")
DEFAULT_ALPHAS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)


@dataclass
class InterventionResult:
    """What :func:`run_intervene` returns.

    Attributes:
        method: ``direction`` or ``patch``.
        table: The per-row table (``<method>.csv``).
        summary: The JSON summary (``<method>.json``).
        figures: Figures by name.
        directions: The task directions used, by layer (steering only).
    """

    method: str
    table: pd.DataFrame
    summary: dict[str, Any]
    figures: dict[str, go.Figure] = field(default_factory=dict)
    directions: dict[int, TaskDirection] = field(default_factory=dict)


def layer_states(model: LoadedModel, run: AnalysisResult, layer: int,
                 rows: np.ndarray | None = None) -> torch.Tensor:
    """Residual states after block ``layer`` for rows of the run's table (saved or recomputed).

    Args:
        model: The run's model.
        run: The analysis run.
        layer: 0-based block index.
        rows: Row indices into ``run.table`` (default: all rows).

    Returns:
        ``[len(rows), d_model]`` states in the order of ``rows``: read from ``residuals/``
        where the run saved them, otherwise by rerunning the model on the windows needed.
    """
    rows = np.arange(len(run.table)) if rows is None else np.asarray(rows)
    if run.run_dir is not None and (Path(run.run_dir) / RESIDUAL_DIR).is_dir():
        resid, _ = load_residuals(run.run_dir, layers=[layer])
        return resid[0, torch.as_tensor(rows)]
    wanted = set(run.table["window"].to_numpy()[rows].tolist())
    windows = [w for w in run.windows if w.window_id in wanted]
    pieces: dict[tuple[int, int], torch.Tensor] = {}
    for batch in iter_batches(windows, run.summary.get("bos_token_id"),
                              int(run.summary["options"]["batch_tokens"])):
        _, resid = run_residuals(model.bridge, batch.tokens, layers=[layer])
        for b, window in enumerate(batch.windows):
            for pos in range(len(window)):
                pieces[(window.window_id, pos)] = resid[0, b, batch.offset + pos]
    keys = zip(run.table["window"].to_numpy()[rows], run.table["position"].to_numpy()[rows])
    return torch.stack([pieces[(int(w), int(p))] for w, p in keys])


def choose_layer(tasks: np.ndarray, layers: np.ndarray, k: int) -> int:
    """The layer with the most balanced numbers of task-k and task-(k+1) states.

    Args:
        tasks: Task table ``[n, m]`` of the positions at ``layers`` (0: no task).
        layers: The ``m`` 0-based layers of the table's columns.
        k: The task steered from (1-based).

    Returns:
        The layer maximising ``min(#task k, #task k+1)`` (the first such layer on ties).

    Raises:
        InvalidOptionError: No layer has states of both tasks.
    """
    balance = np.minimum((tasks == k).sum(0), (tasks == k + 1).sum(0))
    if balance.max() == 0:
        raise InvalidOptionError(
            f"no layer has states of both task {k} and task {k + 1}; try --label-rule count")
    return int(layers[int(np.argmax(balance))])


def _probe_direction(run_dir: Path, k: int, layer: int, scale: float,
                     model: LoadedModel) -> TaskDirection:
    from interventions.directions import probe_direction
    from probes.probe import TaskProbe

    path = run_dir / "probe" / "probe.safetensors"
    if not path.exists():
        raise ProbeError(f"no trained probe in {run_dir / 'probe'}; run `topk-saturation probe "
                         f"--run {run_dir}` first or use --source means")
    probe = TaskProbe.load(path, model=model.info.spec, d_model=model.info.d_model)
    weights, classes = probe.residual_weights(layer)
    return probe_direction(weights, classes, k, scale, layer=layer)


def run_intervene(
    run_dir: str | Path,
    method: str = "direction",
    *,
    layers: Sequence[int] | None = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    source: str = "means",
    k: int = 1,
    label_rule: str = "count",
    min_layer: int | float | None = None,
    n_random: int = 10,
    max_positions: int = 200,
    min_gap: float | int | None = None,
    span: int = 5,
    max_pairs: int = 200,
    seed: int = 0,
    model: LoadedModel | None = None,
    progress: bool = True,
    write: bool = True,
) -> InterventionResult:
    """Run an intervention experiment on an analysis run (see the module docstring).

    Args:
        run_dir: The ``analyze`` run folder.
        method: ``direction`` or ``patch``.
        layers: Layers to steer (default: the most balanced layer for task k vs k+1).
        alphas: Steering strengths, in multiples of the typical residual norm.
        source: ``means`` or ``probe`` (needs ``topk-saturation probe`` first).
        k: Steer from task k to task k+1 (1-based).
        label_rule: Which positions count as being in task k (see :mod:`probes.tasks`).
        min_layer: First layer of the task labels (default 5) or, for patching, the least
            s_1 of both positions of a pair (default 10, or L/3 for shallow models).
        n_random: Random control directions.
        max_positions: Positions steered per layer (a seeded sample when more qualify).
        min_gap: Least s_1 difference of a patch pair (default 10, or L/3 for shallow models).
        span: Patch layers ``s_e - span .. s_e + span``.
        max_pairs: Patch pairs used (a seeded sample when more qualify).
        seed: Seed of every sample and control.
        model: The loaded model (default: loaded from the run's summary).
        progress: Progress bars.
        write: Write the files under ``DIR/interventions/``.

    Returns:
        An :class:`InterventionResult`.

    Raises:
        InvalidOptionError: An unknown method, source or label rule, an empty alpha grid,
            ``k < 1``, a task ``k + 1`` beyond the run's K, bad layers, or no positions (or
            pairs) that qualify.
        RunFolderError: A missing or incomplete run folder, or one from another model.
        ProbeError: ``source="probe"`` and the run has no usable probe.
    """
    if method not in METHODS:
        raise InvalidOptionError(f"unknown method {method!r}; use {' or '.join(METHODS)}")
    if source not in SOURCES:
        raise InvalidOptionError(f"unknown source {source!r}; use {' or '.join(SOURCES)}")
    alphas = [float(a) for a in alphas]
    if method == "direction" and not alphas:
        raise InvalidOptionError("the alpha grid is empty")
    check_rule(label_rule)
    if k < 1:
        raise InvalidOptionError(f"--k must be >= 1, got {k}")
    run = AnalysisResult.load(run_dir)
    n_layers = int(run.summary["n_layers"])
    if layers is not None:
        layers = check_layers(layers, n_layers)
    if k + 1 > run.top_k:
        raise InvalidOptionError(f"task {k} -> {k + 1} needs --top-k >= {k + 1} in the run "
                                 f"(it has {run.top_k})")
    if model is None:
        model = load_model(run.summary["model"])
    check_same_model(run.summary, model)
    t0 = time.perf_counter()
    if method == "patch":
        result = _patch(model, run, min_gap, min_layer, span, max_pairs, seed, progress)
    else:
        result = _direction(model, run, layers, alphas, source, k, label_rule,
                            DEFAULT_MIN_LAYER if min_layer is None else min_layer,
                            n_random, max_positions, seed, progress)
    result.summary.update({"method": method, "model": model.info.spec, "seed": seed,
                           "seconds": round(time.perf_counter() - t0, 2),
                           "versions": library_versions()})
    if write:
        write_results(Path(run_dir), result)
    return result


def _direction(
    model: LoadedModel, run: AnalysisResult, layers: Sequence[int] | None,
    alphas: Sequence[float], source: str, k: int, label_rule: str,
    min_layer: int | float, n_random: int, max_positions: int, seed: int, progress: bool,
) -> InterventionResult:
    n_layers = run.n_layers
    first = resolve_min_layer(min_layer, n_layers)
    all_layers = np.arange(first, n_layers)
    tasks = task_table(run.s(), all_layers, label_rule, n_layers)
    if layers is None:
        layers = [choose_layer(tasks, all_layers, k)]
    rng = np.random.default_rng(seed)
    frames, per_layer, figures, directions = [], {}, {}, {}
    for layer in layers:
        if layer < first:
            raise InvalidOptionError(f"layer {layer} is below --min-layer {first}")
        column = tasks[:, layer - first]
        rows_k = np.nonzero(column == k)[0]
        rows_next = np.nonzero(column == k + 1)[0]
        if len(rows_k) == 0:
            raise InvalidOptionError(
                f"no positions are in task {k} at layer {layer} under the {label_rule} rule "
                f"({int((column > 0).sum())} labelled states there; task counts "
                f"{ {t: int((column == t).sum()) for t in range(1, run.top_k + 1)} })")
        both = np.r_[rows_k, rows_next]
        states = layer_states(model, run, layer, both)
        labels = torch.as_tensor(np.r_[np.full(len(rows_k), k), np.full(len(rows_next), k + 1)])
        if source == "means":
            direction = class_mean_direction(states, labels, k, layer)
        else:
            direction = _probe_direction(Path(run.run_dir), k, layer, typical_norm(states),
                                         model)
            direction.n_from, direction.n_to = len(rows_k), len(rows_next)
        directions[layer] = direction
        chosen = rows_k if len(rows_k) <= max_positions else np.sort(
            rng.choice(rows_k, max_positions, replace=False))
        selected = run.table.iloc[chosen]
        sweep = direction_sweep(model, run.windows, selected, direction, layer, alphas,
                                run.top_k, n_random=n_random, seed=seed, progress=progress)
        sweep.table.insert(0, "layer", layer)
        frames.append(sweep.table)
        per_layer[str(layer)] = sweep_summary_json(sweep, direction, layer, {
            "n_positions_in_task": len(rows_k), "n_positions_steered": len(chosen),
            "n_states_next_task": len(rows_next),
        })
        figures[f"dose_response_L{layer}"] = plots.dose_response_figure(sweep.summary, layer, k)
        figures[f"top1_rank_L{layer}"] = plots.top1_rank_figure(sweep.summary, layer)
    summary = {"source": source, "k": k, "label_rule": label_rule, "min_layer": first,
               "alphas": list(alphas), "n_random": n_random,
               "alpha_unit": "multiples of the median residual norm at the layer",
               "layers": per_layer}
    return InterventionResult("direction", pd.concat(frames, ignore_index=True), summary,
                              figures, directions)


def _patch(model: LoadedModel, run: AnalysisResult, min_gap: float | int | None,
           min_layer: float | int | None, span: int, max_pairs: int, seed: int,
           progress: bool) -> InterventionResult:
    pairs = find_pairs(run.table, run.n_layers, min_gap=min_gap, min_layer=min_layer)
    if pairs.empty:
        raise InvalidOptionError(
            "no position pairs qualify for patching (same top-1, s_1 gap >= the minimum, "
            "<= 30 tokens apart, both above the minimum layer); analyze more tokens or lower "
            "--min-gap")
    result = patching_experiment(model, run.windows, run.table, pairs, span=span,
                                 top_k=run.top_k, max_pairs=max_pairs, seed=seed,
                                 progress=progress)
    summary = patch_summary_json(result, {"n_pairs_found": len(pairs), "span": span})
    return InterventionResult("patch", result.table, summary,
                              {"patch_success": plots.patch_figure(result.summary)})


def write_results(run_dir: Path, result: InterventionResult) -> None:
    """Write ``<method>.csv|json|html`` (and the directions) under ``DIR/interventions``.

    Args:
        run_dir: The run folder.
        result: The intervention result to write.

    Raises:
        RunFolderError: ``run_dir`` does not exist.
    """
    if not run_dir.is_dir():
        raise RunFolderError(f"the run folder {run_dir} does not exist")
    folder = run_dir / "interventions"
    stage = run_dir / f".interventions-{result.method}.partial"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    try:
        write_text(stage / f"{result.method}.csv", result.table.to_csv(index=False))
        write_json(stage / f"{result.method}.json", _json_ready(result.summary))
        sections: list[tuple[str, Any]] = [("Summary", summary_table_html(_key_rows(result)))]
        sections += [(name.replace("_", " "), fig) for name, fig in result.figures.items()]
        write_text(stage / f"{result.method}.html",
                   report_html(f"topk-saturation intervene: {result.method}", sections))
        for layer, direction in result.directions.items():
            direction.save(stage / f"direction_L{layer}")
        folder.mkdir(exist_ok=True)
        for path in sorted(stage.iterdir()):
            os.replace(path, folder / path.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _key_rows(result: InterventionResult) -> list[tuple[str, Any]]:
    s = result.summary
    if result.method == "patch":
        rows = [("pairs used / found", f"{s['n_pairs']} / {s['n_pairs_found']}")]
        for entry in s["per_offset"]:
            ctrl = entry.get("random_control", {})
            rows.append((f"l - s_e = {entry['offset']:+d}",
                         f"{_pct(entry.get('switch_rate'))} "
                         f"(control {_pct(ctrl.get('switch_rate'))})"))
        return rows
    rows = [("source", s["source"]), ("task", f"{s['k']} -> {s['k'] + 1}"),
            ("label rule", s["label_rule"])]
    for layer, block in s["layers"].items():
        best = next((e for e in block["per_alpha"] if e["alpha"] == block["best_alpha"]), None)
        if best:
            rows.append((f"layer {layer}: best alpha {best['alpha']}",
                         f"switch {_pct(best.get('switch_rate'))} vs random "
                         f"{_pct(best.get('random_control', {}).get('switch_rate'))}, n="
                         f"{best.get('n')}"))
    return rows


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if not np.isfinite(value) else float(value)
    return value
