"""The Streamlit trace browser. `streamlit run app.py` or `sinkscope app --root DIR`.

It reads traces (the Trace API) under one root directory and nothing else; every figure comes from
`sinkscope.viz`. The root is `SINKSCOPE_ROOT` (default `traces/`); paths outside it are refused.
"""

from __future__ import annotations

import os
from pathlib import Path

import streamlit as st

from sinkscope.errors import SinkscopeError
from sinkscope.metrics import MIN_QUERIES, SINK_EPS
from sinkscope.webapp.state import get_root, list_traces, load_trace, pick_sample, resolve_under_root
from sinkscope.webapp.views import (
    view_attention,
    view_compare,
    view_cosine,
    view_dataset,
    view_experts,
    view_massive,
    view_overview,
)

VIEWS = ["Overview", "Attention", "Massive activations", "Cosine to BOS", "Experts", "Compare", "Dataset"]
VIEW_HELP = {
    "Overview": "One sample at a glance: how often each segment is a sink per layer, the largest |h| against the "
                "median (massive activations, Sun et al., 2024), mean cosine to BOS per segment, and the findings.",
    "Attention": "alpha = the attention a key receives, averaged over the queries that see it (Gu et al., 2025); "
                 "sinks are the keys with large alpha in most heads (Xiao et al., 2024, attention sinks).",
    "Massive activations": "Activations far above the median (|h| >= 100 and >= 1000 x median, Sun et al., 2024) "
                           "sit at a few fixed feature indices; pick a feature to follow it across layers and tokens.",
    "Cosine to BOS": "Cosine between each token's residual stream and BOS's: sink tokens are almost parallel to BOS "
                     "(the AVSR sinks paper), which its decorrelation loss penalises (cos^2).",
    "Experts": "MoME models (arXiv 2510.04136): which routed experts each segment, and the sink tokens, use.",
    "Compare": "Two traces: whole-trace profiles (no shared sample needed), or one sample paired by id or text.",
    "Dataset": "Aggregates over every sample of the trace, with CSV/Parquet downloads.",
}
"""One line per view, shown under its title: what it shows and the paper behind it."""


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
    if not traces and (Path(root) / "manifest.json").is_file():  # pointed at a trace instead of a folder of them
        st.info(f"{root} is a trace itself; the app lists the traces under its root folder. Start it on the folder "
                f"that holds this trace: `sinkscope app --root {Path(root).resolve().parent}`.")
        return
    if not traces:
        st.info(f"No traces under {root}. Record one with `sinkscope record --text-file examples/prompts.txt "
                f"--out {root}/demo`, or point the app elsewhere with `sinkscope app --root DIR`.")
        return
    if requested is not None and requested not in traces:
        st.error(f"?trace={requested}: no such trace under {root}. The traces there: {', '.join(traces)}. "
                 "Pick one in the sidebar.")
    first = os.environ.get("SINKSCOPE_TRACE")  # `sinkscope app --trace NAME`: the trace to open on
    default = traces.index(requested) if requested in traces else traces.index(first) if first in traces else 0
    name = st.sidebar.selectbox("Trace", traces, index=default, key="trace")
    view = st.sidebar.radio("View", VIEWS, key="view")
    eps = st.sidebar.slider(
        "Sink threshold eps", 0.05, 0.9, SINK_EPS, 0.05, key="eps",
        help="alpha (attention received) of a key = its attention weight averaged over the queries that see it. "
             "A token is a sink in a layer when at least half of the heads give it alpha > eps (Gu et al., 2025, "
             "'When attention sink emerges'; Sink^eps of position 0 is their metric).")
    st.sidebar.radio("Figure download format", ["png", "svg"], horizontal=True, key="fig_format",
                     help="What the camera button above each figure saves.")
    min_queries = st.sidebar.number_input(
        "Min. queries per sink", 1, 256, MIN_QUERIES, key="min_queries",
        help="A key seen by fewer queries (the last positions: alpha there averages over 1-3 queries) is never "
             "called a sink; its alpha is still shown.")
    try:
        tr = load_trace(root, name)
        st.sidebar.caption(f"{tr.manifest.get('model')} | {tr.manifest['n_layers']} layers x "
                           f"{tr.manifest['n_heads']} heads | {len(tr)} samples")
        for entry, why in tr.skipped:
            st.sidebar.warning(f"samples/{entry} is not read: {why}")
        if len(tr) == 0:
            st.warning(f"Trace {name} holds no samples yet.")
            return
        st.header(f"{view}: {name}")
        st.caption(VIEW_HELP[view])
        if view == "Dataset":
            view_dataset(tr, eps, int(min_queries))
            return
        if view == "Compare":
            view_compare(root, tr, traces, name, eps, int(min_queries))
            return
        s = tr[pick_sample(tr, "main")]
        st.caption(f"sample {s.sample_id}: " + " ".join(f"[{seg} {a}-{b - 1}]" for seg, a, b in s.segments))
        if "transcript" in s.extra:
            line = f"**Reference:** {s.extra['transcript']}"
            if "hypothesis" in s.extra:
                line += (f" · **Hypothesis** (greedy): {s.extra['hypothesis'] or '(empty)'} · **WER** "
                         f"{100 * float(s.extra['wer']):.1f} %")
            else:
                line += " · (no hypothesis in this trace: record it again with this sinkscope to store one)"
            st.markdown(line)
        if view == "Overview":
            view_overview(tr, s, eps, int(min_queries))
        elif view == "Attention":
            view_attention(tr, s, eps)
        elif view == "Massive activations":
            view_massive(tr, s, eps, int(min_queries))
        elif view == "Cosine to BOS":
            view_cosine(tr, s)
        elif view == "Experts":
            view_experts(tr, s, eps, int(min_queries))
    except SinkscopeError as exc:
        st.error(f"Cannot show trace '{name}': {exc}")


__all__ = ["main", "resolve_under_root", "list_traces", "VIEWS"]
