"""Massive activations: top |h| per layer, the layer x feature map, tokens x features, feature-set Jaccard and
the attention/MLP origin of each massive entry."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from sinkscope.analysis import top_activations
from sinkscope.viz.axes import esc, layer_axis, layer_xaxis, pool_tokens, token_bins


def top_activations_figure(sample) -> go.Figure:
    """Top-1/2/3 |activation| and the median per layer, log scale (as in Sun et al., 2024)."""
    table = top_activations(sample)
    fig = go.Figure()
    for col, dash in zip(table.columns, ["solid", "dash", "dot", "solid"], strict=False):
        fig.add_trace(go.Scatter(x=table.index, y=table[col], mode="lines+markers", name=col,
                                 line={"dash": dash, "color": "#7f7f7f" if col == "median" else None}))
    fig.update_layout(title="Largest |activations| vs the median", xaxis_title="layer", yaxis_title="|h|",
                      yaxis_type="log", height=360)
    layer_xaxis(fig, len(table))
    return fig

def feature_heatmap(sample, mlp: bool = False, top_features: int | None = None) -> go.Figure:
    """Layer x feature heatmap of the largest |h| (or |mlp_out|) of each feature over tokens, log colour."""
    values = np.asarray(sample.mlp_feature_max_abs if mlp else sample.feature_max_abs)  # [L, D]
    features = np.arange(values.shape[1])
    if top_features is not None and top_features < values.shape[1]:
        features = np.sort(np.argsort(-values.max(axis=0))[:top_features])
        values = values[:, features]
    z = np.log10(np.maximum(values, 1e-6))
    name = "|mlp_out|" if mlp else "|h|"
    fig = go.Figure(go.Heatmap(
        z=z, x=[str(f) for f in features], y=np.arange(values.shape[0]), colorscale="Magma",
        customdata=values, colorbar={"title": f"log10 max {name}"},
        hovertemplate="layer %{y}, feature %{x}<br>max " + name + " %{customdata:.1f}<extra></extra>",
    ))
    fig.update_layout(title=f"Largest {name} of each feature over tokens", xaxis_title="feature",
                      yaxis_title="layer", height=420, xaxis_type="category" if top_features else None)
    layer_axis(fig, values.shape[0])
    return fig

def token_feature_surface(sample, layer: int, max_tokens: int = 128) -> go.Figure:
    """3D |h| over tokens x features at one layer: the full state where the trace holds it, else the
    per-token top features (zeros elsewhere)."""
    n = len(sample.tokens)
    if layer in sample.hidden_states:
        z = np.abs(np.asarray(sample.hidden_states[layer], dtype=np.float32))  # [T, D]
        source = "full hidden state"
    else:
        idx = np.asarray(sample.top_features)[layer]  # [T, k]
        val = np.abs(np.asarray(sample.top_values)[layer])
        z = np.zeros((n, int(np.asarray(sample.feature_max_abs).shape[1])), dtype=np.float32)
        np.put_along_axis(z, idx.astype(np.int64), val, axis=1)
        source = f"top {idx.shape[1]} features per token"
    starts = token_bins(n, max_tokens)
    z = pool_tokens(z, starts, axis=0)
    fig = go.Figure(go.Surface(z=z, x=np.arange(z.shape[1]), y=starts, colorscale="Magma",
                               colorbar={"title": "|h|"}))
    fig.update_layout(title=f"|h| at layer {layer}, tokens x features ({source})", height=560,
                      scene={"xaxis_title": "feature", "yaxis_title": "token", "zaxis_title": "|h|"})
    return fig

def jaccard_figure(labels: list[str], matrix: np.ndarray) -> go.Figure:
    """Pairwise Jaccard of massive-feature sets between sink tokens."""
    labels = [esc(x) for x in labels]
    fig = go.Figure(go.Heatmap(z=matrix, x=labels, y=labels, zmin=0, zmax=1, colorscale="Blues",
                               colorbar={"title": "Jaccard"},
                               hovertemplate="%{y}<br>%{x}<br>Jaccard %{z:.2f}<extra></extra>"))
    fig.update_layout(title="Massive-feature sets: Jaccard between sink tokens", height=380)
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
