"""Plotly figures of the interventions.

Example:
    >>> import pandas as pd
    >>> s = pd.DataFrame({"kind": ["direction", "random"], "alpha": [0.5, 0.5], "n": [10, 100],
    ...                   "rate": [0.4, 0.05], "ci_low": [0.2, 0.02], "ci_high": [0.6, 0.08]})
    >>> len(dose_response_figure(s, layer=3, k=1).data) >= 2
    True
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

_STYLE = {
    "direction": ("task direction", "#EF553B"),
    "reversed": ("reversed direction", "#AB63FA"),
    "random": ("random directions (same norm)", "#7F7F7F"),
    "pair": ("early -> late patch", "#EF553B"),
    "control": ("random unrelated source", "#7F7F7F"),
}


def _band(frame: pd.DataFrame, x: str, name: str, color: str) -> list[go.Scatter]:
    frame = frame.sort_values(x)
    upper = go.Scatter(x=frame[x], y=frame["ci_high"], mode="lines", line={"width": 0},
                       showlegend=False, hoverinfo="skip")
    lower = go.Scatter(x=frame[x], y=frame["ci_low"], mode="lines", line={"width": 0},
                       fill="tonexty", fillcolor=_rgba(color, 0.2), showlegend=False,
                       hoverinfo="skip")
    line = go.Scatter(x=frame[x], y=frame["rate"], mode="lines+markers", name=name,
                      line={"color": color}, customdata=frame[["n"]],
                      hovertemplate="%{x}: %{y:.3f} (n=%{customdata[0]})<extra>" + name
                      + "</extra>")
    return [upper, lower, line]


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    r, g, b = (int(h[i: i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def dose_response_figure(summary: pd.DataFrame, layer: int, k: int) -> go.Figure:
    """Switch rate against alpha for the direction and its controls (95% bootstrap bands).

    Args:
        summary: The sweep's per-(kind, alpha) table (``kind``, ``alpha``, ``n``, ``rate``,
            ``ci_low``, ``ci_high``).
        layer: The steered layer (0-based), for the title.
        k: The task steered from (1-based), for the title.

    Returns:
        A plotly figure, one line with its band per kind present.
    """
    fig = go.Figure()
    for kind in ("random", "reversed", "direction"):
        frame = summary[summary["kind"] == kind]
        if frame.empty:
            continue
        name, color = _STYLE[kind]
        for trace in _band(frame, "alpha", name, color):
            fig.add_trace(trace)
    target = "the second choice becomes the top" if k == 1 else \
        f"the former rank-{k + 1} token becomes rank {k}"
    fig.update_layout(
        title=f"Steering at layer {layer}, task {k} -> {k + 1}: share where {target}",
        xaxis_title="alpha (multiples of the typical residual norm at the layer)",
        yaxis_title="switch rate", template="plotly_white", yaxis_rangemode="tozero",
    )
    return fig


def top1_rank_figure(summary: pd.DataFrame, layer: int) -> go.Figure:
    """Mean new rank of the former top token against alpha.

    Args:
        summary: The sweep's per-(kind, alpha) table with ``mean_top1_rank``.
        layer: The steered layer (0-based), for the title.

    Returns:
        A plotly figure with a log-scale y axis, one line per kind present.
    """
    fig = go.Figure()
    for kind in ("random", "reversed", "direction"):
        frame = summary[summary["kind"] == kind].sort_values("alpha")
        if frame.empty or "mean_top1_rank" not in frame:
            continue
        name, color = _STYLE[kind]
        fig.add_trace(go.Scatter(x=frame["alpha"], y=frame["mean_top1_rank"], name=name,
                                 mode="lines+markers", line={"color": color}))
    fig.update_layout(title=f"How far the former top token falls (layer {layer})",
                      xaxis_title="alpha", yaxis_title="mean rank of the former top-1",
                      yaxis_type="log", template="plotly_white")
    return fig


def patch_figure(summary: pd.DataFrame) -> go.Figure:
    """Patch success against l - s_e, with the random-source control.

    Args:
        summary: The experiment's per-(kind, offset) table (``kind`` is ``pair`` or
            ``control``; ``offset``, ``n``, ``rate``, ``ci_low``, ``ci_high``).

    Returns:
        A plotly figure with 95% bootstrap bands and a dotted line at ``l = s_e``.
    """
    fig = go.Figure()
    for kind in ("control", "pair"):
        frame = summary[summary["kind"] == kind]
        if frame.empty:
            continue
        name, color = _STYLE[kind]
        for trace in _band(frame, "offset", name, color):
            fig.add_trace(trace)
    fig.add_vline(x=0, line_dash="dot", annotation_text="l = s_e")
    fig.update_layout(
        title="Patching the early position's state into the late one: success "
              "(new s_1 = l, top-1 kept)",
        xaxis_title="l - s_e (patched layer relative to the early position's s_1)",
        yaxis_title="success share", template="plotly_white", yaxis_rangemode="tozero",
        xaxis_dtick=1,
    )
    return fig
