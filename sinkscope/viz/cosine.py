"""Cosine to BOS: per segment over layers, and per layer and token."""

from __future__ import annotations

import plotly.graph_objects as go

from sinkscope.metrics import SINK_EPS, cosine_by_segment
from sinkscope.segments import segment_color
from sinkscope.viz.attention import sink_rate_by_segment_figure
from sinkscope.viz.axes import layer_token_heatmap, layer_xaxis
from sinkscope.viz.grid import panel_grid


def cosine_by_segment_figure(sample) -> go.Figure:
    """Mean cos-to-BOS of each segment over layers."""
    table = cosine_by_segment(sample.bos_cosine, sample.segments)
    fig = go.Figure()
    for seg in table.columns:
        if seg == "bos":
            continue
        fig.add_trace(go.Scatter(x=table.index, y=table[seg], mode="lines+markers", name=seg,
                                 line={"color": segment_color(seg)}))
    fig.update_layout(title="Mean cosine to BOS by segment", xaxis_title="layer", yaxis_title="cos(h_0, h_t)",
                      yaxis_range=[-1.05, 1.05], height=360)
    layer_xaxis(fig, len(table))
    return fig

def cosine_heatmap(sample, max_tokens: int = 256, token_range: tuple[int, int] | None = None) -> go.Figure:
    """Layer x token heatmap of cos-to-BOS (max-pooled along tokens when long)."""
    return layer_token_heatmap(sample.bos_cosine, sample, "Cosine to BOS", "cos", max_tokens, token_range,
                                colorscale="RdBu_r", zmid=0)


def segment_profile_figure(sample, eps: float = SINK_EPS) -> go.Figure:
    """The two per-segment curves over layers in one figure with one legend: the sink rate (alpha > eps, as
    `sink_rate_by_segment_figure`) on the left and the mean cosine to BOS (as `cosine_by_segment_figure`) on the
    right. One figure rather than two: each costs a 2-core machine's browser about 0.3 s to draw."""
    return panel_grid([[sink_rate_by_segment_figure(sample, eps), cosine_by_segment_figure(sample)]],
                      "Per segment over layers (click a legend entry to hide it in both panels)")
