"""A trace as columns (sinkscope.trace.columns): the same numbers as the samples, with or without the index, and
an index that is stale, corrupt or outside the root is never used."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from sinkscope import analysis
from sinkscope.cli import app
from sinkscope.metrics import MASSIVE_COLUMNS, sink_layers
from sinkscope.trace import SampleRecord, Trace, TraceWriter
from sinkscope.trace.columns import INDEX, build_columns, heads_needed, trace_columns, write_index

L, H, D = 3, 6, 16


def random_sample(rng, i: int, n_tokens: int, massive: bool) -> SampleRecord:
    alpha = rng.dirichlet(np.ones(n_tokens), size=(L, H)).astype(np.float32)  # any values in [0, 1]
    alpha[:, : H // 2, 0] = 0.9  # half the heads put BOS above every eps: ties at the head fraction
    rows = []
    if massive:
        for _ in range(int(rng.integers(1, 5))):
            rows.append({"layer": int(rng.integers(0, L)), "token": int(rng.integers(0, n_tokens)),
                         "feature": int(rng.integers(0, D)), "value": float(rng.normal() * 300),
                         "attn_share": 0.1, "mlp_share": 0.9, "attn_out": 1.0, "mlp_out": 2.0, "origin_layer": 0})
    frame = pd.DataFrame(rows, columns=MASSIVE_COLUMNS).astype(
        {"layer": "int64", "token": "int64", "feature": "int64", "origin_layer": "int64"}) if rows else \
        pd.DataFrame(columns=MASSIVE_COLUMNS)
    segments = [("bos", 0, 1), ("text", 1, n_tokens - 2), ("eos", n_tokens - 2, n_tokens)]
    return SampleRecord(
        sample_id=f"s{i:03d}", tokens=[f"t{k}" for k in range(n_tokens)], segments=segments,
        attention_received=alpha, bos_cosine=rng.uniform(-1, 1, (L, n_tokens)).astype(np.float32),
        max_abs=rng.uniform(0, 50, (L, n_tokens)).astype(np.float32),
        median_abs=rng.uniform(0, 1, L).astype(np.float32), massive=frame)


def write_random_trace(path, n: int = 9, seed: int = 0):
    rng = np.random.default_rng(seed)
    writer = TraceWriter(path, {"model": "random", "n_layers": L, "n_heads": H, "hidden_size": D,
                                "thresholds": {"sink_head_fraction": 0.5}})
    for i in range(n):
        writer.append(random_sample(rng, i, int(rng.integers(4, 40)), massive=i % 3 != 1))
    return path


@pytest.fixture()
def trace_dir(tmp_path):
    return write_random_trace(tmp_path / "t")


def test_sink_flags_equal_sink_layers_of_every_sample(trace_dir):
    tr = Trace.load(trace_dir)
    for head_fraction in (0.0, 1 / 3, 0.5, 0.51, 1.0):
        c = build_columns(tr, head_fraction)
        for eps in (0.0, 0.05, 0.3, 0.9):
            for min_queries in (1, 8):
                flags = c.sink_flags(eps, min_queries)
                for i, s in enumerate(tr):
                    expected = sink_layers(s.attention_received, eps, head_fraction, min_queries)
                    assert np.array_equal(flags[:, c.start[i]:c.start[i + 1]], expected), (i, head_fraction, eps)
                if head_fraction <= 0.5 and eps < 0.9:
                    assert flags.any(), "the case exercises some sinks"
    # a rule that cannot mean anything is refused by both (before: no sinks, or every token a sink, silently)
    for call in (lambda: build_columns(tr, 1.5), lambda: sink_layers(tr[0].attention_received, head_fraction=1.5)):
        with pytest.raises(ValueError, match=r"head_fraction must be a number in \[0, 1\], not 1.5"):
            call()
    for eps, min_queries, message in ((1.2, 1, "eps must be"), (-0.1, 1, "eps must be"), (0.3, 0, "min_queries")):
        with pytest.raises(ValueError, match=message):
            c.sink_flags(eps, min_queries)
        with pytest.raises(ValueError, match=message):
            sink_layers(tr[0].attention_received, eps, min_queries=min_queries)


def test_heads_needed_matches_the_share_rule():
    for n_heads in (1, 3, 9, 32):
        for fraction in (0.0, 0.1, 1 / 3, 0.5, 2 / 3, 1.0, 1.01):
            need = heads_needed(n_heads, fraction)
            assert all((c / n_heads >= fraction) == (c >= need) for c in range(n_heads + 1))


def columns_equal(a, b) -> None:
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if field.name == "massive":
            assert x.keys() == y.keys()
            for k in x:
                assert np.array_equal(x[k], y[k]), k
        else:
            assert np.array_equal(x, y), field.name


def test_the_index_gives_the_columns_of_the_samples(trace_dir):
    fresh = build_columns(Trace.load(trace_dir))
    assert len(fresh.massive["sample"]) > 0 and fresh.massive["layer"].dtype.kind == "i"
    write_index(trace_dir)
    tr = Trace.load(trace_dir)
    indexed = trace_columns(tr)
    assert tr.index_note is None
    assert not any("_arrays" in vars(s) for s in tr._samples.values()), "no sample's arrays were read"
    columns_equal(indexed, fresh)
    # the tables the app and summary show are the same whichever way the columns came
    plain = Trace.load(trace_dir)
    plain.__dict__["_columns"] = {0.5: fresh}
    for f in (lambda t: analysis.dataset_sinks(t, 0.1, min_queries=2), analysis.dataset_massive_records,
              lambda t: analysis.layer_summary(t, 0.1), lambda t: analysis.dataset_cosine(t, 1)):
        pd.testing.assert_frame_equal(f(tr), f(plain))


def test_tables_equal_a_per_sample_computation(trace_dir):
    tr = Trace.load(trace_dir)
    sinks = analysis.dataset_sinks(tr, 0.2, min_queries=3)
    expected = []
    for s in tr:
        counts = sink_layers(s.attention_received, 0.2, 0.5, 3).sum(axis=0)
        expected += [(s.sample_id, int(k), int(counts[k])) for k in np.flatnonzero(counts)]
    assert list(zip(sinks["sample"], sinks["position"], sinks["layers"], strict=True)) == expected
    profile = analysis.trace_profile(tr, 0.2, min_queries=3)
    s = tr[4]
    rate = profile["sink_rate"].query("sample == @s.sample_id and segment == 'text'")["value"].to_numpy()
    assert np.allclose(rate, 100 * sink_layers(s.attention_received, 0.2, 0.5, 3)[:, 1:len(s) - 2].mean(axis=1))
    cos = profile["cosine"].query("sample == @s.sample_id and segment == 'eos'")["value"].to_numpy()
    assert np.allclose(cos, s.bos_cosine[:, len(s) - 2:].mean(axis=1), atol=1e-6)
    acts = profile["activations"].query("sample == @s.sample_id")
    assert np.allclose(acts["top"], s.max_abs.max(axis=1)) and np.allclose(acts["median"], s.median_abs)


def test_appending_removes_the_index_and_a_copied_in_sample_makes_it_stale(tmp_path, trace_dir):
    write_index(trace_dir)
    TraceWriter(trace_dir, {"model": "random", "n_layers": L, "n_heads": H, "hidden_size": D}).append(
        random_sample(np.random.default_rng(5), 99, 7, massive=True))
    assert not (trace_dir / INDEX).exists(), "the writer drops an index that no longer describes the samples"
    write_index(trace_dir)
    other = write_random_trace(tmp_path / "other", n=1, seed=3)
    shutil.copytree(other / "samples" / "000000", trace_dir / "samples" / "000010")
    tr = Trace.load(trace_dir)
    columns = trace_columns(tr)
    assert "index.safetensors" in tr.index_note and "differ" in tr.index_note and "sinkscope index" in tr.index_note
    assert len(columns.ids) == 11
    columns_equal(columns, build_columns(Trace.load(trace_dir)))


def corrupt(path, name, value):
    arrays = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as fh:
        metadata = fh.metadata()
    arrays[name] = value(arrays[name])
    save_file(arrays, str(path), metadata=metadata)


@pytest.mark.parametrize(("how", "expected"), [
    ("truncate", "not a readable safetensors file"),
    ("alpha", "field 'mean_alpha' has 1 values outside"),
    ("shape", "field 'bos_cosine' has shape"),
    ("token", "field 'massive.token'"),
    ("format", "field 'format'"),
])
def test_a_corrupt_index_is_named_and_the_samples_are_read(trace_dir, how, expected):
    path = write_index(trace_dir)
    if how == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    elif how == "alpha":
        corrupt(path, "mean_alpha", lambda a: np.where(np.arange(a.size).reshape(a.shape) == 5, 1.7, a))
    elif how == "shape":
        corrupt(path, "bos_cosine", lambda a: a[:, :-1].copy())
    elif how == "token":
        corrupt(path, "massive.token", lambda a: a + 1000)
    else:
        arrays = load_file(str(path))
        save_file(arrays, str(path), metadata={"format": "something-else", "version": "1"})
    tr = Trace.load(trace_dir)
    columns = trace_columns(tr)
    assert expected in tr.index_note and str(path) in tr.index_note
    columns_equal(columns, build_columns(Trace.load(trace_dir)))


def test_an_index_linking_outside_the_root_is_not_read(tmp_path):
    root = tmp_path / "root"
    trace_dir = write_random_trace(root / "t")
    outside = write_index(trace_dir).rename(tmp_path / "elsewhere.safetensors")
    (trace_dir / INDEX).symlink_to(outside)
    tr = Trace.load(trace_dir, root=root)
    trace_columns(tr)
    assert "outside the trace root" in tr.index_note


def test_index_command_and_summary(trace_dir):
    runner = CliRunner()
    res = runner.invoke(app, ["index", str(trace_dir)])
    assert res.exit_code == 0, res.output
    assert (trace_dir / INDEX).is_file()
    res = runner.invoke(app, ["index", str(trace_dir / "nope")])
    assert res.exit_code != 0 and "nope" in res.output and "Traceback" not in res.output


def test_the_analysis_functions_refuse_parameters_that_cannot_mean_anything(trace_dir):
    """An eps of 2 found no sink and one of -1 made every token a sink; a layer past the last was an IndexError
    (or, for expert_usage, an empty table); a feature past the width, or k = 0, returned arrays all the same."""

    tr = Trace.load(trace_dir)
    n_layers = tr.manifest["n_layers"]
    cases = [
        (lambda: analysis.dataset_sinks(tr, eps=2), r"eps must be a number in \[0, 1\], not 2"),
        (lambda: analysis.dataset_sinks(tr, min_queries=-3), "min_queries must be a whole number >= 1, not -3"),
        (lambda: analysis.sample_findings(tr[0], eps=float("nan")), "eps must be a number in"),
        (lambda: analysis.sink_statistics(tr, min_layer_share=5), r"min_layer_share must be a number in \[0, 1\]"),
        (lambda: analysis.dataset_cosine(tr, n_layers), rf"layer must be a whole number in \[0, {n_layers - 1}\]"),
        (lambda: analysis.dataset_cosine(tr, 1.5), "not 1.5"),
        (lambda: analysis.expert_usage(tr, -n_layers - 1), "layer must be a whole number"),
        (lambda: analysis.layer_summary(tr, top=0), "top must be a whole number >= 1, not 0"),
        (lambda: analysis.top_activations(tr[0], k=0), "k must be a whole number >= 1"),
        (lambda: analysis.ranked_features(tr[0], k=-2), "k must be a whole number >= 1"),
        (lambda: analysis.feature_values(tr[0], [10**6]), "feature 1000000 is outside the hidden state's"),
        (lambda: analysis.feature_values(tr[0], [-1]), "feature -1 is outside"),
        (lambda: analysis.feature_values(tr[0], [1.5]), "whole feature indices"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    assert analysis.dataset_cosine(tr, -1).equals(analysis.dataset_cosine(tr, n_layers - 1))
    # this trace has none of the optional per-feature fields (as traces recorded before them): named, not a
    # TypeError on None
    for call in (lambda: analysis.feature_values(tr[0], [0, 3]), lambda: analysis.top_activations(tr[0]),
                 lambda: analysis.ranked_features(tr[0], mlp=True)):
        with pytest.raises(ValueError, match=r"sample s000 holds no .*top_features.* record it again"):
            call()


def test_layer_summary_names_top_tokens_among_keys_seen_by_enough_queries(trace_dir):
    """The last keys' alpha averages a few queries: `summary` put the last tokens of a long prompt (and the last
    token of the demo AV trace) at the top of the early layers. The top tokens now follow the sink rule's
    min_queries; with min_queries = 1 they are the largest alpha of every position, as before."""
    import re

    tr = Trace.load(trace_dir)
    for min_queries in (1, 8, 30):
        table = analysis.layer_summary(tr, top=1, min_queries=min_queries)
        expected = {}
        for s in tr:
            mean = np.asarray(s.attention_received).mean(axis=1)  # [L, T]
            n = mean.shape[1]
            keys = np.flatnonzero(n - np.arange(n) >= min_queries)
            if keys.size == 0:
                continue
            for layer in range(L):
                expected.setdefault(layer, []).append(int(keys[np.argmax(mean[layer, keys])]))
        for layer, cell in zip(table["layer"], table["top_sinks"], strict=True):
            if layer not in expected:
                assert cell == ""
                continue
            position = int(re.match(r"'t\d+'@(\d+) ", cell).group(1))
            counts = {p: expected[layer].count(p) for p in expected[layer]}
            assert counts[position] == max(counts.values()), (min_queries, layer, cell)
            assert any(n >= position + min_queries for n in (len(s.tokens) for s in tr))
    with pytest.raises(ValueError, match="min_queries"):
        analysis.layer_summary(tr, min_queries=0)
    result = CliRunner().invoke(app, ["summary", str(trace_dir), "--min-queries", "30"])
    assert result.exit_code == 0 and "seen by at least 30 queries" in result.output
