"""Whole-trace views: where sinks sit, which features are massive, cos-to-BOS by segment over all samples."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from sinkscope.segments import segment_color


def sink_positions_figure(sinks: pd.DataFrame) -> go.Figure:
    """Where sinks live: relative position of every sink token, coloured by segment."""
    fig = go.Figure()
    for seg, group in sinks.groupby("segment"):
        fig.add_trace(go.Histogram(x=group["relative_position"], name=seg or "(none)", nbinsx=40,
                                   marker_color=segment_color(seg)))
    fig.update_layout(barmode="stack", title="Sink tokens by relative position and segment",
                      xaxis_title="position / (T - 1)", yaxis_title="sink tokens", height=360)
    return fig

def massive_feature_histogram(features: pd.DataFrame, selected: int | None = None) -> go.Figure:
    """How many samples show each massive feature index; `selected` in red (in the app, a click selects one)."""
    colours = ["#d62728" if int(f) == selected else "#1f77b4" for f in features["feature"]]
    fig = go.Figure(go.Bar(x=[f"f{int(f)}" for f in features["feature"]], y=features["samples"],
                           customdata=features["max_abs"], marker_color=colours,
                           hovertemplate="feature %{x}<br>%{y} samples<br>max |h| %{customdata:.0f}<extra></extra>"))
    fig.update_layout(title="Massive feature indices over the trace", xaxis_title="feature",
                      yaxis_title="samples", xaxis_type="category", height=360)
    return fig

def cosine_distribution_figure(cos: pd.DataFrame, layer: int) -> go.Figure:
    """Distribution of cos-to-BOS per segment at one layer, over all samples."""
    fig = go.Figure()
    for seg, group in cos.groupby("segment"):
        fig.add_trace(go.Violin(y=group["cos"], name=seg or "(none)", line_color=segment_color(seg),
                                box_visible=True, meanline_visible=True, points=False))
    fig.update_layout(title=f"cos-to-BOS at layer {layer}, all samples", yaxis_title="cos", yaxis_range=[-1, 1],
                      height=380)
    return fig
