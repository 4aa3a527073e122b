"""The app's views: one function per sidebar entry, each drawing `sinkscope.viz` figures of one trace."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import streamlit as st

from sinkscope import analysis, viz
from sinkscope.errors import SinkscopeError
from sinkscope.trace import Trace
from sinkscope.webapp.state import (
    dataset_cosine,
    dataset_tables,
    download_table,
    feature_number,
    load_trace,
    mtime,
    selected_feature,
    show,
    token_window,
    trace_profile,
)


def view_overview(tr: Trace, s, eps: float, min_queries: int) -> None:
    show(viz.segment_profile_figure(s, eps), "ov_segments")
    c3, c4 = st.columns(2)
    with c3:
        why = analysis.missing_features(s)
        if why is None:
            show(viz.top_activations_figure(s), "ov_top")
        else:
            st.info(f"No top-activations figure: {why}.")
    with c4:
        findings = analysis.sample_findings(s, eps, min_queries=min_queries)
        st.subheader("Findings")
        sinks = findings["sinks"][:6]
        if sinks:
            lines = [f"- position {d['position']} {d['token']!r} [{d['segment']}]: {d['layers']} of "
                     f"{tr.manifest['n_layers']} layers" for d in sinks]
            st.markdown(f"**Sink tokens** (layers in which at least half of the heads give alpha > {eps}, keys seen "
                        f"by at least {min_queries} queries):\n" + "\n".join(lines))
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


def view_massive(tr: Trace, s, eps: float, min_queries: int) -> None:
    _massive_features(tr, s)
    st.subheader("Massive activations")
    if not len(s.massive):
        st.info("No massive activations in this sample at the trace's thresholds.")
        return
    # one part at a time, as in Compare: each Plotly figure costs this 2-core machine's browser about 0.3-0.4 s
    part = st.radio(
        "Show", MASSIVE_PARTS, horizontal=True, key="mass_part",
        help="Records: every (layer, token, feature) above the thresholds. Origin: the share of the jump at each "
             "massive activation's first layer written by attention and by the MLP (Sun et al., 2024). "
             "Jaccard: overlap of the massive-feature sets of the sink tokens (blank where both are empty).")
    if part == MASSIVE_PARTS[1]:
        show(viz.origin_figure(analysis.sample_findings(s, eps, min_queries=min_queries)["origin"], s.tokens),
             "mass_origin")
    elif part == MASSIVE_PARTS[2]:
        labels, matrix = analysis.sink_token_jaccard(s, eps, min_queries)
        show(viz.jaccard_figure(labels, matrix), "mass_jaccard")
    else:
        # a static table of the largest records (st.dataframe's grid costs the browser ~0.45 s more to draw); every
        # record is in the downloads
        table = s.massive.copy()
        table.insert(2, "token_text", [s.tokens[t] for t in table["token"]])
        top = table.reindex(table["value"].abs().sort_values(ascending=False, kind="stable").index[:RECORDS_SHOWN])
        st.caption(f"{len(table)} records (layer, token, feature with |h| above the thresholds)"
                   + (f"; the {RECORDS_SHOWN} largest shown, all in the downloads" if len(table) > RECORDS_SHOWN
                      else "") + ".")
        st.table(top.reset_index(drop=True))
        download_table(table, f"{Path(str(tr.path)).name}-{s.sample_id}-massive-records", "Massive records")


RECORDS_SHOWN = 30
"""Rows of the Massive view's records table (the largest |value| first)."""
MASSIVE_PARTS = ["Records", "Origin", "Jaccard between sink tokens"]


@st.fragment
def _massive_features(tr: Trace, s) -> None:
    """The feature part of the Massive view, a fragment: its controls (MLP toggle, top features, a bar click, the
    feature and token pickers, the layer slider) rerun only this part, not the table and figures below it."""
    n_layers = tr.manifest["n_layers"]
    c1, c2 = st.columns(2)
    with c1:
        mlp = st.toggle("MLP output instead of the residual stream", key="mass_mlp",
                        help="|mlp_out| of each block instead of the residual stream |h| (Sun et al., 2024 find the "
                             "massive activations written by an early MLP).")
        why = analysis.missing_features(s, mlp)
        if why is not None:
            st.info(f"No feature views: {why}.")
            return
        k = st.slider("Top features", 4, 64, 16, 4, key="mass_k",
                      help="The features ranked by their largest |value| over layers and tokens.")
        features = [int(f) for f in analysis.ranked_features(s, k, mlp)]
        chosen_feature = selected_feature()
        if chosen_feature is not None and chosen_feature not in features \
                and chosen_feature < tr.manifest["hidden_size"]:
            features.append(chosen_feature)  # selected elsewhere (Dataset, Compare): offered here too
        if chosen_feature in features:  # the picker follows a selection made anywhere
            st.session_state["mass_feature"] = chosen_feature
        elif st.session_state.get("mass_feature") not in features:
            st.session_state["mass_feature"] = features[0]
        show(viz.top_features_figure(s, k, mlp, selected=st.session_state["mass_feature"]), "mass_topk",
             select_feature=True)
    with c2:
        peak = np.asarray(s.mlp_feature_max_abs if mlp else s.feature_max_abs).max(axis=0)
        # the option labels must not change while an option stays (e.g. its max when the MLP toggle flips): the
        # browser keeps the label, and a label no option has any more comes back as a raw string
        feature = st.selectbox("Feature (click a bar on the left, or pick here; selects it in every view)", features,
                               key="mass_feature", format_func=lambda f: f"f{f}",
                               on_change=lambda: st.session_state.update(
                                   selected_feature=feature_number(st.session_state["mass_feature"])))
        feature = feature_number(feature)
        if feature is None or feature not in features:
            feature = features[0]
        st.caption(f"f{feature}: largest {'|mlp_out|' if mlp else '|h|'} over layers and tokens {peak[feature]:,.4g}")
        massive_tokens = sorted(set(map(int, s.massive["token"]))) if len(s.massive) else []
        default = (massive_tokens or [0])[:4]
        chosen = token_positions(st.text_input(
            "Tokens (positions, comma-separated)", ", ".join(map(str, default)), key="mass_tokens",
            help="Default: the tokens that carry massive activations. The figure's legend names each token."),
            len(s.tokens))
        show(viz.feature_trajectory_figure(s, int(feature), chosen or default, mlp), "mass_traj")
    long = len(s.tokens) > TOKEN_MAP_TOKENS
    if not st.toggle("Tokens x features at one layer", value=not long, key=f"mass_tokmap_{'long' if long else 'short'}",
                     help=f"The selected and top features across this sample's tokens at one layer (log colour; "
                          f"more than 512 tokens are max-pooled into bins, so single spikes stay visible). Drawn "
                          f"by default up to {TOKEN_MAP_TOKENS:,} tokens; a longer sample's map waits for this "
                          f"switch, since each chart costs the browser time."):
        return
    layer = st.slider("Layer for tokens x features", 0, n_layers - 1,
                      int(s.massive["layer"].min()) if len(s.massive) else 0, key="mass_layer")
    shown = [feature] + [f for f in features if f != feature][:7]
    show(viz.token_feature_heatmap(s, layer, shown, mlp=mlp), "mass_tokens_map")


TOKEN_MAP_TOKENS = 1024
"""Samples up to this many tokens show the Massive view's tokens x features map by default; longer ones behind a
switch (on a 2,048-token trace it cost the view's first render 0.05-0.23 s in Chromium on the 2-core machine,
session 15)."""


def token_positions(text: str, n_tokens: int, most: int = 12) -> list[int]:
    """The positions typed into a tokens field ("0, 5, 12"); what is not a position of this sample is reported in
    a warning that names it, and the rest are kept (at most `most`)."""
    kept, bad = [], []
    for part in str(text).replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        if part.isdigit() and int(part) < n_tokens:
            if int(part) not in kept:
                kept.append(int(part))
        else:
            bad.append(part)
    if bad:
        st.warning(f"Tokens: {', '.join(map(repr, bad))} not a position of this sample (0-{n_tokens - 1}); ignored.")
    if len(kept) > most:
        st.warning(f"Tokens: the first {most} of {len(kept)} positions are drawn.")
    return kept[:most]


def view_cosine(tr: Trace, s) -> None:
    window = token_window(len(s.tokens), "cos_window")
    show(viz.cosine_heatmap(s, token_range=window), "cos_heat")
    show(viz.cosine_by_segment_figure(s), "cos_curves")


def view_experts(tr: Trace, s, eps: float, min_queries: int) -> None:
    if s.router_ids is None:
        st.info("This trace holds no router fields: it was recorded from a model without MoME adapters "
                "(`model.mome` in the training config). Record a MoME checkpoint with `sinkscope record "
                "--checkpoint RUN` to see which experts each segment and the sink tokens use.")
        return
    layer = st.slider("Layer", 0, tr.manifest["n_layers"] - 1, 0, key="exp_layer",
                      help="MoME routes every token to its top-k experts in every block (arXiv 2510.04136).")
    scope = st.radio("Over", ["this sample", "the whole trace"], horizontal=True, key="exp_scope")
    samples = [s] if scope == "this sample" else tr
    table = analysis.expert_usage(samples, layer, eps, min_queries=min_queries)
    show(viz.expert_usage_figure(table, layer), "exp_usage")
    st.caption(f"Each row: the share of the segment's gate mass per routed expert (shared experts are always on "
               f"and not shown). 'sinks': tokens that are sinks at layer {layer} (alpha > {eps} in at least half of "
               f"the heads, seen by at least {min_queries} queries).")


def _content(sample) -> str:
    return str(sample.extra.get("text") or sample.extra.get("transcript") or "")


def sample_pairs(a: Trace, b: Trace) -> list[tuple[str, str, str]]:
    """(label, id in A, id in B): samples with the same id, else with the same text or transcript."""
    shared = set(b.sample_ids)
    pairs = [(sid, sid, sid) for sid in a.sample_ids if sid in shared]
    if pairs:
        return pairs
    by_content = {}
    for s in b:
        by_content.setdefault(_content(s), s.sample_id)
    by_content.pop("", None)
    return [(f"{s.sample_id} ~ {by_content[_content(s)]}: {_content(s)[:40]}", s.sample_id, by_content[_content(s)])
            for s in a if _content(s) in by_content]


def view_compare(root: Path, tr: Trace, traces: list[str], name: str, eps: float, min_queries: int) -> None:
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
    names = (f"A: {name}", f"B: {other_name}")
    part = st.radio("Compare", COMPARE_PARTS, horizontal=True, key="cmp_part", label_visibility="collapsed",
                    help="One part at a time, so that each click redraws only its own figures.")
    if part == COMPARE_PARTS[0]:
        _compare_traces(tr, other, name, other_name, names, eps, min_queries)
    else:
        _compare_sample(tr, other, names, eps)


COMPARE_PARTS = ("Whole traces", "One sample in both")


def _compare_traces(tr: Trace, other: Trace, name: str, other_name: str, names: tuple[str, str], eps: float,
                    min_queries: int) -> None:
    st.subheader("Whole traces")
    st.caption(f"A = {name} ({len(tr)} samples, {tr.manifest.get('model')}), B = {other_name} ({len(other)} "
               f"samples, {other.manifest.get('model')}). Means over each trace's samples, error bars one standard "
               "deviation; the traces need not share a sample.")
    pa, pb = (trace_profile(str(t.path), mtime(t.path), eps, min_queries) for t in (tr, other))
    for t in (tr, other):
        if t.index_note:
            st.warning(t.index_note)
    # one part at a time, as everywhere in the app: each Plotly figure costs a 2-core machine's browser 0.3-0.4 s,
    # and the five at once took 1.4-1.5 s to open (issue 14's speed script)
    part = st.radio("Whole-trace part", TRACE_PARTS, horizontal=True, key="cmp_trace_part",
                    help="Sinks: the share of each segment's tokens that are sinks, and their mean cos to BOS, per "
                         "layer. Massive: the largest |h| against the median per layer, and the massive features "
                         "of each trace. Positions: where the sinks sit.")
    if part == TRACE_PARTS[0]:
        c1, c2 = st.columns(2)
        with c1:
            show(viz.profile_figure(analysis.profile_mean(pa["sink_rate"]), analysis.profile_mean(pb["sink_rate"]),
                                    names, f"Sinks by segment (alpha > {eps} in at least half of the heads)",
                                    "% of the segment's tokens", bounds=(0.0, 100.0)), "cmp_rate")
        with c2:
            show(viz.profile_figure(analysis.profile_mean(pa["cosine"]), analysis.profile_mean(pb["cosine"]), names,
                                    "Mean cos-to-BOS by segment", "cos to BOS"), "cmp_cosine")
    elif part == TRACE_PARTS[1]:
        c3, c4 = st.columns(2)
        with c3:
            acts = [analysis.profile_mean(p["activations"].melt(["sample", "layer"], var_name="curve"),
                                          by=("curve", "layer")) for p in (pa, pb)]
            show(viz.profile_figure(*acts, names, "Largest |h| over tokens vs the median |h|", "|h|",
                                    group="curve", log=True), "cmp_acts")
        with c4:
            show(viz.massive_feature_comparison(pa["massive_features"], pb["massive_features"], names,
                                                selected=selected_feature()), "cmp_features", select_feature=True)
            overlap_sets = analysis.feature_set_overlap(pa["massive_features"], pb["massive_features"])
            jac = overlap_sets["jaccard"]

            def listed(features: list[int]) -> str:
                return ", ".join(map(str, features[:12])) + (f" and {len(features) - 12} more"
                                                             if len(features) > 12 else "") if features else "none"

            st.caption(f"Massive in at least half of the samples: A: {listed(overlap_sets['a'])}; B: "
                       f"{listed(overlap_sets['b'])}. "
                       + ("Jaccard undefined (both sets empty)." if np.isnan(jac) else f"Jaccard {jac:.2f}."))
    else:
        show(viz.sink_position_comparison(pa["sink_positions"], pb["sink_positions"], names), "cmp_positions")


TRACE_PARTS = ("Sinks and cos to BOS", "Massive activations", "Sink positions")


def _compare_sample(tr: Trace, other: Trace, names: tuple[str, str], eps: float) -> None:
    st.subheader("One sample in both")
    pairs = sample_pairs(tr, other)
    if not pairs:
        st.info("No sample of A has the same id, text or transcript as a sample of B: compare the traces above.")
        return
    label = st.selectbox(f"Paired sample ({len(pairs)} pairs, by id or by content)", [p[0] for p in pairs],
                         key="cmp_sample")
    _, id_a, id_b = next(p for p in pairs if p[0] == label)
    a, b = tr.sample(id_a), other.sample(id_b)
    part = st.radio("Show", SAMPLE_PARTS, horizontal=True, key="cmp_sample_part",
                    help="One figure at a time. Differences: B minus A, token by token, where the pair has the same "
                         "length.")
    if part == SAMPLE_PARTS[0]:
        show(viz.side_by_side(viz.received_attention_heatmap(a), viz.received_attention_heatmap(b), names),
             "cmp_heat")
    elif part == SAMPLE_PARTS[1]:
        show(viz.panel_grid([[viz.sink_rate_by_segment_figure(a, eps), viz.sink_rate_by_segment_figure(b, eps)],
                             [viz.cosine_by_segment_figure(a), viz.cosine_by_segment_figure(b)]],
                            f"Sample {a.sample_id} (A) and {b.sample_id} (B) by segment",
                            subplot_titles=[f"{n}: {t}" for t in ("sink rate", "mean cos to BOS") for n in names]),
             "cmp_segments")
    elif len(a.tokens) == len(b.tokens):
        show(viz.panel_grid([[viz.difference_heatmap(a, b, "attention_received")],
                             [viz.difference_heatmap(a, b, "bos_cosine")]],
                            f"B - A for sample {a.sample_id}", row_height=340), "cmp_diff")
    else:
        st.info(f"The pair has {len(a.tokens)} tokens in A and {len(b.tokens)} in B: no token-wise difference.")


SAMPLE_PARTS = ("Attention received, A | B", "By segment", "Differences B - A")


def view_dataset(tr: Trace, eps: float, min_queries: int) -> None:
    key = (str(tr.path), mtime(tr.path))
    sinks, features, summary, records = dataset_tables(*key, eps, min_queries)
    if tr.index_note:
        st.warning(tr.index_note)
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
            show(viz.massive_feature_histogram(features, selected_feature()), "ds_features", select_feature=True)
    layer = st.slider("Layer for the cosine distribution", 0, tr.manifest["n_layers"] - 1,
                      min(5, tr.manifest["n_layers"] - 1), key="ds_layer")
    show(viz.cosine_distribution_figure(dataset_cosine(*key, layer), layer), "ds_cos")
    st.subheader("Per-layer summary")
    # a static table: Streamlit's data grid cost the browser 0.2-0.7 s per visit (the CSV/Parquet below sort and
    # filter elsewhere)
    st.table(summary)
    st.subheader("Download")
    stem = Path(str(tr.path)).name
    download_table(summary, f"{stem}-layer-summary", "Per-layer summary")
    download_table(records, f"{stem}-massive-records", f"Massive-activation records ({len(records)})")
    download_table(sinks, f"{stem}-sink-tokens", f"Sink tokens at eps={eps} ({len(sinks)})")
