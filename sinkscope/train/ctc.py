"""Character-CTC pretraining of the audio and video encoders (`sinkscope pretrain-encoders`).

These encoders stand in for Whisper and AV-HuBERT offline: they are trained here with CTC on the corpus, then
frozen inside the AVSR model. Greedy CTC decoding gives their CER/WER on the held-out speakers.

Each modality trains through the shared loop (`loop.fit`) into `OUT/<modality>/`, resumable after every epoch;
`OUT/` holds the resolved config, `run.json` and `results.json`. `sinkscope export OUT DIR` writes the encoders in
fp16 for `encoders:` in a training config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sinkscope.config import releases_locks, write_results
from sinkscope.data.dataset import AVSRDataset
from sinkscope.errors import SinkscopeError
from sinkscope.eval import loader, score
from sinkscope.models.encoders import AudioEncoder, AudioEncoderConfig, VideoEncoder, VideoEncoderConfig
from sinkscope.train.loop import Progress, Schedule, fit, prepare_run

ALPHABET = " abcdefghijklmnopqrstuvwxyz'"
BLANK = 0


def encode_text(text: str) -> list[int]:
    """Characters -> CTC labels (1-based; 0 is blank). Other characters are dropped."""
    return [ALPHABET.index(c) + 1 for c in text.lower() if c in ALPHABET]


def greedy_decode(log_probs: torch.Tensor, lengths: torch.Tensor) -> list[str]:
    """Best path: argmax per frame, merge repeats, drop blanks. `log_probs` is `[B, T, V]`."""
    best = log_probs.argmax(dim=-1).cpu()
    out = []
    for row, n in zip(best, lengths.cpu(), strict=True):
        prev, chars = BLANK, []
        for k in row[: int(n)].tolist():
            if k != prev and k != BLANK:
                chars.append(ALPHABET[k - 1])
            prev = k
        out.append(" ".join("".join(chars).split()))
    return out


class CTCModel(nn.Module):
    """An encoder with a linear CTC head over characters."""

    def __init__(self, modality: str, audio: AudioEncoderConfig, video: VideoEncoderConfig):
        super().__init__()
        self.modality = modality
        self.encoder = AudioEncoder(audio) if modality == "audio" else VideoEncoder(video)
        self.head = nn.Linear(self.encoder.output_dim, len(ALPHABET) + 1)

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self.modality == "audio":
            feats, lengths = self.encoder(batch["audio_features"], batch["audio_lengths"])
        else:
            feats, lengths = self.encoder(batch["video"], batch["video_lengths"])
        return self.head(feats).log_softmax(dim=-1), lengths  # [B, T, V]


@dataclass
class PretrainConfig:
    data: str = ""
    out: str = ""
    modalities: tuple[str, ...] = ("audio", "video")
    epochs: int = 20
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 200
    seed: int = 0
    max_train: int | None = None  # use only the first N training utterances (quick runs and tests)
    max_eval: int | None = 200
    audio: AudioEncoderConfig = field(default_factory=lambda: AudioEncoderConfig(max_seconds=4.0))
    video: VideoEncoderConfig = field(default_factory=VideoEncoderConfig)

    def __post_init__(self) -> None:
        if not self.modalities or not set(self.modalities) <= {"audio", "video"}:
            raise ValueError(f"modalities must name audio and/or video, not {list(self.modalities)}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, not {getattr(self, name)}")

    @property
    def schedule(self) -> Schedule:
        return Schedule(self.epochs, self.batch_size, self.lr, self.warmup_steps, self.seed, decay="cosine",
                        clip=5.0)


class CTCTask:
    """One encoder with a character CTC head, scored by greedy-CTC CER/WER on the held-out speakers."""

    def __init__(self, cfg: PretrainConfig, modality: str):
        self.cfg, self.modality = cfg, modality
        self.ctc = nn.CTCLoss(blank=BLANK, zero_infinity=True)

    def build_model(self) -> CTCModel:
        return CTCModel(self.modality, self.cfg.audio, self.cfg.video)

    def train_set(self) -> AVSRDataset:
        snr = "train" if self.modality == "audio" else None
        return AVSRDataset(self.cfg.data, "train", snr=snr, seed=self.cfg.seed, load=(self.modality,),
                           limit=self.cfg.max_train)

    def loss(self, model: CTCModel, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        log_probs, lengths = model(batch)
        targets = [torch.tensor(encode_text(t)) for t in batch["transcripts"]]
        loss = self.ctc(log_probs.transpose(0, 1), torch.cat(targets), lengths, torch.tensor([len(t) for t in targets]))
        return loss, {"ctc": float(loss.detach())}

    @torch.no_grad()
    def evaluate(self, model: CTCModel) -> dict:
        test = AVSRDataset(self.cfg.data, "test", load=(self.modality,), limit=self.cfg.max_eval)
        model.eval()
        refs, hyps = [], []
        for batch in loader(test, self.cfg.batch_size):
            if batch is None:
                continue
            log_probs, lengths = model(batch)
            hyps += greedy_decode(log_probs, lengths)
            refs += batch["transcripts"]
        model.train()
        return score(refs, hyps)


@releases_locks
def pretrain(cfg: PretrainConfig, log: Callable[[str], None] = print, progress: Progress | None = None,
             until_epoch: int | None = None) -> dict:
    """Train each modality's encoder with CTC into `cfg.out/<modality>`, resuming a run that is there; writes
    config.yaml, run.json and results.json into `cfg.out` and returns the results per modality."""
    if not cfg.data or not cfg.out:
        raise SinkscopeError("pretrain-encoders needs `data` and `out`")
    out = Path(cfg.out)
    prepare_run(out, cfg, "pretrain-encoders", ignore=("epochs", "out", "modalities"))
    results = {}
    for modality in cfg.modalities:
        task = CTCTask(cfg, modality)
        prepare_run(out / modality, cfg, "pretrain-encoders", ignore=("epochs", "out", "modalities"))
        state = fit(task, cfg.schedule, out / modality, log, progress, until_epoch, name=modality)
        last = state["history"][-1] if state["history"] else {}
        results[modality] = {"cer": last.get("cer"), "wer": last.get("wer"), "n": last.get("n"),
                             "epochs": state["epoch"], "history": state["history"]}
    write_results(out, results, cfg)
    return results
