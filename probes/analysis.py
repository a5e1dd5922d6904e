"""The main job: saturation layers of every position of a text, and whether they are ordered.

``analyze`` loads a model and a text, runs the model over token windows batch by batch,
finds ``s_1..s_K`` per position with the engine of :mod:`probes.saturation`, and reports the
order statistics of :mod:`probes.order_stats` for all positions and for the positions the
paper keeps (``s_1 <= floor(keep_fraction * L)``). With ``out=...`` it writes a run folder:

- ``saturation.csv``: one row per (window, position): ``window, position, token_id, token,
  next_token_id, target_1..target_K, s_1..s_K, kept``;
- ``summary.json``: model, sizes, options, the statistics for ``all`` and ``kept``,
  ``timings`` and ``versions``;
- ``report.html``: the figures; ``windows.json``, ``permutation_null.csv`` and
  ``lens_window.csv`` (the data behind the figures); ``residuals/`` with
  ``save_residuals=True``.

Each batch's rows are written to the staging folder as soon as they are computed, so that a
run that fails halfway resumes from where it stopped when rerun with the same options.

Example:
    >>> result = analyze("random:gpt2?n_layers=3&d_model=32&n_heads=2",
    ...                  "text:It was the best of times, it was the worst of times.",
    ...                  top_k=3, n_permutations=100, progress=False)
    >>> result.summary["n_layers"], len(result.table) == result.summary["n_positions"]
    (3, True)
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from tqdm.auto import tqdm

from probes import plots
from probes.corpus import Window, check_window, iter_text, make_windows
from probes.errors import InvalidOptionError, RunFolderError
from probes.lens import SCREEN_MODES, LogitLens, lens_error_at_last_layer
from probes.models import LoadedModel, load_model
from probes.order_stats import order_statistics, settled_ranks, strict_tau, tau_over_first_m
from probes.residuals import (
    RESIDUAL_DIR,
    Batch,
    iter_batches,
    release_freed_memory,
    run_residuals,
    save_residual_shard,
)
from probes.runfolder import (
    FORMAT_VERSION,
    TOOL,
    check_output_target,
    read_json,
    require_run,
    staged_folder,
    staging_path,
    write_json,
    write_text,
)
from probes.saturation import saturation_layers

DEFAULT_WINDOW = 256
RESIDUAL_DTYPES = {"float32": torch.float32, "float16": torch.float16,
                   "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class AnalysisOptions:
    """Options of :func:`analyze` (every one is recorded in ``summary.json``).

    Attributes:
        text: Text source (see :mod:`probes.corpus`).
        max_tokens: Cap on the number of text tokens (None: the whole text).
        top_k: K, the number of final top tokens followed.
        window: Longest model input, BOS included (None: 256, or the model's context if
            shorter; an explicit value above the context is refused).
        batch_tokens: Bound on tokens per forward batch (memory).
        keep_fraction: The paper's filter keeps positions with ``s_1 <= floor(f * L)``.
        n_permutations: Shuffles in the permutation test.
        seed: Seed of the permutation test (the only randomness of an analysis).
        screen: Lens screening mode, ``auto``, ``bf16`` or ``none`` (results are exact
            either way; it only changes speed).
        save_residuals: Also store every layer's residual stream (for probes).
        residual_dtype: dtype of stored residuals.
        bos: ``"auto"`` prepends the tokenizer's BOS token to each window; ``"none"`` does not.
        lens_window: Id of the window drawn in the logit-lens heatmap.
        lens_positions: How many of its positions are drawn.
    """

    text: str = "shakespeare:hamlet"
    max_tokens: int | None = None
    top_k: int = 5
    window: int | None = None
    batch_tokens: int = 2048
    keep_fraction: float = 0.85
    n_permutations: int = 1000
    seed: int = 0
    screen: str = "auto"
    save_residuals: bool = False
    residual_dtype: str = "float32"
    bos: str = "auto"
    lens_window: int = 0
    lens_positions: int = 40

    def validate(self) -> None:
        """Refuse out-of-range options before anything expensive happens.

        Raises:
            InvalidOptionError: An option out of its range (``top_k < 1``, ``window < 2``,
                ``keep_fraction`` outside (0, 1], an unknown ``screen``, ``residual_dtype`` or
                ``bos``...).
        """
        if self.top_k < 1:
            raise InvalidOptionError(f"--top-k must be at least 1, got {self.top_k}")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise InvalidOptionError(f"--max-tokens must be positive, got {self.max_tokens}")
        if self.window is not None and self.window < 2:
            raise InvalidOptionError(f"--window must be at least 2, got {self.window}")
        if self.batch_tokens < 2:
            raise InvalidOptionError(f"--batch-tokens must be at least 2, got {self.batch_tokens}")
        if not 0 < self.keep_fraction <= 1:
            raise InvalidOptionError(
                f"--keep-fraction must be in (0, 1], got {self.keep_fraction}")
        if self.n_permutations < 0:
            raise InvalidOptionError(
                f"--permutations must be >= 0, got {self.n_permutations}")
        if self.screen not in SCREEN_MODES:
            raise InvalidOptionError(f"--screen must be one of {SCREEN_MODES}")
        if self.residual_dtype not in RESIDUAL_DTYPES:
            raise InvalidOptionError(
                f"--residual-dtype must be one of {', '.join(RESIDUAL_DTYPES)}")
        if self.bos not in ("auto", "none"):
            raise InvalidOptionError(f"--bos must be auto or none, got {self.bos!r}")
        if self.lens_window < 0 or self.lens_positions < 1:
            raise InvalidOptionError("--lens-window must be >= 0 and lens positions >= 1")


def keep_threshold(n_layers: int, keep_fraction: float) -> int:
    """The paper's filter: positions with ``s_1 <= floor(keep_fraction * L)`` are kept.

    Args:
        n_layers: L.
        keep_fraction: The fraction ``f`` in (0, 1].

    Returns:
        ``floor(keep_fraction * L)``, the largest 0-based ``s_1`` that is kept.
    """
    return math.floor(keep_fraction * n_layers + 1e-9)


def library_versions() -> dict[str, str]:
    """Versions of the libraries that determine the numbers.

    Returns:
        ``{"python": ..., distribution: version}``; ``"not installed"`` for a missing one.
    """
    out = {"python": platform.python_version()}
    for dist in ("topk-saturation", "torch", "transformer-lens", "transformers", "numpy",
                 "scipy", "scikit-learn", "pandas"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


# ---------------------------------------------------------------------------- result


@dataclass
class AnalysisResult:
    """What :func:`analyze` returns: the table, the summary, the figures.

    Attributes:
        table: One row per (window, position) (the columns of ``saturation.csv``).
        summary: The content of ``summary.json``.
        windows: The token windows analysed.
        lens_window: Rank of each target at every layer for the heatmap's window.
        null: Permuted mean taus per group (``"all"``, ``"kept"``).
        run_dir: The run folder written, if any.
    """

    table: pd.DataFrame
    summary: dict[str, Any]
    windows: list[Window]
    lens_window: pd.DataFrame
    null: dict[str, np.ndarray] = field(default_factory=dict)
    run_dir: Path | None = None

    @property
    def top_k(self) -> int:
        """K."""
        return int(self.summary["top_k"])

    @property
    def n_layers(self) -> int:
        """L."""
        return int(self.summary["n_layers"])

    def s(self, kept_only: bool = False) -> np.ndarray:
        """Saturation layers ``[n, K]`` (0-based), optionally of kept positions only.

        Args:
            kept_only: Only the rows whose ``kept`` column is True.

        Returns:
            An int array ``[n, K]`` in table order.
        """
        frame = self.table[self.table["kept"]] if kept_only else self.table
        return frame[[f"s_{k}" for k in range(1, self.top_k + 1)]].to_numpy()

    @cached_property
    def figures(self) -> dict[str, go.Figure]:
        """The report's figures by name."""
        s_all = self.s()
        tau = strict_tau(s_all, self.n_layers)
        shuffled = _one_shuffle_tau(s_all, self.n_layers, int(self.summary["options"]["seed"]))
        window_id = int(self.lens_window["window"].iloc[0]) if len(self.lens_window) else 0
        rows = self.table[self.table["window"] == window_id]
        figs = {
            "saturation_box": plots.saturation_box_figure(self.table, self.top_k, self.n_layers),
            "mean_s": plots.mean_s_figure(
                {g: self.summary[g] for g in ("all", "kept")}, self.n_layers),
            "tau": plots.tau_figure(tau, self.null.get("all", np.zeros(0)),
                                    self.summary["all"]["mean_tau"], shuffled),
        }
        if len(self.lens_window):
            figs["lens_heatmap"] = plots.lens_heatmap_figure(
                self.lens_window, rows["token"].tolist(), self.top_k,
                rows[["position"] + [f"s_{k}" for k in range(1, self.top_k + 1)]],
            )
        return figs

    def key_numbers(self) -> list[tuple[str, Any]]:
        """The headline numbers, as (label, value) rows.

        Returns:
            ``(label, value)`` pairs: model, text, L, positions, kept share, then per group
            (``all``, ``kept``) the mean ``s_k``, scored positions, mean tau, null mean tau,
            permutation p and share fully in order (``-`` where undefined).
        """
        s = self.summary
        out: list[tuple[str, Any]] = [
            ("model", f"{s['model']} ({s['model_info']['weights']})"),
            ("text", s["text"]),
            ("layers L", s["n_layers"]),
            ("positions", f"{s['n_positions']} in {s['n_windows']} windows"),
            (f"kept (s_1 <= {s['keep_threshold']})",
             f"{s['n_kept']} ({100 * s['kept_share']:.1f}%)"),
        ]
        for group in ("all", "kept"):
            g = s[group]
            mean_s = ", ".join("-" if v is None else f"{v:.1f}" for v in g["mean_s"])
            tau = "-" if g["mean_tau"] is None else f"{g['mean_tau']:.3f} ± {g['tau_se'] or 0:.3f}"
            p = "-" if g["p_value"] is None else f"{g['p_value']:.4g}"
            in_order = "-" if g["frac_in_order"] is None else f"{100 * g['frac_in_order']:.1f}%"
            null = "-" if g["null_mean_tau"] is None else f"{g['null_mean_tau']:.3f}"
            out += [(f"{group}: mean s_1..s_{self.top_k}", mean_s),
                    (f"{group}: scored positions (m >= 3)", g["n_scored"]),
                    (f"{group}: mean strict tau ± s.e.", tau),
                    (f"{group}: mean tau under shuffles (ties make it < 0)", null),
                    (f"{group}: permutation p ({g['n_permutations']} shuffles)", p),
                    (f"{group}: fully in order", in_order)]
        return out

    def report_html(self) -> str:
        """The self-contained HTML report.

        Returns:
            An HTML document with the key numbers and every figure (plotly.js inlined once).
        """
        figs = self.figures
        sections: list[tuple[str, Any]] = [("Key numbers", plots.summary_table_html(
            self.key_numbers()))]
        sections += [("Saturation layers per rank", figs["saturation_box"]),
                     ("Mean saturation layer per rank", figs["mean_s"]),
                     ("Order: strict Kendall tau", figs["tau"])]
        if "lens_heatmap" in figs:
            sections.append(("Logit lens of one window", figs["lens_heatmap"]))
        return plots.report_html(f"topk-saturation: {self.summary['model']}", sections)

    def save(self, out: str | Path) -> Path:
        """Write the run folder (atomically; an existing run folder is replaced).

        Args:
            out: The run folder to write.

        Returns:
            ``out`` as a :class:`~pathlib.Path` (also stored in :attr:`run_dir`).

        Raises:
            RunFolderError: ``out`` is not a writable folder, or holds something else than a run.
        """
        out = Path(out)
        check_output_target(out)
        with staged_folder(out) as stage:
            self._write_into(stage)
        self.run_dir = out
        return out

    def _write_into(self, stage: Path) -> None:
        write_text(stage / "saturation.csv", self.table.to_csv(index=False))
        write_json(stage / "windows.json", [w.to_dict() for w in self.windows])
        null_rows = [{"group": g, "mean_tau": float(v)} for g, arr in self.null.items()
                     for v in arr]
        write_text(stage / "permutation_null.csv",
                   pd.DataFrame(null_rows, columns=["group", "mean_tau"]).to_csv(index=False))
        write_text(stage / "lens_window.csv", self.lens_window.to_csv(index=False))
        write_text(stage / "report.html", self.report_html())
        write_json(stage / "summary.json", self.summary)

    @classmethod
    def load(cls, run_dir: str | Path) -> AnalysisResult:
        """Read a run folder back (no model needed).

        Args:
            run_dir: A run folder written by ``analyze`` or :meth:`save`.

        Returns:
            The :class:`AnalysisResult`, with :attr:`run_dir` set.

        Raises:
            RunFolderError: The folder is missing, not a run folder, or incomplete.
        """
        run_dir = Path(run_dir)
        summary = require_run(run_dir)
        table = pd.read_csv(run_dir / "saturation.csv", keep_default_na=False,
                            dtype={"token": str})
        table["kept"] = table["kept"].astype(str).str.lower().isin(["true", "1"])
        windows = [Window.from_dict(d) for d in read_json(run_dir / "windows.json")]
        lens_path = run_dir / "lens_window.csv"
        lens_window = pd.read_csv(lens_path) if lens_path.exists() else pd.DataFrame()
        null: dict[str, np.ndarray] = {}
        null_path = run_dir / "permutation_null.csv"
        if null_path.exists():
            frame = pd.read_csv(null_path)
            null = {g: f["mean_tau"].to_numpy() for g, f in frame.groupby("group")}
        return cls(table, summary, windows, lens_window, null, run_dir)

    def __repr__(self) -> str:
        s = self.summary
        return (f"AnalysisResult(model={s['model']!r}, n_layers={s['n_layers']}, "
                f"n_positions={s['n_positions']}, mean_tau={s['all']['mean_tau']}, "
                f"run_dir={str(self.run_dir) if self.run_dir else None!r})")


def _one_shuffle_tau(s: np.ndarray, n_layers: int, seed: int) -> np.ndarray:
    """Per-position taus after one seeded shuffle (the 'null' histogram of the report).

    As in the permutation test, each scored position's ``s_1..s_m`` is shuffled and tau is
    taken over the same m ranks.
    """
    rng = np.random.default_rng(seed + 1)
    m = settled_ranks(s, n_layers)
    out = s.copy()
    for row in np.nonzero(m >= 3)[0]:
        out[row, : m[row]] = rng.permutation(out[row, : m[row]])
    return tau_over_first_m(out, m)[m >= 3]


# ---------------------------------------------------------------------------- engine


class _Shards:
    """Per-batch results, kept in memory or streamed to a staging folder (for resuming)."""

    def __init__(self, stage: Path | None) -> None:
        self.stage = stage
        self.memory: dict[int, pd.DataFrame] = {}
        if stage is not None:
            (stage / "shards").mkdir(parents=True, exist_ok=True)

    def _path(self, index: int) -> Path:
        assert self.stage is not None
        return self.stage / "shards" / f"batch_{index:05d}.csv"

    def has(self, index: int) -> bool:
        if self.stage is None:
            return index in self.memory
        return self._path(index).exists()

    def load(self, index: int) -> pd.DataFrame:
        if self.stage is None:
            return self.memory[index]
        return pd.read_csv(self._path(index))

    def save(self, index: int, frame: pd.DataFrame) -> None:
        if self.stage is None:
            self.memory[index] = frame
        else:
            write_text(self._path(index), frame.to_csv(index=False))


def _fingerprint(model: LoadedModel, options: AnalysisOptions, windows: list[Window]) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(model.info.to_dict(), sort_keys=True).encode())
    digest.update(json.dumps(asdict(options), sort_keys=True).encode())
    for w in windows:
        digest.update(np.asarray(w.token_ids, dtype=np.int64).tobytes())
    return digest.hexdigest()


def _batch_rows(batch: Batch, s: torch.Tensor, targets: torch.Tensor) -> pd.DataFrame:
    window_ids, positions, token_ids, next_ids = [], [], [], []
    for window in batch.windows:
        n = len(window)
        window_ids += [window.window_id] * n
        positions += list(range(n))
        token_ids += list(window.token_ids)
        next_ids += window.gold_next()
    frame = pd.DataFrame({"window": window_ids, "position": positions, "token_id": token_ids,
                          "next_token_id": next_ids})
    k = targets.shape[1]
    t_np, s_np = targets.cpu().numpy(), s.cpu().numpy()
    for j in range(k):
        frame[f"target_{j + 1}"] = t_np[:, j]
    for j in range(k):
        frame[f"s_{j + 1}"] = s_np[:, j]
    return frame


def _lens_table(lens: LogitLens, resid: torch.Tensor, targets: torch.Tensor, window_id: int,
                n_positions: int) -> pd.DataFrame:
    """Exact rank of every target at every layer, for the first positions of one window."""
    n = min(n_positions, resid.shape[1])
    records = []
    for layer in range(resid.shape[0]):
        ranks = lens.ranks(resid[layer, :n], targets[:n]).numpy()
        for pos in range(n):
            for j in range(targets.shape[1]):
                records.append((window_id, layer, pos, j + 1, int(ranks[pos, j])))
    return pd.DataFrame(records, columns=["window", "layer", "position", "k", "rank"])


@dataclass
class BatchSaturation:
    """The engine's output for one batch (text positions only, flattened in batch order).

    Attributes:
        resid: Residual stream after every block ``[layer, n, d_model]``.
        targets: ``y_1..y_K`` ``[n, K]``: the exact top-K of the lens at the last layer,
            which is the model's output.
        s: Saturation layers ``[n, K]``.
        lens_check: Largest |lens(layer L-1) - model logits| over the logits the model
            returned (the last sequence position of every row).
        forward_s: Seconds in the forward pass.
        saturation_s: Seconds in the saturation engine (targets included).
    """

    resid: torch.Tensor
    targets: torch.Tensor
    s: torch.Tensor
    lens_check: float
    forward_s: float
    saturation_s: float


def saturation_batch(bridge: torch.nn.Module, lens: LogitLens, batch: Batch, top_k: int
                     ) -> BatchSaturation:
    """Run the model on one batch and find ``s_1..s_K`` of its text positions.

    The model is asked for its logits at the last sequence position only: the targets come
    from the lens at the last layer (the model's own head, exactly), whose exact top-K the
    lens computes without the full ``[tokens, d_vocab]`` logits; the logits the model does
    return check that identity on every batch.

    Args:
        bridge: The model's TransformerBridge.
        lens: Its logit lens.
        batch: A padded batch of windows (:func:`probes.residuals.iter_batches`).
        top_k: K.

    Returns:
        A :class:`BatchSaturation` over the batch's ``n`` text positions.
    """
    t0 = time.perf_counter()
    logits, resid = run_residuals(bridge, batch.tokens, last_logits_only=True)
    t1 = time.perf_counter()
    last = resid[-1][:, -logits.shape[1]:].reshape(-1, resid.shape[-1])
    check = lens_error_at_last_layer(lens, last, logits.reshape(-1, logits.shape[-1]))
    mask = batch.valid_mask().to(resid.device)
    flat_resid = resid[:, mask]
    del logits, resid
    _, targets = lens.topk(flat_resid[-1], top_k)
    s = saturation_layers(lens, flat_resid, targets)
    return BatchSaturation(flat_resid, targets.cpu(), s, check, t1 - t0,
                           time.perf_counter() - t1)


def _run_engine(
    model: LoadedModel, windows: list[Window], options: AnalysisOptions, shards: _Shards,
    bos: int | None, progress: bool,
) -> tuple[list[pd.DataFrame], pd.DataFrame | None, dict[str, Any]]:
    lens = LogitLens(model.bridge, screen=options.screen)
    batches = list(iter_batches(windows, bos, options.batch_tokens,
                                pad_token_id=int(model.tokenizer.pad_token_id or 0)))
    frames: list[pd.DataFrame] = []
    lens_frame = None
    timing = {"forward_s": 0.0, "saturation_s": 0.0}
    lens_check: float | None = None
    resumed = 0
    bar = tqdm(total=sum(b.n_positions for b in batches), unit="tok", desc="saturation",
               disable=not progress, leave=False)
    try:
        for index, batch in enumerate(batches):
            wants_lens = any(w.window_id == options.lens_window for w in batch.windows)
            lens_file = shards.stage / "lens_window.csv" if shards.stage else None
            if shards.has(index) and not (wants_lens and lens_file is not None
                                          and not lens_file.exists()):
                frames.append(shards.load(index))
                resumed += 1
                bar.update(batch.n_positions)
                continue
            done = saturation_batch(model.bridge, lens, batch, options.top_k)
            flat_resid, targets, s = done.resid, done.targets, done.s
            timing["forward_s"] += done.forward_s
            timing["saturation_s"] += done.saturation_s
            lens_check = max(lens_check or 0.0, done.lens_check)
            frame = _batch_rows(batch, s, targets)
            if wants_lens:
                row0 = next(i for i, w in enumerate(batch.windows)
                            if w.window_id == options.lens_window)
                start = sum(batch.lengths[:row0])
                stop = start + batch.lengths[row0]
                lens_frame = _lens_table(lens, flat_resid[:, start:stop], targets[start:stop],
                                         options.lens_window, options.lens_positions)
                if lens_file is not None:
                    write_text(lens_file, lens_frame.to_csv(index=False))
            if options.save_residuals and shards.stage is not None:
                folder = shards.stage / RESIDUAL_DIR
                folder.mkdir(exist_ok=True)
                save_residual_shard(folder / f"shard_{index:05d}.safetensors", flat_resid,
                                    frame["window"], frame["position"],
                                    RESIDUAL_DTYPES[options.residual_dtype])
            shards.save(index, frame)
            frames.append(frame)
            bar.update(batch.n_positions)
            del done, flat_resid
            release_freed_memory()
    finally:
        bar.close()
    if lens_frame is None and shards.stage is not None and (shards.stage / "lens_window.csv"
                                                            ).exists():
        lens_frame = pd.read_csv(shards.stage / "lens_window.csv")
    engine = {
        "screen": lens.screen,
        "rows_decoded": lens.stats["rows"],
        "rows_settled_by_screen": lens.stats["screened_exact"],
        "rows_recomputed_fp32": lens.stats["fallback_rows"],
        "batches": len(batches),
        "batches_resumed": resumed,
        "lens_check_max_abs_diff": lens_check,
    }
    return frames, lens_frame, {**timing, "engine": engine}


# ---------------------------------------------------------------------------- analyze


def analyze(
    model: LoadedModel | str = "smollm2-135m",
    text: str | Iterable[str] | None = None,
    *,
    out: str | Path | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    progress: bool = True,
    **options: Any,
) -> AnalysisResult:
    """Saturation layers of every position of a text, with their order statistics.

    Args:
        model: A :class:`~probes.models.LoadedModel` or a model spec (loaded here).
        text: A text source (default ``shakespeare:hamlet``) or literal documents.
        out: Run folder to write (None: keep the result in memory only).
        device: Where to load a model given by spec.
        dtype: dtype of a model given by spec.
        progress: Show a progress bar.
        **options: Fields of :class:`AnalysisOptions` (``max_tokens``, ``top_k``, ...), and
            for masked, vision and encoder-decoder models those of
            :class:`probes.arch_analysis.InputOptions` (``images``, ``mlm_positions``...).

    Returns:
        An :class:`AnalysisResult`.

    Raises:
        TopkSaturationError: Any bad input, with a one-line message.
    """
    from probes import arch_analysis

    options, inputs = arch_analysis.split_options(options)
    unknown = set(options) - set(AnalysisOptions.__dataclass_fields__)
    if unknown:
        raise InvalidOptionError(f"unknown analysis option(s): {', '.join(sorted(unknown))}")
    literal_docs: list[str] | None = None
    if text is None:
        text = AnalysisOptions.text
    if not isinstance(text, str):
        literal_docs = [str(t) for t in text]
        text = "<literal text>"
    opts = AnalysisOptions(text=text, **options)
    opts.validate()
    inputs.validate()
    if out is not None:
        check_output_target(Path(out))
    t_start = time.perf_counter()
    if isinstance(model, str):
        model = load_model(model, device=device, dtype=dtype)
    load_s = time.perf_counter() - t_start
    if arch_analysis.model_kind(model) != "causal":
        # Masked LMs, image classifiers and encoder-decoders: their own inputs and readouts.
        return arch_analysis.analyze_other(model, opts, inputs, literal_docs,
                                           None if out is None else Path(out), progress,
                                           t_start, load_s)
    info = model.info
    if opts.top_k > info.d_vocab:
        raise InvalidOptionError(
            f"--top-k {opts.top_k} is larger than the vocabulary ({info.d_vocab} tokens)")
    if opts.window is None:
        opts = replace(opts, window=min(DEFAULT_WINDOW, info.n_ctx))
    check_window(opts.window, info.n_ctx)
    bos = info.bos_token_id if opts.bos == "auto" else None
    docs = iter_text(literal_docs if literal_docs is not None else opts.text)
    windows = make_windows(docs, model.tokenize, window=opts.window, max_tokens=opts.max_tokens,
                           bos_token_id=bos)
    if opts.lens_window >= len(windows):
        opts = replace(opts, lens_window=0)

    t_engine = time.perf_counter()
    if out is None:
        frames, lens_frame, timing = _run_engine(model, windows, opts, _Shards(None), bos,
                                                 progress)
        result = _assemble(model, opts, windows, frames, lens_frame, timing, load_s,
                           t_start, t_engine, bos)
        return result
    out = Path(out)
    fingerprint = _fingerprint(model, opts, windows)
    stage = staging_path(out)
    resume = (stage / "fingerprint.txt").exists() and \
        (stage / "fingerprint.txt").read_text().strip() == fingerprint
    with staged_folder(out, keep_on_error=True, fresh=not resume) as stage_dir:
        write_text(stage_dir / "fingerprint.txt", fingerprint + "\n")
        frames, lens_frame, timing = _run_engine(model, windows, opts, _Shards(stage_dir), bos,
                                                 progress)
        result = _assemble(model, opts, windows, frames, lens_frame, timing, load_s,
                           t_start, t_engine, bos)
        result._write_into(stage_dir)
        # The per-batch shards only serve resuming; the finished folder holds the table.
        for shard in (stage_dir / "shards").glob("*.csv"):
            shard.unlink()
        (stage_dir / "shards").rmdir()
        (stage_dir / "fingerprint.txt").unlink()
    result.run_dir = out
    return result


def _assemble(
    model: LoadedModel, opts: AnalysisOptions, windows: list[Window], frames: list[pd.DataFrame],
    lens_frame: pd.DataFrame | None, timing: dict[str, Any], load_s: float, t_start: float,
    t_engine: float, bos: int | None,
) -> AnalysisResult:
    info = model.info
    table = pd.concat(frames, ignore_index=True)
    table = table.sort_values(["window", "position"], kind="stable").reset_index(drop=True)
    decoded = model.tokenizer.batch_decode([[int(t)] for t in table["token_id"]])
    table.insert(3, "token", decoded)
    threshold = keep_threshold(info.n_layers, opts.keep_fraction)
    table["kept"] = table["s_1"] <= threshold
    analysis_s = time.perf_counter() - t_engine
    t_stats = time.perf_counter()
    k = opts.top_k
    s_all = table[[f"s_{j}" for j in range(1, k + 1)]].to_numpy()
    kept = table["kept"].to_numpy()
    stats_all, null_all = order_statistics(s_all, info.n_layers, opts.n_permutations, opts.seed)
    stats_kept, null_kept = order_statistics(s_all[kept], info.n_layers, opts.n_permutations,
                                             opts.seed) if kept.any() else (
        _empty_group(k), np.zeros(0))
    engine = timing.pop("engine")
    summary: dict[str, Any] = {
        "tool": TOOL,
        "format_version": FORMAT_VERSION,
        "command": "analyze",
        "model": info.spec,
        "model_info": info.to_dict(),
        "text": opts.text,
        "n_layers": info.n_layers,
        "d_model": info.d_model,
        "d_vocab": info.d_vocab,
        "top_k": k,
        "n_windows": len(windows),
        "n_positions": len(table),
        "n_kept": int(kept.sum()),
        "kept_share": float(kept.mean()),
        "keep_threshold": threshold,
        "keep_rule": f"s_1 <= floor({opts.keep_fraction} * L) = {threshold}",
        "bos_token_id": bos,
        "bos_rule": ("the tokenizer's BOS token starts every window and is not scored"
                     if bos is not None else "no BOS token is prepended"),
        "layers": "0-based block outputs blocks.{l}.hook_resid_post, l = 0..L-1",
        "options": asdict(opts),
        "engine": engine,
        "all": stats_all,
        "kept": stats_kept,
    }
    stats_s = time.perf_counter() - t_stats
    summary["timings"] = {
        "load_s": round(load_s, 3),
        "forward_s": round(timing["forward_s"], 3),
        "saturation_s": round(timing["saturation_s"], 3),
        "analysis_s": round(analysis_s, 3),
        "stats_s": round(stats_s, 3),
        "total_s": round(time.perf_counter() - t_start, 3),
    }
    summary["versions"] = library_versions()
    lens_window = lens_frame if lens_frame is not None else pd.DataFrame(
        columns=["window", "layer", "position", "k", "rank"])
    return AnalysisResult(table, summary, windows, lens_window,
                          {"all": null_all, "kept": null_kept})


def _empty_group(k: int) -> dict[str, Any]:
    return {"n_positions": 0, "n_scored": 0, "mean_tau": None, "tau_se": None,
            "frac_concordant_pairs": None, "frac_in_order": None, "p_value": None,
            "n_permutations": 0, "null_mean_tau": None, "mean_s": [None] * k,
            "se_s": [None] * k, "m_counts": {}, "adjacent_tests": []}


def load_run(run_dir: str | Path) -> AnalysisResult:
    """Read a finished run folder (see :meth:`AnalysisResult.load`).

    Args:
        run_dir: A run folder.

    Returns:
        The :class:`AnalysisResult`.

    Raises:
        RunFolderError: The folder is missing, not a run folder, or incomplete.

    Example:
        >>> import tempfile
        >>> r = analyze("random:gpt2?n_layers=2&d_model=32&n_heads=2",
        ...             "text:It was the best of times.", top_k=2, n_permutations=0,
        ...             progress=False)
        >>> folder = r.save(Path(tempfile.mkdtemp()) / "run")
        >>> back = load_run(folder)
        >>> back.s().tolist() == r.s().tolist(), back.run_dir == folder
        (True, True)
    """
    return AnalysisResult.load(run_dir)


def check_same_model(summary: dict[str, Any], model: LoadedModel) -> None:
    """Refuse to combine a run with a different model.

    Args:
        summary: A run's ``summary.json``.
        model: The loaded model to combine it with.

    Raises:
        RunFolderError: The run's model spec or ``d_model`` differs from the model's.
    """
    if summary.get("model") != model.info.spec or \
            int(summary.get("d_model", -1)) != model.info.d_model:
        raise RunFolderError(
            f"the run was made with model {summary.get('model')!r} "
            f"(d_model {summary.get('d_model')}), not {model.info.spec!r} "
            f"(d_model {model.info.d_model})"
        )

