"""The synthetic AV corpus: determinism, audio-visual alignment, grammar, speakers, resume."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import wave
from pathlib import Path

import av
import numpy as np
import pytest

from sinkscope.data.synth import SPEAKERS, TEST_SPEAKERS, SynthConfig, synthesize
from sinkscope.data.text import GRID_VOCAB, parse_grid
from sinkscope.data.video import mouth_opening_signal
from sinkscope.errors import SinkscopeError

N = 40


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "synth_config.json"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    made, kept = synthesize(out, SynthConfig(n=N, seed=0), workers=2)
    assert (made, kept) == (N, 0)
    return out


def rows(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]


def test_same_seed_is_byte_identical_other_seed_differs(corpus, tmp_path):
    again = tmp_path / "again"
    synthesize(again, SynthConfig(n=N, seed=0), workers=1)  # another worker count, too
    assert digest(again) == digest(corpus)
    other = tmp_path / "other"
    synthesize(other, SynthConfig(n=N, seed=1), workers=2)
    a, b = digest(corpus), digest(other)
    assert [r["transcript"] for r in rows(other)] != [r["transcript"] for r in rows(corpus)]
    assert sum(a.get(k) == v for k, v in b.items()) == 0, "no file of seed 1 equals a file of seed 0"


def _frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="gray") for f in c.decode(video=0)])


def _audio(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768


def test_mouth_opening_follows_audio_energy_and_silence_is_closed(corpus):
    """Measured on 60 utterances of seed 0 (2026-11-24): the correlation between the mouth-opening signal and
    the audio RMS envelope at 25 fps is 0.66 on average (minimum 0.43); in the leading and trailing silence the
    opening signal is at most 0.0004, while every utterance opens to at least 0.17."""
    correlations = []
    for r in rows(corpus):
        frames, audio = _frames(corpus / r["video"]), _audio(corpus / r["audio"])
        assert frames.shape == (r["n_frames"], 88, 88)
        assert len(audio) == r["n_frames"] * 640, "audio and video have the same duration"
        envelope = np.sqrt((audio.reshape(-1, 640) ** 2).mean(axis=1))
        opening = mouth_opening_signal(frames)
        correlations.append(np.corrcoef(opening, envelope)[0, 1])
        meta = json.loads((corpus / r["video"]).with_suffix(".json").read_text())
        first, last = meta["words"][0][1], meta["words"][-1][2]
        silent = np.r_[opening[: max(1, int(first * 25) - 1)], opening[int(np.ceil(last * 25)) + 1:]]
        assert silent.max() <= 0.01, "the mouth is closed in silence"
        assert opening.max() >= 0.1, "the mouth opens when speaking"
    assert min(correlations) >= 0.3 and np.mean(correlations) >= 0.55, correlations


def test_grammar_alignment_and_speaker_splits(corpus):
    assert len(GRID_VOCAB) == 51
    manifest = rows(corpus)
    assert len(manifest) == N and [r["id"] for r in manifest] == [f"{i:06d}" for i in range(N)]
    for r in manifest:
        assert parse_grid(r["transcript"]) is not None, r["transcript"]
        txt = (corpus / r["video"]).with_suffix(".txt").read_text().strip()
        assert txt == r["transcript"]
        meta = json.loads((corpus / r["video"]).with_suffix(".json").read_text())
        words = meta["words"]
        assert [w for w, _, _ in words] == r["transcript"].split()
        starts = [s for _, s, _ in words]
        assert starts == sorted(starts) and 0.1 < starts[0] and words[-1][2] < r["duration"]
        assert all(e >= s for _, s, e in meta["phonemes"]) and len(meta["phonemes"]) >= 12
    train = {r["speaker"] for r in manifest if r["split"] == "train"}
    test = {r["speaker"] for r in manifest if r["split"] == "test"}
    assert train and test and not train & test
    assert len(SPEAKERS) >= 8 and len(TEST_SPEAKERS) >= 2
    assert {r["split"] for r in manifest} == {"train", "test"}


def test_open_vocabulary(tmp_path):
    out = tmp_path / "open"
    synthesize(out, SynthConfig(n=12, seed=0, vocab="open"), workers=2)
    manifest = rows(out)
    lengths = [len(r["transcript"].split()) for r in manifest]
    assert all(4 <= n <= 12 for n in lengths) and len(set(lengths)) > 3
    words = {w for r in manifest for w in r["transcript"].split()}
    assert len(words) > 40 and not words <= set(GRID_VOCAB)
    for r in manifest:
        meta = json.loads((out / r["video"]).with_suffix(".json").read_text())
        assert [w for w, _, _ in meta["words"]] == r["transcript"].split()


def test_killed_generation_resumes_to_the_same_files(corpus, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "sinkscope", "data", "synth", "--out", str(out), "--n", str(N), "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and len(list(out.glob("*/*/*.json"))) < 6:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list(out.glob("*/*/*.json")))
    assert 0 < finished < N, "the generation was killed part-way"
    made, kept = synthesize(out, SynthConfig(n=N, seed=0), workers=2)
    assert kept >= finished - 1 and made + kept == N
    assert digest(out) == digest(corpus)


def test_resuming_with_other_arguments_is_refused(corpus):
    before = digest(corpus)
    with pytest.raises(SinkscopeError, match=r"generated with seed=0, not 5"):
        synthesize(corpus, SynthConfig(n=N, seed=5))
    with pytest.raises(SinkscopeError, match="generated with vocab='grid', not 'open'"):
        synthesize(corpus, SynthConfig(n=N, seed=0, vocab="open"))
    with pytest.raises(SinkscopeError, match="--vocab must be grid or open, not 'klingon'"):
        synthesize(corpus, SynthConfig(n=N, seed=0, vocab="klingon"))
    assert digest(corpus) == before


def test_a_corpus_never_shrinks_and_foreign_directories_are_refused(corpus, tmp_path):
    before = {**digest(corpus), "config": (corpus / "synth_config.json").read_bytes()}
    with pytest.raises(SinkscopeError, match=rf"holds a corpus of {N} utterances; --n 3 would shrink it"):
        synthesize(corpus, SynthConfig(n=3, seed=0))
    assert {**digest(corpus), "config": (corpus / "synth_config.json").read_bytes()} == before
    # a user's own directory (their manifest, their notes) is left as it was
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "manifest.jsonl").write_text('{"id": "my-own"}\n')
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(SinkscopeError, match=r"is not empty \(manifest.jsonl, notes.txt.*not a corpus"):
        synthesize(mine, SynthConfig(n=4, seed=0))
    assert sorted(p.name for p in mine.iterdir()) == ["manifest.jsonl", "notes.txt"]
    assert (mine / "manifest.jsonl").read_text() == '{"id": "my-own"}\n'
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(SinkscopeError, match="is a file, not a corpus directory"):
        synthesize(a_file, SynthConfig(n=4, seed=0))


def _alive_in_group(pgid: int) -> list[str]:
    """Processes of a process group that are still running (zombies waiting to be reaped do not count)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(stat.parent.name)
    return alive


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killing_the_main_process_leaves_no_worker_running(tmp_path):
    out = tmp_path / "orphans"
    cmd = [sys.executable, "-m", "sinkscope", "data", "synth", "--out", str(out), "--n", "40", "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and len(list(out.glob("*/*/*.json"))) < 2:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # the main process only, as `kill -9 PID` does
    proc.wait()
    deadline = time.time() + 5
    while time.time() < deadline and _alive_in_group(proc.pid):
        time.sleep(0.1)
    assert not _alive_in_group(proc.pid), "workers outlived the killed main process"
    written = len(list(out.glob("*/*/*.json")))
    time.sleep(1.0)
    assert len(list(out.glob("*/*/*.json"))) == written, "utterances were still written after the kill"
