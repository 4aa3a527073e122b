"""Attention sinks: attention received per layer and token, per head, full maps, sink rate by segment."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from sinkscope.analysis import sink_rate_by_segment
from sinkscope.arguments import index_into
from sinkscope.metrics import SINK_EPS
from sinkscope.segments import segment_color
from sinkscope.viz.axes import (
    add_segment_bands,
    checked_max_tokens,
    esc,
    layer_axis,
    layer_token_heatmap,
    layer_xaxis,
    pool_tokens,
    token_bins,
    token_labels,
    token_window,
)


def received_attention_heatmap(sample, head: int | None = None, max_tokens: int = 256,
                               token_range: tuple[int, int] | None = None) -> go.Figure:
    """Layer x token heatmap of attention received (alpha), averaged over heads or for one head."""
    alpha = np.asarray(sample.attention_received)
    if head is not None:
        head = index_into(head, alpha.shape[1], "head", "heads")
    values = alpha.mean(axis=1) if head is None else alpha[:, head]
    which = "mean over heads" if head is None else f"head {head}"
    return layer_token_heatmap(values, sample, f"Attention received, {which}", "alpha", max_tokens, token_range)

def head_grid(sample, token: int = 0, eps: float | None = SINK_EPS) -> go.Figure:
    """Layer x head grid of the attention each head gives to one token (alpha of that token)."""
    token = index_into(token, len(sample.tokens), "token", "tokens")
    alpha = np.asarray(sample.attention_received)[:, :, token]  # [L, H]
    fig = go.Figure(go.Heatmap(z=alpha, x=np.arange(alpha.shape[1]), y=np.arange(alpha.shape[0]),
                               colorscale="Viridis", zmin=0, zmax=1, colorbar={"title": "alpha"},
                               hovertemplate="layer %{y}, head %{x}<br>alpha %{z:.3f}<extra></extra>"))
    title = f"Attention received by token {token}"
    subtitle = esc(repr(sample.tokens[token]))
    if eps is not None:
        subtitle += f": {100 * float((alpha > eps).mean()):.0f}% of heads above eps={eps}"
    fig.update_layout(title=f"{title}<br><sup>{subtitle}</sup>", xaxis_title="head", yaxis_title="layer",
                      height=420)
    layer_axis(fig, alpha.shape[0])
    fig.update_xaxes(tickmode="linear", dtick=1)
    return fig

def attention_map(sample, layer: int, head: int, max_tokens: int = 256,
                  token_range: tuple[int, int] | None = None) -> go.Figure:
    """A full attention map (query x key), where the trace holds it; max-pooled on both axes when long."""
    maps = sample.attention_maps
    if (layer, head) not in maps:
        raise KeyError(f"the trace holds no attention map for layer {layer}, head {head}; "
                       f"it has {sorted(maps)}")
    max_tokens = checked_max_tokens(max_tokens)
    start, end, tokens, segments = token_window(sample, token_range)
    a = np.asarray(maps[(layer, head)])[start:end, start:end]
    starts = token_bins(end - start, max_tokens)
    z = pool_tokens(pool_tokens(a, starts, axis=1), starts, axis=0)
    labels = token_labels(tokens, segments, starts)
    fig = go.Figure(go.Heatmap(
        z=z, colorscale="Viridis", colorbar={"title": "attention"},
        customdata=np.array([[f"q {q}<br>k {k}" for k in labels] for q in labels], dtype=object),
        hovertemplate="%{customdata}<br>%{z:.3f}<extra></extra>",
    ))
    add_segment_bands(fig, segments, starts, axis="x")
    add_segment_bands(fig, segments, starts, axis="y", label=False)
    fig.update_layout(title=f"Attention map, layer {layer}, head {head}", xaxis_title="key", yaxis_title="query",
                      yaxis_autorange="reversed", height=520)
    return fig

def sink_rate_by_segment_figure(sample, eps: float = SINK_EPS) -> go.Figure:
    """Per layer, the share of (head, token) pairs of each segment with alpha > eps."""
    table = sink_rate_by_segment(sample.attention_received, sample.segments, eps)
    fig = go.Figure()
    for seg in table.columns:
        fig.add_trace(go.Scatter(x=table.index, y=table[seg], mode="lines+markers", name=seg,
                                 line={"color": segment_color(seg)}))
    fig.update_layout(title=f"Sink rate by segment (alpha > {eps})", xaxis_title="layer",
                      yaxis_title="% of heads x tokens", yaxis_range=[-2, 102], height=360)
    layer_xaxis(fig, len(table))
    return fig
