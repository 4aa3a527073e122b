"""The corrupted inputs, by family. Each case copies a small valid artefact (a 4-utterance corpus, a 3-sample trace
of a tiny Llama, a checkpoint directory), breaks one thing, and runs what a user would run on it."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import wave
from functools import partial
from pathlib import Path

import numpy as np
import torch
from typer.testing import CliRunner

from tests.fuzz.harness import Case, CleanExit

BASE: dict[str, Path] = {}


# ----------------------------------------------------------------------------------------------- artefacts
def build_base(where: Path) -> dict[str, Path]:
    """The valid artefacts every case starts from (built once per run)."""
    if BASE:
        return BASE
    from sinkscope.data.synth import SynthConfig, synthesize
    from sinkscope.record.recorder import Recorder
    from sinkscope.train.checkpoint import save_checkpoint
    from tests.tiny_models import tiny_llama

    where.mkdir(parents=True, exist_ok=True)
    corpus = where / "corpus"
    synthesize(corpus, SynthConfig(n=4, seed=0), workers=1)
    model = tiny_llama()
    torch.manual_seed(3)
    ids = torch.randint(3, 128, (3, 12))
    ids[:, 0] = 1
    with Recorder(model, attention_maps=[(0, 1)], hidden_states=[1]) as rec:
        rec.annotate_next(sample_ids=["a", "b", "c"])
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    trace = rec.save(where / "trace")
    run = where / "run"
    param = torch.nn.Parameter(torch.linspace(-1, 1, 12).reshape(3, 4))
    save_checkpoint(run, "epoch-001", {"w": param}, torch.optim.AdamW([param]), {"epoch": 1, "step": 1,
                                                                                  "history": []})
    (run / "config.yaml").write_text("data: corpora/x\nout: runs/x\n")
    BASE.update(corpus=corpus, trace=trace, run=run, root=where)
    return BASE


def _copy(name: str, d: Path) -> Path:
    target = d / name
    shutil.copytree(BASE[name], target, symlinks=True)
    return target


def cli(*args: str):
    """Run a `sinkscope` command in this process; a non-zero exit with a message becomes CleanExit, any other
    exception propagates (a raw traceback)."""
    from sinkscope.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    if result.exit_code != 0:
        text = result.output.strip()
        if "error" not in text.lower() and "invalid" not in text.lower() and "usage" not in text.lower():
            raise AssertionError(f"exit {result.exit_code} without a message: {text[:200]}")
        raise CleanExit(text.splitlines()[-1] if text else f"exit {result.exit_code}")
    return result.output


# ----------------------------------------------------------------------------------------------- corpus
def _rows(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "manifest.jsonl").read_text("utf-8-sig").splitlines() if line.strip()]


def _write_rows(root: Path, rows: list) -> None:
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def load_corpus(root: Path, skip_bad: bool = False, layout: str = "auto"):
    from sinkscope.data.dataset import AVSRDataset

    ds = AVSRDataset(root, None, layout=layout, max_seconds=4.0, skip_bad=skip_bad)
    items = [ds[i] for i in range(len(ds))]
    return {"transcripts": [it["transcript"] for it in items if it is not None], "bad": len(ds.bad),
            "n": len(ds)}


def _corpus_with(edit, d: Path) -> Path:
    root = _copy("corpus", d)
    edit(root)
    return root


def _row_field(key, value, root):
    rows = _rows(root)
    rows[0][key] = value
    _write_rows(root, rows)


def _row_drop(key, root):
    rows = _rows(root)
    del rows[0][key]
    _write_rows(root, rows)


def _manifest_text(text: bytes, root):
    (root / "manifest.jsonl").write_bytes(text)


def _first_line(transform, root):
    lines = (root / "manifest.jsonl").read_bytes().splitlines(keepends=True)
    lines[0] = transform(lines[0])
    (root / "manifest.jsonl").write_bytes(b"".join(lines))


def _wav(path: Path, rate: int = 16000, seconds: float = 1.0, channels: int = 1, width: int = 2,
         frames: int | None = None) -> None:
    n = int(rate * seconds) if frames is None else frames
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(max(rate, 1))
        w.writeframes((np.random.default_rng(0).standard_normal(n * channels) * 1000).astype(f"<i{width}")
                      .tobytes() if width > 1 else bytes(n * channels))
    if rate < 1:  # the wave module refuses to write 0 Hz: patch the header field
        data = bytearray(path.read_bytes())
        data[24:28] = struct.pack("<I", rate)
        path.write_bytes(bytes(data))


def _media(kind: str, edit, root):
    row = _rows(root)[0]
    edit(root / row[kind], root)


def _set_rate(rate, path, root):
    data = bytearray(path.read_bytes())
    data[24:28] = struct.pack("<I", rate)
    data[28:32] = struct.pack("<I", rate * 2)
    path.write_bytes(bytes(data))


def _truncate(fraction, path, root):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def _garbage(path, root):
    path.write_bytes(os.urandom(3000))


def _empty(path, root):
    path.write_bytes(b"")


def _remove(path, root):
    path.unlink()


def _long_audio(path, root):
    _wav(path, seconds=6.0)


def _resampled(path, root):
    """The same utterance at 48 kHz (valid: it is resampled)."""
    from scipy.signal import resample_poly

    with wave.open(str(path)) as w:
        audio = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float64)
    up = np.clip(resample_poly(audio, 3, 1), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(48000)
        w.writeframes(up.tobytes())


def _stereo(path, root):
    with wave.open(str(path)) as w:
        audio = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(np.repeat(audio, 2).tobytes())


def _eight_bit(path, root):
    _wav(path, width=1, seconds=2.0)


def _tiny_video(path, root):
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        for _ in range(10):
            frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode())


def _transcripts_equal(ctx, result) -> bool:
    expected = [" ".join(r["transcript"].replace("\ufeff", "").lower().split()) for r in _rows(ctx)]
    return sorted(result["transcripts"]) == sorted(expected)


def _lrs_tree(transcript: bytes | None, d: Path) -> Path:
    """An LRS-layout tree of one utterance (media from the base corpus) with the given transcript file bytes."""
    row = _rows(BASE["corpus"])[0]
    root = d / "lrs"
    folder = root / "test" / "spk"
    folder.mkdir(parents=True)
    shutil.copy(BASE["corpus"] / row["video"], folder / "u1.mp4")
    shutil.copy(BASE["corpus"] / row["audio"], folder / "u1.wav")
    if transcript is not None:
        (folder / "u1.txt").write_bytes(transcript)
    return root


def corpus_cases() -> list[Case]:
    cases = []
    act = load_corpus
    bad_values = {"int": 123, "null": None, "list": ["a"], "object": {"a": 1}, "bool": True, "empty": ""}
    for key in ("id", "split", "video", "audio", "transcript", "speaker"):
        for label, value in bad_values.items():
            if key == "speaker" and label == "empty":
                continue  # an empty speaker is valid (the field is optional)
            cases.append(Case("corpus", f"manifest-{key}-{label}", partial(_corpus_with, partial(_row_field, key,
                                                                                                value)), act))
    for key, values in {"duration": {"string": "2.0", "list": [2], "bool": True, "negative": -1.0, "zero": 0},
                        "n_frames": {"string": "60", "float": 1.5, "negative": -3, "bool": False,
                                     "huge": 10**12}}.items():
        for label, value in values.items():
            cases.append(Case("corpus", f"manifest-{key}-{label}",
                              partial(_corpus_with, partial(_row_field, key, value)), act))
    for key in ("id", "split", "video", "audio", "transcript"):
        cases.append(Case("corpus", f"manifest-missing-{key}", partial(_corpus_with, partial(_row_drop, key)), act))
    for key in ("duration", "n_frames", "speaker"):  # optional fields: valid without them
        cases.append(Case("corpus", f"manifest-without-{key}", partial(_corpus_with, partial(_row_drop, key)), act,
                          expect="ok", check=lambda ctx, r: r["n"] == 4))
    structural = {
        "latin1-byte": lambda line: line.replace(b'"transcript": "', b'"transcript": "caf\xe9 '),
        "deep-nesting": lambda line: b"[" * 100000 + b"]" * 100000 + b"\n",
        "list-line": lambda line: b"[1, 2, 3]\n",
        "string-line": lambda line: b'"just a string"\n',
        "number-line": lambda line: b"42\n",
        "truncated-json": lambda line: line[: len(line) // 2] + b"\n",
        "nan-literal": lambda line: line.replace(b'"duration": ', b'"duration": NaN, "x": '),
        "nul-transcript": lambda line: line.replace(b'"transcript": "', b'"transcript": "\\u0000\\u0000", "t": "'),
        "control-transcript": lambda line: line.replace(b'"transcript": "', b'"transcript": "a\\u0007b", "t": "'),
        "whitespace-transcript": lambda line: line.replace(b'"transcript": "', b'"transcript": "  \\t ", "t": "'),
        "absolute-video": lambda line: line.replace(b'"video": "', b'"video": "/etc/passwd", "v": "'),
        "dotdot-audio": lambda line: line.replace(b'"audio": "', b'"audio": "../../../etc/passwd", "a": "'),
        "binary-garbage": lambda line: os.urandom(200).replace(b"\n", b"x") + b"\n",
    }
    for label, transform in structural.items():
        cases.append(Case("corpus", f"manifest-{label}", partial(_corpus_with, partial(_first_line, transform)), act))
    cases.append(Case("corpus", "manifest-duplicate-id", partial(_corpus_with, lambda root: _write_rows(
        root, [*_rows(root), _rows(root)[0]])), act))
    cases.append(Case("corpus", "manifest-empty", partial(_corpus_with, partial(_manifest_text, b"")), act))
    cases.append(Case("corpus", "manifest-only-blank-lines", partial(_corpus_with, partial(_manifest_text,
                                                                                           b"\n\n  \n")), act))
    cases.append(Case("corpus", "manifest-missing-read-as-tree", partial(_corpus_with, lambda root: (
        root / "manifest.jsonl").unlink()), act, expect="ok", check=lambda ctx, r: r["n"] == 4))  # the media and
    # transcript files of a synthetic corpus also form a valid <split>/<speaker>/<utt> tree
    cases.append(Case("corpus", "manifest-utf8-bom", partial(_corpus_with, lambda root: _manifest_text(
        b"\xef\xbb\xbf" + (root / "manifest.jsonl").read_bytes(), root)), act, expect="ok",
        check=_transcripts_equal))
    cases.append(Case("corpus", "transcript-with-bom", partial(_corpus_with, partial(
        _first_line, lambda line: line.replace(b'"transcript": "', b'"transcript": "\\ufeff'))), act, expect="ok",
        check=lambda ctx, r: not any("\ufeff" in t for t in r["transcripts"]) and _transcripts_equal(ctx, r)))
    cases.append(Case("corpus", "transcript-upper-case", partial(_corpus_with, partial(
        _first_line, lambda line: line.replace(b'"transcript": "', b'"transcript": "  LAY '))), act, expect="ok",
        check=lambda ctx, r: any(t.startswith("lay ") for t in r["transcripts"])))
    media = {
        "wav-1hz-header": ("audio", partial(_set_rate, 1)),
        "wav-0hz-header": ("audio", partial(_set_rate, 0)),
        "wav-huge-rate": ("audio", partial(_set_rate, 10**9)),
        "wav-truncated": ("audio", partial(_truncate, 0.5)),
        "wav-header-only": ("audio", partial(_truncate, 0.02)),
        "wav-garbage": ("audio", _garbage),
        "wav-empty": ("audio", _empty),
        "wav-missing": ("audio", _remove),
        "wav-8-bit": ("audio", _eight_bit),
        "wav-longer-than-window": ("audio", _long_audio),
        "mp4-truncated": ("video", partial(_truncate, 0.3)),
        "mp4-garbage": ("video", _garbage),
        "mp4-empty": ("video", _empty),
        "mp4-missing": ("video", _remove),
        "mp4-16x16-frames": ("video", _tiny_video),
        "mp4-is-a-wav": ("video", lambda path, root: shutil.copy(root / _rows(root)[0]["audio"], path)),
    }
    for label, (kind, edit) in media.items():
        cases.append(Case("corpus", label, partial(_corpus_with, partial(_media, kind, edit)), act))
    cases.append(Case("corpus", "wav-longer-than-window-skipped", partial(_corpus_with, partial(
        _media, "audio", _long_audio)), partial(act, skip_bad=True), expect="ok",
        check=lambda ctx, r: r["bad"] == 1 and len(r["transcripts"]) == 3))
    cases.append(Case("corpus", "wav-48khz", partial(_corpus_with, partial(_media, "audio", _resampled)), act,
                      expect="ok", check=_transcripts_equal))
    cases.append(Case("corpus", "wav-stereo", partial(_corpus_with, partial(_media, "audio", _stereo)), act,
                      expect="ok", check=_transcripts_equal))
    lrs = partial(load_corpus, layout="lrs")
    for label, data in {"latin1": "caf\xe9 au lait".encode("latin-1"), "nul-only": b"\x00\x00\x00",
                        "empty": b"", "blank": b"  \n \n", "binary": os.urandom(64).replace(b"\n", b"")}.items():
        cases.append(Case("corpus", f"lrs-transcript-{label}", partial(_lrs_tree, data), lrs))
    cases.append(Case("corpus", "lrs-transcript-missing", partial(_lrs_tree, None), lrs))
    for label, data, text in (("bom", b"\xef\xbb\xbfBIN BLUE AT F TWO NOW\n", "bin blue at f two now"),
                              ("lrs3-header", b"Text:  BIN BLUE\nConf:  4\n", "bin blue"),
                              ("crlf", b"bin blue\r\n", "bin blue")):
        cases.append(Case("corpus", f"lrs-transcript-{label}", partial(_lrs_tree, data), lrs, expect="ok",
                          check=lambda ctx, r, text=text: r["transcripts"] == [text]))
    return cases


# ----------------------------------------------------------------------------------------------- traces
def read_trace(path: Path, root: Path | None = None):
    """Everything the app and `summary` read: every sample's arrays, massive table, maps, hidden states, and
    the per-layer summary."""
    from sinkscope.analysis import layer_summary
    from sinkscope.trace import Trace

    tr = Trace.load(path, root=root)
    for s in tr:
        for name in ("attention_received", "bos_cosine", "max_abs", "median_abs", "top_features",
                     "mlp_top_features", "feature_max_abs"):
            getattr(s, name)
        s.massive, s.attention_maps, s.hidden_states  # noqa: B018
    layer_summary(tr)
    return {"samples": len(tr), "skipped": list(tr.skipped)}


def _trace_with(edit, d: Path) -> Path:
    path = _copy("trace", d)
    edit(path)
    return path


def _json_edit(rel: str, fn, path: Path):
    file = path / rel
    data = json.loads(file.read_text())
    fn(data)
    file.write_text(json.dumps(data))


def _set(key, value, data):
    data[key] = value


def _arrays_edit(fn, path: Path, sample: str = "000000"):
    from safetensors.numpy import load_file, save_file

    file = path / "samples" / sample / "arrays.safetensors"
    arrays = {k: v.copy() for k, v in load_file(str(file)).items()}
    fn(arrays)
    save_file(arrays, str(file))


def _poke(name, index, value, arrays):
    arrays[name][index] = value


def _overlapping(path: Path):
    """A header whose second tensor's byte range overlaps the first (what the hand-written reader accepted)."""
    file = path / "samples" / "000000" / "arrays.safetensors"
    data = file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    names = [k for k in header if k != "__metadata__"]
    first = header[names[0]]["data_offsets"]
    header[names[1]]["data_offsets"] = [first[0], first[0] + header[names[1]]["data_offsets"][1]
                                        - header[names[1]]["data_offsets"][0]]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def _massive_edit(fn, path: Path):
    import pyarrow.parquet as pq

    file = path / "samples" / "000000" / "massive.parquet"
    df = pq.read_table(file).to_pandas()
    df = fn(df)
    df.to_parquet(file, index=False)


def _massive_row(column, value, df):
    import pandas as pd

    row = {"layer": 0, "token": 0, "feature": 0, "value": 100.0, "attn_share": 0.5, "mlp_share": 0.5}
    row[column] = value
    return pd.concat([df, pd.DataFrame([row])], ignore_index=True)


def _link(rel: str, target: str, path: Path):
    file = path / rel
    if file.is_dir():
        shutil.rmtree(file)
    else:
        file.unlink()
    file.symlink_to(target)


def trace_cases() -> list[Case]:
    cases = []
    act = read_trace
    for key in ("n_layers", "n_heads", "hidden_size"):
        for label, value in {"string": "3", "zero": 0, "negative": -1, "huge": 10**30, "float": 1.5, "bool": True,
                             "null": None}.items():
            cases.append(Case("traces", f"manifest-{key}-{label}", partial(_trace_with, partial(
                _json_edit, "manifest.json", partial(_set, key, value))), act, limit=5))
    for label, fn in {"format-foreign": partial(_set, "format", "something-else"),
                      "schema-version-2": partial(_set, "schema_version", 2),
                      "schema-version-string": partial(_set, "schema_version", "1"),
                      "model-null": partial(_set, "model", None),
                      "model-missing": lambda data: data.pop("model"),
                      # optional fields, checked when present (the index and the app read the thresholds)
                      "thresholds-null": partial(_set, "thresholds", None),
                      "thresholds-list": partial(_set, "thresholds", [100, 1000]),
                      "head-fraction-string": lambda data: data["thresholds"].update(sink_head_fraction="half"),
                      "head-fraction-zero": lambda data: data["thresholds"].update(sink_head_fraction=0),
                      "massive-abs-negative": lambda data: data["thresholds"].update(massive_abs=-5.0),
                      "min-queries-float": lambda data: data["thresholds"].update(sink_min_queries=2.5),
                      "top-k-zero": partial(_set, "top_k", 0),
                      "top-k-string": partial(_set, "top_k", "8"),
                      "config-string": partial(_set, "config", "x")}.items():
        cases.append(Case("traces", f"manifest-{label}", partial(_trace_with, partial(
            _json_edit, "manifest.json", fn)), act))
    raws = {"not-object": b"[1, 2]", "deep": b"[" * 50000 + b"]" * 50000, "latin1": b'{"format": "\xe9"}',
            "truncated": b'{"format": "sinkscope-trace", ', "empty": b"", "nan": b'{"n_layers": NaN}'}
    for label, raw in raws.items():
        cases.append(Case("traces", f"manifest-{label}", partial(_trace_with, lambda path, raw=raw: (
            path / "manifest.json").write_bytes(raw)), act))
    meta = "samples/000000/meta.json"
    for label, fn in {"tokens-string": partial(_set, "tokens", "abcdefghijkl"),
                      "tokens-ints": partial(_set, "tokens", list(range(12))),
                      "tokens-empty": partial(_set, "tokens", []),
                      "tokens-too-few": lambda data: data.update(tokens=data["tokens"][:5]),
                      "segment-past-end": partial(_set, "segments", [["bos", 0, 1], ["text", 1, 99]]),
                      "segment-start-after-end": partial(_set, "segments", [["text", 5, 2]]),
                      "segment-negative": partial(_set, "segments", [["text", -3, 2]]),
                      "segment-short-row": partial(_set, "segments", [["text", 1]]),
                      "segment-name-int": partial(_set, "segments", [[7, 0, 1]]),
                      "segment-string-bounds": partial(_set, "segments", [["text", "0", "1"]]),
                      "segments-not-list": partial(_set, "segments", "bos"),
                      "id-null": partial(_set, "id", None), "id-list": partial(_set, "id", ["a"]),
                      "id-empty": partial(_set, "id", ""), "extra-list": partial(_set, "extra", [1]),
                      "missing-tokens": lambda data: data.pop("tokens")}.items():
        cases.append(Case("traces", f"meta-{label}", partial(_trace_with, partial(_json_edit, meta, fn)), act))
    for label, raw in {"not-object": b'"x"', "deep": b"{\"a\":" * 5000 + b"1" + b"}" * 5000,
                       "garbage": os.urandom(100)}.items():
        cases.append(Case("traces", f"meta-{label}", partial(_trace_with, lambda path, raw=raw: (
            path / meta).write_bytes(raw)), act))
    pokes = {"alpha-nan": ("attention_received", (0, 0, 1), np.nan), "alpha-above-1": ("attention_received",
                                                                                        (0, 0, 1), 6.5),
             "alpha-negative": ("attention_received", (1, 0, 2), -0.3),
             "alpha-inf": ("attention_received", (0, 1, 0), np.inf),
             "cosine-above-1": ("bos_cosine", (0, 3), 2.0), "cosine-nan": ("bos_cosine", (1, 3), np.nan),
             "max-abs-negative": ("max_abs", (0, 0), -5.0), "max-abs-inf": ("max_abs", (0, 0), np.inf),
             "median-nan": ("median_abs", (0,), np.nan),
             "top-feature-too-large": ("top_features", (0, 0, 0), 64), "top-feature-negative":
                 ("top_features", (0, 0, 0), -1), "feature-max-negative": ("feature_max_abs", (0, 0), -1.0),
             "token-id-below-minus-1": ("token_ids", (2,), -7)}
    for label, (name, index, value) in pokes.items():
        cases.append(Case("traces", f"arrays-{label}", partial(_trace_with, partial(_arrays_edit, partial(
            _poke, name, index, value))), act))
    for label, fn in {"alpha-wrong-shape": lambda a: a.update(attention_received=a["attention_received"][:, :, :5]),
                      "alpha-missing": lambda a: a.pop("attention_received"),
                      "top-features-float": lambda a: a.update(top_features=a["top_features"].astype(np.float32)),
                      "top-features-wrong-shape": lambda a: a.update(top_features=a["top_features"][:, :3]),
                      "cosine-int8": lambda a: a.update(bos_cosine=a["bos_cosine"].astype(np.int8)),
                      "token-ids-float": lambda a: a.update(token_ids=a["token_ids"].astype(np.float32)),
                      "token-ids-wrong-shape": lambda a: a.update(token_ids=a["token_ids"][:4])}.items():
        cases.append(Case("traces", f"arrays-{label}", partial(_trace_with, partial(_arrays_edit, fn)), act))
    cases.append(Case("traces", "arrays-extra-tensor-ignored", partial(_trace_with, partial(
        _arrays_edit, lambda a: a.update(note=np.zeros(3, np.float32)))), act, expect="ok",
        check=lambda ctx, r: r["samples"] == 3))
    arrays = "samples/000000/arrays.safetensors"
    for label, fn in {"overlapping-offsets": _overlapping,
                      "truncated": lambda path: _truncate(0.5, path / arrays, None),
                      "garbage": lambda path: _garbage(path / arrays, None),
                      "empty": lambda path: _empty(path / arrays, None),
                      "huge-header-size": lambda path: (path / arrays).write_bytes(struct.pack("<Q", 2**62) + b"{}"),
                      "missing": lambda path: (path / arrays).unlink()}.items():
        cases.append(Case("traces", f"safetensors-{label}", partial(_trace_with, fn), act))
    for label, fn in {"feature-too-large": partial(_massive_row, "feature", 10**6),
                      "token-past-end": partial(_massive_row, "token", 500),
                      "layer-negative": partial(_massive_row, "layer", -1),
                      "value-nan": partial(_massive_row, "value", float("nan")),
                      "missing-column": lambda df: df.drop(columns=["feature"])}.items():
        cases.append(Case("traces", f"massive-{label}", partial(_trace_with, partial(_massive_edit, fn)), act))
    cases.append(Case("traces", "massive-garbage", partial(_trace_with, lambda path: _garbage(
        path / "samples/000000/massive.parquet", None)), act))
    cases.append(Case("traces", "maps-bad-name", partial(_trace_with, lambda path: _rename_tensor(
        path / "samples/000000/attention_maps.safetensors", "x")), act))
    cases.append(Case("traces", "hidden-bad-name", partial(_trace_with, lambda path: _rename_tensor(
        path / "samples/000000/hidden_states.safetensors", "layer-one")), act))
    cases.append(Case("traces", "samples-is-a-file", partial(_trace_with, lambda path: (
        shutil.rmtree(path / "samples"), (path / "samples").write_text("x"))), act))
    for label, fn in {"stray-empty-dir": lambda path: (path / "samples" / "zzz").mkdir(),
                      "stray-file": lambda path: (path / "samples" / "notes.txt").write_text("x"),
                      "numbered-dir-without-meta": lambda path: (path / "samples" / "000007").mkdir()}.items():
        cases.append(Case("traces", f"samples-{label}", partial(_trace_with, fn), act, expect="ok",
                          check=lambda ctx, r: r["samples"] == 3 and len(r["skipped"]) == 1))
    for label, stray in (("stray-dir", "zzz"), ("stray-numbered-dir", "000009")):
        cases.append(Case("traces", f"append-after-{label}", partial(_trace_with, lambda path, stray=stray: (
            path / "samples" / stray).mkdir()), append_sample, expect="ok",
            check=lambda path, r: r["samples"] == 4 and len(r["skipped"]) == 1))
    cases.append(Case("traces", "summary-cli-overlapping-offsets", partial(_trace_with, _overlapping),
                      lambda path: cli("summary", path)))
    cases.append(Case("traces", "summary-cli-huge-n-layers", partial(_trace_with, partial(
        _json_edit, "manifest.json", partial(_set, "n_layers", 10**30))), lambda path: cli("summary", path), limit=5))
    cases.append(Case("traces", "summary-cli-stray-dir", partial(_trace_with, lambda path: (
        path / "samples" / "zzz").mkdir()), lambda path: cli("summary", path), expect="ok",
        check=lambda ctx, out: "Sink^" in out))
    return cases


def append_sample(path: Path):
    """What `record --resume` does: append a sample to an existing trace, then read it back."""
    from sinkscope.record.recorder import Recorder
    from tests.tiny_models import tiny_llama

    model = tiny_llama()
    ids = torch.randint(3, 128, (1, 9))
    ids[:, 0] = 1
    with Recorder(model) as rec:
        rec.annotate_next(sample_ids=["d"])
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    rec.save(path)
    return read_trace(path)


def _rename_tensor(file: Path, name: str):
    from safetensors.numpy import load_file, save_file

    arrays = load_file(str(file))
    first = next(iter(arrays))
    arrays[name] = arrays.pop(first)
    save_file(arrays, str(file))


# ----------------------------------------------------------------------------------------------- app root
def app_cases() -> list[Case]:
    """Trace files that link outside the app's root: `Trace.load(path, root)` must refuse them (the app's test
    suite also checks, with an audit hook, that nothing outside the root is opened)."""
    cases = []
    for label, (rel, target) in {"arrays-to-passwd": ("samples/000000/arrays.safetensors", "/etc/passwd"),
                                 "meta-outside": ("samples/000000/meta.json", "/etc/hostname"),
                                 "manifest-outside": ("manifest.json", "/etc/passwd"),
                                 "massive-outside": ("samples/000000/massive.parquet", "/etc/passwd"),
                                 "sample-dir-outside": ("samples/000000", "/etc"),
                                 "samples-outside": ("samples", "/tmp")}.items():
        def setup(d, rel=rel, target=target):
            root = d / "root"
            root.mkdir()
            path = _copy("trace", root)
            _link(rel, target, path)
            return path, root

        cases.append(Case("app-root", label, setup, lambda ctx: read_trace(ctx[0], root=ctx[1])))

    def escape(d):
        root = d / "root"
        root.mkdir()
        return _copy("trace", d), root

    cases.append(Case("app-root", "trace-outside-root", escape, lambda ctx: read_trace(ctx[0], root=ctx[1])))
    cases.append(Case("app-root", "dotdot-name", escape, lambda ctx: read_trace(ctx[1] / ".." / "trace",
                                                                                root=ctx[1])))
    cases.append(Case("app-root", "inside-root-ok", lambda d: (_copy("trace", d), d),
                      lambda ctx: read_trace(ctx[0], root=ctx[1]), expect="ok", check=lambda c, r: r["samples"] == 3))
    return cases


# ----------------------------------------------------------------------------------------------- configs
def load_train_config(path: Path, *sets: str):
    from sinkscope.config import load_config
    from sinkscope.train.avsr import TrainConfig

    return load_config(TrainConfig, path, list(sets))


def _yaml(text: str, d: Path) -> Path:
    path = d / "train.yaml"
    path.write_text(text)
    return path


def _yaml_bytes(data: bytes, d: Path) -> Path:
    path = d / "train.yaml"
    path.write_bytes(data)
    return path


BASE_YAML = "data: corpora/x\nout: runs/x\nepochs: 2\n"


def config_cases() -> list[Case]:
    cases = []
    act = load_train_config
    values = {"epochs": ["0", "-1", "ten", "1.5", "null", "[1]", "true", "1e9999"],
              "batch_size": ["0", "-4", "'8'"], "max_train": ["-3", "0"], "decorrelation": ["-1", ".nan", ".inf",
                                                                                              "lots"],
              "lr": ["-0.001", "fast", "0", ".nan"], "warmup_steps": ["-1"], "snr": ["loud", "[1, 2]", "1e30"],
              "seed": ["abc"], "model": ["5", "[1]"], "nonsense_key": ["1"]}
    for key, options in values.items():
        for value in options:
            cases.append(Case("configs", f"{key}={value}", partial(_yaml, f"data: corpora/x\nout: runs/x\n{key}: "
                                                                         f"{value}\n"), act))
    for key, value in {"model.k_video": "-2", "model.k_audio": "[1,2]", "model.lora_r": "0", "model.mode": "text",
                       "model.compression": "zip", "model.lora_targets": "[nope_proj]", "model.lora_dropout": "1.5",
                       "model.audio.max_seconds": "-1", "model.llm": "5", "model.nope": "1"}.items():
        cases.append(Case("configs", f"set-{key}={value}", partial(_yaml, BASE_YAML),
                          lambda path, key=key, value=value: act(path, f"{key}={value}")))
    levels = zip("abcdefgh", "bcdefghi", strict=True)
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in levels)
    cases.append(Case("configs", "yaml-alias-bomb", partial(_yaml, bomb + "snr: *i\n"), act, limit=5))
    cases.append(Case("configs", "yaml-not-mapping", partial(_yaml, "- 1\n- 2\n"), act))
    cases.append(Case("configs", "yaml-syntax", partial(_yaml, "data: [unclosed\n"), act))
    cases.append(Case("configs", "yaml-deep", partial(_yaml, "a: " + "[" * 20000 + "]" * 20000 + "\n"), act))
    cases.append(Case("configs", "yaml-latin1", partial(_yaml_bytes, b"data: caf\xe9\n"), act))
    cases.append(Case("configs", "yaml-python-tag", partial(_yaml, "data: !!python/object/apply:os.system [ls]\n"),
                      act))
    cases.append(Case("configs", "yaml-missing-file", lambda d: d / "nope.yaml", act))
    cases.append(Case("configs", "set-without-equals", partial(_yaml, BASE_YAML), lambda path: act(path, "epochs")))
    cases.append(Case("configs", "valid-config", partial(_yaml, BASE_YAML + "decorrelation: 1e4\nlr: 5e-4\n"), act,
                      expect="ok", check=lambda ctx, cfg: cfg.decorrelation == 1e4 and cfg.epochs == 2))
    cases.append(Case("configs", "valid-set", partial(_yaml, BASE_YAML), lambda path: act(
        path, "model.k_audio=16", "decorrelation=100"), expect="ok",
        check=lambda ctx, cfg: cfg.model.k_audio == 16 and cfg.decorrelation == 100.0))
    return cases


# ----------------------------------------------------------------------------------------------- checkpoints
def load_run_weights(run: Path):
    from sinkscope.train.checkpoint import load_weights

    return load_weights(run)[1]


def resume_optimiser(run: Path):
    from sinkscope.train.checkpoint import load_checkpoint

    param = torch.nn.Parameter(torch.zeros(3, 4))
    return load_checkpoint(run, torch.optim.AdamW([param]))


def _run_with(edit, d: Path) -> Path:
    run = _copy("run", d)
    edit(run)
    return run


def _weights(fn, run: Path):
    from safetensors.torch import load_file, save_file

    file = run / "epoch-001.safetensors"
    weights = {k: v.clone() for k, v in load_file(file).items()}
    fn(weights)
    save_file(weights, str(file))


class _Payload:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def _pickle_to(path: Path):
    with open(path, "wb") as fh:
        pickle.dump({"optimiser": _Payload(), "rng": None}, fh)


def load_encoder_file(directory: Path):
    """`load_encoders` on a directory of exported encoders, into a small stand-in with a real audio encoder."""
    from sinkscope.models.encoders import AudioEncoder, AudioEncoderConfig
    from sinkscope.models.pretrained import load_encoders

    class Holder:
        audio_encoder = AudioEncoder(AudioEncoderConfig(d_model=32, layers=1, heads=2, ffn=64, max_seconds=1.0))
        video_encoder = None

    load_encoders(Holder(), directory)
    return "loaded"


def _encoder_dir(edit, d: Path) -> Path:
    from safetensors.torch import save_file

    from sinkscope.models.encoders import AudioEncoder, AudioEncoderConfig

    enc = AudioEncoder(AudioEncoderConfig(d_model=32, layers=1, heads=2, ffn=64, max_seconds=1.0))
    folder = d / "encoders"
    folder.mkdir()
    weights = {f"encoder.{k}": v.half().contiguous() for k, v in enc.state_dict().items()}
    save_file(weights, str(folder / "audio.safetensors"))
    edit(folder / "audio.safetensors", weights)
    return folder


def _whisper_with_pickle(d: Path) -> str:
    from transformers import WhisperConfig

    folder = d / "whisper"
    folder.mkdir()
    WhisperConfig(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                  decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64).save_pretrained(folder)
    _pickle_to(folder / "pytorch_model.bin")
    return str(folder)


def _whisper_encoder(name: str):
    from sinkscope.models.encoders import AudioEncoder, AudioEncoderConfig

    AudioEncoder(AudioEncoderConfig(name_or_path=name))
    return "built"


def checkpoint_cases() -> list[Case]:
    cases = []
    for label, fn in {"nan-weight": lambda w: w["w"].__setitem__((0, 0), float("nan")),
                      "inf-weight": lambda w: w["w"].__setitem__((1, 1), float("inf"))}.items():
        cases.append(Case("checkpoints", label, partial(_run_with, partial(_weights, fn)), load_run_weights))
    weights = "epoch-001.safetensors"
    for label, fn in {"truncated": lambda run: _truncate(0.5, run / weights, None),
                      "garbage": lambda run: _garbage(run / weights, None),
                      "empty": lambda run: _empty(run / weights, None),
                      "missing": lambda run: (run / weights).unlink(),
                      "state-missing": lambda run: (run / "state.json").unlink(),
                      "state-not-json": lambda run: (run / "state.json").write_text("{oops"),
                      "state-list": lambda run: (run / "state.json").write_text("[1]"),
                      "state-checkpoint-dotdot": lambda run: _json_edit("state.json", partial(
                          _set, "checkpoint", "../../etc/passwd"), run),
                      "state-checkpoint-null": lambda run: _json_edit("state.json", partial(
                          _set, "checkpoint", None), run)}.items():
        cases.append(Case("checkpoints", label, partial(_run_with, fn), load_run_weights))
    for label, fn in {"optimiser-truncated": lambda run: _truncate(0.5, run / "epoch-001.pt", None),
                      "optimiser-garbage": lambda run: _garbage(run / "epoch-001.pt", None),
                      "optimiser-missing": lambda run: (run / "epoch-001.pt").unlink()}.items():
        cases.append(Case("checkpoints", label, partial(_run_with, fn), resume_optimiser))
    cases.append(Case("checkpoints", "valid-run", partial(_run_with, lambda run: None), load_run_weights,
                      expect="ok", check=lambda ctx, w: tuple(w["w"].shape) == (3, 4)))
    for label, fn in {"truncated": lambda f, w: _truncate(0.5, f, None),
                      "nan": lambda f, w: _save_modified(f, w, lambda t: t.__setitem__(0, float("nan"))),
                      "wrong-shape": lambda f, w: _save_modified(f, w, None, shape=True),
                      "garbage": lambda f, w: _garbage(f, None)}.items():
        cases.append(Case("checkpoints", f"encoder-{label}", partial(_encoder_dir, fn), load_encoder_file))
    cases.append(Case("checkpoints", "encoder-valid", partial(_encoder_dir, lambda f, w: None), load_encoder_file,
                      expect="ok", check=lambda ctx, r: r == "loaded"))
    return cases


def _save_modified(file: Path, weights: dict, fn, shape: bool = False):
    from safetensors.torch import save_file

    name = next(k for k, v in weights.items() if v.ndim == 2)
    tensor = weights[name].clone()
    if shape:
        tensor = tensor[:, :3].contiguous()
    else:
        fn(tensor.view(-1))
    save_file({**weights, name: tensor}, str(file))


def pickle_cases() -> list[Case]:
    cases = [Case("pickles", "optimiser-state-pickle", partial(_run_with, lambda run: _pickle_to(
        run / "epoch-001.pt")), resume_optimiser),
        Case("pickles", "whisper-pytorch-model-bin", _whisper_with_pickle, _whisper_encoder),
        Case("pickles", "weights-file-is-a-pickle", partial(_run_with, lambda run: _pickle_to(
            run / "epoch-001.safetensors")), load_run_weights),
        Case("pickles", "encoder-file-is-a-pickle", partial(_encoder_dir, lambda f, w: _pickle_to(f)),
             load_encoder_file)]
    return cases


# ----------------------------------------------------------------------------------------------- CLI
def _with_files(d: Path) -> Path:
    """A directory of a user's own files (which no command may touch)."""
    folder = d / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes")
    (folder / "config.yaml").write_text("mine: true\n")
    (folder / "manifest.jsonl").write_text('{"mine": 1}\n')
    return folder


def cli_cases() -> list[Case]:
    cases = []
    trace = lambda d: _copy("trace", d)  # noqa: E731
    for eps in ("nan", "-1", "2", "inf", "x"):
        cases.append(Case("cli", f"summary-eps-{eps}", trace, lambda path, eps=eps: cli("summary", path, "--eps", eps)))
    cases.append(Case("cli", "summary-missing-trace", lambda d: d / "nope", lambda path: cli("summary", path)))
    cases.append(Case("cli", "summary-on-a-file", lambda d: _with_files(d) / "notes.txt",
                      lambda path: cli("summary", path)))
    record = ["record", "--text", "hi"]
    for label, args in {"device-tpu": ["--device", "tpu"], "device-cuda-x": ["--device", "cuda:x"],
                        "device-meta": ["--device", "meta"], "n-zero": ["--n", "0"], "n-negative": ["--n", "-1"],
                        "batch-zero": ["--batch-size", "0"], "dtype-int8": ["--dtype", "int8"],
                        "maps-garbage": ["--attention-maps", "x:y"], "hidden-garbage": ["--hidden-states", "a,b"],
                        "checkpoint-without-data": ["--checkpoint", "demo"],
                        "rate-without-checkpoint": ["--rate", "4,2"]}.items():
        cases.append(Case("cli", f"record-{label}", lambda d: d / "out",
                          lambda out, args=args: cli(*record, "--out", out, *args)))
    cases.append(Case("cli", "record-out-is-a-file", lambda d: _with_files(d) / "notes.txt",
                      lambda out: cli(*record, "--out", out)))
    cases.append(Case("cli", "record-out-foreign-dir", _with_files, lambda out: cli(*record, "--out", out)))
    cases.append(Case("cli", "record-out-under-a-file", lambda d: _with_files(d) / "notes.txt" / "sub",
                      lambda out: cli(*record, "--out", out)))
    ev = ["eval", "--checkpoint", "demo"]
    for label, args in {"snr-nan": ["--snr", "nan"], "snr-minus-inf": ["--snr", "-inf"], "limit-negative":
                        ["--limit", "-1"], "beam-zero": ["--beam", "0"], "no-data": [],
                        "snr-huge": ["--snr", "1e30"], "beam-huge": ["--beam", "100000"],
                        "data-missing": ["--data", "/nonexistent/corpus"],
                        "checkpoint-missing": ["--checkpoint", "/nonexistent/run"],
                        "rate-not-a-number": ["--rate", "x,y"]}.items():
        cases.append(Case("cli", f"eval-{label}", lambda d: _copy("corpus", d),
                          lambda corpus, args=args, label=label: cli(*ev, *([] if "data" in label else
                                                                        ["--data", corpus]), *args)))
    cases.append(Case("cli", "eval-out-is-a-file", lambda d: (_copy("corpus", d), _with_files(d) / "notes.txt"),
                      lambda ctx: cli(*ev, "--data", ctx[0], "--out", ctx[1])))
    cases.append(Case("cli", "eval-out-foreign-dir", lambda d: (_copy("corpus", d), _with_files(d)),
                      lambda ctx: cli(*ev, "--data", ctx[0], "--out", ctx[1])))
    cases.append(Case("cli", "eval-out-under-a-file", lambda d: (_copy("corpus", d),
                                                                 _with_files(d) / "notes.txt" / "x"),
                      lambda ctx: cli(*ev, "--data", ctx[0], "--out", ctx[1])))
    cases.append(Case("cli", "train-out-foreign-dir", _with_files, lambda out: cli(
        "train", "--data", BASE["corpus"], "--out", out, "--epochs", "1")))
    cases.append(Case("cli", "train-bad-set", lambda d: d / "run", lambda out: cli(
        "train", "--data", BASE["corpus"], "--out", out, "--set", "epochs=ten")))
    cases.append(Case("cli", "train-config-missing", lambda d: d / "nope.yaml", lambda cfg: cli(
        "train", "--config", cfg)))
    cases.append(Case("cli", "sweep-config-missing", lambda d: d / "nope.yaml", lambda cfg: cli(
        "sweep", "--config", cfg)))
    cases.append(Case("cli", "sweep-points-not-list", lambda d: _yaml(
        "out: x\nbase: y\nresults: r.csv\npoints: 5\n", d),
                      lambda cfg: cli("sweep", "--config", cfg, "--list")))
    for label, section in {"eval-snr-huge": "eval: {snr: [1.0e+30]}", "eval-limit-zero": "eval: {limit: 0}",
                           "record-n-negative": "record: {n: -3}", "eval-snr-twice": "eval: {snr: [0, 0.0]}"}.items():
        cases.append(Case("cli", f"sweep-{label}", lambda d, section=section: _yaml(
            f"out: x\nbase: y\nresults: r.csv\ngrid: {{decorrelation: [0.0]}}\n{section}\n", d),
            lambda cfg: cli("sweep", "--config", cfg, "--list")))
    cases.append(Case("cli", "export-onto-itself", lambda d: _copy("run", d), lambda run: cli("export", run, run)))
    cases.append(Case("cli", "export-missing-run", lambda d: d / "nope", lambda run: cli("export", run, run.parent
                                                                                          / "out")))
    cases.append(Case("cli", "export-into-file", lambda d: (_copy("run", d), _with_files(d) / "notes.txt"),
                      lambda ctx: cli("export", ctx[0], ctx[1])))
    cases.append(Case("cli", "synth-into-foreign-dir", _with_files, lambda out: cli("data", "synth", "--out", out,
                                                                                    "--n", "2", "--workers", "1")))
    cases.append(Case("cli", "synth-into-file", lambda d: _with_files(d) / "notes.txt", lambda out: cli(
        "data", "synth", "--out", out, "--n", "2", "--workers", "1")))
    cases.append(Case("cli", "synth-shrink", lambda d: _copy("corpus", d), lambda out: cli(
        "data", "synth", "--out", out, "--n", "2", "--workers", "1")))
    cases.append(Case("cli", "synth-n-zero", lambda d: d / "c", lambda out: cli("data", "synth", "--out", out,
                                                                                "--n", "0")))
    cases.append(Case("cli", "synth-vocab-bad", lambda d: d / "c", lambda out: cli(
        "data", "synth", "--out", out, "--n", "2", "--vocab", "klingon")))
    cases.append(Case("cli", "synth-seed-negative", lambda d: d / "c", lambda out: cli(
        "data", "synth", "--out", out, "--n", "2", "--seed", "-1", "--workers", "1")))
    cases.append(Case("cli", "synth-n-huge", lambda d: d / "c", lambda out: cli(
        "data", "synth", "--out", out, "--n", "100000000", "--workers", "1"), limit=5))
    cases.append(Case("cli", "app-root-missing", lambda d: d / "nope", lambda root: cli("app", "--root", root)))
    cases.append(Case("cli", "app-port-out-of-range", lambda d: d, lambda d: cli("app", "--port", "99999")))
    cases.append(Case("cli", "prepare-unknown-model", lambda d: d, lambda d: cli("prepare", "--model", "no-such-llm")))
    cases.append(Case("cli", "prepare-not-a-model-dir", _with_files, lambda d: cli("prepare", "--model", d)))
    cases.append(Case("cli", "synth-resume-same", lambda d: _copy("corpus", d), lambda out: cli(
        "data", "synth", "--out", out, "--n", "4", "--workers", "1"), expect="ok",
        check=lambda ctx, out: "already there" in out, protect=lambda d: sorted((d / "corpus").rglob("*.wav"))))
    return cases


def all_cases() -> list[Case]:
    return corpus_cases() + trace_cases() + app_cases() + config_cases() + checkpoint_cases() + pickle_cases() \
        + cli_cases()
