"""The app's views: one function per sidebar entry, each drawing `sinkscope.viz` figures of one trace."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from sinkscope import analysis, viz
from sinkscope.errors import SinkscopeError
from sinkscope.trace import Trace
from sinkscope.webapp.state import dataset_cosine, dataset_tables, load_trace, mtime, show, token_window


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


def view_attention(tr: Trace, s, eps: float) -> None:
    n = len(s.tokens)
    c1, c2 = st.columns([1, 2])
    with c1:
        token = st.number_input("Token for the head grid", 0, n - 1, 0, key="att_token")
        show(viz.head_grid(s, int(token), eps), "att_grid")
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


def view_dataset(tr: Trace, eps: float) -> None:
    st.caption(f"Aggregates over all {len(tr)} samples.")
    key = (str(tr.path), mtime(tr.path))
    sinks, features, summary = dataset_tables(*key, eps)
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
    show(viz.cosine_distribution_figure(dataset_cosine(*key, layer), layer), "ds_cos")
    st.subheader("Per-layer summary")
    st.dataframe(summary, width="stretch", height=320)
