"""Character-CTC pretraining of the audio and video encoders (`sinkscope pretrain-encoders`).

These encoders stand in for Whisper and AV-HuBERT offline: they are trained here with CTC on the corpus, then
frozen inside the AVSR model. Greedy CTC decoding gives their CER/WER on the held-out speakers.

Runs are resumable after every epoch: `OUT/<modality>/epoch-N.safetensors` holds the weights, `epoch-N.pt` the
optimiser state (saved with `torch.save`, read back with `weights_only=True`), and `state.json` (replaced last)
the epoch, the history and the name of the checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import jiwer
import torch
from torch import nn
from torch.utils.data import DataLoader

from sinkscope.data.dataset import AVSRDataset, BucketBatchSampler, collate
from sinkscope.errors import SinkscopeError
from sinkscope.models.encoders import AudioEncoder, AudioEncoderConfig, VideoEncoder, VideoEncoderConfig
from sinkscope.train.checkpoint import load_checkpoint, save_checkpoint

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
    data: str
    out: str
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


def _subset(ds: AVSRDataset, n: int | None) -> AVSRDataset:
    if n is not None:
        ds.items = ds.items[:n]
    return ds


def evaluate(model: CTCModel, loader: DataLoader) -> dict:
    """Greedy-CTC CER and WER (jiwer, lower-cased) on a loader."""
    model.eval()
    refs, hyps = [], []
    with torch.no_grad():
        for batch in loader:
            if batch is None:
                continue
            log_probs, lengths = model(batch)
            hyps += greedy_decode(log_probs, lengths)
            refs += batch["transcripts"]
    model.train()
    hyps = [h if h else "<empty>" for h in hyps]
    return {"cer": jiwer.cer(refs, hyps), "wer": jiwer.wer(refs, hyps), "n": len(refs), "example": hyps[:3],
            "reference": refs[:3]}


def _lr(step: int, cfg: PretrainConfig, total: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def pretrain(cfg: PretrainConfig, log: Callable[[str], None] = print,
             progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Train each modality's encoder with CTC, resuming from `cfg.out` when a run is there."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    config_file = out / "pretrain_config.json"
    wanted = {k: v for k, v in asdict(cfg).items() if k not in ("epochs", "out")}
    if config_file.exists():
        previous = json.loads(config_file.read_text())
        changed = [k for k in wanted if k != "data" and previous.get(k) != json.loads(json.dumps(wanted[k]))]
        if changed:
            raise SinkscopeError(f"{config_file}: the run in {out} used other settings for {changed}; "
                                 "resume it with the same settings or choose another --out")
    config_file.write_text(json.dumps(dict(wanted, epochs=cfg.epochs), indent=2))
    results = {}
    for modality in cfg.modalities:
        results[modality] = _pretrain_one(cfg, modality, out / modality, log, progress)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def _pretrain_one(cfg: PretrainConfig, modality: str, out: Path, log, progress) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    train = _subset(AVSRDataset(cfg.data, "train", snr="train" if modality == "audio" else None, seed=cfg.seed,
                                load=(modality,)), cfg.max_train)
    test = _subset(AVSRDataset(cfg.data, "test", load=(modality,)), cfg.max_eval)
    sampler = BucketBatchSampler(train.lengths(), cfg.batch_size, shuffle=True, seed=cfg.seed)
    test_loader = DataLoader(test, batch_sampler=BucketBatchSampler(test.lengths(), cfg.batch_size, shuffle=False),
                             collate_fn=collate)
    model = CTCModel(modality, cfg.audio, cfg.video)
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    ctc = nn.CTCLoss(blank=BLANK, zero_infinity=True)
    state_file = out / "state.json"
    state = {"epoch": 0, "step": 0, "history": []}
    if state_file.exists():
        state, weights = load_checkpoint(out, optimiser)
        model.load_state_dict(weights)
        log(f"{modality}: resuming after epoch {state['epoch']}")
    total = cfg.epochs * len(sampler)
    model.train()
    while state["epoch"] < cfg.epochs:
        epoch = state["epoch"]
        sampler.set_epoch(epoch)
        train.set_epoch(epoch)
        loader = DataLoader(train, batch_sampler=sampler, collate_fn=collate)
        start, seen, loss_sum = time.time(), 0, 0.0
        for k, batch in enumerate(loader):
            if batch is None:
                continue
            for group in optimiser.param_groups:
                group["lr"] = _lr(state["step"], cfg, total)
            log_probs, lengths = model(batch)
            targets = [torch.tensor(encode_text(t)) for t in batch["transcripts"]]
            loss = ctc(log_probs.transpose(0, 1), torch.cat(targets), lengths,
                       torch.tensor([len(t) for t in targets]))
            optimiser.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimiser.step()
            state["step"] += 1
            seen += len(batch["ids"])
            loss_sum += float(loss.detach()) * len(batch["ids"])
            if progress is not None:
                progress(modality, k + 1, len(sampler))
        metrics = evaluate(model, test_loader)
        state["epoch"] += 1
        state["history"].append({"epoch": state["epoch"], "train_loss": loss_sum / max(1, seen),
                                 "cer": metrics["cer"], "wer": metrics["wer"], "seconds": time.time() - start})
        save_checkpoint(out, f"epoch-{state['epoch']:03d}", model.state_dict(), optimiser, state)
        log(f"{modality} epoch {state['epoch']}/{cfg.epochs}: loss {loss_sum / max(1, seen):.3f}, "
            f"test CER {metrics['cer']:.3f}, WER {metrics['wer']:.3f} ({time.time() - start:.0f} s), "
            f"e.g. {metrics['example'][0]!r} for {metrics['reference'][0]!r}")
    final = evaluate(model, test_loader)
    return {"cer": final["cer"], "wer": final["wer"], "n": final["n"], "epochs": state["epoch"],
            "history": state["history"]}


def export_encoders(run: str | Path, out: str | Path) -> list[Path]:
    """Copy the latest weights of each encoder a `pretrain-encoders` run holds to `out/<modality>.safetensors`
    in fp16 (what `encoders:` in a training config and `load_encoders` read). Only those files are replaced, so
    an audio-only run can refresh the audio encoder of a directory that keeps its video encoder."""
    from sinkscope.train.checkpoint import load_weights, save_half

    run, out = Path(run), Path(out)
    modalities = [m for m in ("audio", "video") if (run / m / "state.json").is_file()]
    if not modalities:
        raise SinkscopeError(f"{run}: not a `sinkscope pretrain-encoders` run (no audio/state.json or "
                             "video/state.json)")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for modality in modalities:
        state, weights = load_weights(run / modality)
        target = out / f"{modality}.safetensors"
        save_half(weights, target, {"dtype": "float16", "source": str(run / modality / state["checkpoint"]),
                                    "epoch": str(state["epoch"])})
        written.append(target)
    return written
