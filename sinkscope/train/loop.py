"""The one training loop of sinkscope, shared by every model family (AVSR, CTC encoders, and later MoME).

A family is a `Task`: it builds its model (after the loop has seeded torch), its training set, and gives the
loss of a batch (with the parts to log) and the evaluation of the model. The loop owns everything else:

- the run directory: the resolved config (`config.yaml`) and the refusal to resume a run with other settings;
- the epoch loop, `set_epoch` on the sampler and the dataset (so shuffling and training noise are reproducible);
- the learning-rate schedule (linear warm-up, then linear or cosine decay over the whole schedule);
- AdamW, gradient clipping, accelerate (`accelerate launch -m sinkscope train ...` runs data-parallel);
- evaluation after every epoch, the history, and a checkpoint after every epoch (`checkpoint.py`);
- resuming after a kill with identical results, and `until_epoch` to train a long schedule in slices.

Checkpoints hold the trainable parameters and the buffers of the modules that own them (BatchNorm statistics of
a trained encoder), never the frozen weights.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from sinkscope.config import CONFIG_FILE, changed_fields, claim_output, to_dict, write_run_files
from sinkscope.data.dataset import BucketBatchSampler, collate
from sinkscope.errors import SinkscopeError
from sinkscope.train.checkpoint import load_checkpoint, save_checkpoint

Progress = Callable[[int, int, dict], None]
"""`progress(step_in_epoch, steps_per_epoch, logs)`: called after every training step."""


@dataclass
class Schedule:
    """The optimisation settings the loop reads from a family's config."""

    epochs: int
    batch_size: int
    lr: float
    warmup_steps: int
    seed: int
    decay: str = "linear"  # "linear": lr * warm-up * (1 - step / total); "cosine": cosine decay after warm-up
    clip: float = 1.0
    weight_decay: float = 0.01

    def lr_at(self, step: int, total: int) -> float:
        if self.decay == "linear":
            return self.lr * min(1.0, (step + 1) / max(1, self.warmup_steps)) * max(0.0, 1 - step / max(1, total))
        if self.decay == "cosine":
            if step < self.warmup_steps:
                return self.lr * (step + 1) / self.warmup_steps
            progress = (step - self.warmup_steps) / max(1, total - self.warmup_steps)
            return self.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        raise SinkscopeError(f"unknown learning-rate decay {self.decay!r} (linear or cosine)")


class Task(Protocol):
    """A model family: a model, a loss and an evaluation."""

    def build_model(self) -> nn.Module: ...

    def train_set(self): ...  # a Dataset with `lengths()` and `set_epoch(epoch)`

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss to minimise and the numbers to log (averaged over the epoch's batches)."""
        ...

    def evaluate(self, model: nn.Module) -> dict:
        """Held-out metrics (at least `wer` and `cer`) after an epoch."""
        ...


def saved_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps: trainable parameters, and the buffers of the modules that own trainable
    parameters (e.g. BatchNorm running statistics); frozen weights are rebuilt from their source."""
    keep: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not any(p.requires_grad for _, p in own):
            continue
        dot = f"{prefix}." if prefix else ""
        keep.update({dot + n: p for n, p in own if p.requires_grad})
        keep.update({dot + n: b for n, b in module.named_buffers(recurse=False)
                     if n not in module._non_persistent_buffers_set})
    return keep


def prepare_run(out: Path, cfg: Any, verb: str, ignore: tuple[str, ...] = ("epochs", "out")) -> None:
    """Create `out` and write the resolved config and `run.json`; refuse a run directory that holds a checkpoint
    made with other settings, or a directory of files that no training job wrote."""
    claim_output(out, (verb, "train", "sweep"), markers=("state.json",))
    resolved = to_dict(cfg)
    config_file = out / CONFIG_FILE
    if config_file.exists() and (out / "state.json").exists():
        try:
            previous = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise SinkscopeError(f"{config_file}: not a readable config ({exc}); choose another out") from exc
        changed = changed_fields(previous if isinstance(previous, dict) else {}, resolved, ignore)
        if changed:
            raise SinkscopeError(f"{config_file}: the run in {out} used other settings for {changed}; "
                                 "resume it with the same config or choose another out")
    write_run_files(out, verb, cfg)


def _batches(loader: DataLoader) -> Iterator[tuple[int, dict]]:
    for k, batch in enumerate(loader):
        if batch is not None:
            yield k, batch


def fit(task: Task, schedule: Schedule, out: str | Path, log: Callable[[str], None] = print,
        progress: Progress | None = None, until_epoch: int | None = None, name: str = "") -> dict:
    """Train (or resume) `task` into `out` on `schedule`; returns the state: epoch, step and history.

    `until_epoch` stops after that epoch of the schedule (the learning rate still follows `schedule.epochs`), so a
    long run can be trained in slices across sessions and resumed identically."""
    from accelerate import Accelerator

    out = Path(out)
    torch.manual_seed(schedule.seed)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model = task.build_model()
    train_set = task.train_set()
    sampler = BucketBatchSampler(train_set.lengths(), schedule.batch_size, seed=schedule.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=schedule.lr, weight_decay=schedule.weight_decay)
    state = {"epoch": 0, "step": 0, "history": []}
    prefix = f"{name}: " if name else ""
    if (out / "state.json").exists():
        state, weights = load_checkpoint(out, optimiser)
        unexpected = sorted(set(weights) - set(model.state_dict()))
        if unexpected:
            raise SinkscopeError(f"{out}: the checkpoint holds tensors this model does not have ({unexpected[:3]}); "
                                 "it was made by another config")
        model.load_state_dict(weights, strict=False)
        log(f"{prefix}resuming after epoch {state['epoch']}")
    model, optimiser = accelerator.prepare(model, optimiser)
    total = schedule.epochs * len(sampler)
    stop = schedule.epochs if until_epoch is None else min(schedule.epochs, until_epoch)
    while state["epoch"] < stop:
        sampler.set_epoch(state["epoch"])
        train_set.set_epoch(state["epoch"])
        loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=collate)
        if accelerator.num_processes > 1:  # `accelerate launch`: each process takes its shard of the batches
            loader = accelerator.prepare_data_loader(loader)
        start, sums, seen = time.time(), {}, 0
        model.train()
        for k, batch in _batches(loader):
            lr = schedule.lr_at(state["step"], total)
            for group in optimiser.param_groups:
                group["lr"] = lr
            loss, logs = task.loss(model, batch)
            optimiser.zero_grad()
            accelerator.backward(loss)
            torch.nn.utils.clip_grad_norm_(params, schedule.clip)
            optimiser.step()
            state["step"] += 1
            seen += 1
            for key, value in logs.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            if progress is not None:
                progress(k + 1, len(sampler), {**logs, "lr": lr, "seconds": time.time() - start})
        inner = accelerator.unwrap_model(model)
        metrics = task.evaluate(inner)
        state["epoch"] += 1
        means = {key: value / max(1, seen) for key, value in sums.items()}
        row = {"epoch": state["epoch"], **means, **{k: v for k, v in metrics.items() if isinstance(v, int | float)},
               "seconds": time.time() - start}
        if "tokens" in sums:
            row["tokens_per_s"] = sums["tokens"] / max(1e-9, row["seconds"])
        state["history"].append(row)
        save_checkpoint(out, f"epoch-{state['epoch']:03d}", saved_state(inner), optimiser, state)
        shown = ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k not in ("epoch", "seconds", "tokens",
                                                                            "tokens_per_s", "n"))
        log(f"{prefix}epoch {state['epoch']}/{schedule.epochs}: {shown} ({row['seconds']:.0f} s)")
    return state
