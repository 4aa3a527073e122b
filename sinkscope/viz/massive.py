"""Massive activations: top |h| per layer, the ranked top-k features across layers, one feature's trajectory
across layers, tokens x features, feature-set Jaccard and the attention/MLP origin of each massive entry."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from sinkscope.analysis import feature_values, ranked_features, top_activations
from sinkscope.arguments import index_into
from sinkscope.viz.axes import (
    add_segment_bands,
    checked_max_tokens,
    esc,
    label_token_axis,
    layer_axis,
    layer_xaxis,
    log_axis,
    pool_tokens,
    token_bins,
    token_labels,
)


def top_activations_figure(sample) -> go.Figure:
    """Top-1/2/3 |activation| and the median per layer, log scale (as in Sun et al., 2024)."""
    table = top_activations(sample)
    fig = go.Figure()
    for col, dash in zip(table.columns, ["solid", "dash", "dot", "solid"], strict=False):
        fig.add_trace(go.Scatter(x=table.index, y=table[col], mode="lines+markers", name=col,
                                 line={"dash": dash, "color": "#7f7f7f" if col == "median" else None}))
    fig.update_layout(title="Largest |activations| vs the median", xaxis_title="layer", yaxis_title="|h|",
                      height=360)
    log_axis(fig, table.to_numpy())
    layer_xaxis(fig, len(table))
    return fig

def top_features_figure(sample, k: int = 16, mlp: bool = False, selected: int | None = None) -> go.Figure:
    """The `k` features with the largest |h| (or |mlp_out|), ranked left to right: their peak over layers and
    tokens as bars (log scale; in the app a click on a bar selects the feature), and a layer x feature heatmap
    below with labelled columns and log colour, so the massive features stand out however wide the model is.
    `selected` is outlined. `data[0]` is the heatmap, `data[1]` the bars."""
    from plotly.subplots import make_subplots

    features = ranked_features(sample, k, mlp)
    values = np.asarray(sample.mlp_feature_max_abs if mlp else sample.feature_max_abs)[:, features]  # [L, k]
    name = "|mlp_out|" if mlp else "|h|"
    labels = [f"f{f}" for f in features]
    peak = values.max(axis=0)
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.28, 0.72], vertical_spacing=0.04)
    fig.add_trace(go.Heatmap(
        z=np.log10(np.maximum(values, 1e-6)), x=labels, y=np.arange(values.shape[0]), colorscale="Magma",
        customdata=values, colorbar={"title": f"log10 max {name}", "len": 0.72, "y": 0.36},
        hovertemplate="layer %{y}, feature %{x}<br>max " + name + " over tokens %{customdata:.4g}<extra></extra>",
    ), row=2, col=1)
    colours = ["#d62728" if f == selected else "#7f7f7f" for f in features]
    fig.add_trace(go.Bar(x=labels, y=peak, marker_color=colours, showlegend=False,
                         hovertemplate="feature %{x}: peak " + name + " %{y:.4g}<br>click to select<extra></extra>"),
                  row=1, col=1)
    if selected is not None and int(selected) in {int(f) for f in features}:
        i = [int(f) for f in features].index(int(selected))
        fig.add_shape(type="rect", x0=i - 0.5, x1=i + 0.5, y0=-0.5, y1=values.shape[0] - 0.5, row=2, col=1,
                      line={"color": "#d62728", "width": 2})
    fig.update_layout(title=f"The {len(features)} features with the largest {name} (ranked; max over tokens)",
                      height=520, clickmode="event+select")
    fig.update_xaxes(type="category", row=1, col=1)
    fig.update_xaxes(type="category", title_text="feature (largest first; click a bar to select it)", row=2, col=1)
    fig.update_yaxes(title_text=f"peak {name}", row=1, col=1)
    log_axis(fig, peak, row=1, col=1)
    fig.update_yaxes(title_text="layer", row=2, col=1)
    layer_axis(fig, values.shape[0], row=2, col=1)
    return fig


def feature_trajectory_figure(sample, feature: int, tokens: Sequence[int], mlp: bool = False) -> go.Figure:
    """|h[feature]| across layers for chosen tokens, log scale (Sun et al., 2024, Fig. 1). Gaps: layers where the
    feature was not among the token's recorded top-k (its value is then below the token's k-th largest)."""
    tokens = [index_into(t, len(sample.tokens), "tokens", "tokens") for t in tokens]
    values = feature_values(sample, [feature], mlp)[:, :, 0]  # [L, T]
    fig = go.Figure()
    for t in tokens:
        fig.add_trace(go.Scatter(x=np.arange(values.shape[0]), y=values[:, t], mode="lines+markers",
                                 name=f"t{t} {esc(repr(sample.tokens[t]))}", connectgaps=False))
    name = "|mlp_out|" if mlp else "|h|"
    fig.update_layout(title=f"{name} of feature {feature} across layers", xaxis_title="layer",
                      yaxis_title=f"{name}[{feature}]", height=420, legend_title="token")
    log_axis(fig, values[:, tokens])
    layer_xaxis(fig, values.shape[0])
    return fig


def token_feature_heatmap(sample, layer: int, features: Sequence[int], max_tokens: int = 512,
                          mlp: bool = False) -> go.Figure:
    """Tokens x chosen features at one layer, log colour, max-pooled along tokens (spikes survive on a
    2,048-token trace); blank where a feature was not among a token's recorded top-k."""
    max_tokens = checked_max_tokens(max_tokens)
    values = feature_values(sample, features, mlp)
    values = values[index_into(layer, values.shape[0], "layer", "layers")]  # [T, F]
    n = values.shape[0]
    starts = token_bins(n, max_tokens)
    pooled = pool_tokens(np.nan_to_num(values, nan=0.0), starts, axis=0)
    z = np.where(pooled > 0, np.log10(np.maximum(pooled, 1e-6)), np.nan)
    labels = token_labels(sample.tokens, sample.segments, starts)
    name = "|mlp_out|" if mlp else "|h|"
    fig = go.Figure(go.Heatmap(
        z=z.T, x=labels, y=[f"f{f}" for f in features], colorscale="Magma",
        customdata=pooled.T, colorbar={"title": f"log10 {name}"},
        hovertemplate="%{x}<br>feature %{y}: " + name + " %{customdata:.4g}<extra></extra>",
    ))
    add_segment_bands(fig, sample.segments, starts)
    label_token_axis(fig, labels, starts, 0, sample.tokens)
    fig.update_layout(title=f"{name} at layer {layer}, tokens x the top features"
                      + (f" (max over bins of {n} tokens)" if len(starts) < n else ""),
                      xaxis_title="token (bin)", yaxis_title="feature", height=380, yaxis_type="category",
                      margin={"t": 80})
    return fig


def jaccard_figure(labels: list[str], matrix: np.ndarray) -> go.Figure:
    """Pairwise Jaccard of massive-feature sets between sink tokens; cells where both sets are empty are undefined
    and drawn blank with the word "undefined"."""
    labels = [esc(x) for x in labels]
    matrix = np.asarray(matrix, dtype=float)
    text = np.where(np.isnan(matrix), "undefined (no massive features)", np.char.mod("%.2f", np.nan_to_num(matrix)))
    fig = go.Figure(go.Heatmap(z=matrix, x=labels, y=labels, zmin=0, zmax=1, colorscale="Blues",
                               colorbar={"title": "Jaccard"}, text=text,
                               hovertemplate="%{y}<br>%{x}<br>Jaccard %{text}<extra></extra>"))
    fig.update_layout(title="Massive-feature sets: Jaccard between sink tokens (blank: both sets empty)",
                      height=380)
    return fig

def origin_figure(origin: pd.DataFrame, tokens: Sequence[str]) -> go.Figure:
    """Attention vs MLP share of the jump at each massive (token, feature)'s origin layer."""
    labels = [f"t{t} {esc(repr(tokens[t]))} f{f} @L{layer}" for t, f, layer in
              zip(origin["token"], origin["feature"], origin["origin_layer"], strict=True)]
    fig = go.Figure([
        go.Bar(x=labels, y=origin["attn_share"], name="attention"),
        go.Bar(x=labels, y=origin["mlp_share"], name="MLP"),
    ])
    fig.update_layout(barmode="relative", title="Where massive activations come from (share of the jump at the "
                      "origin layer)", yaxis_title="share of h[l]-h[l-1]", height=360)
    return fig


def expert_usage_figure(table: pd.DataFrame, layer: int) -> go.Figure:
    """Segments (and the sink tokens) x routed experts: the share of each row's gate mass per expert."""
    experts = [c for c in table.columns if c != "tokens"]
    labels = [f"{esc(r)} ({n} tok)" for r, n in zip(table.index, table["tokens"], strict=True)]
    fig = go.Figure(go.Heatmap(z=table[experts].to_numpy(), x=experts, y=labels, zmin=0, zmax=1, colorscale="Blues",
                               text=np.round(table[experts].to_numpy(), 2), texttemplate="%{text}",
                               colorbar={"title": "share of gate mass"},
                               hovertemplate="%{y}<br>%{x}: %{z:.3f}<extra></extra>"))
    sinks = "last row: sink tokens" if "sinks" in table.index else "no token is a sink at this layer"
    fig.update_layout(title=f"Which experts each segment routes to, layer {layer} ({sinks})",
                      xaxis_title="routed expert", height=80 + 36 * len(labels), yaxis_autorange="reversed")
    return fig
