"""The app's data access (traces under one root, cached) and its small widgets."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from sinkscope import analysis
from sinkscope.errors import TraceError
from sinkscope.trace import MANIFEST, Trace, find_traces

DEFAULT_ROOT = "traces"


def get_root() -> Path:
    return Path(os.environ.get("SINKSCOPE_ROOT", DEFAULT_ROOT)).expanduser().resolve()


def resolve_under_root(root: Path, name: str) -> Path:
    """The trace directory `name` (relative to `root`); refuse anything that resolves outside the root."""
    if not isinstance(name, str) or "\x00" in name or len(name) > 1024:
        raise TraceError(f"{name!r} is not a trace name (a path relative to the trace root {root})")
    try:
        path = (root / name).resolve()
    except (OSError, ValueError, RuntimeError) as exc:
        raise TraceError(f"{name!r} cannot be resolved under the trace root {root} ({exc})") from exc
    if not path.is_relative_to(root):
        raise TraceError(f"'{name}' is outside the trace root {root}; only traces under the root can be opened")
    return path


@st.cache_data(ttl=10, show_spinner=False)
def list_traces(root: str) -> list[str]:
    """`sinkscope.trace.find_traces(root)`, cached for 10 s."""
    return find_traces(root)


def mtime(path: Path) -> float:
    manifest = path / MANIFEST
    return manifest.stat().st_mtime if manifest.exists() else 0.0


@st.cache_resource(show_spinner="Opening trace...", max_entries=8)
def _load(path: str, mtime: float) -> Trace:
    return Trace.load(path, root=get_root())


def load_trace(root: Path, name: str) -> Trace:
    path = resolve_under_root(root, name)
    return _load(str(path), mtime(path))


@st.cache_resource(show_spinner=False, max_entries=8)
def _sample_index(path: str, mtime: float) -> pd.DataFrame:
    tr = _load(path, mtime)
    return pd.DataFrame({"id": tr.sample_ids,
                         "text": [str(s.extra.get("text", s.extra.get("transcript", ""))) for s in tr],
                         "tokens": [len(s) for s in tr]})


def sample_index(tr: Trace) -> pd.DataFrame:
    return _sample_index(str(tr.path), mtime(tr.path))


# The derived tables are cached as resources (shared, never copied): the views only read them, and copying a
# 1,000-sample profile out of st.cache_data on every rerun cost more than drawing it.
@st.cache_resource(show_spinner="Aggregating over the trace...", max_entries=16)
def dataset_tables(path: str, mtime: float, eps: float, min_queries: int
                   ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    tr = _load(path, mtime)
    return (analysis.dataset_sinks(tr, eps, min_queries=min_queries), analysis.dataset_massive_features(tr),
            analysis.layer_summary(tr, eps, min_queries=min_queries), analysis.dataset_massive_records(tr))


@st.cache_resource(show_spinner="Profiling the trace...", max_entries=16)
def trace_profile(path: str, mtime: float, eps: float, min_queries: int) -> dict:
    return analysis.trace_profile(_load(path, mtime), eps, min_queries=min_queries)


@st.cache_resource(show_spinner=False, max_entries=32)
def dataset_cosine(path: str, mtime: float, layer: int) -> pd.DataFrame:
    return analysis.dataset_cosine(_load(path, mtime), layer)


def pick_sample(tr: Trace, key: str) -> int:
    index = sample_index(tr)
    query = st.sidebar.text_input("Search samples (id or text)", key=f"{key}_search")
    shown = index
    if query:
        hit = index["id"].str.contains(query, case=False, regex=False) | \
            index["text"].str.contains(query, case=False, regex=False)
        shown = index[hit]
    if shown.empty:
        st.sidebar.warning(f"No sample matches '{query}'.")
        shown = index
    options = list(shown.index)
    choice = st.sidebar.selectbox(
        f"Sample ({len(shown)} of {len(index)})", options, key=f"{key}_sample",
        format_func=lambda i: f"{index.at[i, 'id']}  ({index.at[i, 'tokens']} tok)  {index.at[i, 'text'][:50]}",
    )
    return int(choice)


def token_window(n: int, key: str) -> tuple[int, int] | None:
    if n <= 64:
        return None
    lo, hi = st.slider("Zoom to positions (full resolution inside the window when it is short enough)",
                       0, n, (0, n), key=key)
    return zoom_window(lo, hi, n)


def zoom_window(lo: int, hi: int, n: int) -> tuple[int, int] | None:
    """The zoom slider's handles as a `token_range` of at least one position (None: the whole sample)."""
    lo = min(lo, n - 1)  # both handles at the end: the last position
    return None if (lo, hi) == (0, n) else (lo, max(hi, lo + 1))


def show(fig, key: str, select_feature: bool = False) -> None:
    """A figure; its camera button downloads it in the sidebar's format (PNG or SVG), named after the view.
    With `select_feature`, a click on a bar labelled fN selects feature N in every view (`selected_feature`)."""
    fmt = st.session_state.get("fig_format", "png")
    extra = {"on_select": lambda: _feature_clicked(key), "selection_mode": "points"} if select_feature else {}
    st.plotly_chart(fig, width="stretch", key=key,
                    config={"toImageButtonOptions": {"format": fmt, "filename": f"sinkscope-{key}", "scale": 2},
                            "modeBarButtons": [MODEBAR], "displaylogo": False},
                    **extra)


MODEBAR = ["toImage", "zoom2d", "pan2d", "resetScale2d"]
"""The Plotly mode bar of every figure: download (the sidebar's format), zoom, pan, reset. Plotly's default dozen
buttons cost a 2-core machine's browser about 0.03-0.06 s per chart to build (the Massive view's three charts
1.24-1.34 -> 1.14-1.15 s, measured in Chromium)."""


def clicked_feature(event) -> int | None:
    """The feature N of the first clicked point labelled fN in a plotly selection event, if any."""
    try:
        points = event["selection"]["points"]
    except (KeyError, TypeError):
        return None
    for point in points or []:
        label = str(point.get("x", ""))
        if label.startswith("f") and label[1:].isdigit():
            return int(label[1:])
    return None


def _feature_clicked(key: str) -> None:
    feature = clicked_feature(st.session_state.get(key))
    if feature is not None:
        st.session_state["selected_feature"] = feature


def feature_number(value) -> int | None:
    """A feature index from what a widget or a click left in the session: an int, "507" or "f507" (a label such as
    "f507 (max 2.5e+04)" reads as 507); anything else is None, never an exception."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    match = re.match(r"\s*f?(\d+)\b", str(value)) if value is not None else None
    return int(match[1]) if match else None


def selected_feature() -> int | None:
    """The feature selected in any view (a click on a feature bar, or the Massive view's picker)."""
    return feature_number(st.session_state.get("selected_feature"))


def download_table(table: pd.DataFrame, name: str, label: str) -> None:
    """CSV and Parquet download buttons for one table; the files are written when a button is clicked."""
    import io

    def parquet() -> bytes:
        buffer = io.BytesIO()
        table.to_parquet(buffer, index=False)
        return buffer.getvalue()

    c1, c2 = st.columns(2)
    c1.download_button(f"{label} (CSV)", lambda: table.to_csv(index=False).encode(), f"{name}.csv", "text/csv",
                       key=f"dl_{name}_csv")
    c2.download_button(f"{label} (Parquet)", parquet, f"{name}.parquet", "application/octet-stream",
                       key=f"dl_{name}_parquet")
