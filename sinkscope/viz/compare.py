"""Two traces compared: per-layer profiles over all samples (no shared sample needed), sink positions and
massive-feature shares; for a sample in both, the signed difference of a field and paired panels."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from sinkscope.segments import SEGMENT_COLORS, segment_color
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
from sinkscope.viz.grid import panel_grid

DIFFERENCE_FIELDS = ("attention_received", "bos_cosine", "max_abs")
"""The per-sample fields `difference_heatmap` draws (layer x token; alpha averaged over heads)."""


def difference_heatmap(a, b, field: str = "attention_received", max_tokens: int = 256) -> go.Figure:
    """B minus A of a layer x token field for one sample present in both traces (heads averaged)."""
    if len(a.tokens) != len(b.tokens):
        raise ValueError(f"sample '{a.sample_id}' has {len(a.tokens)} tokens in one trace and "
                         f"{len(b.tokens)} in the other; a token-wise difference needs the same length")
    if field not in DIFFERENCE_FIELDS:
        raise ValueError(f"field must be one of {list(DIFFERENCE_FIELDS)} (the layer x token fields), not {field!r}")
    max_tokens = checked_max_tokens(max_tokens)
    va, vb = (np.asarray(getattr(s, field)) for s in (a, b))
    if field == "attention_received":
        va, vb = va.mean(axis=1), vb.mean(axis=1)
    starts = token_bins(len(a.tokens), max_tokens)
    diff = vb - va
    # pool the signed difference by its largest magnitude, so a pooled bin keeps its strongest change
    pooled_pos = pool_tokens(diff, starts, axis=1)
    pooled_neg = -pool_tokens(-diff, starts, axis=1)
    z = np.where(np.abs(pooled_pos) >= np.abs(pooled_neg), pooled_pos, pooled_neg)
    labels = token_labels(a.tokens, a.segments, starts)
    fig = go.Figure(go.Heatmap(z=z, x=labels, colorscale="RdBu_r", zmid=0, colorbar={"title": "B - A"},
                               hovertemplate="layer %{y}<br>%{x}<br>B - A %{z:.3f}<extra></extra>"))
    add_segment_bands(fig, a.segments, starts)
    label_token_axis(fig, labels, starts, 0, a.tokens)
    fig.update_layout(title=f"{field}: B - A for sample {esc(a.sample_id)}", xaxis_title="token",
                      yaxis_title="layer", height=420, margin={"t": 80})
    layer_axis(fig, z.shape[0])
    return fig

def side_by_side(fig_a: go.Figure, fig_b: go.Figure, titles: tuple[str, str]) -> go.Figure:
    """Two single-panel figures of the same kind in one row, labelled like the single views: axis titles kept,
    one legend, and heatmaps on one shared colour scale (its range spans both panels)."""
    return panel_grid([[fig_a, fig_b]], fig_a.layout.title.text, subplot_titles=list(titles), shared_yaxes=True,
                      row_height=320)


def profile_figure(mean_a: pd.DataFrame, mean_b: pd.DataFrame, names: tuple[str, str], title: str,
                   yaxis_title: str, group: str = "segment", log: bool = False,
                   bounds: tuple[float, float] | None = None) -> go.Figure:
    """Per-layer curves of two traces from `analysis.profile_mean` tables: A solid, B dashed, one colour per
    segment (or curve), error bars of one standard deviation over samples, cut at `bounds` (e.g. 0-100 %)."""
    fig = go.Figure()
    for label, table, dash in ((names[0], mean_a, "solid"), (names[1], mean_b, "dash")):
        for key, rows in table.groupby(group, sort=False):
            color = segment_color(key) if key in SEGMENT_COLORS else CURVE_COLORS.get(key)
            fig.add_trace(go.Scatter(
                x=rows["layer"], y=rows["mean"], mode="lines+markers", name=f"{esc(label)}: {esc(key)}",
                legendgroup=str(key), line={"color": color, "dash": dash},
                error_y=_error_bars(rows, bounds),
                customdata=rows["n"], hovertemplate=f"{esc(label)}, {esc(key)}<br>layer %{{x}}: %{{y:.4g}} "
                                                    "(± sd over %{customdata} samples)<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="layer", yaxis_title=yaxis_title, height=420,
                      legend={"font": {"size": 10}})
    if log:
        log_axis(fig, pd.concat([mean_a["mean"], mean_b["mean"]]))
    layers = pd.concat([mean_a["layer"], mean_b["layer"]])
    if layers.empty:  # e.g. traces whose samples hold BOS alone: no token to average over
        fig.add_annotation(text="nothing to draw: neither trace has a token here (BOS is left out)",
                           showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
        return fig
    layer_xaxis(fig, int(layers.max()) + 1)
    return fig


CURVE_COLORS = {"top": "#d62728", "median": "#7f7f7f"}


def _error_bars(rows: pd.DataFrame, bounds: tuple[float, float] | None) -> dict:
    std = rows["std"].to_numpy(dtype=float)
    if bounds is None:
        return {"type": "data", "array": std, "visible": True, "thickness": 1}
    mean = rows["mean"].to_numpy(dtype=float)
    return {"type": "data", "symmetric": False, "array": np.minimum(std, bounds[1] - mean),
            "arrayminus": np.minimum(std, mean - bounds[0]), "visible": True, "thickness": 1}


def sink_position_comparison(a: pd.DataFrame, b: pd.DataFrame, names: tuple[str, str]) -> go.Figure:
    """Where sinks sit, relative to each sample's length (0 = BOS, 1 = last token), for two traces."""
    fig = go.Figure()
    for label, table, color in ((names[0], a, "#1f77b4"), (names[1], b, "#ff7f0e")):
        fig.add_trace(go.Histogram(x=table["relative_position"], name=esc(label), histnorm="probability",
                                   xbins={"start": 0, "end": 1.0001, "size": 0.05}, marker_color=color,
                                   opacity=0.6))
    fig.update_layout(barmode="overlay", title="Sink positions relative to the sample's length",
                      xaxis_title="relative position (0 = BOS, 1 = last token)", yaxis_title="share of sinks",
                      height=380)
    return fig


def massive_feature_comparison(a: pd.DataFrame, b: pd.DataFrame, names: tuple[str, str], top: int = 12,
                               selected: int | None = None) -> go.Figure:
    """Share of samples in which each massive feature appears, for the features most common in either trace;
    the `selected` feature's label is marked."""
    shares = pd.merge(a[["feature", "share"]], b[["feature", "share"]], on="feature", how="outer",
                      suffixes=("_a", "_b")).fillna(0.0)
    shares = shares.assign(peak=shares[["share_a", "share_b"]].max(axis=1)).nlargest(top, "peak")
    labels = [f"f{int(f)}" for f in shares["feature"]]
    ticks = [f"<b>[{label}]</b>" if int(f) == selected else label for label, f in zip(labels, shares["feature"],
                                                                                        strict=True)]
    fig = go.Figure([go.Bar(x=labels, y=100 * shares["share_a"], name=esc(names[0]), marker_color="#1f77b4"),
                     go.Bar(x=labels, y=100 * shares["share_b"], name=esc(names[1]), marker_color="#ff7f0e")])
    fig.update_layout(barmode="group", title="Massive features: share of samples in which each is massive",
                      xaxis_title="feature", yaxis_title="% of samples", yaxis_range=[0, 105], height=380,
                      xaxis_type="category")
    fig.update_xaxes(tickvals=labels, ticktext=ticks)
    return fig
