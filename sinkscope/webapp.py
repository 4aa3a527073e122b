"""The Streamlit trace browser. `streamlit run app.py` or `sinkscope app --root DIR`.

It reads traces (the Trace API) under one root directory and nothing else; every figure comes from
`sinkscope.viz`. The root is `SINKSCOPE_ROOT` (default `traces/`); paths outside it are refused.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import streamlit as st

from sinkscope import analysis, viz
from sinkscope.errors import SinkscopeError, TraceError
from sinkscope.trace import MANIFEST, Trace

VIEWS = ["Overview", "Attention", "Massive activations", "Cosine to BOS", "Compare", "Dataset"]
DEFAULT_ROOT = "traces"


# ------------------------------------------------------------------------------------------- data access
def get_root() -> Path:
    return Path(os.environ.get("SINKSCOPE_ROOT", DEFAULT_ROOT)).expanduser().resolve()


def resolve_under_root(root: Path, name: str) -> Path:
    """The trace directory `name` (relative to `root`); refuse anything that resolves outside the root."""
    path = (root / name).resolve()
    if not path.is_relative_to(root):
        raise TraceError(f"'{name}' is outside the trace root {root}; only traces under the root can be opened")
    return path


@st.cache_data(ttl=10, show_spinner=False)
def list_traces(root: str) -> list[str]:
    """Trace directories under `root` (a directory holding manifest.json), up to three levels deep."""
    base = Path(root)
    if not base.is_dir():
        return []
    found = []
    for manifest in sorted(base.glob(f"**/{MANIFEST}")):
        rel = manifest.parent.relative_to(base)
        if len(rel.parts) <= 3 and not any(part.startswith(".") for part in rel.parts):
            found.append(str(rel))
    return found


def _mtime(path: Path) -> float:
    manifest = path / MANIFEST
    return manifest.stat().st_mtime if manifest.exists() else 0.0


@st.cache_resource(show_spinner="Opening trace...", max_entries=8)
def _load(path: str, mtime: float) -> Trace:
    return Trace.load(path)


def load_trace(root: Path, name: str) -> Trace:
    path = resolve_under_root(root, name)
    return _load(str(path), _mtime(path))


@st.cache_data(show_spinner=False, max_entries=8)
def _sample_index(path: str, mtime: float) -> pd.DataFrame:
    tr = _load(path, mtime)
    return pd.DataFrame({"id": tr.sample_ids,
                         "text": [str(s.extra.get("text", s.extra.get("transcript", ""))) for s in tr],
                         "tokens": [len(s) for s in tr]})


def sample_index(tr: Trace) -> pd.DataFrame:
    return _sample_index(str(tr.path), _mtime(tr.path))


# ------------------------------------------------------------------------------------------------- widgets
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
    return None if (lo, hi) == (0, n) else (lo, max(hi, lo + 1))


def show(fig, key: str) -> None:
    st.plotly_chart(fig, width="stretch", key=key)


# ---------------------------------------------------------------------------------------------------- views
def view_overview(tr: Trace, s, eps: float) -> None:
    c1, c2 = st.columns(2)
    with c1:
        show(viz.sink_rate_by_segment_figure(s, eps), "ov_sinkrate")
    with c2:
        show(viz.top_activations_figure(s), "ov_top")
    c3, c4 = st.columns(2)
    with c3:
        show(viz.cosine_by_segment_figure(s), "ov_cos")
    with c4:
        findings = analysis.sample_findings(s, eps)
        st.subheader("Findings")
        sinks = findings["sinks"][:6]
        if sinks:
            st.markdown("**Sink tokens** (layers in which at least half of the heads give alpha > "
                        f"{eps}):\n" + "\n".join(f"- position {d['position']} {d['token']!r} [{d['segment']}]: "
                                                 f"{d['layers']} of {tr.manifest['n_layers']} layers" for d in sinks))
        else:
            st.markdown("**Sink tokens:** none at this threshold.")
        feats = findings["massive_features"]
        if len(feats):
            st.markdown("**Massive features:** " + ", ".join(
                f"{int(r.feature)} (from layer {int(r.first_layer)}, max |h| {r.max_value:.4g})"
                for r in feats.head(6).itertuples()))
            origin = findings["origin"]
            st.markdown("**Origin:** " + "; ".join(
                f"token {int(r.token)} feature {int(r.feature)} at layer {int(r.origin_layer)}: "
                f"{100 * r.mlp_share:.0f}% MLP, {100 * r.attn_share:.0f}% attention"
                for r in origin.head(4).itertuples()))
        else:
            th = tr.manifest.get("thresholds", {})
            st.markdown(f"**Massive activations:** none (|h| >= {th.get('massive_abs', 100):g} and >= "
                        f"{th.get('massive_rel', 1000):g} x median).")


def view_attention(tr: Trace, s) -> None:
    n = len(s.tokens)
    c1, c2 = st.columns([1, 2])
    with c1:
        token = st.number_input("Token for the head grid", 0, n - 1, 0, key="att_token")
        show(viz.head_grid(s, int(token)), "att_grid")
    with c2:
        heads = ["mean"] + list(range(tr.manifest["n_heads"]))
        head = st.selectbox("Head", heads, key="att_head")
        max_tokens = st.slider("Max columns (longer sequences are max-pooled)", 32, 1024, 256, 32, key="att_max")
        window = token_window(n, "att_window")
        show(viz.received_attention_heatmap(s, None if head == "mean" else int(head), max_tokens, window),
             "att_heat")
    maps = sorted(s.attention_maps)
    if maps:
        pair = st.selectbox("Full attention map", maps, format_func=lambda p: f"layer {p[0]}, head {p[1]}",
                            key="att_map")
        show(viz.attention_map(s, pair[0], pair[1]), "att_map_fig")
    else:
        st.caption("This trace holds no full attention maps (record with --attention-maps L:H,...).")


def view_massive(tr: Trace, s, eps: float) -> None:
    c1, c2 = st.columns(2)
    with c1:
        mlp = st.toggle("MLP output instead of the residual stream", key="mass_mlp")
        show(viz.feature_heatmap(s, mlp=mlp), "mass_heat")
    with c2:
        layer = st.slider("Layer for the 3D view", 0, tr.manifest["n_layers"] - 1,
                          int(s.massive["layer"].min()) if len(s.massive) else 0, key="mass_layer")
        show(viz.token_feature_surface(s, layer), "mass_surface")
    st.subheader("Massive activations")
    if len(s.massive):
        table = s.massive.copy()
        table.insert(2, "token_text", [s.tokens[t] for t in table["token"]])
        st.dataframe(table, width="stretch", height=240)
        c3, c4 = st.columns(2)
        with c3:
            labels, matrix = analysis.sink_token_jaccard(s, eps)
            show(viz.jaccard_figure(labels, matrix), "mass_jaccard")
        with c4:
            show(viz.origin_figure(analysis.sample_findings(s, eps)["origin"], s.tokens), "mass_origin")
    else:
        st.info("No massive activations in this sample at the trace's thresholds.")


def view_cosine(tr: Trace, s) -> None:
    window = token_window(len(s.tokens), "cos_window")
    show(viz.cosine_heatmap(s, token_range=window), "cos_heat")
    show(viz.cosine_by_segment_figure(s), "cos_curves")


def view_compare(root: Path, tr: Trace, traces: list[str], name: str, eps: float) -> None:
    others = [t for t in traces if t != name] or traces
    mine = set(tr.sample_ids)

    def overlap(other: str) -> int:
        try:
            return len(mine & set(load_trace(root, other).sample_ids))
        except SinkscopeError:
            return -1

    best = max(range(len(others[:20])), key=lambda i: overlap(others[i]))
    other_name = st.selectbox("Trace B (the default shares the most sample ids)", others, index=best,
                              key="cmp_other")
    try:
        other = load_trace(root, other_name)
    except SinkscopeError as exc:
        st.error(str(exc))
        return
    shared = [sid for sid in tr.sample_ids if sid in set(other.sample_ids)]
    st.caption(f"A = {name} ({len(tr)} samples), B = {other_name} ({len(other)} samples); {len(shared)} shared ids.")
    if not shared:
        st.warning("The two traces share no sample ids, so there is nothing to compare sample by sample.")
        return
    sid = st.selectbox("Shared sample", shared, key="cmp_sample")
    a, b = tr.sample(sid), other.sample(sid)
    show(viz.side_by_side(viz.received_attention_heatmap(a), viz.received_attention_heatmap(b),
                          (f"A: {name}", f"B: {other_name}")), "cmp_heat")
    c1, c2 = st.columns(2)
    with c1:
        show(viz.side_by_side(viz.sink_rate_by_segment_figure(a, eps), viz.sink_rate_by_segment_figure(b, eps),
                              ("A: sink rate by segment", "B")), "cmp_sink")
    with c2:
        show(viz.side_by_side(viz.cosine_by_segment_figure(a), viz.cosine_by_segment_figure(b),
                              ("A: cos-to-BOS by segment", "B")), "cmp_cos")
    if len(a.tokens) == len(b.tokens):
        show(viz.difference_heatmap(a, b, "attention_received"), "cmp_diff_alpha")
        show(viz.difference_heatmap(a, b, "bos_cosine"), "cmp_diff_cos")
    else:
        st.info(f"Sample {sid} has {len(a.tokens)} tokens in A and {len(b.tokens)} in B: no token-wise difference.")


@st.cache_data(show_spinner="Aggregating over the trace...", max_entries=16)
def _dataset_tables(path: str, mtime: float, eps: float) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    tr = _load(path, mtime)
    return analysis.dataset_sinks(tr, eps), analysis.dataset_massive_features(tr), analysis.layer_summary(tr, eps)


@st.cache_data(show_spinner=False, max_entries=32)
def _dataset_cosine(path: str, mtime: float, layer: int) -> pd.DataFrame:
    return analysis.dataset_cosine(_load(path, mtime), layer)


def view_dataset(tr: Trace, eps: float) -> None:
    st.caption(f"Aggregates over all {len(tr)} samples.")
    key = (str(tr.path), _mtime(tr.path))
    sinks, features, summary = _dataset_tables(*key, eps)
    c1, c2 = st.columns(2)
    with c1:
        if sinks.empty:
            st.info(f"No sink tokens at eps={eps} in this trace (lower the threshold in the sidebar).")
        else:
            show(viz.sink_positions_figure(sinks), "ds_sinks")
    with c2:
        if features.empty:
            st.info("No massive activations in this trace.")
        else:
            show(viz.massive_feature_histogram(features), "ds_features")
    layer = st.slider("Layer for the cosine distribution", 0, tr.manifest["n_layers"] - 1,
                      min(5, tr.manifest["n_layers"] - 1), key="ds_layer")
    show(viz.cosine_distribution_figure(_dataset_cosine(*key, layer), layer), "ds_cos")
    st.subheader("Per-layer summary")
    st.dataframe(summary, width="stretch", height=320)


# ------------------------------------------------------------------------------------------------------ main
def main() -> None:
    st.set_page_config(page_title="sinkscope", layout="wide")
    root = get_root()
    st.sidebar.title("sinkscope")
    traces = list_traces(str(root))
    requested = st.query_params.get("trace")
    if requested is not None:
        try:
            resolve_under_root(root, requested)
        except SinkscopeError as exc:
            st.error(str(exc))
            return
    if not traces:
        st.info(f"No traces under {root}. Record one with `sinkscope record --text-file examples/prompts.txt "
                f"--out {root}/demo`, or point the app elsewhere with `sinkscope app --root DIR`.")
        return
    default = traces.index(requested) if requested in traces else 0
    name = st.sidebar.selectbox("Trace", traces, index=default, key="trace")
    view = st.sidebar.radio("View", VIEWS, key="view")
    eps = st.sidebar.slider("Sink threshold eps", 0.05, 0.9, 0.3, 0.05, key="eps")
    try:
        tr = load_trace(root, name)
        st.sidebar.caption(f"{tr.manifest.get('model')} | {tr.manifest['n_layers']} layers x "
                           f"{tr.manifest['n_heads']} heads | {len(tr)} samples")
        if len(tr) == 0:
            st.warning(f"Trace {name} holds no samples yet.")
            return
        st.header(f"{view}: {name}")
        if view == "Dataset":
            view_dataset(tr, eps)
            return
        if view == "Compare":
            view_compare(root, tr, traces, name, eps)
            return
        s = tr[pick_sample(tr, "main")]
        st.caption(f"sample {s.sample_id}: " + " ".join(f"[{seg} {a}-{b - 1}]" for seg, a, b in s.segments))
        if view == "Overview":
            view_overview(tr, s, eps)
        elif view == "Attention":
            view_attention(tr, s)
        elif view == "Massive activations":
            view_massive(tr, s, eps)
        elif view == "Cosine to BOS":
            view_cosine(tr, s)
    except SinkscopeError as exc:
        st.error(f"Cannot show trace '{name}': {exc}")


__all__ = ["main", "resolve_under_root", "list_traces", "VIEWS"]
