"""`sinkscope sweep`: a resumable grid of training runs, e.g. compression rates x decorrelation on/off.

A sweep file (YAML) names a base training config, the grid and the evaluations:

    base: experiments/configs/grid_avsr_stack_a4_v2.yaml   # any `sinkscope train` config
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
running the same command again continues where it stopped.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sinkscope.errors import SinkscopeError

RESULT_COLUMNS = ["point", "overrides", "mode", "compression", "k_audio", "k_video", "decorrelation", "epochs",
                  "snr", "n", "wer", "cer", "run"]


@dataclass
class SweepSpec:
    base: str
    out: str
    results: str
    grid: dict[str, list] = field(default_factory=dict)
    set: dict = field(default_factory=dict)
    eval: dict = field(default_factory=lambda: {"snr": [None], "limit": None})
    path: str = "sweep"

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
                    options.append(({k: v for k, v in value.items()}, "-".join(f"{_short(k)}{v}"
                                                                          for k, v in value.items())))
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


def load_sweep(path: str | Path) -> SweepSpec:
    from sinkscope.train.avsr import read_yaml_mapping

    path = Path(path)
    data = read_yaml_mapping(path, "sweep file")
    known = {"base", "out", "results", "grid", "set", "eval"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SinkscopeError(f"{path}: unknown field(s) {unknown}; known: {sorted(known)}")
    missing = sorted(k for k in ("base", "out", "results", "grid") if k not in data)
    if missing:
        raise SinkscopeError(f"{path}: missing field(s) {missing}")
    ev = {"snr": [None], "limit": None, **(data.get("eval") or {})}
    if not isinstance(ev["snr"], list):
        ev["snr"] = [ev["snr"]]
    spec = SweepSpec(base=str(data["base"]), out=str(data["out"]), results=str(data["results"]),
                     grid=data["grid"] or {}, set=data.get("set") or {}, eval=ev, path=str(path))
    spec.points  # noqa: B018 - validates the grid now rather than after hours of training
    return spec


def _overrides(mapping: dict) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in mapping.items()]


def read_results(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and set(RESULT_COLUMNS) - set(rows[0]):
        raise SinkscopeError(f"{path}: not a sweep results file (columns {sorted(rows[0])}); move it away")
    return rows


def _append(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(row)
        f.flush()
        os.fsync(f.fileno())


def run_sweep(spec: SweepSpec, log: Callable[[str], None] = print, progress: Callable | None = None,
              until_epoch: int | None = None, model_factory: Callable | None = None) -> list[dict]:
    """Train and evaluate every grid point that has no result yet; returns all result rows.

    `until_epoch` trains every point only that far (no evaluation until a point has finished its schedule).
    `model_factory(cfg)` builds the model (tests pass tiny ones); by default `AVSRModel(cfg.model)`."""
    from sinkscope.data.dataset import AVSRDataset
    from sinkscope.train.avsr import evaluate, load_config, train

    results = Path(spec.results)
    done = {(r["point"], r["snr"]) for r in read_results(results)}
    for k, (name, overrides) in enumerate(spec.points):
        snrs = [None if s is None else float(s) for s in spec.eval["snr"]]
        todo = [s for s in snrs if (name, _snr_text(s)) not in done]
        if not todo:
            log(f"[{k + 1}/{len(spec.points)}] {name}: done")
            continue
        run_dir = Path(spec.out) / name
        cfg = load_config(spec.base, [*_overrides(overrides), f"out={run_dir}"])
        log(f"[{k + 1}/{len(spec.points)}] {name}: training into {run_dir}")
        model = model_factory(cfg) if model_factory else None
        state = train(cfg, log=log, progress=progress, model=model, until_epoch=until_epoch)
        if state["epoch"] < cfg.epochs:
            log(f"[{k + 1}/{len(spec.points)}] {name}: stopped after epoch {state['epoch']} of {cfg.epochs}")
            continue
        if model is None:
            from sinkscope.train.avsr import load_trained

            model, cfg = load_trained(run_dir)
        else:
            from sinkscope.train.checkpoint import load_weights

            model.load_state_dict(load_weights(run_dir)[1], strict=False)
        for snr in todo:
            test = AVSRDataset(cfg.data, "test", snr=snr, video_multiple=cfg.model.k_video)
            if spec.eval.get("limit"):
                test.items = test.items[: int(spec.eval["limit"])]
            metrics = evaluate(model, test, cfg)
            row = {"point": name, "overrides": json.dumps(overrides, sort_keys=True), "mode": cfg.model.mode,
                   "compression": cfg.model.compression, "k_audio": cfg.model.k_audio,
                   "k_video": cfg.model.k_video, "decorrelation": cfg.decorrelation, "epochs": cfg.epochs,
                   "snr": _snr_text(snr), "n": metrics["n"], "wer": f"{metrics['wer']:.6f}",
                   "cer": f"{metrics['cer']:.6f}", "run": str(run_dir)}
            _append(results, row)
            log(f"[{k + 1}/{len(spec.points)}] {name} {_snr_text(snr)}: WER {metrics['wer']:.3f}")
    return read_results(results)


def _snr_text(snr: float | None) -> str:
    return "clean" if snr is None else f"{float(snr):g}"
