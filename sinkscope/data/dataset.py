"""One Dataset API for the synthetic corpus and for LRS2/LRS3 in the Auto-AVSR preprocessed layout.

Layouts (`layout="auto"` picks one):

- **synth**: `ROOT/manifest.jsonl` as written by `sinkscope data synth` (fields id, split, speaker, duration,
  n_frames, transcript, video, audio; paths relative to ROOT).
- **lrs**: mouth-ROI videos with their audio and transcripts, as Auto-AVSR's preprocessing leaves them:

      ROOT/<anything>_video_seg<N>s/<split>/<speaker>/<utt>.mp4     88x88 (or 96x96, centre-cropped) 25 fps
      ROOT/<anything>_video_seg<N>s/<split>/<speaker>/<utt>.wav     16 kHz mono
      ROOT/<anything>_text_seg<N>s/<split>/<speaker>/<utt>.txt      transcript

  or the plain tree `ROOT/<split>/<speaker>/<utt>.{mp4,wav,txt}`. A transcript file holds the text on its first
  line; LRS3's `Text:  WORDS` header line is understood. The text is lower-cased for training and scoring.

Each item holds `audio_features [T_a, n_mels]` (Whisper log-mel from transformers' feature extractor, cut to the
real length, 100 frames/s), `video [T_v, 88, 88]` normalised with mean 0.421 and std 0.165, the raw `audio`,
the transcript and the SNR used. Noise (babble from other utterances of the split, or white) is mixed at load
time: training samples the SNR from {-5, 0, 5, 10, 15, 20, clean}; evaluation fixes it.
"""

from __future__ import annotations

import json
import logging
import math
import re
import wave
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from sinkscope.errors import SinkscopeError

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
FPS = 25
VIDEO_MEAN, VIDEO_STD = 0.421, 0.165
TRAIN_SNRS: tuple[float | None, ...] = (-5.0, 0.0, 5.0, 10.0, 15.0, 20.0, None)  # None = clean
ROI = 88


class DataError(SinkscopeError):
    """A corpus file or manifest row is unusable; the message names the file and the field."""


@dataclass(frozen=True)
class Item:
    """One utterance as listed by a corpus (paths only; media are read on access)."""

    id: str
    split: str
    speaker: str
    video: Path
    audio: Path
    transcript: str | None = None  # None: read from `text`
    text: Path | None = None
    source: str = ""  # where the row came from (manifest line), for error messages


# ----------------------------------------------------------------------------------------------- listing
def list_synth(root: Path, split: str | None) -> list[Item]:
    manifest = root / "manifest.jsonl"
    items = []
    for k, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{manifest}:{k}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc})") from exc
        for key in ("id", "split", "video", "audio", "transcript"):
            if key not in row:
                raise DataError(f"{where}: field '{key}' is missing")
        if split is not None and row["split"] != split:
            continue
        items.append(Item(id=str(row["id"]), split=row["split"], speaker=str(row.get("speaker", "")),
                          video=root / row["video"], audio=root / row["audio"], transcript=row["transcript"],
                          source=where))
    return items


def list_lrs(root: Path, split: str | None) -> list[Item]:
    video_roots = sorted(p for p in root.glob("*_video_seg*s") if p.is_dir()) or [root]
    items = []
    for vroot in video_roots:
        troot = root / vroot.name.replace("_video_", "_text_") if vroot != root else root
        pattern = f"{split}/*/*.mp4" if split else "*/*/*.mp4"
        for video in sorted(vroot.glob(pattern)):
            rel = video.relative_to(vroot)
            text = (troot / rel).with_suffix(".txt")
            if not text.exists():
                text = video.with_suffix(".txt")
            items.append(Item(id=str(rel.with_suffix("")), split=rel.parts[0], speaker=rel.parts[1], video=video,
                              audio=video.with_suffix(".wav"), text=text, source=str(video)))
    return items


def detect_layout(root: Path) -> str:
    if (root / "manifest.jsonl").is_file():
        return "synth"
    if any(root.glob("*_video_seg*s")) or any(root.glob("*/*/*.mp4")):
        return "lrs"
    raise DataError(f"{root} holds neither a manifest.jsonl (synthetic corpus) nor an LRS-style tree of "
                    "<split>/<speaker>/<utt>.mp4 files")


# ------------------------------------------------------------------------------------------------- media
def read_transcript(item: Item) -> str:
    if item.transcript is not None:
        text = item.transcript
        where = f"{item.source}: field 'transcript'"
    else:
        path = item.text
        if path is None or not path.is_file():
            raise DataError(f"{path}: transcript file is missing (for video {item.video})")
        raw = path.read_bytes()
        try:
            decoded = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: transcript is not UTF-8 text (byte {exc.start}: {exc.reason})") from exc
        first = decoded.strip().splitlines()[0] if decoded.strip() else ""
        text = re.sub(r"^Text:\s*", "", first)
        where = str(path)
    text = " ".join(text.lower().split())
    if not text:
        raise DataError(f"{where}: transcript is empty")
    return text


def read_wav(path: Path, allow_resample: bool = True) -> np.ndarray:
    """Mono float32 audio at 16 kHz."""
    if not path.is_file():
        raise DataError(f"{path}: audio file is missing")
    try:
        with wave.open(str(path), "rb") as w:
            rate, channels, width, n = w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()
            raw = w.readframes(n)
    except (wave.Error, EOFError, OSError) as exc:
        raise DataError(f"{path}: not a readable WAV file ({exc})") from exc
    if width != 2:
        raise DataError(f"{path}: {8 * width}-bit samples; expected 16-bit PCM")
    if len(raw) < n * channels * width:
        raise DataError(f"{path}: truncated WAV ({len(raw)} of {n * channels * width} data bytes)")
    audio = np.frombuffer(raw, "<i2").astype(np.float32).reshape(-1, channels).mean(axis=1) / 32768.0
    if rate != SAMPLE_RATE:
        if not allow_resample:
            raise DataError(f"{path}: sample rate {rate} Hz, expected {SAMPLE_RATE} (allow_resample=True fixes it)")
        from scipy.signal import resample_poly

        g = math.gcd(rate, SAMPLE_RATE)
        audio = resample_poly(audio, SAMPLE_RATE // g, rate // g).astype(np.float32)
    return audio


def read_video(path: Path) -> np.ndarray:
    """uint8 grayscale frames `[T, 88, 88]` (larger crops are centre-cropped)."""
    import av

    if not path.is_file():
        raise DataError(f"{path}: video file is missing")
    try:
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="gray") for f in container.decode(video=0)]
    except (av.error.FFmpegError, ValueError, IndexError, OSError) as exc:
        raise DataError(f"{path}: corrupt or truncated video ({exc})") from exc
    if not frames:
        raise DataError(f"{path}: the video has no frames (corrupt or truncated)")
    video = np.stack(frames)
    h, w = video.shape[1:]
    if h < ROI or w < ROI:
        raise DataError(f"{path}: frames are {w}x{h}; a mouth ROI needs at least {ROI}x{ROI}")
    top, left = (h - ROI) // 2, (w - ROI) // 2
    return video[:, top:top + ROI, left:left + ROI]


def mix_at_snr(speech: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """`speech + g * noise` with g chosen so that 10 log10(P_speech / P_noise) = snr_db."""
    noise = np.resize(noise, speech.shape)
    p_s, p_n = float(np.mean(speech**2)), float(np.mean(noise**2))
    if p_n == 0.0 or p_s == 0.0:
        return speech.copy()
    gain = math.sqrt(p_s / (p_n * 10 ** (snr_db / 10)))
    return (speech + gain * noise).astype(np.float32)


# ----------------------------------------------------------------------------------------------- dataset
class AVSRDataset(Dataset):
    """Audio-visual utterances with log-mel features, normalised mouth ROIs and load-time noise.

    Args:
        root: corpus directory (see the module docstring for the layouts).
        split: "train", "test", ... (None: every split).
        snr: None for clean, a number (dB) to fix the SNR, or "train" to sample from TRAIN_SNRS per item.
        noise: "babble" (a mix of 4 other utterances of the split) or "white".
        n_mels: 80 or 128 Whisper log-mel bins.
        video_multiple: truncate the video to a multiple of this many frames (the video compression rate);
            the audio is cut to the same duration.
        max_av_mismatch: allowed difference between the audio and video durations, seconds.
        skip_bad: log and count unusable samples (`bad`) instead of raising; they come back as None, which
            `collate` drops.
        load: the modalities to return ("audio" features and/or "video"); both files are always checked.
    """

    def __init__(self, root: str | Path, split: str | None = "train", layout: str = "auto", snr=None,
                 noise: str = "babble", n_mels: int = 80, video_multiple: int = 1, max_av_mismatch: float = 0.1,
                 allow_resample: bool = True, skip_bad: bool = False, seed: int = 0,
                 load: tuple[str, ...] = ("audio", "video")):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: corpus directory does not exist")
        layout = detect_layout(self.root) if layout == "auto" else layout
        if layout not in ("synth", "lrs"):
            raise DataError(f"layout must be auto, synth or lrs, not {layout!r}")
        self.items = list_synth(self.root, split) if layout == "synth" else list_lrs(self.root, split)
        if not self.items:
            raise DataError(f"{self.root}: no utterances in split {split!r}")
        if snr not in (None, "train") and not isinstance(snr, int | float):
            raise DataError(f"snr must be None, 'train' or a number of dB, not {snr!r}")
        if noise not in ("babble", "white"):
            raise DataError(f"noise must be 'babble' or 'white', not {noise!r}")
        if n_mels not in (80, 128):
            raise DataError(f"n_mels must be 80 or 128, not {n_mels}")
        self.layout, self.split, self.snr, self.noise = layout, split, snr, noise
        self.video_multiple, self.max_av_mismatch = int(video_multiple), float(max_av_mismatch)
        self.allow_resample, self.skip_bad, self.seed = allow_resample, skip_bad, seed
        if not set(load) <= {"audio", "video"} or not load:
            raise DataError(f"load must name audio and/or video, not {load!r}")
        self.load_modalities = tuple(load)
        self.bad: list[tuple[str, str]] = []
        self.epoch = 0
        # babble comes from other utterances of the split, or of the whole corpus when the split is tiny
        lister = list_synth if layout == "synth" else list_lrs
        self.noise_pool = self.items if len(self.items) > 4 else lister(self.root, None)
        from transformers import WhisperFeatureExtractor

        self.features = WhisperFeatureExtractor(feature_size=n_mels)

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        """Training noise changes every epoch, reproducibly."""
        self.epoch = int(epoch)

    def _noise(self, index: int, n: int, rng: np.random.Generator) -> np.ndarray:
        if self.noise == "white":
            return rng.standard_normal(n).astype(np.float32)
        babble = np.zeros(n, dtype=np.float32)
        pool = self.noise_pool
        own = self.items[index].id
        others = [j for j in rng.choice(len(pool), size=min(6, len(pool)), replace=False) if pool[j].id != own][:4]
        for j in others:
            try:
                other = read_wav(pool[j].audio, self.allow_resample)
            except DataError:
                continue
            babble += np.resize(other, n) / max(1e-8, float(np.sqrt(np.mean(other**2))))
        return babble

    def load(self, index: int) -> dict:
        """Item `index`; raises DataError naming the file when it is unusable."""
        item = self.items[index]
        transcript = read_transcript(item)
        audio = read_wav(item.audio, self.allow_resample)
        video = read_video(item.video)
        a_dur, v_dur = len(audio) / SAMPLE_RATE, len(video) / FPS
        if abs(a_dur - v_dur) > self.max_av_mismatch:
            raise DataError(f"{item.video}: video lasts {v_dur:.2f} s but {item.audio} lasts {a_dur:.2f} s "
                            f"(tolerance {self.max_av_mismatch} s)")
        n_frames = len(video) - len(video) % self.video_multiple
        if n_frames == 0:
            raise DataError(f"{item.video}: {len(video)} frames, fewer than video_multiple={self.video_multiple}")
        video = video[:n_frames]
        audio = np.resize(audio, n_frames * SAMPLE_RATE // FPS)  # same duration as the kept video
        rng = np.random.default_rng([self.seed, self.epoch, index])
        snr = self.snr
        if snr == "train":
            snr = TRAIN_SNRS[int(rng.integers(len(TRAIN_SNRS)))]
        out = {"id": item.id, "speaker": item.speaker, "transcript": transcript, "snr": snr}
        if "audio" in self.load_modalities:
            if snr is not None:
                audio = mix_at_snr(audio, self._noise(index, len(audio), rng), float(snr))
            mel = self.features(audio, sampling_rate=SAMPLE_RATE, return_tensors="np", padding="longest")
            mel = mel["input_features"][0].T[: len(audio) // 160]  # [T_a, n_mels], 100 frames/s
            out["audio"] = torch.from_numpy(audio)
            out["audio_features"] = torch.from_numpy(np.ascontiguousarray(mel, dtype=np.float32))
        if "video" in self.load_modalities:
            out["video"] = torch.from_numpy((video.astype(np.float32) / 255.0 - VIDEO_MEAN) / VIDEO_STD)
        return out

    def __getitem__(self, index: int) -> dict | None:
        try:
            return self.load(index)
        except DataError as exc:
            if not self.skip_bad:
                raise
            self.bad.append((self.items[index].id, str(exc)))
            log.warning("skipping a bad sample: %s", exc)
            return None

    def lengths(self) -> list[int]:
        """A length per item for bucketing, without decoding: the manifest's n_frames for the synthetic
        corpus, the video file size (bytes) for LRS trees."""
        if self.layout == "synth":
            rows = [json.loads(line) for line in
                    (self.root / "manifest.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
            frames = {str(r["id"]): int(r.get("n_frames", 0)) for r in rows}
            return [frames[item.id] for item in self.items]
        return [item.video.stat().st_size if item.video.exists() else 0 for item in self.items]


def collate(batch: Sequence[dict | None]) -> dict | None:
    """Pad a list of items into tensors with lengths; bad samples (None) are dropped."""
    items = [b for b in batch if b is not None]
    if not items:
        return None
    out = {"ids": [b["id"] for b in items], "transcripts": [b["transcript"] for b in items],
           "snr": [b["snr"] for b in items], "dropped": len(batch) - len(items)}
    if "audio_features" in items[0]:
        a_len = torch.tensor([len(b["audio_features"]) for b in items])
        feats = torch.zeros(len(items), int(a_len.max()), items[0]["audio_features"].shape[1])
        for k, b in enumerate(items):
            feats[k, : a_len[k]] = b["audio_features"]
        out.update(audio_features=feats, audio_lengths=a_len)
    if "video" in items[0]:
        v_len = torch.tensor([len(b["video"]) for b in items])
        video = torch.zeros(len(items), int(v_len.max()), ROI, ROI)
        for k, b in enumerate(items):
            video[k, : v_len[k]] = b["video"]
        out.update(video=video, video_lengths=v_len)
    return out


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of items of similar length (sorted within shuffled buckets), reproducible with a seed."""

    def __init__(self, lengths: Sequence[int], batch_size: int, shuffle: bool = True, seed: int = 0,
                 bucket_size: int = 50):
        self.lengths, self.batch_size, self.shuffle, self.seed = list(lengths), int(batch_size), shuffle, seed
        self.bucket_size, self.epoch = int(bucket_size) * int(batch_size), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.lengths)) if self.shuffle else np.arange(len(self.lengths))
        batches = []
        for start in range(0, len(order), self.bucket_size):
            bucket = sorted(order[start:start + self.bucket_size], key=lambda i: self.lengths[i])
            batches += [list(map(int, bucket[k:k + self.batch_size])) for k in range(0, len(bucket), self.batch_size)]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return iter(batches)

    def __len__(self) -> int:
        return sum(math.ceil(min(self.bucket_size, len(self.lengths) - s) / self.batch_size)
                   for s in range(0, len(self.lengths), self.bucket_size))
