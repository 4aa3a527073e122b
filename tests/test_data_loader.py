"""The corpus loader: round trip, an Auto-AVSR LRS3 tree, noise, batching, and every bad-input case."""

from __future__ import annotations

import json
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from sinkscope.data.dataset import (
    VIDEO_MEAN,
    VIDEO_STD,
    AVSRDataset,
    BucketBatchSampler,
    DataError,
    collate,
    mix_at_snr,
    read_video,
)
from sinkscope.data.synth import SynthConfig, synthesize, write_mp4, write_wav

N = 12


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    synthesize(out, SynthConfig(n=N, seed=3), workers=2)
    return out


@pytest.fixture()
def copy(corpus, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(corpus, dst)
    return dst


def manifest(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]


def test_round_trip_of_the_synthetic_corpus(corpus):
    rows = {r["id"]: r for r in manifest(corpus)}
    for split in ("train", "test"):
        ds = AVSRDataset(corpus, split)
        assert len(ds) == sum(r["split"] == split for r in rows.values())
        for i in range(len(ds)):
            item = ds[i]
            row = rows[item["id"]]
            assert item["transcript"] == row["transcript"] and item["snr"] is None
            assert item["video"].shape == (row["n_frames"], 88, 88)
            assert item["audio_features"].shape == (4 * row["n_frames"], 80), "100 mel frames/s vs 25 fps"
            raw = read_video(corpus / row["video"])
            expected = (raw.astype(np.float32) / 255 - VIDEO_MEAN) / VIDEO_STD
            torch.testing.assert_close(item["video"], torch.from_numpy(expected))


def test_video_multiple_truncates_both_streams(corpus):
    ds = AVSRDataset(corpus, "train", video_multiple=4, n_mels=128)
    for i in range(len(ds)):
        item = ds[i]
        assert len(item["video"]) % 4 == 0
        assert item["audio_features"].shape == (4 * len(item["video"]), 128)
        assert len(item["audio"]) == 640 * len(item["video"])


def test_limit_keeps_the_first_utterances_and_the_whole_babble_pool(corpus):
    full = AVSRDataset(corpus, "train", snr=0.0)
    first = AVSRDataset(corpus, "train", snr=0.0, limit=2)
    assert [i.id for i in first.items] == [i.id for i in full.items[:2]]
    assert [i.id for i in first.noise_pool] == [i.id for i in full.noise_pool]
    torch.testing.assert_close(first[1]["audio"], full[1]["audio"])  # the same babble at the same SNR
    with pytest.raises(DataError, match="limit must be a positive number of utterances, not 0"):
        AVSRDataset(corpus, "train", limit=0)
    # indexed like a list: negative from the end; past the end an IndexError that names the split (a negative
    # index was a numpy seeding error)
    torch.testing.assert_close(first[-1]["audio"], first[1]["audio"])
    with pytest.raises(IndexError, match="split 'train' has 2 utterances; index 2 is out of range"):
        first[2]
    with pytest.raises(TypeError, match="indexed by position"):
        first["a"]


def test_noise_is_mixed_at_the_requested_snr(corpus):
    rng = np.random.default_rng(0)
    speech, noise = rng.standard_normal(16000).astype(np.float32), rng.standard_normal(16000).astype(np.float32)
    for snr in (-5.0, 0.0, 10.0):
        mixed = mix_at_snr(speech, noise, snr)
        measured = 10 * np.log10(np.mean(speech**2) / np.mean((mixed - speech) ** 2))
        assert measured == pytest.approx(snr, abs=1e-3)
    clean = AVSRDataset(corpus, "test")[0]
    noisy = AVSRDataset(corpus, "test", snr=0.0)[0]
    residual = noisy["audio"] - clean["audio"]
    assert 10 * np.log10(float((clean["audio"] ** 2).mean() / (residual**2).mean())) == pytest.approx(0.0, abs=0.01)
    train = AVSRDataset(corpus, "train", snr="train", seed=1)
    snrs = [train[i]["snr"] for i in range(len(train))]
    assert snrs == [train[i]["snr"] for i in range(len(train))], "the same epoch gives the same noise"
    assert set(snrs) <= {-5.0, 0.0, 5.0, 10.0, 15.0, 20.0, None} and len(set(snrs)) > 1
    white = AVSRDataset(corpus, "test", snr=5.0, noise="white")[0]
    assert not torch.equal(white["audio"], noisy["audio"])


def test_collate_and_buckets(corpus):
    ds = AVSRDataset(corpus, "train")
    sampler = BucketBatchSampler(ds.lengths(), batch_size=3, seed=0)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(ds)))
    assert batches == list(BucketBatchSampler(ds.lengths(), batch_size=3, seed=0)), "reproducible"
    batch = collate([ds[i] for i in batches[0]] + [None])
    assert batch["dropped"] == 1 and len(batch["ids"]) == len(batches[0])
    T = int(batch["video_lengths"].max())
    assert batch["video"].shape == (len(batches[0]), T, 88, 88)
    assert batch["audio_features"].shape[1] == int(batch["audio_lengths"].max())
    k = int(batch["video_lengths"].argmin())
    assert torch.all(batch["video"][k, batch["video_lengths"][k]:] == 0), "padding is zero"


def test_auto_avsr_lrs3_layout(corpus, tmp_path):
    root = tmp_path / "LRS3"
    rows = manifest(corpus)[:3]
    for k, r in enumerate(rows):
        rel = Path("test") / f"spk{k % 2}" / f"0000{k}"
        vid = root / "lrs3_video_seg24s" / rel
        vid.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(corpus / r["video"], vid.with_suffix(".mp4"))
        shutil.copy(corpus / r["audio"], vid.with_suffix(".wav"))
        txt = (root / "lrs3_text_seg24s" / rel).with_suffix(".txt")
        txt.parent.mkdir(parents=True, exist_ok=True)
        txt.write_text(f"Text:  {r['transcript'].upper()}\nConf:  4\n")
    ds = AVSRDataset(root, "test")
    assert ds.layout == "lrs" and len(ds) == 3
    got = sorted((ds[i]["id"], ds[i]["transcript"]) for i in range(3))
    assert got == sorted((f"test/spk{k % 2}/0000{k}", r["transcript"]) for k, r in enumerate(rows))


def _first(root: Path, ext: str) -> Path:
    return root / manifest(root)[0][ext]


def _expect(root: Path, match: str, **kwargs):
    row = manifest(root)[0]
    ds = AVSRDataset(root, row["split"], **kwargs)
    index = [it.id for it in ds.items].index(row["id"])
    with pytest.raises(DataError, match=match):
        ds[index]
    skipping = AVSRDataset(root, row["split"], skip_bad=True, **kwargs)
    assert skipping[index] is None and len(skipping.bad) == 1 and skipping.bad[0][0] == row["id"]
    assert all(skipping[i] is not None for i in range(len(skipping)) if i != index), "the rest still loads"


def test_truncated_and_corrupt_video(copy):
    video = _first(copy, "video")
    video.write_bytes(video.read_bytes()[:300])
    _expect(copy, r"\.mp4: (corrupt or truncated video|the video has no frames)")
    video.write_bytes(b"definitely not an mp4 file" * 20)
    _expect(copy, r"\.mp4: corrupt or truncated video")


def test_corrupt_wav_and_wrong_sample_rate(copy):
    audio = _first(copy, "audio")
    good = audio.read_bytes()
    audio.write_bytes(good[:40])
    _expect(copy, r"\.wav: (not a readable WAV file|truncated WAV)")
    audio.write_bytes(good)
    with wave.open(str(audio), "rb") as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    with wave.open(str(audio), "wb") as w:  # the same samples declared at 8 kHz: twice as long, wrong rate
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(pcm[::2].tobytes())
    _expect(copy, r"\.wav: sample rate 8000 Hz, expected 16000", allow_resample=False)
    row = manifest(copy)[0]
    ds = AVSRDataset(copy, row["split"])  # resampling is allowed by default
    item = ds[[it.id for it in ds.items].index(row["id"])]
    assert len(item["audio"]) == 640 * len(item["video"])


def test_transcript_problems(copy, tmp_path):
    lines = (copy / "manifest.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    first["transcript"] = "   "
    (copy / "manifest.jsonl").write_text("\n".join([json.dumps(first)] + lines[1:]) + "\n")
    _expect(copy, r"manifest\.jsonl:1: field 'transcript': transcript is empty")
    del first["transcript"]
    (copy / "manifest.jsonl").write_text("\n".join([json.dumps(first)] + lines[1:]) + "\n")
    with pytest.raises(DataError, match=r"manifest\.jsonl:1: field 'transcript' is missing"):
        AVSRDataset(copy, first["split"])
    # LRS layout: missing, empty and non-UTF-8 transcript files
    root = tmp_path / "lrs"
    vid = root / "test" / "spk" / "u1"
    vid.parent.mkdir(parents=True)
    shutil.copy(copy / first["video"], vid.with_suffix(".mp4"))
    shutil.copy(copy / first["audio"], vid.with_suffix(".wav"))
    with pytest.raises(DataError, match=r"u1\.txt: transcript file is missing"):
        AVSRDataset(root, "test")[0]
    vid.with_suffix(".txt").write_text("\n\n")
    with pytest.raises(DataError, match=r"u1\.txt: transcript is empty"):
        AVSRDataset(root, "test")[0]
    vid.with_suffix(".txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(DataError, match=r"u1\.txt: transcript: not UTF-8"):
        AVSRDataset(root, "test")[0]


def test_duration_mismatch_and_missing_files(copy):
    row = manifest(copy)[0]
    frames = read_video(copy / row["video"])
    write_mp4(copy / row["video"], np.concatenate([frames, frames[:10]]))  # +0.4 s of video
    _expect(copy, r"video lasts .* but .*\.wav lasts .*tolerance 0\.1 s")
    (copy / row["video"]).unlink()
    _expect(copy, r"\.mp4: video file is missing")
    write_wav(copy / "unused.wav", np.zeros(10, dtype=np.float32))
    with pytest.raises(DataError, match="holds neither a manifest.jsonl"):
        AVSRDataset(copy / "train")
    splits = ", ".join(sorted({r["split"] for r in manifest(copy)}))
    with pytest.raises(DataError, match=f"no utterances in split 'dev'; its splits are {splits}$"):
        AVSRDataset(copy, "dev")
