"""The AVSR model family (`sinkscope train`): its config, its loss and its evaluation; `loop.fit` does the rest.

The projectors and LoRA adapters train (the encoders and the LLM stay frozen) on cross-entropy over the
transcript, plus `decorrelation * losses.decorrelation_loss` when `decorrelation > 0`. Cross-entropy and the
decorrelation term (mean cos^2 to BOS, measured also when its weight is 0) are logged separately (`ce`,
`decorrelation` in the history).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sinkscope.config import load_config, releases_locks, write_results
from sinkscope.data.media import SNR_DB_RANGE, check_snr
from sinkscope.errors import SinkscopeError
from sinkscope.eval import evaluate
from sinkscope.models.avsr import AVSRConfig, AVSRModel, dataset_for
from sinkscope.models.pretrained import load_encoders
from sinkscope.train.loop import Progress, Schedule, fit, prepare_run
from sinkscope.train.losses import context_mask, decorrelation_loss


@dataclass
class TrainConfig:
    data: str = ""
    out: str = ""
    model: AVSRConfig = field(default_factory=AVSRConfig)
    encoders: str | None = None  # a `pretrain-encoders` run directory, or a directory of exported encoders
    epochs: int = 10
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 100
    decorrelation: float = 0.0  # lambda; 0 turns the decorrelation loss off
    snr: str | float | None = "train"
    seed: int = 0
    max_train: int | None = None
    max_eval: int | None = 100
    max_new_tokens: int = 24

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, not {getattr(self, name)}")
        for name in ("max_train", "max_eval", "max_new_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (or null for max_train/max_eval), not {getattr(self, name)}")
        if self.lr <= 0 or self.decorrelation < 0 or self.warmup_steps < 0:
            raise ValueError(f"lr must be > 0 and decorrelation, warmup_steps >= 0 (got lr={self.lr}, "
                             f"decorrelation={self.decorrelation}, warmup_steps={self.warmup_steps})")
        if self.snr not in ("train", None):
            try:
                check_snr(self.snr)
            except ValueError:
                low, high = SNR_DB_RANGE
                raise ValueError(f"snr must be 'train' (sampled per utterance), null (clean) or a number of dB in "
                                 f"[{low:g}, {high:g}], not {self.snr!r}") from None
        self.model.check()

    @property
    def schedule(self) -> Schedule:
        return Schedule(self.epochs, self.batch_size, self.lr, self.warmup_steps, self.seed, decay="linear",
                        clip=1.0)


def read_train_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """A TrainConfig from YAML plus `key=value` overrides (e.g. `model.k_audio=8`)."""
    return load_config(TrainConfig, path, overrides)


class AVSRTask:
    """Cross-entropy on the transcript (+ lambda * decorrelation), scored by greedy WER on held-out utterances."""

    def __init__(self, cfg: TrainConfig, model_factory: Callable[[TrainConfig], AVSRModel] | None = None):
        self.cfg = cfg
        self.model_factory = model_factory

    def build_model(self) -> AVSRModel:
        model = self.model_factory(self.cfg) if self.model_factory else AVSRModel(self.cfg.model)
        if self.cfg.encoders:
            load_encoders(model, self.cfg.encoders)
        return model

    def train_set(self):
        return dataset_for(self.cfg.model, self.cfg.data, "train", snr=self.cfg.snr, seed=self.cfg.seed,
                           limit=self.cfg.max_train)

    def loss(self, model: AVSRModel, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        lam = self.cfg.decorrelation
        result = model(batch, output_hidden_states=True)
        loss = result["loss"]
        runs = result.get("per_rate", [result])  # a Matryoshka model: one forward per rate
        weights = model.cfg.rate_weights or (1.0,) * len(runs)
        with torch.set_grad_enabled(lam > 0 and torch.is_grad_enabled()):  # logged also when it is off
            dec = sum(w * decorrelation_loss(r["hidden_states"], context_mask(r["segments"], r["width"]))
                      for w, r in zip(weights, runs, strict=True))
        if lam > 0:
            loss = loss + lam * dec
        ce = sum(w * r["loss"].detach() for w, r in zip(weights, runs, strict=True))
        logs = {"ce": float(ce), "decorrelation": float(dec.detach()), "tokens": float(result["n_tokens"])}
        if len(runs) > 1:
            logs.update({f"ce_rate{k}": float(r["loss"].detach()) for k, r in enumerate(runs)})
        if "balance" in result:
            logs["balance"] = float(result["balance"].detach())
        return loss, logs

    def evaluate(self, model: AVSRModel) -> dict:
        test = dataset_for(self.cfg.model, self.cfg.data, "test", limit=self.cfg.max_eval)
        result = evaluate(model, test, self.cfg.batch_size, self.cfg.max_new_tokens)
        return {k: result[k] for k in ("wer", "cer", "n")}


@releases_locks
def train(cfg: TrainConfig, log: Callable[[str], None] = print, progress: Progress | None = None,
          until_epoch: int | None = None, model_factory: Callable | None = None, verb: str = "train") -> dict:
    """Train (or resume) an AVSR model into `cfg.out`; writes config.yaml, run.json and results.json there and
    returns the state (epoch, step, history)."""
    if not cfg.data or not cfg.out:
        raise SinkscopeError("the config needs `data` and `out` (set them in the YAML or with --set data=DIR "
                             "--set out=DIR)")
    out = Path(cfg.out)
    prepare_run(out, cfg, verb)
    state = fit(AVSRTask(cfg, model_factory), cfg.schedule, out, log, progress, until_epoch)
    last = state["history"][-1] if state["history"] else {}
    write_results(out, {"epoch": state["epoch"], "epochs": cfg.epochs, "schedule_done": state["epoch"] >= cfg.epochs,
                        "val_wer": last.get("wer"), "val_cer": last.get("cer"), "val_n": last.get("n"),
                        "history": state["history"]}, cfg)
    return state
