"""Two traces side by side: the signed difference of a field for one sample, and paired panels."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from sinkscope.viz.axes import add_segment_bands, esc, layer_axis, pool_tokens, token_bins, token_labels


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
    layer_axis(fig, z.shape[0])
    return fig

def side_by_side(fig_a: go.Figure, fig_b: go.Figure, titles: tuple[str, str]) -> go.Figure:
    """Two single-panel figures of the same kind in one row."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=titles, shared_yaxes=True)
    for col, src in ((1, fig_a), (2, fig_b)):
        for trace in src.data:
            fig.add_trace(trace, row=1, col=col)
    fig.update_layout(height=420, showlegend=False)
    return fig
