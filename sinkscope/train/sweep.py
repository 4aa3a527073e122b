"""`sinkscope sweep`: a resumable grid of training runs, e.g. compression rates x decorrelation on/off.

A sweep file (YAML) names a base training config, the grid and the evaluations:

    base: experiments/configs/grid_avsr_stack_a4_v3.yaml   # any `sinkscope train` config
    out: runs/sweep-decorrelation                           # one run directory per grid point under here
    results: experiments/results/sweep_decorrelation.csv    # one row per (point, evaluation), appended
    set: {epochs: 3}                                        # overrides applied to every point
    grid:                                                   # the cross product of these
      rate: [{model.k_audio: 4, model.k_video: 2}, {model.k_audio: 16, model.k_video: 8}]
      decorrelation: [0.0, 0.1]
    eval: {snr: [null, 0], limit: null}                     # SNRs in dB (null = clean); limit = first N

A grid entry is either a list of values for one key (`decorrelation: [0.0, 0.1]`) or a named list of override
mappings (`rate: [...]` above) for keys that move together. Every point trains with `train()` (which resumes a
killed run), then is evaluated; finished evaluations are read back from the results file and not redone, so
running the same command again continues where it stopped. Each row names the sweep file, the point's resolved
config (its hash; the run directory holds the config itself) and the command that made it.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sinkscope.config import command_line, config_hash, load_config, write_run_files
from sinkscope.errors import SinkscopeError
from sinkscope.eval import evaluate
from sinkscope.models.avsr import dataset_for
from sinkscope.models.pretrained import load_trainable, load_trained
from sinkscope.train.avsr import read_train_config, train
from sinkscope.train.checkpoint import load_weights
from sinkscope.train.results import append_row, read_rows

RESULT_COLUMNS = ["point", "overrides", "mode", "compression", "k_audio", "k_video", "decorrelation", "seed", "epochs",
                  "snr", "n", "wer", "cer", "run", "sweep", "config_hash", "command"]


@dataclass
class SweepConfig:
    base: str
    out: str
    results: str
    grid: dict = field(default_factory=dict)
    set: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
    path: str = "sweep"

    def __post_init__(self) -> None:
        self.eval = {"snr": [None], "limit": None, **(self.eval or {})}
        if not isinstance(self.eval["snr"], list):
            self.eval["snr"] = [self.eval["snr"]]
        unknown = sorted(set(self.eval) - {"snr", "limit"})
        if unknown:
            raise ValueError(f"eval: unknown field(s) {unknown}; known: ['limit', 'snr']")

    @property
    def points(self) -> list[tuple[str, dict]]:
        """`(name, overrides)` for every grid point, in a fixed order."""
        axes = []
        for key, values in self.grid.items():
            if not isinstance(values, list) or not values:
                raise SinkscopeError(f"{self.path}: grid.{key} must be a non-empty list")
            options = []
            for value in values:
                if isinstance(value, dict):  # several keys that move together
                    options.append((dict(value), "-".join(f"{_short(k)}{v}" for k, v in value.items())))
                else:
                    options.append(({key: value}, f"{_short(key)}{value}"))
            axes.append(options)
        points = []
        for combo in itertools.product(*axes):
            overrides = dict(self.set)
            for part, _ in combo:
                overrides.update(part)
            points.append(("_".join(name for _, name in combo) or "base", overrides))
        return points



def _short(key: str) -> str:
    return {"model.k_audio": "ka", "model.k_video": "kv", "decorrelation": "dec", "model.compression": "",
            "model.mode": ""}.get(key, key.split(".")[-1])


def load_sweep(path: str | Path, overrides: list[str] = ()) -> SweepConfig:
    """A sweep file, validated now (grid included) rather than after hours of training."""
    spec = load_config(SweepConfig, path, overrides, defaults={"path": str(path)})
    spec.points  # noqa: B018 - validates the grid
    return spec


def _overrides(mapping: dict) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in mapping.items()]


def read_results(path: str | Path) -> list[dict]:
    return read_rows(path, RESULT_COLUMNS)


def _snr_text(snr: float | None) -> str:
    return "clean" if snr is None else f"{float(snr):g}"


def run_sweep(spec: SweepConfig, log: Callable[[str], None] = print, progress: Callable | None = None,
              until_epoch: int | None = None, model_factory: Callable | None = None) -> list[dict]:
    """Train and evaluate every grid point that has no result yet; returns all result rows.

    `until_epoch` trains every point only that far (no evaluation until a point has finished its schedule).
    `model_factory(cfg)` builds the model (tests pass tiny ones); by default `AVSRModel(cfg.model)`."""
    write_run_files(spec.out, "sweep", spec)
    results = Path(spec.results)
    done = {(r["point"], r["snr"]) for r in read_results(results)}
    total = len(spec.points)
    for k, (name, overrides) in enumerate(spec.points, start=1):
        snrs = [None if s is None else float(s) for s in spec.eval["snr"]]
        todo = [s for s in snrs if (name, _snr_text(s)) not in done]
        if not todo:
            log(f"[{k}/{total}] {name}: done")
            continue
        run_dir = Path(spec.out) / name
        cfg = read_train_config(spec.base, [*_overrides(overrides), f"out={run_dir}"])
        log(f"[{k}/{total}] {name}: training into {run_dir}")
        state = train(cfg, log=log, progress=progress, until_epoch=until_epoch, model_factory=model_factory,
                      verb="sweep")
        if state["epoch"] < cfg.epochs:
            log(f"[{k}/{total}] {name}: stopped after epoch {state['epoch']} of {cfg.epochs}")
            continue
        if model_factory is None:
            model = load_trained(run_dir)[0]
        else:
            model = model_factory(cfg)
            load_trainable(model, load_weights(run_dir)[1], run_dir)
        for snr in todo:
            test = dataset_for(cfg.model, cfg.data, "test", snr=snr, limit=spec.eval.get("limit"))
            metrics = evaluate(model, test, cfg.batch_size, cfg.max_new_tokens)
            row = {"point": name, "overrides": json.dumps(overrides, sort_keys=True), "mode": cfg.model.mode,
                   "compression": cfg.model.compression, "k_audio": cfg.model.k_audio, "k_video": cfg.model.k_video,
                   "decorrelation": cfg.decorrelation, "seed": cfg.seed, "epochs": cfg.epochs,
                   "snr": _snr_text(snr), "n": metrics["n"], "wer": f"{metrics['wer']:.6f}",
                   "cer": f"{metrics['cer']:.6f}", "run": str(run_dir), "sweep": spec.path,
                   "config_hash": config_hash(cfg, ignore=("out",)), "command": command_line()}
            append_row(results, row, RESULT_COLUMNS)
            log(f"[{k}/{total}] {name} {_snr_text(snr)}: WER {metrics['wer']:.3f}")
    return read_results(results)
