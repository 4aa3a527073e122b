"""Several single-panel figures drawn as the panels of one figure.

Used where a view's figures always change together and belong side by side (a sample in two traces, the
Overview's two per-segment curves). Measured in Chromium on a 2-core machine, a grid is not cheaper to open than
the same charts drawn separately, and separate charts win when a control changes only some of them (Streamlit
redraws only the charts whose figure changed), so the whole-trace Compare and the Dataset view keep theirs apart.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from sinkscope.viz.axes import esc, subplot_refs

GAP_PX = 150
"""Pixels between two rows of panels, plus their titles' shift (`_title_shift`)."""
_AXIS_KEYS_DROPPED = {"domain", "anchor", "matches", "scaleanchor", "overlaying", "position"}


def panel_grid(rows: list[list[go.Figure]], title: str, subplot_titles: list[str] | None = None,
               shared_yaxes: bool = False, row_height: int = 360) -> go.Figure:
    """`rows` of single-panel figures as one figure, each source's panel keeping its axes (titles, ranges, log
    type, category ticks), its shapes and its annotations (segment bands). The heatmaps of one row share one colour
    scale (its range spans the row's panels; centred when the source is), with the colour bar beside that row.
    One legend: a trace name shown once, and a legend click hides that name in every panel. `subplot_titles`
    (row-major) default to the sources' own titles."""
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    cells = [(r, c, fig) for r, row in enumerate(rows, 1) for c, fig in enumerate(row, 1)]
    titles = subplot_titles or [fig.layout.title.text or "" for _, _, fig in cells]
    shifts = [_title_shift(src) for _, _, src in cells]
    top = max(shifts)
    # rows apart by enough pixels for the tick labels (token text at -60 degrees) and the axis title of the row
    # above, and the next row's shifted subplot title
    margin = {"t": 90 + top, "b": 40}
    gap = GAP_PX + top
    height = row_height * n_rows + 120 + top + gap * (n_rows - 1)
    plot_px = height - margin["t"] - margin["b"]
    fig = make_subplots(rows=n_rows, cols=n_cols, subplot_titles=[esc(t) for t in titles], shared_yaxes=shared_yaxes,
                        horizontal_spacing=0.06 if shared_yaxes else 0.09,
                        vertical_spacing=gap / plot_px if n_rows > 1 else 0.0)
    shapes, notes, seen, axes = [], [], set(), {}
    for r, row in enumerate(rows, 1):
        heatmaps = [t for src in row for t in src.data if t.type == "heatmap"]
        if heatmaps:
            axes[r] = _row_colour_axis(fig, r, heatmaps)
    for r, c, src in cells:
        for trace in src.data:
            if trace.type == "heatmap":
                trace.update(coloraxis=axes[r])
            else:
                name = trace.name
                trace.update(legendgroup=name, showlegend=name is not None and name not in seen
                             and trace.showlegend is not False)
                seen.add(name)
            fig.add_trace(trace, row=r, col=c)
        xa, ya = subplot_refs(fig, r, c)
        for which, ref in (("xaxis", xa), ("yaxis", ya)):
            props = {k: v for k, v in src.layout[which].to_plotly_json().items() if k not in _AXIS_KEYS_DROPPED}
            if which == "yaxis" and shared_yaxes and c > 1:
                props.pop("title", None)
            fig.layout[ref[0] + "axis" + ref[1:]].update(props)
        refs = {"x": xa, "y": ya, "x domain": f"{xa} domain", "y domain": f"{ya} domain"}
        for item, out in [(sh, shapes) for sh in src.layout.shapes] + [(an, notes) for an in src.layout.annotations]:
            item = item.to_plotly_json()
            out.append({**item, **{k: refs.get(item.get(k), item.get(k)) for k in ("xref", "yref") if k in item}})
        if src.layout.barmode and not fig.layout.barmode:
            fig.update_layout(barmode=src.layout.barmode)
    for shift, note in zip(shifts, fig.layout.annotations, strict=False):  # the subplot titles, row-major
        if shift:
            note.update(yshift=shift)
    fig.update_layout(shapes=shapes, annotations=list(fig.layout.annotations) + notes, title=title,
                      height=height, margin=margin,
                      legend={"groupclick": "togglegroup", "orientation": "h", "x": 0, "y": -0.5 / (n_rows + 2),
                              "yanchor": "top", "font": {"size": 10}})
    return fig


def _title_shift(src: go.Figure) -> int:
    """Pixels a panel's subplot title moves up: above a segment band along the top of the source (14), and above
    the band's labels (28)."""
    if any(str(an.yref).endswith("domain") and (an.y or 0) > 1 for an in src.layout.annotations):
        return 28
    if any(str(sh.yref).endswith("domain") and (sh.y1 or 0) > 1 for sh in src.layout.shapes):
        return 14
    return 0


def _row_colour_axis(fig: go.Figure, row: int, heatmaps: list) -> str:
    """A layout colour axis for the heatmaps of one grid row ("coloraxis", "coloraxis2", ...), its bar beside it."""
    name = "coloraxis" if row == 1 else f"coloraxis{row}"
    first = heatmaps[0]
    values = np.concatenate([np.asarray(t.z, dtype=float).ravel() for t in heatmaps])
    domain = fig.get_subplot(row, 1).yaxis.domain
    axis = {"colorscale": first.colorscale,
            "colorbar": {"title": first.colorbar.title.text if first.colorbar.title else None,
                         "y": (domain[0] + domain[1]) / 2, "len": domain[1] - domain[0], "yanchor": "middle"}}
    if first.zmid is not None:
        axis["cmid"] = first.zmid
    elif np.isfinite(values).any():
        axis.update(cmin=float(np.nanmin(values)), cmax=float(np.nanmax(values)))
    fig.update_layout({name: axis})
    return name
