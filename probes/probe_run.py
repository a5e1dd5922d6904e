"""``probe``: train and evaluate task probes on an analysis run folder.

:func:`run_probe` reads a run written by ``analyze`` (``saturation.csv``, ``summary.json``,
``windows.json``), labels every (position, layer) state with its task (:mod:`probes.tasks`),
takes the residual stream ``blocks.{l}.hook_resid_post`` of each state (from
``residuals/`` when the run saved them, otherwise by rerunning the model from
``summary["model"]`` on the windows needed), and evaluates a :class:`~probes.probe.TaskProbe`
with cross-validation grouped by window, beside its controls on the same folds (layer index
only, shuffled labels, Gaussian random embeddings) and the paper's leaky plain KFold. It
then fits the final probe on every state and writes, through a staging folder:

- ``DIR/probe/metrics.json``: every number (see :func:`run_probe`);
- ``DIR/probe/probe.safetensors`` + ``probe.json``: the final pooled probe (no pickle);
  ``DIR/probe/per_layer/layer_XX.*`` with ``per_layer=True``;
- ``DIR/probe/report.html``: balanced accuracy of the probe and its controls, accuracy per
  layer with the controls as lines, the confusion matrix.

Example:
    >>> import tempfile, pathlib
    >>> from probes.analysis import analyze
    >>> run = pathlib.Path(tempfile.mkdtemp()) / "run"
    >>> _ = analyze("random:gpt2?n_layers=4&d_model=16&n_heads=2&seed=3",
    ...             "text:" + "It was the best of times, it was the worst of times. " * 12,
    ...             out=run, top_k=2, window=16, n_permutations=0, save_residuals=True,
    ...             progress=False)
    >>> result = run_probe(run, label_rule="count", min_layer=0, folds=3, progress=False)
    >>> sorted(result.metrics["controls"])
    ['layer_only', 'leaky_kfold', 'random_embeddings', 'shuffled']
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from safetensors import safe_open
from tqdm.auto import tqdm

from probes import plots
from probes.analysis import AnalysisResult, check_same_model, library_versions
from probes.corpus import Window
from probes.errors import InvalidOptionError, ProbeError, RunFolderError
from probes.lens import LogitLens
from probes.models import LoadedModel, load_model
from probes.probe import (
    BALANCE_MODES,
    SOLVERS,
    CVResult,
    ProbeMeta,
    TaskProbe,
    classification_report,
    compare_to_layer_only,
    cross_validate,
    cv_summary,
    grouped_folds,
    leaky_folds,
    restrict_folds,
    run_controls,
    standard_error,
)
from probes.residuals import RESIDUAL_DIR, iter_batches, load_residuals, run_residuals
from probes.runfolder import TOOL, read_json, require_run, staged_folder, write_json, write_text
from probes.tasks import (
    DEFAULT_MIN_LAYER,
    LABEL_RULES,
    TaskStates,
    check_rule,
    resolve_min_layer,
    rule_counts,
    task_states,
)

FEATURES = ("raw", "normed")
PROBE_DIR = "probe"
#: A task with fewer states than this (or than ``folds``) cannot be probed.
MIN_STATES_PER_TASK = 10
CONTROL_NAMES = ("layer_only", "shuffled", "random_embeddings", "leaky_kfold")


@dataclass(frozen=True)
class ProbeOptions:
    """Options of :func:`run_probe` (all recorded in ``metrics.json``).

    Attributes:
        label_rule: ``in-order`` (default) or ``count`` (see :mod:`probes.tasks`).
        min_layer: First layer labelled: an ``int`` block index (default 5), or a ``float``
            in (0, 1) meaning ``floor(fraction * L)``.
        per_layer: Also train and cross-validate one probe per layer.
        folds: Number of cross-validation folds (at least 2).
        seed: Seeds every random draw (leaky KFold, shuffles, random embeddings,
            truncation).
        features: ``raw`` residual stream or ``normed`` (after the model's final norm).
        top_k: K, the number of tasks (default: the run's K).
        C: Inverse L2 strength of the probe.
        max_iter: Most solver iterations per fit.
        balance: ``weights`` (default), ``truncate`` (the paper's) or ``none``.
        solver: ``whitened-lbfgs`` (default) or ``sklearn-lbfgs``.
    """

    label_rule: str = "in-order"
    min_layer: int | float = DEFAULT_MIN_LAYER
    per_layer: bool = False
    folds: int = 5
    seed: int = 0
    features: str = "raw"
    top_k: int | None = None
    C: float = 1.0
    max_iter: int = 1000
    balance: str = "weights"
    solver: str = "whitened-lbfgs"

    def validate(self) -> None:
        """Refuse bad options before anything is read or computed.

        Raises:
            InvalidOptionError: An unknown rule, ``features``, ``balance`` or ``solver``;
                ``folds < 2``, ``C <= 0``, ``max_iter < 1``, ``top_k < 2`` or ``seed < 0``.
        """
        check_rule(self.label_rule)
        if not isinstance(self.folds, int) or self.folds < 2:
            raise InvalidOptionError(f"--folds must be at least 2, got {self.folds}")
        if self.features not in FEATURES:
            raise InvalidOptionError(
                f"--features must be one of {', '.join(FEATURES)}, got {self.features!r}")
        if self.balance not in BALANCE_MODES:
            raise InvalidOptionError(
                f"--balance must be one of {', '.join(BALANCE_MODES)}, got {self.balance!r}")
        if self.solver not in SOLVERS:
            raise InvalidOptionError(
                f"--solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        if not self.C > 0:
            raise InvalidOptionError(f"--C must be positive, got {self.C}")
        if self.max_iter < 1:
            raise InvalidOptionError(f"--max-iter must be at least 1, got {self.max_iter}")
        if self.top_k is not None and self.top_k < 2:
            raise InvalidOptionError(f"--top-k must be at least 2 for probing, got {self.top_k}")
        if self.seed < 0:
            raise InvalidOptionError(f"--seed must be >= 0, got {self.seed}")

    def estimator(self) -> TaskProbe:
        """The probe these options describe (unfitted).

        Returns:
            A :class:`~probes.probe.TaskProbe` with ``C``, ``max_iter``, ``balance``, ``solver``
            and ``random_state=seed``.
        """
        return TaskProbe(C=self.C, max_iter=self.max_iter, balance=self.balance,
                         solver=self.solver, random_state=self.seed)


# ---------------------------------------------------------------------------- result


@dataclass
class ProbeRunResult:
    """What :func:`run_probe` returns.

    Attributes:
        metrics: The content of ``metrics.json``.
        probe: The final pooled probe, trained on every labelled state.
        layer_probes: Final per-layer probes (``per_layer=True``), by layer.
        states: The labelled states (None when loaded from a folder).
        cv: Out-of-fold results of the probe and each control (empty when loaded).
        folds: The grouped (train, test) folds, as row indices into ``states``.
        features: The feature rows ``[n_states, d_model]`` (None when loaded).
        out_dir: The ``probe/`` folder written, if any.
    """

    metrics: dict[str, Any]
    probe: TaskProbe
    layer_probes: dict[int, TaskProbe] = field(default_factory=dict)
    states: TaskStates | None = None
    cv: dict[str, CVResult] = field(default_factory=dict)
    folds: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    features: np.ndarray | None = field(default=None, repr=False)
    out_dir: Path | None = None

    @cached_property
    def figures(self) -> dict[str, go.Figure]:
        """The report's figures, drawn from :attr:`metrics` alone."""
        return {
            "balanced_accuracy": plots.probe_scores_figure(self.metrics),
            "per_layer_accuracy": plots.probe_layer_accuracy_figure(self.metrics),
            "per_layer_balanced_accuracy": plots.probe_layer_accuracy_figure(
                self.metrics, balanced=True),
            "confusion_matrix": plots.probe_confusion_figure(
                self.metrics["confusion_matrix"]),
        }

    def key_numbers(self) -> list[tuple[str, Any]]:
        """The headline numbers as (label, value) rows.

        Returns:
            ``(label, value)`` pairs: model, labels, states, states per task, features, the CV
            scheme, chance, the probe's and each control's balanced accuracy, whether it reads
            the task, the layers where it does, and what each label rule keeps.
        """
        m = self.metrics
        rows: list[tuple[str, Any]] = [
            ("model", f"{m['model']} (L = {m['n_layers']}, d_model = {m['d_model']})"),
            ("labels", f"{m['label_rule']}, layers {m['min_layer']}..{m['n_layers'] - 1}, "
                       f"K = {m['top_k']}"),
            ("states", f"{m['n_states']} from {m['n_positions']} positions in "
                       f"{m['n_windows']} windows"),
            ("states per task", ", ".join(f"{t}: {c}" for t, c in m["task_counts"].items())),
            ("features", m["features"]),
            ("cross-validation", m["cv"]),
            ("chance (1/K)", f"{m['chance']:.3f}"),
            ("probe balanced accuracy", _pm(m["balanced_accuracy"], m["balanced_accuracy_se"])),
        ]
        for name in CONTROL_NAMES:
            c = m["controls"][name]
            rows.append((CONTROL_LABELS[name], _pm(c["balanced_accuracy"],
                                                   c["balanced_accuracy_se"])))
        r = m["reads_task"]
        rows.append(("reads the task (beats layer-only)",
                     f"{'yes' if r['reads_task'] else 'no'}: margin "
                     f"{_pm(r['margin'], r['margin_se'])}"))
        rows.append(("layers where it beats layer-only (balanced accuracy within the layer)",
                     layer_ranges(r["layers_read"])))
        for rule, counts in m["label_rules"].items():
            rows.append((f"rule {rule} keeps", f"{counts['n_states']} states, "
                                               f"{counts['n_positions']} positions"))
        return rows

    def report_html(self) -> str:
        """The self-contained HTML report.

        Returns:
            An HTML document with the key numbers and the four figures.
        """
        figs = self.figures
        sections: list[tuple[str, Any]] = [
            ("Key numbers", plots.summary_table_html(self.key_numbers())),
            ("Balanced accuracy: probe and controls (grouped CV)", figs["balanced_accuracy"]),
            ("Accuracy per layer, with the controls", figs["per_layer_accuracy"]),
            ("Balanced accuracy per layer (the layer-only control is a constant within a "
             "layer)", figs["per_layer_balanced_accuracy"]),
            ("Confusion matrix (out of fold, grouped CV)", figs["confusion_matrix"]),
        ]
        return plots.report_html(f"topk-saturation probe: {self.metrics['model']}", sections)

    @classmethod
    def load(cls, run_dir: str | Path) -> ProbeRunResult:
        """Read ``DIR/probe`` back (metrics and the final probes; no CV arrays).

        Args:
            run_dir: The run folder (its ``probe/`` subfolder is read).

        Returns:
            A :class:`ProbeRunResult` with ``metrics``, ``probe``, ``layer_probes`` and
            ``out_dir``; states, CV results and features are not stored and stay empty.

        Raises:
            RunFolderError: ``probe/metrics.json`` is missing or broken.
            ProbeError: A probe file is missing, corrupt or for another model.
        """
        folder = Path(run_dir) / PROBE_DIR
        metrics = read_json(folder / "metrics.json")
        probe = TaskProbe.load(folder / "probe.safetensors", model=metrics["model"],
                               d_model=metrics["d_model"])
        layer_probes = {int(f.stem.split("_")[1]): TaskProbe.load(f, model=metrics["model"])
                        for f in sorted((folder / "per_layer").glob("layer_*.safetensors"))}
        return cls(metrics, probe, layer_probes, out_dir=folder)


CONTROL_LABELS = {
    "layer_only": "control: layer index only",
    "shuffled": "control: shuffled labels",
    "random_embeddings": "control: random embeddings (class mean/std)",
    "leaky_kfold": "leaky: plain shuffled KFold (the paper's)",
}


def _round(value: Any, digits: int = 4) -> float | None:
    if value is None or not np.isfinite(value):
        return None
    return round(float(value), digits)


def layer_ranges(layers: list[int]) -> str:
    """Layers as compact ranges.

    Args:
        layers: Layer indices, in any order.

    Returns:
        Runs of consecutive layers as ``a-b``, joined by ``", "``; ``"none"`` when empty.

    Example:
        >>> layer_ranges([5, 6, 7, 9, 12, 13]), layer_ranges([])
        ('5-7, 9, 12-13', 'none')
    """
    parts: list[str] = []
    for layer in sorted(layers):
        if parts and int(parts[-1].split("-")[-1]) == layer - 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{layer}"
        else:
            parts.append(str(layer))
    return ", ".join(parts) or "none"


def _pm(value: float | None, se: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f} ± {se or 0:.3f}"


# ---------------------------------------------------------------------------- inputs


@dataclass
class _Run:
    """The parts of a run folder probing needs."""

    run_dir: Path
    summary: dict[str, Any]
    table: pd.DataFrame
    windows: list[Window]


def _read_run(run_dir: Path) -> _Run:
    summary = require_run(run_dir)
    for key in ("model", "n_layers", "d_model", "top_k"):
        if key not in summary:
            raise RunFolderError(f"{run_dir}/summary.json lacks {key!r}; rerun `analyze`")
    loaded = AnalysisResult.load(run_dir)
    if len(loaded.table) != int(summary.get("n_positions", len(loaded.table))):
        raise RunFolderError(f"{run_dir}/saturation.csv has {len(loaded.table)} rows but "
                             f"summary.json says {summary['n_positions']} positions")
    return _Run(run_dir, summary, loaded.table, loaded.windows)


def _residual_shape(run_dir: Path) -> tuple[int, int] | None:
    """(layers, d_model) stored in ``residuals/``, or None where residuals were not saved."""
    shards = sorted((run_dir / RESIDUAL_DIR).glob("shard_*.safetensors"))
    if not shards:
        return None
    try:
        with safe_open(str(shards[0]), framework="pt") as handle:
            shape = handle.get_slice("resid").get_shape()
    except Exception as err:  # a truncated or foreign file: safetensors raises its own types
        raise RunFolderError(f"{shards[0]} is not a readable residual shard ({err})") from err
    return int(shape[0]), int(shape[-1])


def _check_residuals(run: _Run, shape: tuple[int, int]) -> None:
    n_layers, d_model = int(run.summary["n_layers"]), int(run.summary["d_model"])
    if shape != (n_layers, d_model):
        raise RunFolderError(
            f"{run.run_dir}/{RESIDUAL_DIR} holds residuals with {shape[0]} layers of width "
            f"{shape[1]}, but the run's model {run.summary['model']!r} has {n_layers} layers "
            f"of width {d_model}: the folder mixes runs of different models")


def _shortfall(states: TaskStates, folds: int) -> tuple[str, list[str]] | None:
    """What is too few for ``folds``-fold probing, and what would help; None when enough."""
    needed = max(MIN_STATES_PER_TASK, folds)
    counts = states.task_counts()
    short = {t: c for t, c in counts.items() if c < needed}
    n_windows = len(np.unique(states.group))
    if not short and n_windows >= folds:
        return None
    have = ", ".join(f"task {t} has {c}" for t, c in counts.items())
    hints = []
    if n_windows < folds:
        hints.append("analyze more tokens, use a smaller --window, or fewer --folds")
    if short and states.rule == "in-order":
        hints.append("try --label-rule count")
    return (f"too few labelled states for {folds}-fold probing with the {states.rule} rule: "
            f"{have} from {states.n_positions} positions in {n_windows} windows; each task "
            f"needs at least {needed} states and the states at least {folds} windows"), hints


def _shortfall_error(shortfall: tuple[str, list[str]]) -> ProbeError:
    """The refusal to probe: how many states there are and need, then what would help."""
    text, hints = shortfall
    return ProbeError(text + (f" ({'; '.join(hints)})" if hints else ""))


# ---------------------------------------------------------------------------- features


def _features_from_saved(run: _Run, states: TaskStates, progress: bool
                         ) -> Float[np.ndarray, "m d"]:
    """Gather each state's residual row from ``residuals/``, one layer at a time (memory)."""
    d_model = int(run.summary["d_model"])
    X = np.empty((len(states), d_model), dtype=np.float32)
    expected = run.table[["window", "position"]].to_numpy()
    layers = np.unique(states.layer)
    for i, layer in enumerate(tqdm(layers, desc="residuals", leave=False, disable=not progress)):
        resid, index = load_residuals(run.run_dir, [int(layer)])
        if i == 0 and (index.shape != expected.shape or
                       not np.array_equal(index.numpy(), expected)):
            raise RunFolderError(
                f"{run.run_dir}/{RESIDUAL_DIR} covers {len(index)} (window, position) rows "
                f"that do not match the {len(expected)} rows of saturation.csv; rerun "
                "`analyze --save-residuals`")
        rows = np.flatnonzero(states.layer == layer)
        X[rows] = resid[0].numpy()[states.row[rows]]
    return X


def _features_from_model(run: _Run, states: TaskStates, model: LoadedModel, progress: bool
                         ) -> Float[np.ndarray, "m d"]:
    """Rerun the model on the windows that hold labelled states, for the layers needed."""
    table = run.table
    by_id = {w.window_id: w for w in run.windows}
    needed = sorted({int(w) for w in table["window"].to_numpy()[np.unique(states.row)]})
    missing = [w for w in needed if w not in by_id]
    if missing:
        raise RunFolderError(f"{run.run_dir}/windows.json lacks windows {missing[:5]}")
    row_of = {(int(w), int(p)): i for i, (w, p) in enumerate(
        zip(table["window"].to_numpy(), table["position"].to_numpy()))}
    layers = np.unique(states.layer)
    slot = np.full(int(run.summary["n_layers"]), -1)
    slot[layers] = np.arange(len(layers))
    X = np.empty((len(states), model.info.d_model), dtype=np.float32)
    bos = run.summary.get("bos_token_id")
    batch_tokens = int(run.summary.get("options", {}).get("batch_tokens", 2048))
    pad = int(model.tokenizer.pad_token_id or 0)
    lookup = np.full(len(table), -1)
    windows = [by_id[w] for w in needed]
    bar = tqdm(total=sum(len(w) for w in windows), unit="tok", desc="rerun", leave=False,
               disable=not progress)
    for batch in iter_batches(windows, bos, batch_tokens, pad_token_id=pad):
        _, resid = run_residuals(model.bridge, batch.tokens, [int(layer) for layer in layers])
        flat = resid[:, batch.valid_mask().to(resid.device)].float().cpu().numpy()
        batch_rows = np.array([row_of[(w.window_id, p)] for w in batch.windows
                               for p in range(len(w))])
        tokens = table["token_id"].to_numpy()[batch_rows]
        if not np.array_equal(tokens, np.concatenate([w.token_ids for w in batch.windows])):
            raise RunFolderError(f"{run.run_dir}: windows.json and saturation.csv disagree on "
                                 "the tokens; the run folder is damaged")
        lookup[:] = -1
        lookup[batch_rows] = np.arange(len(batch_rows))
        sel = np.flatnonzero(lookup[states.row] >= 0)
        X[sel] = flat[slot[states.layer[sel]], lookup[states.row[sel]]]
        bar.update(batch.n_positions)
    bar.close()
    return X


def normalize_features(model: LoadedModel, X: Float[np.ndarray, "m d"], chunk: int = 8192
                       ) -> Float[np.ndarray, "m d"]:
    """Residual rows after the model's own final norm (the ``normed`` features).

    Args:
        model: The run's model (its final norm is applied).
        X: Raw residual rows ``[m, d_model]``.
        chunk: Rows normalised at a time (bounds memory).

    Returns:
        ``[m, d_model]`` float32 normed rows.

    Raises:
        UnsupportedArchitectureError: The model has no unembedding (or is an
            encoder-decoder) to read its final norm from.
    """
    lens = LogitLens(model.bridge)
    out = np.empty_like(X, dtype=np.float32)
    for start in range(0, len(X), chunk):
        block = torch.from_numpy(np.ascontiguousarray(X[start:start + chunk]))
        out[start:start + chunk] = lens.normalize(block).float().cpu().numpy()
    return out


# ---------------------------------------------------------------------------- per layer


def _per_layer_probes(
    opts: ProbeOptions, X: np.ndarray, states: TaskStates, folds: list, classes: np.ndarray,
    progress: bool,
) -> tuple[dict[str, Any], dict[int, TaskProbe]]:
    """One probe per layer, on the same window folds restricted to that layer."""
    results: dict[str, Any] = {}
    probes: dict[int, TaskProbe] = {}
    for layer in tqdm(np.unique(states.layer), desc="per-layer probes", leave=False,
                      disable=not progress):
        mask = states.layer == layer
        y = states.task[mask]
        present = np.unique(y)
        entry: dict[str, Any] = {"n_states": int(mask.sum()),
                                 "task_counts": {str(t): int(np.sum(y == t)) for t in classes},
                                 "n_tasks_present": len(present)}
        if len(present) < 2:
            entry.update(balanced_accuracy=None, balanced_accuracy_se=None, accuracy=None,
                         note="a single task at this layer: nothing to discriminate")
            results[str(int(layer))] = entry
            continue
        cv = cross_validate(opts.estimator(), X[mask], y, restrict_folds(folds, mask), classes,
                            f"layer {layer}")
        scored = cv.pred >= 0
        entry.update(balanced_accuracy=_round(np.mean(cv.fold_scores) if len(cv.fold_scores)
                                              else None),
                     balanced_accuracy_se=_round(standard_error(cv.fold_scores)),
                     accuracy=_round(np.mean(cv.pred[scored] == y[scored]) if scored.any()
                                     else None),
                     n_fits_not_converged=cv.n_not_converged)
        results[str(int(layer))] = entry
        probes[int(layer)] = _fit_quietly(opts.estimator(), X[mask], y)
    return results, probes


def _fit_quietly(estimator: TaskProbe, X: np.ndarray, y: np.ndarray) -> TaskProbe:
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported via converged_
        return estimator.fit(X, y)


# ---------------------------------------------------------------------------- run_probe


def _label(run: _Run, opts: ProbeOptions) -> tuple[TaskStates, int]:
    """The labelled states of a run and K, refusing too few states per task.

    With no ``top_k`` asked for, K is the run's K, or, where its last tasks have too few
    states to cross-validate, the largest K' < K whose tasks 1..K' all have enough (a
    message says so; ``metrics["tasks_reduced_from"]`` records it). An explicit ``top_k``
    that has too few states is refused.
    """
    summary = run.summary
    run_k = int(summary["top_k"])
    if opts.top_k is not None and opts.top_k > run_k:
        raise InvalidOptionError(f"--top-k {opts.top_k} is larger than the run's K ({run_k})")
    n_layers = int(summary["n_layers"])
    first = resolve_min_layer(opts.min_layer, n_layers)
    candidates = [opts.top_k] if opts.top_k is not None else list(range(run_k, 1, -1))
    first_shortfall: tuple[str, list[str]] | None = None  # about the K wanted first
    for top_k in candidates:
        s = run.table[[f"s_{k}" for k in range(1, top_k + 1)]].to_numpy()
        states = task_states(s, run.table["window"].to_numpy(), n_layers, opts.label_rule,
                             first)
        shortfall = _shortfall(states, opts.folds)
        if shortfall is not None:
            first_shortfall = first_shortfall or shortfall
            continue
        if first_shortfall is not None:
            print(f"note: probing tasks 1..{top_k} of the run's {run_k}: with all {run_k}, "
                  f"{first_shortfall[0]}", file=sys.stderr)
        return states, top_k
    assert first_shortfall is not None
    raise _shortfall_error(first_shortfall)


def _features(
    run: _Run, states: TaskStates, opts: ProbeOptions, model: LoadedModel | None,
    device: str, dtype: str, progress: bool,
) -> tuple[Float[np.ndarray, "m d"], str]:
    """Each state's feature row, from saved residuals or a rerun, and where it came from.

    The model is loaded only where it is needed: residuals not saved, or ``normed``.
    """
    shape = _residual_shape(run.run_dir)
    if shape is not None:
        _check_residuals(run, shape)
    if (shape is None or opts.features == "normed") and model is None:
        model = load_model(str(run.summary["model"]), device=device, dtype=dtype)
        check_same_model(run.summary, model)
    if shape is not None:
        X = _features_from_saved(run, states, progress)
        source = f"saved residuals ({RESIDUAL_DIR}/)"
    else:
        assert model is not None
        X = _features_from_model(run, states, model, progress)
        source = "model rerun (residuals were not saved)"
    if opts.features == "normed":
        assert model is not None
        X = normalize_features(model, X)
        source += ", then the model's final norm"
    return X, source


def run_probe(
    run_dir: str | Path,
    label_rule: str = "in-order",
    min_layer: int | float = DEFAULT_MIN_LAYER,
    per_layer: bool = False,
    folds: int = 5,
    seed: int = 0,
    features: str = "raw",
    *,
    model: LoadedModel | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    progress: bool = True,
    write: bool = True,
    **options: Any,
) -> ProbeRunResult:
    """Train and evaluate task probes on a run folder; write ``DIR/probe/``.

    Args:
        run_dir: A run folder written by ``analyze``.
        label_rule: ``in-order`` or ``count`` (see :mod:`probes.tasks`).
        min_layer: First layer labelled (``int``), or a fraction of L (``float`` in (0, 1)).
        per_layer: Also cross-validate and save one probe per layer.
        folds: Cross-validation folds (>= 2), grouped by window.
        seed: Seeds every random draw.
        features: ``raw`` or ``normed`` (after the model's final norm; needs the model).
        model: A loaded model to use instead of loading ``summary["model"]`` (it must be the
            run's model); only needed where residuals were not saved or for ``normed``.
        device: Where to load the model when one is needed.
        dtype: dtype of that model.
        progress: Show progress bars.
        write: Write ``DIR/probe/`` (False: compute only).
        **options: More :class:`ProbeOptions` fields (``top_k``, ``C``, ``max_iter``,
            ``balance``, ``solver``).

    Returns:
        A :class:`ProbeRunResult`. Its ``metrics`` hold at least ``balanced_accuracy``,
        ``balanced_accuracy_se``, ``chance``, ``n_states``, ``n_positions``,
        ``per_task_accuracy``, ``roc_auc``, ``per_layer_accuracy``, ``confusion_matrix``,
        ``reads_task`` and ``controls`` (``layer_only``, ``shuffled``,
        ``random_embeddings``, ``leaky_kfold``, each with its ``balanced_accuracy``).

    Raises:
        TopkSaturationError: A bad option, a missing, incomplete or mismatched run folder,
            or too few states per task; nothing is written then.
    """
    unknown = set(options) - set(ProbeOptions.__dataclass_fields__)
    if unknown:
        raise InvalidOptionError(f"unknown probe option(s): {', '.join(sorted(unknown))}")
    opts = ProbeOptions(label_rule=label_rule, min_layer=min_layer, per_layer=per_layer,
                        folds=folds, seed=seed, features=features, **options)
    opts.validate()
    t_start = time.perf_counter()
    run = _read_run(Path(run_dir))
    if model is not None:
        check_same_model(run.summary, model)
    states, top_k = _label(run, opts)
    reduced_from = int(run.summary["top_k"]) if top_k < int(run.summary["top_k"]) and \
        opts.top_k is None else None
    t_features = time.perf_counter()
    X, source = _features(run, states, opts, model, device, dtype, progress)
    features_s = time.perf_counter() - t_features

    t_cv = time.perf_counter()
    classes = np.arange(1, top_k + 1)
    y = states.task
    grouped = grouped_folds(states.group, opts.folds)
    leaky = leaky_folds(len(y), opts.folds, opts.seed)
    cv = run_controls(opts.estimator(), X, y, states.layer, grouped, leaky, classes, opts.seed,
                      progress=progress)
    layer_results, layer_probes = ({}, {})
    if opts.per_layer:
        layer_results, layer_probes = _per_layer_probes(opts, X, states, grouped, classes,
                                                        progress)
    cv_s = time.perf_counter() - t_cv
    t_final = time.perf_counter()
    final = _fit_quietly(opts.estimator(), X, y)
    final_s = time.perf_counter() - t_final

    metrics = _metrics(run, opts, states, top_k, cv, grouped, layer_results, final, source)
    metrics["tasks_reduced_from"] = reduced_from
    metrics["timings"] = {"features_s": round(features_s, 2), "cv_s": round(cv_s, 2),
                          "final_fit_s": round(final_s, 2),
                          "total_s": round(time.perf_counter() - t_start, 2)}
    summary = run.summary
    meta = ProbeMeta(model=str(summary["model"]), d_model=int(summary["d_model"]),
                     n_layers=int(summary["n_layers"]),
                     layers=[int(v) for v in np.unique(states.layer)],
                     features=opts.features, label_rule=opts.label_rule,
                     min_layer=states.min_layer,
                     top_k=top_k, extra={"run": str(run.run_dir), "n_states": len(states),
                                         "pooled": True})
    result = ProbeRunResult(metrics, final, layer_probes, states, cv, grouped, X)
    if write:
        result.out_dir = _write(run.run_dir, result, meta)
    return result


def _metrics(
    run: _Run, opts: ProbeOptions, states: TaskStates, top_k: int, cv: dict[str, CVResult],
    folds: list, layer_results: dict[str, Any], final: TaskProbe, source: str,
) -> dict[str, Any]:
    summary = run.summary
    probe = cv["probe"]
    layers = states.layer
    layer_counts = {str(int(v)): int(np.sum(layers == v)) for v in np.unique(layers)}
    main = cv_summary(probe, layers)
    report = classification_report(probe)
    return {
        "tool": TOOL,
        "command": "probe",
        "run": str(run.run_dir),
        "model": summary["model"],
        "n_layers": int(summary["n_layers"]),
        "d_model": int(summary["d_model"]),
        "top_k": top_k,
        "label_rule": opts.label_rule,
        "min_layer": states.min_layer,
        "layers": "0-based blocks.{l}.hook_resid_post, l = min_layer..L-1",
        "tasks": "1-based: task i at layer l when s_{i-1} < l <= s_i (see probes.tasks)",
        "features": opts.features,
        "feature_source": source,
        "cv": f"GroupKFold by window, {opts.folds} folds",
        "options": asdict(opts),
        "chance": round(1.0 / top_k, 4),
        "n_states": len(states),
        "n_positions": states.n_positions,
        "n_windows": len(np.unique(states.group)),
        "task_counts": {str(t): c for t, c in states.task_counts().items()},
        "label_rules": rule_counts(
            run.table[[f"s_{k}" for k in range(1, top_k + 1)]].to_numpy(),
            run.table["window"].to_numpy(), int(summary["n_layers"]), states.min_layer),
        "balanced_accuracy": main["balanced_accuracy"],
        "balanced_accuracy_se": main["balanced_accuracy_se"],
        "fold_balanced_accuracy": main["fold_balanced_accuracy"],
        "per_task_accuracy": report["per_task_accuracy"],
        "roc_auc": report["roc_auc"],
        "confusion_matrix": report["confusion_matrix"],
        "per_layer_accuracy": main["per_layer_accuracy"],
        "per_layer_balanced_accuracy": main["per_layer_balanced_accuracy"],
        "per_layer_n_states": layer_counts,
        "n_fits_not_converged": main["n_fits_not_converged"],
        "reads_task": compare_to_layer_only(probe, cv["layer_only"], layers, folds),
        "controls": {name: {**cv_summary(cv[name], layers),
                            "what": CONTROL_LABELS[name]} for name in CONTROL_NAMES},
        "per_layer_probes": layer_results or None,
        "final_probe": {"n_states": len(states), "n_iter": final.n_iter_,
                        "converged": final.converged_, "file": "probe.safetensors"},
        "versions": library_versions(),
    }


def _write(run_dir: Path, result: ProbeRunResult, meta: ProbeMeta) -> Path:
    final_dir = run_dir / PROBE_DIR
    with staged_folder(final_dir) as stage:
        result.probe.save(stage / "probe.safetensors", meta)
        if result.layer_probes:
            (stage / "per_layer").mkdir()
            for layer, probe in result.layer_probes.items():
                layer_meta = ProbeMeta(**{**asdict(meta), "layers": [layer],
                                          "extra": {**meta.extra, "pooled": False}})
                probe.save(stage / "per_layer" / f"layer_{layer:02d}.safetensors", layer_meta)
        write_text(stage / "report.html", result.report_html())
        write_json(stage / "metrics.json", result.metrics)
    return final_dir


def format_probe(result: ProbeRunResult) -> str:
    """The short stdout report of a probe run.

    Args:
        result: A finished (or loaded) probe run.

    Returns:
        Multi-line text: states, balanced accuracies of the probe and controls, whether it
        reads the task, label-rule counts, timings and the files written.
    """
    m = result.metrics
    lines = [f"topk-saturation probe: {m['model']} ({m['run']})",
             f"  {m['label_rule']} labels, layers {m['min_layer']}..{m['n_layers'] - 1}, "
             f"K = {m['top_k']}, {m['features']} features; {m['n_states']} states from "
             f"{m['n_positions']} positions in {m['n_windows']} windows",
             "  states per task: " + ", ".join(f"{t}: {c}" for t, c in m["task_counts"].items()),
             f"  balanced accuracy ({m['cv']}; chance {m['chance']:.3f}):",
             f"    {'probe':<46}{_pm(m['balanced_accuracy'], m['balanced_accuracy_se'])}"]
    for name in CONTROL_NAMES:
        c = m["controls"][name]
        lines.append(f"    {CONTROL_LABELS[name]:<46}"
                     f"{_pm(c['balanced_accuracy'], c['balanced_accuracy_se'])}")
    r = m["reads_task"]
    lines.append(f"  reads the task beyond the layer index (probe vs layer-only, same folds): "
                 f"{'yes' if r['reads_task'] else 'no'}, margin "
                 f"{_pm(r['margin'], r['margin_se'])}")
    lines.append("  within single layers (where layer-only is a constant) it beats layer-only "
                 f"at layers: {layer_ranges(r['layers_read'])}")
    counts = "; ".join(f"{rule}: {c['n_states']} states / {c['n_positions']} positions"
                       for rule, c in m["label_rules"].items())
    lines.append(f"  label rules keep {counts}")
    if m["n_fits_not_converged"]:
        lines.append(f"  note: {m['n_fits_not_converged']} probe fits stopped at max_iter")
    lines.append(f"  time: features {m['timings']['features_s']:.1f} s, cross-validation "
                 f"{m['timings']['cv_s']:.1f} s, total {m['timings']['total_s']:.1f} s")
    if result.out_dir is not None:
        lines.append(f"  wrote {result.out_dir}/: metrics.json, probe.safetensors, probe.json, "
                     "report.html" + (", per_layer/" if result.layer_probes else ""))
    return "\n".join(lines)


__all__ = ["FEATURES", "LABEL_RULES", "ProbeOptions", "ProbeRunResult", "format_probe",
           "normalize_features", "run_probe"]
