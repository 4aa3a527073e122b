"""Plotly figure builders shared by the Streamlit app and the notebooks.

Every function takes trace samples (or tables from `sinkscope.analysis`) and returns a `plotly` Figure; none
computes metrics of its own. Token axes are banded by segment and hovering shows the token text. Long sequences
are decimated by max-pooling along the token axis, which keeps sink columns visible, and the first tokens are
always kept at full resolution; pass `token_range` to zoom to full resolution.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from sinkscope.analysis import sink_rate_by_segment, token_segments, top_activations
from sinkscope.metrics import cosine_by_segment

SEGMENT_COLORS = {
    "bos": "#d62728", "audio_start": "#9467bd", "audio": "#1f77b4", "audio_end": "#9467bd",
    "video_start": "#8c564b", "video": "#2ca02c", "video_end": "#8c564b", "prompt": "#ff7f0e",
    "transcript": "#e377c2", "eos": "#7f7f7f", "text": "#17becf",
}
KEEP_FIRST = 8
"""Tokens kept at full resolution at the start of a decimated axis (BOS and the first sink candidates)."""


def segment_color(name: str) -> str:
    return SEGMENT_COLORS.get(name, "#bcbd22")


# -------------------------------------------------------------------------------------------- token axes
def token_bins(n_tokens: int, max_tokens: int, keep_first: int = KEEP_FIRST) -> np.ndarray:
    """Start index of each bin along a token axis: single tokens first, then equal-width bins."""
    if n_tokens <= max_tokens:
        return np.arange(n_tokens)
    keep = min(keep_first, max_tokens // 2)
    rest = np.linspace(keep, n_tokens, max_tokens - keep + 1).astype(int)[:-1]
    return np.unique(np.concatenate([np.arange(keep), rest]))


def pool_tokens(values: np.ndarray, starts: np.ndarray, axis: int = -1) -> np.ndarray:
    """Max-pool `values` along `axis` over the bins that begin at `starts`."""
    if len(starts) == values.shape[axis]:
        return np.asarray(values)
    return np.maximum.reduceat(np.asarray(values), starts, axis=axis)


def token_labels(tokens: Sequence[str], segments, starts: np.ndarray) -> list[str]:
    """Hover label of each bin: position, token text and segment (a range for pooled bins)."""
    names = token_segments(segments, len(tokens))
    ends = np.append(starts[1:], len(tokens))
    labels = []
    for a, b in zip(starts, ends, strict=True):
        if b - a == 1:
            labels.append(f"{a}: {esc(repr(tokens[a]))} [{names[a]}]")
        else:
            labels.append(f"{a}-{b - 1} (max over {b - a}) [{names[a]}..{names[b - 1]}]")
    return labels


def _window(sample, token_range):
    n = len(sample.tokens)
    start, end = token_range if token_range is not None else (0, n)
    start, end = max(0, int(start)), min(n, int(end))
    segments = [(name, max(s, start) - start, min(e, end) - start) for name, s, e in sample.segments
                if e > start and s < end]
    return start, end, list(sample.tokens[start:end]), segments


def esc(text: str) -> str:
    """Token text made safe for plotly labels, which render HTML (`<s>` would strike the rest through)."""
    return html.escape(str(text), quote=False)


def add_segment_bands(fig: go.Figure, segments, starts: np.ndarray, axis: str = "x", row=None, col=None,
                      label: bool = True, min_label_share: float = 0.04) -> go.Figure:
    """A coloured strip along a (possibly decimated) token axis, one block per segment, just outside the plot
    (above it for x, left of it for y); segments wide enough are named on the strip."""
    bins = np.asarray(starts)
    n_bins = max(1, len(bins))
    for name, s, e in segments:
        if e <= s:
            continue
        b0 = int(np.searchsorted(bins, s, side="right") - 1)
        b1 = int(np.searchsorted(bins, e - 1, side="right") - 1)
        kwargs = {"fillcolor": segment_color(name), "opacity": 0.85, "line_width": 0.5, "line_color": "white",
                  "layer": "above"}
        if label and (b1 - b0 + 1) / n_bins >= min_label_share:
            kwargs.update(annotation_text=esc(name), annotation_position="top", annotation_font_size=10)
        if row is not None:
            kwargs.update(row=row, col=col)
        if axis == "x":
            fig.add_vrect(x0=b0 - 0.5, x1=b1 + 0.5, y0=1.005, y1=1.04, **kwargs)
        else:
            kwargs.pop("annotation_text", None)
            kwargs.pop("annotation_position", None)
            kwargs.pop("annotation_font_size", None)
            fig.add_hrect(y0=b0 - 0.5, y1=b1 + 0.5, x0=-0.04, x1=-0.005, **kwargs)
    return fig


def _layer_axis(fig: go.Figure, n_layers: int) -> None:
    fig.update_yaxes(tickmode="linear", dtick=max(1, n_layers // 15))


def _layer_xaxis(fig: go.Figure, n_layers: int) -> None:
    fig.update_xaxes(tickmode="linear", dtick=max(1, n_layers // 15))


def _layer_token_heatmap(values: np.ndarray, sample, title: str, colorbar: str, max_tokens: int,
                         token_range, colorscale: str = "Viridis", zmid=None) -> go.Figure:
    start, end, tokens, segments = _window(sample, token_range)
    values = np.asarray(values)[:, start:end]
    starts = token_bins(end - start, max_tokens)
    z = pool_tokens(values, starts, axis=1)
    labels = token_labels(tokens, segments, starts)
    hover = np.broadcast_to(np.array(labels, dtype=object), z.shape)
    fig = go.Figure(go.Heatmap(
        z=z, x=np.arange(len(starts)), y=np.arange(z.shape[0]), text=hover, colorscale=colorscale, zmid=zmid,
        colorbar={"title": colorbar},
        hovertemplate="layer %{y}<br>%{text}<br>" + colorbar + " %{z:.3f}<extra></extra>",
    ))
    add_segment_bands(fig, segments, starts)
    pooled = " (max-pooled along tokens)" if len(starts) < end - start else ""
    fig.update_layout(title=title + pooled, xaxis_title=f"token (positions {start}-{end - 1})",
                      yaxis_title="layer", height=420, margin={"t": 60})
    if len(starts) <= 40:
        fig.update_xaxes(tickmode="array", tickvals=np.arange(len(starts)),
                         ticktext=[esc(repr(tokens[s])[1:-1][:10]) for s in starts], tickangle=-60)
    _layer_axis(fig, z.shape[0])
    fig.update_layout(margin={"t": 80})
    return fig


# -------------------------------------------------------------------------------------------- attention
def received_attention_heatmap(sample, head: int | None = None, max_tokens: int = 256,
                               token_range: tuple[int, int] | None = None) -> go.Figure:
    """Layer x token heatmap of attention received (alpha), averaged over heads or for one head."""
    alpha = np.asarray(sample.attention_received)
    values = alpha.mean(axis=1) if head is None else alpha[:, head]
    which = "mean over heads" if head is None else f"head {head}"
    return _layer_token_heatmap(values, sample, f"Attention received, {which}", "alpha", max_tokens, token_range)


def head_grid(sample, token: int = 0, eps: float | None = 0.3) -> go.Figure:
    """Layer x head grid of the attention each head gives to one token (alpha of that token)."""
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
    _layer_axis(fig, alpha.shape[0])
    fig.update_xaxes(tickmode="linear", dtick=1)
    return fig


def attention_map(sample, layer: int, head: int, max_tokens: int = 256,
                  token_range: tuple[int, int] | None = None) -> go.Figure:
    """A full attention map (query x key), where the trace holds it; max-pooled on both axes when long."""
    maps = sample.attention_maps
    if (layer, head) not in maps:
        raise KeyError(f"the trace holds no attention map for layer {layer}, head {head}; "
                       f"it has {sorted(maps)}")
    start, end, tokens, segments = _window(sample, token_range)
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


def sink_rate_by_segment_figure(sample, eps: float = 0.3) -> go.Figure:
    """Per layer, the share of (head, token) pairs of each segment with alpha > eps."""
    table = sink_rate_by_segment(sample.attention_received, sample.segments, eps)
    fig = go.Figure()
    for seg in table.columns:
        fig.add_trace(go.Scatter(x=table.index, y=table[seg], mode="lines+markers", name=seg,
                                 line={"color": segment_color(seg)}))
    fig.update_layout(title=f"Sink rate by segment (alpha > {eps})", xaxis_title="layer",
                      yaxis_title="% of heads x tokens", yaxis_range=[-2, 102], height=360)
    _layer_xaxis(fig, len(table))
    return fig


def top_activations_figure(sample) -> go.Figure:
    """Top-1/2/3 |activation| and the median per layer, log scale (as in Sun et al., 2024)."""
    table = top_activations(sample)
    fig = go.Figure()
    for col, dash in zip(table.columns, ["solid", "dash", "dot", "solid"], strict=False):
        fig.add_trace(go.Scatter(x=table.index, y=table[col], mode="lines+markers", name=col,
                                 line={"dash": dash, "color": "#7f7f7f" if col == "median" else None}))
    fig.update_layout(title="Largest |activations| vs the median", xaxis_title="layer", yaxis_title="|h|",
                      yaxis_type="log", height=360)
    _layer_xaxis(fig, len(table))
    return fig


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
    _layer_xaxis(fig, len(table))
    return fig


def cosine_heatmap(sample, max_tokens: int = 256, token_range: tuple[int, int] | None = None) -> go.Figure:
    """Layer x token heatmap of cos-to-BOS (max-pooled along tokens when long)."""
    return _layer_token_heatmap(sample.bos_cosine, sample, "Cosine to BOS", "cos", max_tokens, token_range,
                                colorscale="RdBu_r", zmid=0)


# ------------------------------------------------------------------------------------ massive activations
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
    _layer_axis(fig, values.shape[0])
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


# ------------------------------------------------------------------------------------------------ compare
def difference_heatmap(a, b, field: str = "attention_received", max_tokens: int = 256) -> go.Figure:
    """B minus A of a layer x token field for one sample present in both traces (heads averaged)."""
    if len(a.tokens) != len(b.tokens):
        raise ValueError(f"sample '{a.sample_id}' has {len(a.tokens)} tokens in one trace and "
                         f"{len(b.tokens)} in the other; a token-wise difference needs the same length")
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
    fig = go.Figure(go.Heatmap(z=z, colorscale="RdBu_r", zmid=0, text=np.broadcast_to(
        np.array(labels, dtype=object), z.shape), colorbar={"title": "B - A"},
        hovertemplate="layer %{y}<br>%{text}<br>B - A %{z:.3f}<extra></extra>"))
    add_segment_bands(fig, a.segments, starts)
    fig.update_layout(title=f"{field}: B - A for sample {esc(a.sample_id)}", xaxis_title="token",
                      yaxis_title="layer", height=420, margin={"t": 80})
    _layer_axis(fig, z.shape[0])
    return fig


def side_by_side(fig_a: go.Figure, fig_b: go.Figure, titles: tuple[str, str]) -> go.Figure:
    """Two single-panel figures of the same kind in one row."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=titles, shared_yaxes=True)
    for col, src in ((1, fig_a), (2, fig_b)):
        for trace in src.data:
            fig.add_trace(trace, row=1, col=col)
    fig.update_layout(height=420, showlegend=False)
    return fig


# ------------------------------------------------------------------------------------------------ dataset
def sink_positions_figure(sinks: pd.DataFrame) -> go.Figure:
    """Where sinks live: relative position of every sink token, coloured by segment."""
    fig = go.Figure()
    for seg, group in sinks.groupby("segment"):
        fig.add_trace(go.Histogram(x=group["relative_position"], name=seg or "(none)", nbinsx=40,
                                   marker_color=segment_color(seg)))
    fig.update_layout(barmode="stack", title="Sink tokens by relative position and segment",
                      xaxis_title="position / (T - 1)", yaxis_title="sink tokens", height=360)
    return fig


def massive_feature_histogram(features: pd.DataFrame) -> go.Figure:
    """How many samples show each massive feature index."""
    fig = go.Figure(go.Bar(x=features["feature"].astype(str), y=features["samples"],
                           customdata=features["max_abs"],
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


def sweep_figure(results: pd.DataFrame) -> go.Figure:
    """Test WER against the compression rate of a `sinkscope sweep` (one line per decorrelation weight, one
    panel per SNR). `results` holds the rows of the sweep results CSV."""
    df = results.copy()
    for col in ("k_audio", "k_video", "wer", "decorrelation"):
        df[col] = pd.to_numeric(df[col])
    df["rate"] = "K_a=" + df["k_audio"].astype(int).astype(str) + ", K_v=" + df["k_video"].astype(int).astype(str)
    order = df.sort_values(["k_audio", "k_video"])["rate"].unique().tolist()
    snrs = list(dict.fromkeys(df["snr"]))
    fig = make_subplots(rows=1, cols=len(snrs), shared_yaxes=True,
                        subplot_titles=[f"{'clean' if s == 'clean' else s + ' dB babble'}" for s in snrs])
    for c, snr in enumerate(snrs, start=1):
        for lam, group in df[df["snr"] == snr].groupby("decorrelation"):
            group = group.set_index("rate").reindex(order).dropna(subset=["wer"])
            name = "decorrelation off" if lam == 0 else f"decorrelation λ={lam:g}"
            fig.add_trace(go.Scatter(x=group.index, y=group["wer"], mode="lines+markers", name=name,
                                     legendgroup=name, showlegend=c == 1,
                                     line_color="#7f7f7f" if lam == 0 else "#d62728",
                                     hovertemplate="%{x}<br>WER %{y:.1%}<extra>" + html.escape(name) + "</extra>"),
                          row=1, col=c)
        fig.update_xaxes(title_text="compression rate", categoryorder="array", categoryarray=order, row=1, col=c)
    fig.update_yaxes(title_text="test WER", tickformat=".0%", row=1, col=1)
    fig.update_layout(title="WER across compression rates, with and without the decorrelation loss", height=420)
    return fig
