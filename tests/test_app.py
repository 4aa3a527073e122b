"""The Streamlit app, driven by streamlit.testing.AppTest on small generated traces."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from sinkscope import analysis
from sinkscope.metrics import SINK_EPS
from sinkscope.trace import Trace
from sinkscope.webapp.views import RECORDS_SHOWN
from tests.av_trace import AV_SEGMENTS, write_av_trace

APP = str(Path(__file__).resolve().parents[1] / "app.py")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("traces")
    write_av_trace(root / "av-a", seed=0)
    write_av_trace(root / "av-b", seed=1)
    write_av_trace(root / "av-renamed", seed=1, prefix="other")  # other ids, the same transcripts
    broken = root / "broken"
    write_av_trace(broken, seed=2, n=1)
    (broken / "manifest.json").write_text('{"format": "sinkscope-trace", "schema_version": 1, "model"')
    return root


@pytest.fixture()
def app(root, monkeypatch):
    monkeypatch.setenv("SINKSCOPE_ROOT", str(root))
    st.cache_data.clear()
    st.cache_resource.clear()
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    return at


def _decode(value):
    """Plotly JSON stores numpy arrays as {"dtype", "bdata"(base64), "shape"}; turn them back into arrays."""
    if isinstance(value, dict) and "bdata" in value:
        arr = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        shape = value.get("shape")
        if isinstance(shape, str):
            shape = [int(x) for x in shape.split(",")]
        return arr.reshape(shape) if shape else arr
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


class Fig:
    """A figure spec as the browser receives it: `data` (list of trace dicts) and `layout`."""

    def __init__(self, spec: str):
        d = _decode(json.loads(spec))
        self.data, self.layout = d["data"], d.get("layout", {})
        self.title = (self.layout.get("title") or {}).get("text", "")
        self.shapes = self.layout.get("shapes", [])
        self.annotations = [a.get("text") for a in self.layout.get("annotations", [])]


def figures(at) -> list[Fig]:
    return [Fig(el.proto.spec) for el in at.get("plotly_chart")]


def by_title(at, start: str) -> Fig:
    for fig in figures(at):
        if fig.title.startswith(start):
            return fig
    raise AssertionError(f"no figure titled {start!r}: {[f.title for f in figures(at)]}")


def grid_panel(at, start: str) -> Fig:
    """The panel of a `viz.panel_grid` figure whose subplot title starts with `start`: its traces (those on its x
    axis) in `data`, the whole figure's layout. make_subplots puts the subplot titles first, in row-major order."""
    for fig in figures(at):
        for i, text in enumerate(fig.annotations):
            if text and text.startswith(start):
                axis = "x" if i == 0 else f"x{i + 1}"
                fig.data, fig.title = [t for t in fig.data if t.get("xaxis", "x") == axis], text
                return fig
    raise AssertionError(f"no panel titled {start!r}: {[f.annotations for f in figures(at)]}")


def goto(at, view: str, trace: str = "av-a"):
    at.sidebar.selectbox(key="trace").set_value(trace)
    at.sidebar.radio(key="view").set_value(view).run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    return at


def test_trace_picker_lists_traces_under_root(app):
    assert app.sidebar.selectbox(key="trace").options == ["av-a", "av-b", "av-renamed", "broken"]
    search = app.sidebar.text_input(key="main_search")
    search.set_value("red by").run()
    sample = app.sidebar.selectbox(key="main_sample")
    assert len(sample.options) == 1 and "utt01" in sample.options[0]


def test_attention_view_shows_the_trace_values_with_segment_bands(app, root):
    s = Trace.load(root / "av-a")[0]
    goto(app, "Attention")
    heat = by_title(app, "Attention received, mean over heads")
    z = np.asarray(heat.data[0]["z"])
    alpha = np.asarray(s.attention_received)
    np.testing.assert_allclose(z[:, 0], alpha[:, :, 0].mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(z, alpha.mean(axis=1), rtol=1e-5)
    spans = sorted((shape["x0"], shape["x1"]) for shape in heat.shapes)
    assert spans == sorted((s0 - 0.5, e0 - 0.5) for _, s0, e0 in AV_SEGMENTS)
    assert {"audio", "video", "prompt", "transcript"} <= set(heat.annotations)
    assert "'A3'" in heat.data[0]["x"][5], "hover shows the token text"

    app.selectbox(key="att_head").set_value(2).run()
    z = np.asarray(by_title(app, "Attention received, head 2").data[0]["z"])
    np.testing.assert_allclose(z, alpha[:, 2], rtol=1e-5)

    app.slider(key="att_max").set_value(32).run()
    pooled = by_title(app, "Attention received, head 2")
    zp = np.asarray(pooled.data[0]["z"])
    assert zp.shape[1] <= 32 and "max-pooled" in pooled.title
    np.testing.assert_allclose(zp[:, 0], alpha[:, 2, 0], rtol=1e-5)  # BOS kept at full resolution
    np.testing.assert_allclose(zp.max(axis=1), alpha[:, 2].max(axis=1), rtol=1e-5)  # no peak lost

    grid = by_title(app, "Attention received by token 0")
    np.testing.assert_allclose(np.asarray(grid.data[0]["z"]), alpha[:, :, 0], rtol=1e-5)
    amap = by_title(app, "Attention map, layer 1, head 0")
    np.testing.assert_allclose(np.asarray(amap.data[0]["z"]), s.attention_maps[(1, 0)], rtol=1e-5)


def test_token_map_waits_for_its_switch_on_long_samples(app, root, monkeypatch):
    """The Massive view's tokens x features map is drawn by default for samples up to TOKEN_MAP_TOKENS tokens; a
    longer sample's waits for its switch (a chart costs the browser time), and the switch draws it with the
    selected feature first and the layer's pooled values."""
    from sinkscope.webapp import views

    s = Trace.load(root / "av-a")[0]
    goto(app, "Massive activations")
    assert by_title(app, "|h| at layer").data[0]["y"][0].startswith("f")
    monkeypatch.setattr(views, "TOKEN_MAP_TOKENS", len(s.tokens) - 1)  # this sample is now a long one
    app.run()
    assert not [f for f in figures(app) if f.title.startswith("|h| at layer")]
    switch = app.toggle(key="mass_tokmap_long")
    assert switch.value is False and "waits for this switch" in switch.proto.help
    switch.set_value(True).run()
    assert not app.exception, app.exception
    tokmap = by_title(app, "|h| at layer")
    feature = int(np.argmax(np.asarray(s.feature_max_abs).max(axis=0)))
    assert tokmap.data[0]["y"][0] == f"f{feature}"
    layer = int(s.massive["layer"].min()) if len(s.massive) else 0
    assert tokmap.title.startswith(f"|h| at layer {layer},")


def test_overview_massive_and_cosine_views(app, root):
    s = Trace.load(root / "av-a")[0]
    goto(app, "Overview")
    # one figure, two panels: the sink rate per segment (x axis 1) and the mean cosine to BOS (x axis 2)
    both = by_title(app, "Per segment over layers")
    sink = [t for t in both.data if t.get("xaxis", "x") == "x"]
    cos = [t for t in both.data if t.get("xaxis") == "x2"]
    assert [t["name"] for t in sink] == [name for name, _, _ in AV_SEGMENTS]
    assert [t["name"] for t in cos] == [name for name, _, _ in AV_SEGMENTS if name != "bos"]
    assert not any(t.get("showlegend") for t in cos), "one legend entry per segment"
    audio = next(t for t in cos if t["name"] == "audio")
    np.testing.assert_allclose(audio["y"], np.asarray(s.bos_cosine)[:, 2:30].mean(axis=1), rtol=1e-5)
    rate = analysis.sink_rate_by_segment(s.attention_received, s.segments, SINK_EPS)
    np.testing.assert_allclose(next(t for t in sink if t["name"] == "audio")["y"], rate["audio"], rtol=1e-6)
    assert any("Findings" in h.value for h in app.subheader)

    goto(app, "Massive activations")
    # the top-k view: its columns are the trace's largest features, largest first, with their values
    top = by_title(app, "The 16 features with the largest |h|")
    peak = np.asarray(s.feature_max_abs).max(axis=0)
    expected = np.argsort(-peak, kind="stable")[:16]
    assert top.data[0]["x"] == [f"f{f}" for f in expected]
    assert np.all(np.diff(peak[expected]) <= 0) and expected[0] == int(np.argmax(peak))
    np.testing.assert_allclose(np.asarray(top.data[0]["customdata"]), s.feature_max_abs[:, expected], rtol=1e-5)
    # the selected feature's trajectory across layers for the tokens carrying massive activations
    feature = int(expected[0])
    traj = by_title(app, f"|h| of feature {feature} across layers")
    tokens = sorted(set(map(int, s.massive["token"])))[:4] or [0]
    assert [t["name"].split()[0] for t in traj.data] == [f"t{t}" for t in tokens]
    for t, line in zip(tokens, traj.data, strict=True):
        hit = s.top_features[:, t, :] == feature
        want = np.where(hit.any(axis=1), np.abs((s.top_values[:, t, :] * hit).sum(axis=1)), np.nan)
        for layer, h in s.hidden_states.items():  # exact where the full state was recorded
            want[layer] = abs(h[t, feature])
        np.testing.assert_allclose(np.asarray(line["y"], dtype=float), want, rtol=1e-5)
    tokmap = by_title(app, "|h| at layer")
    assert tokmap.data[0]["y"][0] == f"f{feature}"
    table = app.table[0].value  # the largest records, |value| descending; all of them in the downloads
    assert len(table) == min(len(s.massive), RECORDS_SHOWN)
    assert {"layer", "token", "feature", "value", "attn_share"} <= set(table)
    np.testing.assert_allclose(table["value"].abs(), np.sort(np.abs(s.massive["value"]))[::-1][:len(table)])
    assert any(b.proto.label.startswith("Massive records") for b in app.get("download_button"))
    # the trajectory's tokens are typed positions; what is not one is named in a warning, the rest are drawn
    app.text_input(key="mass_tokens").set_value(f"0, x, {len(s.tokens)}, 1").run()
    assert any("'x', '" + str(len(s.tokens)) + "'" in w.value for w in app.warning)
    assert [t["name"].split()[0] for t in by_title(app, f"|h| of feature {feature}").data] == ["t0", "t1"]
    # below the features, one part at a time: records (above), origin, Jaccard
    assert not [f for f in figures(app) if f.title.startswith(("Where massive", "Massive-feature sets"))]
    app.radio(key="mass_part").set_value("Origin").run()
    origin = analysis.sample_findings(s, SINK_EPS)["origin"]
    np.testing.assert_allclose(by_title(app, "Where massive activations come from").data[1]["y"],
                               origin["mlp_share"], rtol=1e-6)
    assert not app.table
    app.radio(key="mass_part").set_value("Jaccard between sink tokens").run()
    by_title(app, "Massive-feature sets: Jaccard")
    app.radio(key="mass_part").set_value("Records").run()
    app.toggle(key="mass_mlp").set_value(True).run()
    mlp_top = by_title(app, "The 16 features with the largest |mlp_out|")
    mlp_expected = np.argsort(-np.asarray(s.mlp_feature_max_abs).max(axis=0), kind="stable")[:16]
    np.testing.assert_allclose(np.asarray(mlp_top.data[0]["customdata"]), s.mlp_feature_max_abs[:, mlp_expected],
                               rtol=1e-5)

    goto(app, "Cosine to BOS")
    z = np.asarray(by_title(app, "Cosine to BOS").data[0]["z"])
    np.testing.assert_allclose(z, s.bos_cosine, rtol=1e-5)


def test_compare_and_dataset_views(app, root):
    a, b = Trace.load(root / "av-a")[0], Trace.load(root / "av-b")[0]
    goto(app, "Compare")
    app.selectbox(key="cmp_other").set_value("av-b").run()
    assert app.radio(key="cmp_part").value == "Whole traces"
    assert not [f for f in figures(app) if "B - A" in f.title], "one part at a time: no paired figure yet"
    app.radio(key="cmp_part").set_value("One sample in both").run()
    assert len(figures(app)) == 1, "one figure per part"
    app.radio(key="cmp_sample_part").set_value("Differences B - A").run()
    diff = grid_panel(app, "attention_received: B - A")
    expected = np.asarray(b.attention_received).mean(axis=1) - np.asarray(a.attention_received).mean(axis=1)
    np.testing.assert_allclose(np.asarray(diff.data[0]["z"]), expected, atol=1e-6)
    app.radio(key="cmp_part").set_value("Whole traces").run()

    # whole-trace comparison, one part at a time: each curve is the mean over the trace's samples of the
    # per-sample values
    assert app.radio(key="cmp_trace_part").value == "Sinks and cos to BOS"
    assert len(figures(app)) == 2, "sinks and cosine: two figures"
    cos = by_title(app, "Mean cos-to-BOS by segment")
    for label, trace in (("A: av-a", Trace.load(root / "av-a")), ("B: av-b", Trace.load(root / "av-b"))):
        curve = next(t for t in cos.data if t["name"] == f"{label}: audio")
        per_sample = [np.asarray(s.bos_cosine)[:, 2:30].mean(axis=1) for s in trace]
        np.testing.assert_allclose(curve["y"], np.mean(per_sample, axis=0), rtol=1e-5)
        np.testing.assert_allclose(curve["error_y"]["array"], np.std(per_sample, axis=0, ddof=1), rtol=1e-4,
                                   atol=1e-7)
    rate = by_title(app, "Sinks by segment")
    assert {t["name"] for t in rate.data} >= {"A: av-a: audio", "B: av-b: video"}
    for curve in rate.data:  # error bars are one sd, cut at 0 and 100 %
        y = np.asarray(curve["y"], dtype=float)
        assert np.all(y + np.asarray(curve["error_y"]["array"]) <= 100 + 1e-9)
        assert np.all(y - np.asarray(curve["error_y"]["arrayminus"]) >= -1e-9)
    app.radio(key="cmp_trace_part").set_value("Massive activations").run()
    assert len(figures(app)) == 2 and not [f for f in figures(app) if f.title.startswith("Sinks by segment")]
    acts = by_title(app, "Largest |h| over tokens vs the median")
    top = next(t for t in acts.data if t["name"] == "A: av-a: top")
    np.testing.assert_allclose(top["y"], np.mean([np.asarray(s.max_abs).max(axis=1) for s in
                                                  Trace.load(root / "av-a")], axis=0), rtol=1e-5)
    app.radio(key="cmp_trace_part").set_value("Sink positions").run()
    assert len(figures(app)) == 1 and not app.exception
    app.radio(key="cmp_trace_part").set_value("Sinks and cos to BOS").run()
    # disjoint ids: samples are paired by transcript
    app.selectbox(key="cmp_other").set_value("av-renamed").run()
    app.radio(key="cmp_part").set_value("One sample in both").run()
    assert not app.exception and not app.error
    pairs = app.selectbox(key="cmp_sample").options
    assert len(pairs) == 3 and pairs[0].startswith("utt00 ~ other00")
    panel = by_title(app, "Attention received, mean over heads")
    assert panel.layout["coloraxis"]["cmin"] <= panel.layout["coloraxis"]["cmax"]
    assert all(t.get("coloraxis") == "coloraxis" for t in panel.data), "one colour scale for both panels"

    goto(app, "Dataset")
    labels = [b.proto.label for b in app.get("download_button")]
    assert len(labels) == 6 and any(label.startswith("Massive-activation records") for label in labels)
    records = analysis.dataset_massive_records(Trace.load(root / "av-a"))
    assert len(records) == sum(len(s.massive) for s in Trace.load(root / "av-a"))
    assert list(records.columns[:6]) == ["sample", "layer", "token", "token_text", "feature", "value"]
    assert len(app.table[0].value) == Trace.load(root / "av-a").manifest["n_layers"]
    assert any("No sink tokens" in i.value for i in app.info), "random tiny models have no sink at eps=0.3"
    app.sidebar.slider(key="eps").set_value(0.05).run()
    positions = by_title(app, "Sink tokens by relative position")
    bos = next(t for t in positions.data if t["name"] == "bos")
    assert list(bos["x"]) == [0.0, 0.0, 0.0], "BOS of each of the 3 samples sinks at eps=0.05"
    # no sink at a position seen by fewer queries than the sidebar's minimum
    n_tokens = len(Trace.load(root / "av-a")[0].tokens)
    for minimum in (8, 40):
        app.sidebar.number_input(key="min_queries").set_value(minimum).run()
        table = analysis.dataset_sinks(Trace.load(root / "av-a"), 0.05, min_queries=minimum)
        assert (n_tokens - table["position"] >= minimum).all()
        shown = [x for t in by_title(app, "Sink tokens by relative position").data for x in t["x"]]
        assert max(shown) <= (n_tokens - minimum) / (n_tokens - 1) + 1e-9 and len(shown) == len(table)


def test_a_selected_feature_is_selected_in_every_view(app, root):
    from sinkscope.webapp.state import clicked_feature

    tr = Trace.load(root / "av-a")
    s = tr[0]
    peak = np.asarray(s.feature_max_abs).max(axis=0)
    ranked = np.argsort(-peak, kind="stable")
    # what a click on the bar of the third-ranked feature sends (plotly selection event, as Streamlit passes it)
    third = int(ranked[2])
    event = {"selection": {"points": [{"x": f"f{third}", "y": float(peak[third]), "curve_number": 1}]}}
    assert clicked_feature(event) == third
    assert clicked_feature({"selection": {"points": []}}) is None and clicked_feature(None) is None
    app.session_state["selected_feature"] = third
    goto(app, "Massive activations")
    assert app.selectbox(key="mass_feature").value == third
    top = by_title(app, "The 16 features with the largest |h|")
    bars = top.data[1]
    assert bars["type"] == "bar" and bars["x"] == [f"f{f}" for f in ranked[:16]]
    np.testing.assert_allclose(np.asarray(bars["y"]), peak[ranked[:16]], rtol=1e-5)
    assert [c for c in bars["marker"]["color"]].count("#d62728") == 1 and bars["marker"]["color"][2] == "#d62728"
    outline = [sh for sh in top.shapes if sh.get("type") == "rect"]
    assert len(outline) == 1 and outline[0]["x0"] == 1.5 and outline[0]["x1"] == 2.5
    by_title(app, f"|h| of feature {third} across layers")
    assert by_title(app, "|h| at layer").data[0]["y"][0] == f"f{third}"
    # a feature outside the top 16 selected elsewhere is offered and followed too
    outside = int(ranked[40])
    app.session_state["selected_feature"] = outside
    app.run()
    assert app.selectbox(key="mass_feature").value == outside
    by_title(app, f"|h| of feature {outside} across layers")
    # picking one in the Massive view selects it in the Dataset view
    app.selectbox(key="mass_feature").set_value(int(ranked[1])).run()
    assert app.session_state["selected_feature"] == int(ranked[1])
    goto(app, "Dataset")
    app.sidebar.slider(key="eps").set_value(0.3).run()
    features = analysis.dataset_massive_features(tr)
    if len(features):
        hist = by_title(app, "Massive feature indices over the trace")
        want = ["#d62728" if int(f) == int(ranked[1]) else "#1f77b4" for f in features["feature"]]
        assert list(hist.data[0]["marker"]["color"]) == want


def test_malformed_trace_and_path_outside_root(app, root):
    app.sidebar.selectbox(key="trace").set_value("broken").run()
    assert not app.exception
    assert any("manifest.json: not valid JSON" in e.value for e in app.error)

    st.cache_data.clear()
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["trace"] = "../../etc"
    at.run()
    assert not at.exception
    assert any("outside the trace root" in e.value for e in at.error)


def _opened_during(fn) -> list[str]:
    """Every path the process opened (audit hook `open`) while `fn` ran."""
    import sys

    seen, active = [], [True]

    def hook(event, args):
        if active[0] and event == "open" and isinstance(args[0], str | bytes):
            seen.append(str(args[0]))

    sys.addaudithook(hook)  # hooks cannot be removed; this one goes quiet after `fn`
    try:
        fn()
    finally:
        active[0] = False
    return seen


@pytest.mark.parametrize("link", ["arrays", "meta", "manifest", "sample_dir", "trace_dir"])
def test_the_app_opens_nothing_outside_its_root(tmp_path, monkeypatch, link):
    """A trace under the root whose files (or directories) are symlinks to outside files is refused with a
    message, and the outside files are never opened (checked with an audit hook on `open`)."""
    import shutil

    outside = tmp_path / "outside"
    good = write_av_trace(outside / "victim", seed=3, n=1)
    secret = outside / "secret.txt"
    secret.write_text("not for the app")
    root = tmp_path / "root"
    root.mkdir()
    trace = root / "t"
    if link == "trace_dir":
        trace.symlink_to(good, target_is_directory=True)
    else:
        shutil.copytree(good, trace)
        sample = trace / "samples" / "000000"
        if link == "arrays":
            (sample / "arrays.safetensors").unlink()
            (sample / "arrays.safetensors").symlink_to(secret)
        elif link == "meta":
            (sample / "meta.json").unlink()
            (sample / "meta.json").symlink_to(good / "samples" / "000000" / "meta.json")
        elif link == "manifest":
            (trace / "manifest.json").unlink()
            (trace / "manifest.json").symlink_to(good / "manifest.json")
        else:
            shutil.rmtree(sample)
            sample.symlink_to(good / "samples" / "000000", target_is_directory=True)
    monkeypatch.setenv("SINKSCOPE_ROOT", str(root))
    st.cache_data.clear()
    st.cache_resource.clear()
    at = AppTest.from_file(APP, default_timeout=60)
    if link in ("manifest", "trace_dir"):  # not even listed: the root shows no trace
        opened = _opened_during(at.run)
        assert "No traces under" in " ".join(i.value for i in at.info)
    else:
        def run():
            at.run()
            at.sidebar.radio(key="view").set_value("Massive activations").run()

        opened = _opened_during(run)
        assert any("outside the trace root" in e.value for e in at.error), [e.value for e in at.error]
    assert not at.exception, at.exception
    assert not [p for p in opened if Path(p).resolve().is_relative_to(outside)], opened


def test_query_parameters_are_checked(root, monkeypatch):
    monkeypatch.setenv("SINKSCOPE_ROOT", str(root))
    for bad in ("av-a\x00x", "../../etc", "nope"):
        st.cache_data.clear()
        st.cache_resource.clear()
        at = AppTest.from_file(APP, default_timeout=60)
        at.query_params["trace"] = bad
        at.run()
        assert not at.exception, (bad, at.exception)
        assert at.error, f"?trace={bad!r} was accepted silently"


def test_feature_numbers_from_widget_values():
    from sinkscope.webapp.state import feature_number

    assert feature_number(507) == 507 and feature_number(np.int64(3)) == 3
    assert feature_number("f507") == 507 and feature_number("f507 (max 2.493e+04)") == 507
    assert feature_number("12") == 12
    assert all(feature_number(v) is None for v in (None, True, "abc", "f", "", [1]))


def test_server_warm_up_builds_the_first_pages_figures():
    """`python -m sinkscope.appserver` builds the Overview's figures once before serving (plotly's lazy imports off
    the first render): on its made-up sample they must build and serialise."""
    from sinkscope.appserver import warm_up

    warm_up()


def test_a_trace_without_the_optional_feature_fields_opens_in_every_view(tmp_path, monkeypatch):
    """Per-token top features and per-feature maxima are optional trace fields (older traces lack them): the
    Overview and Massive views said so in a TypeError traceback; now every view opens and says what is missing."""
    from tests.test_columns import write_random_trace

    write_random_trace(tmp_path / "old")
    monkeypatch.setenv("SINKSCOPE_ROOT", str(tmp_path))
    st.cache_data.clear()
    st.cache_resource.clear()
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    views = at.sidebar.radio(key="view").options
    assert "Massive activations" in views
    for view in views:
        at.sidebar.radio(key="view").set_value(view).run()
        assert not at.exception, (view, at.exception)
        assert not at.error, (view, [e.value for e in at.error])
        if view in ("Overview", "Massive activations"):
            assert any("holds no feature_max_abs" in i.value for i in at.info), (view, [i.value for i in at.info])


def test_the_figure_functions_check_positions_heads_layers_and_windows(root):
    """The figures are drawn from notebooks too: an out-of-range token, head or layer was an IndexError, a
    reversed window or max_tokens = 0 a zip() error, and a window past the end was clipped silently."""
    from sinkscope import viz

    s = Trace.load(root / "av-a")[0]
    n = len(s.tokens)
    cases = [
        (lambda: viz.head_grid(s, token=n), rf"token must be a whole number in \[0, {n - 1}\] \({n} tokens"),
        (lambda: viz.received_attention_heatmap(s, head=4), r"head must be a whole number in \[0, 3\]"),
        (lambda: viz.received_attention_heatmap(s, max_tokens=0), "max_tokens must be a whole number >= 1"),
        (lambda: viz.cosine_heatmap(s, token_range=(5, 2)), rf"0 <= start < end <= {n} .* not \(5, 2\)"),
        (lambda: viz.cosine_heatmap(s, token_range=(0, n + 1)), "token_range must be"),
        (lambda: viz.attention_map(s, 1, 0, token_range=(-3, 4)), "token_range must be"),
        (lambda: viz.feature_trajectory_figure(s, 0, [0, n]), "tokens must be a whole number"),
        (lambda: viz.token_feature_heatmap(s, 3, [0]), r"layer must be a whole number in \[0, 2\]"),
        (lambda: viz.difference_heatmap(s, s, field="tokens"), "field must be one of"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    assert viz.head_grid(s, token=-1).layout.title.text.startswith(f"Attention received by token {n - 1}")
    assert np.asarray(viz.cosine_heatmap(s, token_range=(n - 1, n)).data[0]["z"]).shape[1] == 1


def test_the_zoom_slider_at_the_end_shows_the_last_position():
    """Both handles of the zoom slider at the last position gave a window past the end."""
    from sinkscope.webapp.state import zoom_window

    assert zoom_window(100, 100, 100) == (99, 100)
    assert zoom_window(3, 3, 100) == (3, 4) and zoom_window(0, 100, 100) is None and zoom_window(5, 9, 100) == (5, 9)


def test_traces_of_one_token_samples_open_in_every_view_and_compare(tmp_path, monkeypatch):
    """Samples that hold BOS alone leave nothing to average over: Compare's sink profile of two such traces was a
    ValueError (an integer from NaN) instead of an empty figure that says so."""
    import torch

    from sinkscope.record import Recorder
    from tests.tiny_models import tiny_llama

    model = tiny_llama()
    for name, lengths in (("short", (1, 2)), ("one", (1,))):
        with Recorder(model, attention_maps=[(0, 0)]) as rec, torch.no_grad():
            for n in lengths:
                model(input_ids=torch.tensor([[1, 5][:n]]))
        rec.save(tmp_path / name)
    monkeypatch.setenv("SINKSCOPE_ROOT", str(tmp_path))
    st.cache_data.clear()
    st.cache_resource.clear()
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    at.sidebar.selectbox(key="trace").set_value("one").run()
    for view in at.sidebar.radio(key="view").options:
        at.sidebar.radio(key="view").set_value(view).run()
        assert not at.exception, (view, at.exception)
    at.sidebar.radio(key="view").set_value("Compare").run()
    at.radio(key="cmp_part").set_value("Whole traces").run()
    at.selectbox(key="cmp_other").set_value("short").run()
    for part in at.radio(key="cmp_trace_part").options:
        at.radio(key="cmp_trace_part").set_value(part).run()
        assert not at.exception, (part, at.exception)
    at.radio(key="cmp_trace_part").set_value("Sinks and cos to BOS").run()
    rate = by_title(at, "Sinks by segment")  # A ("one") has no token besides BOS: only B's curves
    assert rate.data and all(t["name"].startswith("B: short: ") for t in rate.data), [t["name"] for t in rate.data]
    from sinkscope import analysis, viz  # neither trace with a token to draw: an empty figure that says so

    empty = analysis.profile_mean(analysis.trace_profile(Trace.load(tmp_path / "one"))["sink_rate"])
    fig = viz.profile_figure(empty, empty, ("a", "b"), "t", "y")
    assert not fig.data and "nothing to draw" in fig.layout.annotations[0].text


def test_a_root_that_is_a_trace_itself_is_named_as_such(root, monkeypatch):
    """`sinkscope app --root traces/demo-prompts` (a trace, not a folder of them) said "No traces under ..." and
    suggested recording into it."""
    monkeypatch.setenv("SINKSCOPE_ROOT", str(root / "av-a"))
    st.cache_data.clear()
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    assert [i.value for i in at.info] == [f"{root / 'av-a'} is a trace itself; the app lists the traces under its "
                                          f"root folder. Start it on the folder that holds this trace: `sinkscope app "
                                          f"--root {root.resolve()}`."]


def test_figures_keep_labels_off_the_data_and_label_log_axes_at_powers_of_ten(root):
    """Seen in a real browser on the demo traces: segment names drawn over the heatmap's top row, one-token
    segments' names over each other, log axes labelled "2" and "5" between "1000" and "10k", layer axes from -2,
    and the second row of Compare's difference grid titled over the first row's token labels."""
    import plotly.graph_objects as go

    from sinkscope import viz
    from sinkscope.viz.axes import log_axis
    from sinkscope.viz.grid import GAP_PX

    s = Trace.load(root / "av-a")[0]
    heat = viz.received_attention_heatmap(s)
    labels = {a.text: a for a in heat.layout.annotations}
    assert {"audio", "video", "prompt"} <= set(labels)
    assert all(a.y > 1.04 and a.yanchor == "bottom" for a in labels.values()), "above the strip, not on the data"
    assert "audio_start" not in labels and "video_start" not in labels, "one-token neighbours of named segments"

    n_layers = s.attention_received.shape[0]
    assert list(viz.top_activations_figure(s).layout.xaxis.range) == [-0.5, n_layers - 0.5]

    wide, narrow = go.Figure(go.Scatter(y=[20, 27_000])), go.Figure(go.Scatter(y=[1_000, 5_000]))
    log_axis(wide, [20, 27_000])
    log_axis(narrow, [1_000, 5_000])
    assert wide.layout.yaxis.type == narrow.layout.yaxis.type == "log"
    assert wide.layout.yaxis.dtick == 1 and narrow.layout.yaxis.dtick is None
    trajectory = viz.feature_trajectory_figure(s, int(analysis.ranked_features(s, 1)[0]), [0, 1])
    assert trajectory.layout.yaxis.type == "log"

    grid = viz.panel_grid([[viz.difference_heatmap(s, s, "attention_received")],
                           [viz.difference_heatmap(s, s, "bos_cosine")]], "B - A", row_height=340)
    plot_px = grid.layout.height - grid.layout.margin.t - grid.layout.margin.b
    gap_px = (grid.layout.yaxis.domain[0] - grid.layout.yaxis2.domain[1]) * plot_px
    titles = [a for a in grid.layout.annotations if a.text.startswith(("attention_received", "bos_cosine"))]
    assert [a.yshift for a in titles] == [28, 28]
    assert gap_px >= GAP_PX + 28 - 1


def test_the_app_opens_on_the_trace_it_is_started_with(root, monkeypatch):
    """`make demo` starts the app with `--trace demo-avsr` (the AV trace of the demo model) instead of the first
    trace in alphabetical order; a `?trace=` link still wins, and a name that is not under the root is refused
    before the server starts."""
    from typer.testing import CliRunner

    from sinkscope.cli import app as cli

    monkeypatch.setenv("SINKSCOPE_ROOT", str(root))
    monkeypatch.setenv("SINKSCOPE_TRACE", "av-b")
    for query, expected in ((None, "av-b"), ("av-renamed", "av-renamed")):
        st.cache_data.clear()
        st.cache_resource.clear()
        at = AppTest.from_file(APP, default_timeout=60)
        if query:
            at.query_params["trace"] = query
        at.run()
        assert not at.exception and at.sidebar.selectbox(key="trace").value == expected
    res = CliRunner().invoke(cli, ["app", "--root", str(root), "--trace", "nope"])
    assert res.exit_code == 1 and "--trace nope: no such trace under" in res.output and "av-a, av-b" in res.output
