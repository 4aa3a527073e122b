"""The trace format: round trip, memory mapping, resume after an interrupted write, and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sinkscope import trace as trace_mod
from sinkscope.errors import TraceError
from sinkscope.record import Recorder
from sinkscope.trace import Trace, TraceWriter
from sinkscope.trace import write as trace_write
from tests.tiny_models import tiny_llama


@pytest.fixture(scope="module")
def recorded():
    model = tiny_llama()
    torch.manual_seed(3)
    ids = torch.randint(3, 128, (3, 12))
    ids[:, 0] = 1
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0
    with Recorder(model, attention_maps=[(0, 1), (2, 3)], hidden_states=[1], abs_threshold=0.01,
                  rel_threshold=3.0) as rec:
        rec.annotate_next(sample_ids=["a", "b", "c"], extra=[{"text": "x"}, {}, {"text": "ünï"}])
        model(input_ids=ids, attention_mask=mask)
    return rec


def test_round_trip_keeps_every_field(tmp_path, recorded):
    path = recorded.save(tmp_path / "tr", config={"note": "unit test"})
    tr = Trace.load(path)
    assert len(tr) == 3 and tr.sample_ids == ["a", "b", "c"]
    assert tr.manifest["schema_version"] == trace_mod.SCHEMA_VERSION
    assert (tr.manifest["n_layers"], tr.manifest["n_heads"], tr.manifest["hidden_size"]) == (3, 4, 64)
    assert tr.manifest["sample_count"] == 3 and tr.manifest["config"]["note"] == "unit test"
    for mem, disk in zip(recorded.samples, tr, strict=True):
        assert disk.tokens == mem.tokens and disk.segments == mem.segments and disk.extra == mem.extra
        for name in trace_mod.ARRAY_FIELDS + trace_mod.OPTIONAL_ARRAY_FIELDS:
            np.testing.assert_array_equal(getattr(disk, name), getattr(mem, name), err_msg=name)
        assert disk.massive.reset_index(drop=True).equals(mem.massive.reset_index(drop=True))
        assert set(disk.attention_maps) == {(0, 1), (2, 3)}
        np.testing.assert_array_equal(disk.attention_maps[(2, 3)], mem.attention_maps[(2, 3)])
        np.testing.assert_array_equal(disk.hidden_states[1], mem.hidden_states[1])
    assert tr.sample("c").extra["text"] == "ünï"
    assert len(tr[2]) == 8
    torch.manual_seed(3)
    ids = torch.randint(3, 128, (3, 12))
    ids[:, 0] = 1
    for s, row, n in zip(tr, ids, (12, 12, 8), strict=True):  # the ids the forward got, padding left out
        assert s.token_ids.dtype == np.int64
        np.testing.assert_array_equal(s.token_ids, row[:n].numpy())
    with pytest.raises(KeyError, match="no sample 'zz'"):
        tr.sample("zz")
    # picked by position, id or slice; anything else refused (a float or a bool was taken as a position)
    assert tr["b"] is tr[1] is tr[-2] is tr[np.int64(1)] and tr[1:] == [tr[1], tr[2]] and tr[::-2] == [tr[2], tr[0]]
    for bad in (1.0, True, None):
        with pytest.raises(TypeError, match=rf"picked by position .* not {type(bad).__name__}"):
            tr[bad]
    with pytest.raises(IndexError, match="has 3 samples; index 3 is out of range"):
        tr[3]
    # a map or layer that was not recorded is named with those that were
    with pytest.raises(KeyError, match=r"\(1, 1\) was not recorded: .* only \[\(0, 1\), \(2, 3\)\]"):
        tr[0].attention_maps[(1, 1)]
    with pytest.raises(KeyError, match=r"2 was not recorded: this sample holds hidden states for layers only \[1\]"):
        tr[0].hidden_states[2]


def test_interrupted_write_keeps_finished_samples_and_resume_appends(tmp_path, recorded, monkeypatch):
    path = tmp_path / "tr"
    writer = TraceWriter(path, recorded.manifest())
    writer.append(recorded.samples[0])

    real = trace_write._write_sample

    def dies_half_way(directory, sample):
        (directory / "meta.json").write_text("{half")
        raise KeyboardInterrupt

    monkeypatch.setattr(trace_write, "_write_sample", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        writer.append(recorded.samples[1])
    monkeypatch.setattr(trace_write, "_write_sample", real)

    tr = Trace.load(path)
    assert tr.sample_ids == ["a"], "the finished sample survives; the half-written one is invisible"
    np.testing.assert_array_equal(tr[0].attention_received, recorded.samples[0].attention_received)

    resumed = TraceWriter(path, recorded.manifest())
    assert resumed.sample_ids == {"a"}
    resumed.append(recorded.samples[1])
    resumed.append(recorded.samples[2])
    assert Trace.load(path).sample_ids == ["a", "b", "c"]
    assert not list((path / "samples").glob(".tmp-*"))
    with pytest.raises(TraceError, match="already in the trace"):
        resumed.append(recorded.samples[0])


def test_appending_another_model_is_refused(tmp_path, recorded):
    recorded.save(tmp_path / "tr")
    other = dict(recorded.manifest(), n_layers=99)
    with pytest.raises(TraceError, match=r"field 'n_layers' is 3 but the new samples have 99"):
        TraceWriter(tmp_path / "tr", other)


def test_appending_samples_recorded_with_other_thresholds_is_refused(tmp_path, recorded):
    recorded.save(tmp_path / "tr")
    other = recorded.manifest()
    other["thresholds"] = dict(other["thresholds"], massive_abs=50.0)
    with pytest.raises(TraceError, match=r"field 'thresholds' is .*'massive_abs': 0\.01.* recorded with .*50\.0"):
        TraceWriter(tmp_path / "tr", other)
    with pytest.raises(TraceError, match=r"field 'top_k' is 8 but the new samples were recorded with 4"):
        TraceWriter(tmp_path / "tr", dict(recorded.manifest(), top_k=4))
    TraceWriter(tmp_path / "tr", recorded.manifest())  # the same setting appends


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: m.update(thresholds=None), r"field 'thresholds' is None: input should be a valid dictionary"),
    (lambda m: m["thresholds"].update(sink_head_fraction="half"), r"field 'thresholds\.sink_head_fraction' is 'half'"),
    (lambda m: m["thresholds"].update(massive_rel=-1.0), r"field 'thresholds\.massive_rel' is -1\.0"),
    (lambda m: m.update(top_k=0), r"field 'top_k' is 0: input should be greater than or equal to 1"),
    (lambda m: m.update(config=[1]), r"field 'config' is \[1\]"),
])
def test_optional_manifest_fields_are_checked_when_present(tmp_path, recorded, edit, message):
    path = _saved(tmp_path, recorded)
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TraceError, match=r"manifest\.json: " + message):
        Trace.load(path)
    for key in ("thresholds", "top_k", "config", "sample_count"):  # older traces without them still load
        manifest.pop(key, None)
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert len(Trace.load(path)) == 3


def _saved(tmp_path, recorded):
    return recorded.save(tmp_path / "tr")


def test_corrupt_manifest_is_named(tmp_path, recorded):
    path = _saved(tmp_path, recorded)
    (path / "manifest.json").write_text('{"format": "sinkscope-trace", "schema_version": 1,')
    with pytest.raises(TraceError, match=r"manifest\.json: not valid JSON"):
        Trace.load(path)


def test_wrong_schema_version(tmp_path, recorded):
    path = _saved(tmp_path, recorded)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TraceError, match=r"field 'schema_version' is 99.*upgrade sinkscope"):
        Trace.load(path)


def test_missing_and_truncated_array_files(tmp_path, recorded):
    path = _saved(tmp_path, recorded)
    arrays = path / "samples" / "000001" / "arrays.safetensors"
    data = arrays.read_bytes()
    arrays.write_bytes(data[: len(data) // 2])
    tr = Trace.load(path)
    with pytest.raises(TraceError, match=r"000001/arrays\.safetensors .*truncated"):
        _ = tr[1].attention_received
    arrays.unlink()
    with pytest.raises(TraceError, match=r"000001/arrays\.safetensors is missing"):
        Trace.load(path)


def test_foreign_directories(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TraceError, match="not a sinkscope trace: it has no manifest.json"):
        Trace.load(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text(json.dumps({"name": "some other tool"}))
    with pytest.raises(TraceError, match="field 'format' is None"):
        Trace.load(tmp_path / "other")
    with pytest.raises(TraceError, match="is not a directory"):
        Trace.load(tmp_path / "nowhere")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(TraceError, match="not empty and is not a sinkscope trace"):
        TraceWriter(tmp_path / "busy", {"model": "m", "n_layers": 1, "n_heads": 1, "hidden_size": 1})
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine", "nothing already written is lost"
    # a folder of traces given where one trace is expected: the traces in it are named
    with pytest.raises(TraceError, match=rf"{tmp_path} is not a sinkscope trace: it has no manifest.json; it holds "
                                         rf"the traces {tmp_path / 'other'}: pass one"):
        Trace.load(tmp_path)
