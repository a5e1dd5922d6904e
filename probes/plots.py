"""Plotly figures of the analyses, and self-contained HTML reports that hold them.

One function per figure; each takes plain tables or summaries (so a figure can be redrawn
from a run folder without the model) and returns a ``plotly.graph_objects.Figure``.

Example:
    >>> fig = mean_s_figure({"all": {"mean_s": [20, 27], "se_s": [0.5, 0.3]}}, n_layers=30)
    >>> fig.layout.xaxis.title.text
    'rank k'
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

GROUP_COLORS = {"all": "#636EFA", "kept": "#EF553B"}


def saturation_box_figure(table: pd.DataFrame, top_k: int, n_layers: int) -> go.Figure:
    """Distribution of ``s_k`` per rank, for all positions and for kept ones.

    Args:
        table: The ``saturation.csv`` table (columns ``s_1..s_K`` and ``kept``).
        top_k: K.
        n_layers: L (the y range is ``0..L-1``).

    Returns:
        A box plot of ``s_k`` against ``k``, one box group per ``all`` / ``kept`` (a group
        with no rows is left out).
    """
    fig = go.Figure()
    for group, frame in (("all", table), ("kept", table[table["kept"]])):
        if frame.empty:
            continue
        values = np.concatenate([frame[f"s_{k}"].to_numpy() for k in range(1, top_k + 1)])
        ranks = np.repeat(np.arange(1, top_k + 1), len(frame))
        fig.add_trace(go.Box(x=ranks, y=values, name=f"{group} (n={len(frame)})",
                             marker_color=GROUP_COLORS[group], boxmean=True))
    fig.update_layout(
        title="Saturation layer s_k per rank", boxmode="group",
        xaxis_title="rank k", yaxis_title="saturation layer s_k (0-based)",
        yaxis_range=[-0.5, n_layers - 0.5], template="plotly_white",
    )
    return fig


def mean_s_figure(groups: dict[str, dict[str, Any]], n_layers: int) -> go.Figure:
    """Mean ``s_k`` with standard-error bars against rank k, one line per group.

    Args:
        groups: ``{group: stats}`` where ``stats`` has ``mean_s`` and ``se_s`` lists (as in
            ``summary.json``'s ``all`` and ``kept``); groups with no mean are left out.
        n_layers: L (a dotted line marks the output layer ``L-1``).

    Returns:
        A line plot of mean ``s_k`` against ``k`` with standard-error bars.
    """
    fig = go.Figure()
    for group, stats in groups.items():
        mean = stats.get("mean_s") or []
        if not mean or all(v is None for v in mean):
            continue
        se = [v or 0.0 for v in (stats.get("se_s") or [0.0] * len(mean))]
        fig.add_trace(go.Scatter(
            x=list(range(1, len(mean) + 1)), y=mean, mode="lines+markers", name=group,
            error_y={"type": "data", "array": se, "visible": True},
            marker_color=GROUP_COLORS.get(group),
        ))
    fig.add_hline(y=n_layers - 1, line_dash="dot", annotation_text="output layer L-1")
    fig.update_layout(title="Mean saturation layer by rank (± s.e.)", xaxis_title="rank k",
                      yaxis_title="mean s_k", template="plotly_white", xaxis_dtick=1)
    return fig


def tau_figure(tau: np.ndarray, null: np.ndarray, observed: float | None,
               null_tau: np.ndarray | None = None) -> go.Figure:
    """Per-position strict tau (left) and the permutation null of the mean tau (right).

    Args:
        tau: Per-position strict taus (NaN entries are dropped).
        null: Permuted mean taus of the permutation test (may be empty).
        observed: The observed mean tau, marked in red (None: no marker).
        null_tau: Per-position taus after one shuffle, overlaid on the left (optional).

    Returns:
        A two-panel figure of histograms.
    """
    fig = make_subplots(rows=1, cols=2, subplot_titles=(
        "strict Kendall tau per position", "mean tau: permutation null vs observed"))
    tau = tau[~np.isnan(tau)]
    fig.add_trace(go.Histogram(x=tau, name="observed", histnorm="probability",
                               marker_color=GROUP_COLORS["all"], xbins={"size": 0.1}),
                  row=1, col=1)
    if null_tau is not None and len(null_tau):
        fig.add_trace(go.Histogram(x=null_tau, name="shuffled", histnorm="probability",
                                   marker_color="#AAAAAA", opacity=0.6, xbins={"size": 0.1}),
                      row=1, col=1)
    if len(null):
        fig.add_trace(go.Histogram(x=null, name="null mean tau", marker_color="#AAAAAA",
                                   nbinsx=40), row=1, col=2)
    if observed is not None:
        fig.add_vline(x=observed, line_color="red", annotation_text=f"observed {observed:.3f}",
                      row=1, col=2)
    fig.update_layout(barmode="overlay", template="plotly_white",
                      title="Are top-K tokens settled in order?")
    fig.update_xaxes(title_text="tau", row=1, col=1)
    fig.update_xaxes(title_text="mean tau", row=1, col=2)
    return fig


def lens_heatmap_figure(lens_window: pd.DataFrame, tokens: Sequence[str], top_k: int,
                        saturation: pd.DataFrame | None = None) -> go.Figure:
    """Rank of each target ``y_k`` across layers for the positions of one window.

    Args:
        lens_window: Rows ``(layer, position, k, rank)`` for one window.
        tokens: The input token text at each position.
        top_k: K (one dropdown entry per rank).
        saturation: Optional rows ``(position, s_1..s_K)`` marking each ``s_k``.

    Returns:
        A heatmap of ``log10(rank)`` (layers by positions) per rank, with a dropdown to
        switch between ``y_1..y_K``.
    """
    fig = go.Figure()
    positions = sorted(lens_window["position"].unique())
    layers = sorted(lens_window["layer"].unique())
    labels = [f"{p}:{tokens[p]!r}"[:18] for p in positions]
    for k in range(1, top_k + 1):
        frame = lens_window[lens_window["k"] == k]
        grid = frame.pivot(index="layer", columns="position", values="rank").reindex(
            index=layers, columns=positions)
        fig.add_trace(go.Heatmap(
            z=np.log10(grid.to_numpy(dtype=float)), x=labels, y=layers,
            text=grid.to_numpy(), texttemplate="%{text}", textfont={"size": 8},
            colorscale="Viridis_r", zmin=0, zmax=4, visible=(k == 1),
            colorbar={"title": "rank", "tickvals": [0, 1, 2, 3, 4],
                      "ticktext": ["1", "10", "100", "1k", "10k"]},
            hovertemplate="layer %{y}<br>%{x}<br>rank %{text}<extra></extra>",
            name=f"rank of y_{k}",
        ))
        if saturation is not None:
            sat = saturation.set_index("position").reindex(positions)
            fig.add_trace(go.Scatter(
                x=labels, y=sat[f"s_{k}"], mode="markers", visible=(k == 1),
                marker={"symbol": "line-ew-open", "size": 14, "color": "red",
                        "line": {"width": 3}},
                name=f"s_{k}", hovertemplate="s_" + str(k) + " = %{y}<extra></extra>",
            ))
    per_k = 2 if saturation is not None else 1
    buttons = []
    for k in range(1, top_k + 1):
        visible = [False] * (top_k * per_k)
        for j in range(per_k):
            visible[(k - 1) * per_k + j] = True
        buttons.append({"label": f"y_{k}", "method": "update",
                        "args": [{"visible": visible},
                                 {"title": f"Logit lens: rank of target y_{k} by layer"}]})
    fig.update_layout(
        title="Logit lens: rank of target y_1 by layer", template="plotly_white",
        xaxis_title="position: input token", yaxis_title="layer",
        updatemenus=[{"buttons": buttons, "x": 1.0, "y": 1.15, "xanchor": "right"}],
        height=650,
    )
    return fig


def summary_table_html(rows: Sequence[tuple[str, Any]]) -> str:
    """A two-column HTML table of key numbers.

    Args:
        rows: ``(label, value)`` pairs; both are HTML-escaped.

    Returns:
        A ``<table class='kv'>`` snippet.
    """
    body = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows
    )
    return f"<table class='kv'>{body}</table>"


def report_html(title: str, sections: Sequence[tuple[str, str | go.Figure]]) -> str:
    """One self-contained HTML page: headings, text blocks and figures (plotly.js inline once).

    Args:
        title: Page title.
        sections: ``(heading, content)`` pairs; content is a figure or an HTML snippet.

    Returns:
        The HTML document as a string.
    """
    parts = []
    first = True
    for heading, content in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        if isinstance(content, go.Figure):
            parts.append(content.to_html(full_html=False, include_plotlyjs=first,
                                         config={"responsive": True}))
            first = False
        else:
            parts.append(content)
    style = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;"
             "padding:0 1em;color:#222} table.kv th{text-align:left;padding-right:1.5em;"
             "font-weight:600} table.kv td,table.kv th{border-bottom:1px solid #eee;"
             "padding:2px 6px} h2{margin-top:2em}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
            + "\n".join(parts) + "</body></html>")


# ---------------------------------------------------------------------------- task probes

PROBE_COLORS = {"probe": "#636EFA", "layer_only": "#EF553B", "shuffled": "#AAAAAA",
                "random_embeddings": "#00CC96", "leaky_kfold": "#AB63FA",
                "per_layer_probes": "#FFA15A"}
PROBE_NAMES = {"probe": "probe (grouped CV)", "layer_only": "layer index only",
               "shuffled": "shuffled labels", "random_embeddings": "random embeddings",
               "leaky_kfold": "probe, leaky KFold", "per_layer_probes": "per-layer probes"}


def probe_scores_figure(metrics: dict[str, Any]) -> go.Figure:
    """Balanced accuracy (± s.e. over folds) of the probe and each control, with chance.

    Args:
        metrics: A probe's ``metrics.json``: ``balanced_accuracy``,
            ``balanced_accuracy_se``, ``chance`` and ``controls`` (name -> the same keys).

    Returns:
        A bar chart with a dotted line at chance.

    Example:
        >>> m = {"balanced_accuracy": 0.6, "balanced_accuracy_se": 0.02, "chance": 0.2,
        ...      "controls": {"layer_only": {"balanced_accuracy": 0.5,
        ...                                  "balanced_accuracy_se": 0.01}}}
        >>> len(probe_scores_figure(m).data[0].x)
        2
    """
    names = ["probe", *metrics["controls"]]
    rows = [metrics, *metrics["controls"].values()]
    fig = go.Figure(go.Bar(
        x=[PROBE_NAMES.get(n, n) for n in names],
        y=[r["balanced_accuracy"] for r in rows],
        error_y={"type": "data", "array": [r.get("balanced_accuracy_se") or 0 for r in rows]},
        marker_color=[PROBE_COLORS.get(n, "#888") for n in names],
        text=[f"{r['balanced_accuracy']:.3f}" if r["balanced_accuracy"] is not None else "-"
              for r in rows], textposition="outside",
    ))
    fig.add_hline(y=metrics["chance"], line_dash="dot", annotation_text="chance 1/K")
    fig.update_layout(title="Balanced accuracy (mean ± s.e. over folds)",
                      yaxis_title="balanced accuracy", yaxis_range=[0, 1.05],
                      template="plotly_white")
    return fig


def probe_layer_accuracy_figure(metrics: dict[str, Any], balanced: bool = False) -> go.Figure:
    """Out-of-fold accuracy among the states of each layer: the probe, and the controls as
    lines (and the per-layer probes where they were trained). ``balanced=True`` draws the
    balanced accuracy over the tasks present at each layer instead.

    Args:
        metrics: A probe's ``metrics.json`` with ``per_layer_accuracy`` (or
            ``per_layer_balanced_accuracy``) keyed by layer strings, ``controls`` and,
            optionally, ``per_layer_probes``.
        balanced: Draw balanced accuracy instead of accuracy.

    Returns:
        A line plot of accuracy against the 0-based layer, one line per series.

    Example:
        >>> m = {"per_layer_accuracy": {"5": 0.9, "6": 0.8},
        ...      "controls": {"layer_only": {"per_layer_accuracy": {"5": 0.9, "6": 0.7}}}}
        >>> [t.name for t in probe_layer_accuracy_figure(m).data]
        ['probe (grouped CV)', 'layer index only']
    """
    fig = go.Figure()
    key = "per_layer_balanced_accuracy" if balanced else "per_layer_accuracy"
    series = {"probe": metrics.get(key) or {}}
    series.update({name: c[key] for name, c in metrics["controls"].items() if c.get(key)})
    per_layer = metrics.get("per_layer_probes") or {}
    if per_layer:
        series["per_layer_probes"] = {
            k: v.get("balanced_accuracy" if balanced else "accuracy")
            for k, v in per_layer.items()}
    for name, values in series.items():
        layers = sorted(values, key=int)
        fig.add_trace(go.Scatter(
            x=[int(v) for v in layers], y=[values[v] for v in layers], mode="lines+markers",
            name=PROBE_NAMES.get(name, name),
            line={"color": PROBE_COLORS.get(name), "width": 3 if name == "probe" else 1.5,
                  "dash": "dot" if name in ("shuffled", "leaky_kfold") else "solid"},
        ))
    what = "Balanced accuracy" if balanced else "Accuracy"
    fig.update_layout(title=f"{what} per layer (out of fold)", xaxis_title="layer (0-based)",
                      yaxis_title=f"{what.lower()} among the states of the layer",
                      yaxis_range=[0, 1.02], template="plotly_white")
    return fig


def probe_confusion_figure(confusion: dict[str, Any]) -> go.Figure:
    """Confusion matrix heatmap: rows are true tasks, columns predicted ones; colour is the
    share of the true task's states, the text their count.

    Args:
        confusion: ``{"labels": [task, ...], "counts": [[...], ...]}`` with rows the true
            tasks and columns the predicted ones.

    Returns:
        A heatmap of row shares annotated with counts.

    Example:
        >>> fig = probe_confusion_figure({"labels": [1, 2], "counts": [[8, 2], [1, 9]]})
        >>> fig.data[0].z.tolist()
        [[0.8, 0.2], [0.1, 0.9]]
    """
    counts = np.asarray(confusion["counts"], dtype=float)
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    labels = [f"task {t}" for t in confusion["labels"]]
    fig = go.Figure(go.Heatmap(
        z=shares, x=labels, y=labels, text=counts.astype(int), texttemplate="%{text}",
        colorscale="Blues", zmin=0, zmax=1, colorbar={"title": "share of row"},
        hovertemplate="true %{y}<br>predicted %{x}<br>%{text} states<extra></extra>",
    ))
    fig.update_layout(title="Confusion matrix (rows: true task)", xaxis_title="predicted",
                      yaxis_title="true", yaxis_autorange="reversed", template="plotly_white")
    return fig
