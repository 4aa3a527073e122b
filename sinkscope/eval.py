"""Decoding and scoring: the one place where hypotheses are produced and WER/CER computed.

`score` is jiwer's WER and CER over lower-cased, whitespace-normalised text (an empty hypothesis counts as deleting
every word and character of its reference). `transcribe` decodes a dataset
with an AVSR model; training, `sinkscope eval`, sweeps, notebooks and interventions all call these two.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import jiwer
import pandas as pd
import torch
from torch.utils.data import DataLoader

from sinkscope.arguments import whole_number
from sinkscope.config import releases_locks
from sinkscope.data.dataset import BucketBatchSampler, collate
from sinkscope.data.media import check_snr
from sinkscope.errors import SinkscopeError


def normalise(text: str) -> str:
    """Lower-case and collapse whitespace."""
    return " ".join(str(text).lower().split())


def score(refs: Sequence[str], hyps: Sequence[str]) -> dict:
    """`{"wer", "cer", "n"}` of hypotheses against references (jiwer)."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    if not refs:
        return {"wer": float("nan"), "cer": float("nan"), "n": 0}
    empty = [i for i, r in enumerate(refs) if not str(r).strip()]
    if empty:  # a rate per reference word is undefined there (jiwer 4 counts it as 1.0 per utterance)
        raise ValueError(f"reference {empty[0]} is empty ({len(empty)} of {len(refs)}); WER and CER need words")
    # an empty hypothesis is every reference word (and character) deleted, as jiwer >= 4 scores it; until session
    # 26 it was replaced by the word "<empty>", which gave the same WER but added 7 characters to the CER's errors
    hyps = ["" if h is None else str(h) for h in hyps]
    return {"wer": float(jiwer.wer(list(refs), hyps)), "cer": float(jiwer.cer(list(refs), hyps)), "n": len(refs)}


def loader(dataset, batch_size: int = 8) -> DataLoader:
    """Batches of similar length, in a fixed order, for evaluation."""
    whole_number(batch_size, "batch_size")
    return DataLoader(dataset, batch_sampler=BucketBatchSampler(dataset.lengths(), batch_size, shuffle=False),
                      collate_fn=collate)


@torch.no_grad()
def transcribe(model, batches, max_new_tokens: int = 24, beams: int = 1,
               intervention: Callable | None = None) -> pd.DataFrame:
    """Decode every batch with the AVSR `model` (`model.generate`): one row per utterance with id, reference,
    hypothesis. `intervention(batch, built)`, when given, returns a context manager to decode under."""
    whole_number(max_new_tokens, "max_new_tokens")
    whole_number(beams, "beams", 1, MAX_BEAM)
    model.eval()
    rows = []
    for batch in batches:
        if batch is None:
            continue
        built = model.build(batch, with_transcript=False, padding_side="left")
        context = intervention(batch, built) if intervention is not None else None
        with context if context is not None else nullcontext():
            hyps = model.generate(batch, max_new_tokens=max_new_tokens, beams=beams, built=built)
        rows += [{"id": i, "reference": r, "hypothesis": h}
                 for i, r, h in zip(batch["ids"], batch["transcripts"], hyps, strict=True)]
    return pd.DataFrame(rows, columns=["id", "reference", "hypothesis"])


def evaluate(model, dataset, batch_size: int = 8, max_new_tokens: int = 24, beams: int = 1) -> dict:
    """WER/CER of `model` on `dataset`, with the per-utterance `hypotheses` table."""
    table = transcribe(model, loader(dataset, batch_size), max_new_tokens, beams)
    result = score(table["reference"].tolist(), table["hypothesis"].tolist())
    result["hypotheses"] = table
    return result


MAX_BEAM = 64
"""The widest beam `eval` decodes with (each beam is a copy of the batch through the LLM)."""


@dataclass
class EvalConfig:
    """`sinkscope eval`: decode a split with a trained model and score it."""

    checkpoint: str = ""  # a training run, an export, or a registered name (`demo`)
    data: str = ""
    split: str = "test"
    snr: float | None = None  # babble noise at this SNR (dB); None = clean
    beam: int = 1
    limit: int | None = None  # only the first N utterances
    batch_size: int = 8
    max_new_tokens: int = 24
    out: str | None = None  # directory for hypotheses.csv + provenance (default: see `default_out`)
    skip_bad: bool = False  # skip (and count, in skipped.csv) unusable or too long utterances instead of stopping
    rate: str | None = None  # a Matryoshka model's rate to score: "K_a,K_v" (AVSR), "K_a" (ASR) or "K_v" (VSR)

    def __post_init__(self) -> None:
        if self.rate is not None and not re.fullmatch(r"\d+(,\d+)?", str(self.rate)):
            raise ValueError(f"rate must be K_a,K_v (AVSR), K_a (ASR) or K_v (VSR), e.g. 16,5; not {self.rate!r}")
        if self.snr is not None:
            check_snr(self.snr)
        if self.beam < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("beam, batch_size and max_new_tokens must be >= 1")
        if self.beam > MAX_BEAM:
            raise ValueError(f"beam must be at most {MAX_BEAM} (each beam decodes a copy of the batch), "
                             f"not {self.beam}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, not {self.limit}")

    @property
    def tag(self) -> str:
        rate = f"-rate{self.rate.replace(',', 'x')}" if self.rate else ""
        return f"{self.split}-{'clean' if self.snr is None else f'snr{self.snr:g}'}-beam{self.beam}{rate}"

    def default_out(self) -> Path:
        """`CHECKPOINT/eval-TAG` for a run directory given as a path; `eval-NAME-TAG` in the working directory for
        a registered name (the shipped weights stay untouched)."""
        path = Path(self.checkpoint)
        if path.is_dir():
            return path / f"eval-{self.tag}"
        return Path(f"eval-{path.name}-{self.tag}")


def rate_index(cfg, rate: str) -> int:
    """The index in `cfg.rate_set` of `rate` ("K_a,K_v" for AVSR, "K_a" for ASR, "K_v" for VSR)."""
    try:
        wanted = tuple(int(k) for k in str(rate).split(","))
    except ValueError:
        wanted = ()
    pick = {"avsr": lambda r: r, "asr": lambda r: r[:1], "vsr": lambda r: r[1:]}[cfg.mode]
    for index, pair in enumerate(cfg.rate_set):
        if pick(pair) == wanted:
            return index
    known = [",".join(map(str, pick(r))) for r in cfg.rate_set]
    raise SinkscopeError(f"--rate {rate}: this {cfg.mode} model runs at {known}")


@releases_locks
def run_eval(cfg: EvalConfig) -> dict:
    """Decode and score as `cfg` says; writes `hypotheses.csv`, config.yaml, run.json and results.json into the
    output directory and returns the results (wer, cer, n, mode, ...)."""
    from sinkscope.config import claim_output, write_results, write_run_files
    from sinkscope.models.avsr import dataset_for
    from sinkscope.models.pretrained import load_trained

    if not cfg.checkpoint or not cfg.data:
        raise SinkscopeError("eval needs a checkpoint and data (--checkpoint RUN --data CORPUS)")
    if not Path(cfg.data).is_dir():  # before the model is loaded: a typo costs no time
        raise SinkscopeError(f"--data {cfg.data}: corpus directory does not exist")
    out = claim_output(Path(cfg.out) if cfg.out else cfg.default_out(), "eval")
    model, _ = load_trained(cfg.checkpoint)
    if cfg.rate is not None:
        model.set_rate(rate_index(model.cfg, cfg.rate))
    dataset = dataset_for(model.cfg, cfg.data, cfg.split, snr=cfg.snr, limit=cfg.limit, skip_bad=cfg.skip_bad)
    result = evaluate(model, dataset, cfg.batch_size, cfg.max_new_tokens, cfg.beam)
    write_run_files(out, "eval", cfg)
    result["hypotheses"].to_csv(out / "hypotheses.csv", index=False)
    if dataset.bad:
        pd.DataFrame(dataset.bad, columns=["id", "reason"]).to_csv(out / "skipped.csv", index=False)
    summary = {"wer": result["wer"], "cer": result["cer"], "n": result["n"], "skipped": len(dataset.bad),
               "mode": model.cfg.mode, "rate": list(model.rate),
               "snr": cfg.snr, "beam": cfg.beam, "split": cfg.split, "checkpoint": cfg.checkpoint, "out": str(out)}
    write_results(out, summary, cfg)
    return summary
