"""Token and layer axes shared by every figure: decimation by max-pooling (which keeps sink columns visible),
hover labels that name position, token and segment, segment bands, and the layer x token heatmap."""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from sinkscope.analysis import token_segments
from sinkscope.arguments import whole_number
from sinkscope.segments import segment_color

KEEP_FIRST = 8
"""Tokens kept at full resolution at the start of a decimated axis (BOS and the first sink candidates)."""


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

def label_token_axis(fig: go.Figure, labels: list[str], starts: np.ndarray, offset: int = 0, tokens=None) -> None:
    """Make a token heatmap's x axis its bins' hover labels (categories: one string per column goes to the
    browser, rather than one per cell, which was 300 KB for 30 layers x 256 bins). Ticks: the token text for at
    most 40 bins (given `tokens`), else the first position of about ten bins."""
    if tokens is not None and len(starts) <= 40:
        fig.update_xaxes(type="category", tickmode="array", tickvals=list(labels), tickangle=-60,
                         ticktext=[esc(repr(tokens[s])[1:-1][:10]) for s in starts])
    else:
        step = max(1, len(labels) // 10)
        fig.update_xaxes(type="category", tickmode="array", tickvals=list(labels[::step]),
                         ticktext=[str(offset + int(s)) for s in starts[::step]])


def checked_max_tokens(max_tokens) -> int:
    return whole_number(max_tokens, "max_tokens", what=" (columns drawn at most)")


def token_window(sample, token_range):
    """`(start, end, tokens, segments)` of the positions `token_range` = (start, end) shows, end excluded (all of
    them for None); a range that is empty or leaves the sample is refused by name."""
    n = len(sample.tokens)
    start, end = token_range if token_range is not None else (0, n)
    if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in (start, end)) \
            or not 0 <= start < end <= n:
        raise ValueError(f"token_range must be (start, end) with 0 <= start < end <= {n} (the sample's {n} "
                         f"tokens, end excluded), not {token_range!r}")
    start, end = int(start), int(end)
    segments = [(name, max(s, start) - start, min(e, end) - start) for name, s, e in sample.segments
                if e > start and s < end]
    return start, end, list(sample.tokens[start:end]), segments

def esc(text: str) -> str:
    """Token text made safe for plotly labels, which render HTML (`<s>` would strike the rest through)."""
    return html.escape(str(text), quote=False)

def subplot_refs(fig: go.Figure, row=None, col=None) -> tuple[str, str]:
    """The x and y axis references ("x", "y2", ...) of a subplot, or of the single plot."""
    if row is None:
        return "x", "y"
    sub = fig.get_subplot(row, col)
    return sub.xaxis.plotly_name.replace("axis", ""), sub.yaxis.plotly_name.replace("axis", "")


LABEL_PLOT_PX = 400
"""The narrowest plot (pixels) a segment strip's labels are fitted to: the app's half-width columns."""
LABEL_CHAR_PX = 5.5
"""About the width of one character of a strip label (10 px font)."""


def add_segment_bands(fig: go.Figure, segments, starts: np.ndarray, axis: str = "x", row=None, col=None,
                      label: bool = True, plot_px: float = LABEL_PLOT_PX) -> go.Figure:
    """A coloured strip along a (possibly decimated) token axis, one block per segment, just outside the plot
    (above it for x, left of it for y). Segments are named above their blocks, the widest first, where the name
    fits on a `plot_px`-wide axis without running into a name already placed, so that labels neither cover the
    data nor each other (the hover and the figure's caption name every segment). The shapes and labels are added
    in one layout update (plotly's add_vrect validates and relayouts once per call: 45 ms each)."""
    bins = np.asarray(starts)
    n_bins = max(1, len(bins))
    xa, ya = subplot_refs(fig, row, col)
    shapes, named = [], []
    for name, s, e in segments:
        if e <= s:
            continue
        b0 = int(np.searchsorted(bins, s, side="right") - 1)
        b1 = int(np.searchsorted(bins, e - 1, side="right") - 1)
        base = {"type": "rect", "fillcolor": segment_color(name), "opacity": 0.85, "layer": "above",
                "line": {"width": 0.5, "color": "white"}}
        if axis == "x":
            shapes.append({**base, "xref": xa, "yref": f"{ya} domain", "x0": b0 - 0.5, "x1": b1 + 0.5,
                           "y0": 1.005, "y1": 1.04})
            if label:
                named.append((b1 - b0 + 1, name, (b0 + b1) / 2))
        else:
            shapes.append({**base, "yref": ya, "xref": f"{xa} domain", "y0": b0 - 0.5, "y1": b1 + 0.5,
                           "x0": -0.04, "x1": -0.005})
    notes, taken = [], []
    px = plot_px / n_bins  # pixels per bin
    for _, name, centre in sorted(named, key=lambda item: -item[0]):
        half = (LABEL_CHAR_PX * len(name) + 6) / 2
        lo, hi = (centre + 0.5) * px - half, (centre + 0.5) * px + half
        if lo >= -px / 2 and hi <= plot_px + px / 2 and all(hi <= a or lo >= b for a, b in taken):
            taken.append((lo, hi))
            notes.append({"text": esc(name), "x": centre, "y": 1.045, "xref": xa, "yref": f"{ya} domain",
                          "xanchor": "center", "yanchor": "bottom", "showarrow": False, "font": {"size": 10}})
    fig.update_layout(shapes=list(fig.layout.shapes) + shapes, annotations=list(fig.layout.annotations) + notes)
    return fig


def layer_axis(fig: go.Figure, n_layers: int, **subplot) -> None:
    fig.update_yaxes(tickmode="linear", dtick=max(1, n_layers // 15), **subplot)

def layer_xaxis(fig: go.Figure, n_layers: int) -> None:
    """Layers 0 .. n_layers - 1 along x, nothing drawn past them (autorange padded a line chart to layer -2)."""
    fig.update_xaxes(tickmode="linear", dtick=max(1, n_layers // 15), range=[-0.5, n_layers - 0.5])


def log_axis(fig: go.Figure, values, axis: str = "y", **subplot) -> None:
    """A log axis labelled at powers of ten only, with unlabelled grid lines at 2..9 between them, where
    `values` span at least 1.5 decades (plotly labelled the 2s and 5s as bare "2" and "5" between "1000" and
    "10k", which read as values); over a narrower span its own labels stay (a single power of ten would leave
    the axis without a number)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    update = fig.update_xaxes if axis == "x" else fig.update_yaxes
    update(type="log", **subplot)
    if v.size and np.log10(v.max()) - np.log10(v.min()) >= 1.5:
        update(dtick=1, minor={"dtick": "D1", "showgrid": True, "gridcolor": "rgba(0,0,0,0.05)"}, **subplot)

def layer_token_heatmap(values: np.ndarray, sample, title: str, colorbar: str, max_tokens: int,
                         token_range, colorscale: str = "Viridis", zmid=None) -> go.Figure:
    max_tokens = checked_max_tokens(max_tokens)
    start, end, tokens, segments = token_window(sample, token_range)
    values = np.asarray(values)[:, start:end]
    starts = token_bins(end - start, max_tokens)
    z = pool_tokens(values, starts, axis=1)
    labels = token_labels(tokens, segments, starts)
    fig = go.Figure(go.Heatmap(
        z=z, x=labels, y=np.arange(z.shape[0]), colorscale=colorscale, zmid=zmid, colorbar={"title": colorbar},
        hovertemplate="layer %{y}<br>%{x}<br>" + colorbar + " %{z:.3f}<extra></extra>",
    ))
    add_segment_bands(fig, segments, starts)
    pooled = " (max-pooled along tokens)" if len(starts) < end - start else ""
    fig.update_layout(title=title + pooled, xaxis_title=f"token (positions {start}-{end - 1})",
                      yaxis_title="layer", height=420, margin={"t": 60})
    label_token_axis(fig, labels, starts, start, tokens)
    layer_axis(fig, z.shape[0])
    fig.update_layout(margin={"t": 80})
    return fig
