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

import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from sinkscope.data.layouts import Item, detect_layout, list_lrs, list_synth, read_transcript
from sinkscope.data.media import (
    FPS,
    MEL_HOP,
    ROI,
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    SNR_DB_RANGE,
    VIDEO_MEAN,
    VIDEO_STD,
    DataError,
    check_snr,
    mix_at_snr,
    read_video,
    read_wav,
)

log = logging.getLogger(__name__)

TRAIN_SNRS: tuple[float | None, ...] = (-5.0, 0.0, 5.0, 10.0, 15.0, 20.0, None)  # None = clean
__all__ = ["AVSRDataset", "BucketBatchSampler", "DataError", "Item", "collate", "mix_at_snr", "read_video",
           "read_wav", "read_transcript", "TRAIN_SNRS", "ROI", "FPS", "SAMPLE_RATE", "VIDEO_MEAN", "VIDEO_STD"]


# ----------------------------------------------------------------------------------------------- dataset
class AVSRDataset(Dataset):
    """Audio-visual utterances with log-mel features, normalised mouth ROIs and load-time noise.

    Args:
        root: corpus directory (see the module docstring for the layouts).
        split: "train", "test", ... (None: every split).
        snr: None for clean, a number (dB) to fix the SNR, or "train" to sample from TRAIN_SNRS per item.
        noise: "babble" (a mix of 4 other utterances of the split) or "white".
        n_mels: 80 or 128 Whisper log-mel bins.
        video_multiple: truncate the video to a multiple of this many frames; the audio is cut to the same
            duration (1 keeps every frame; the models drop the remainder of their compression rate themselves).
        max_av_mismatch: allowed difference between the audio and video durations, seconds.
        skip_bad: log and count unusable samples (`bad`) instead of raising; they come back as None, which
            `collate` drops.
        load: the modalities to return ("audio" features and/or "video"); both files are always checked.
        limit: keep only the first `limit` utterances of the split (None: all); babble is still drawn from
            the whole split.
        max_seconds: the longest audio the model takes (its encoder window); a longer utterance is refused
            naming its file and length, or skipped and counted under `skip_bad`. When the corpus lists
            durations (the synthetic manifest), they are checked before anything is decoded.
    """

    def __init__(self, root: str | Path, split: str | None = "train", layout: str = "auto", snr=None,
                 noise: str = "babble", n_mels: int = 80, video_multiple: int = 1, max_av_mismatch: float = 0.1,
                 allow_resample: bool = True, skip_bad: bool = False, seed: int = 0,
                 load: tuple[str, ...] = ("audio", "video"), limit: int | None = None,
                 max_seconds: float | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: corpus directory does not exist")
        layout = detect_layout(self.root) if layout == "auto" else layout
        if layout not in ("synth", "lrs"):
            raise DataError(f"layout must be auto, synth or lrs, not {layout!r}")
        lister = list_synth if layout == "synth" else list_lrs
        self.items = lister(self.root, split)
        if not self.items:
            splits = sorted({item.split for item in lister(self.root, None)}) if split is not None else []
            raise DataError(f"{self.root}: no utterances in split {split!r}"
                            + (f"; its splits are {', '.join(splits)}" if splits else ""))
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise DataError(f"limit must be a positive number of utterances, not {limit!r}")
        if snr not in (None, "train"):
            try:
                check_snr(snr)
            except ValueError:
                low, high = SNR_DB_RANGE
                raise DataError(f"snr must be None, 'train' or a number of dB in [{low:g}, {high:g}], not "
                                f"{snr!r}") from None
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
        if limit is not None:  # after the noise pool: babble still comes from the whole split
            self.items = self.items[:limit]
        self.max_seconds = max_seconds
        self._refuse_long()
        from transformers import WhisperFeatureExtractor

        self.features = WhisperFeatureExtractor(feature_size=n_mels)

    def __len__(self) -> int:
        return len(self.items)

    def _too_long(self, item: Item, seconds: float) -> str:
        return (f"{item.audio}: audio lasts {seconds:.2f} s, longer than the {self.max_seconds:g} s this model's "
                "audio encoder takes (its window, `model.audio.max_seconds`); skip such utterances with "
                "--skip-bad, or train a model with a longer window")

    def _refuse_long(self) -> None:
        """Utterances the corpus lists as longer than `max_seconds`: refused up front, or dropped and counted."""
        if self.max_seconds is None:
            return
        long = [item for item in self.items if item.duration is not None and item.duration > self.max_seconds]
        if not long:
            return
        if not self.skip_bad:
            raise DataError(f"{len(long)} of {len(self.items)} utterances are too long; the first: "
                            + self._too_long(long[0], long[0].duration))
        for item in long:
            self.bad.append((item.id, self._too_long(item, item.duration)))
        log.warning("skipping %d utterances longer than %g s", len(long), self.max_seconds)
        self.items = [item for item in self.items if item.duration is None or item.duration <= self.max_seconds]
        if not self.items:
            raise DataError(f"{self.root}: every utterance of split {self.split!r} is longer than "
                            f"{self.max_seconds:g} s")

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
        if self.max_seconds is not None and "audio" in self.load_modalities \
                and len(audio) > self.max_seconds * SAMPLE_RATE:
            raise DataError(self._too_long(item, len(audio) / SAMPLE_RATE))
        video = read_video(item.video)
        a_dur, v_dur = len(audio) / SAMPLE_RATE, len(video) / FPS
        if abs(a_dur - v_dur) > self.max_av_mismatch:
            raise DataError(f"{item.video}: video lasts {v_dur:.2f} s but {item.audio} lasts {a_dur:.2f} s "
                            f"(tolerance {self.max_av_mismatch} s)")
        n_frames = len(video) - len(video) % self.video_multiple
        if n_frames == 0:
            raise DataError(f"{item.video}: {len(video)} frames, fewer than video_multiple={self.video_multiple}")
        video = video[:n_frames]
        audio = np.resize(audio, n_frames * SAMPLES_PER_FRAME)  # same duration as the kept video
        rng = np.random.default_rng([self.seed, self.epoch, index])
        snr = self.snr
        if snr == "train":
            snr = TRAIN_SNRS[int(rng.integers(len(TRAIN_SNRS)))]
        out = {"id": item.id, "speaker": item.speaker, "transcript": transcript, "snr": snr}
        if "audio" in self.load_modalities:
            if snr is not None:
                audio = mix_at_snr(audio, self._noise(index, len(audio), rng), float(snr))
            mel = self.features(audio, sampling_rate=SAMPLE_RATE, return_tensors="np", padding="longest")
            mel = mel["input_features"][0].T[: len(audio) // MEL_HOP]  # [T_a, n_mels], 100 frames/s
            out["audio"] = torch.from_numpy(audio)
            out["audio_features"] = torch.from_numpy(np.ascontiguousarray(mel, dtype=np.float32))
        if "video" in self.load_modalities:
            out["video"] = torch.from_numpy((video.astype(np.float32) / 255.0 - VIDEO_MEAN) / VIDEO_STD)
        return out

    def __getitem__(self, index: int) -> dict | None:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"{self.root}: utterances are indexed by position (an int), not {index!r}")
        if not -len(self.items) <= index < len(self.items):
            raise IndexError(f"{self.root}: split {self.split!r} has {len(self.items)} utterances; index {index} "
                             "is out of range")
        index = int(index) % len(self.items)
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
            return [item.n_frames for item in self.items]
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
