"""`sinkscope sweep`: a resumable grid of training runs, e.g. compression rates x decorrelation on/off.

A sweep file (YAML) names a base training config, the points, what to measure, and where the rows go:

    base: experiments/configs/decorrelation/base.yaml    # any `sinkscope train` config
    out: runs/decorrelation                             # one run directory per point under here
    results: experiments/results/decorrelation.csv      # one row per finished point
    set: {epochs: 3}                                    # overrides applied to every point
    grid:                                               # the cross product of these ...
      rate: [{model.mode: asr, model.k_audio: 4}, {model.mode: vsr, model.k_video: 5}]
      decorrelation: [0.0, 10000.0]
    points:                                             # ... and these points on top (a mapping of overrides each)
      - {model.mode: asr, model.k_audio: 32, decorrelation: 10000.0, seed: 1}
    eval: {snr: [null, 0], limit: 200}                  # SNRs in dB (null = clean; VSR is scored clean only)
    record: {n: 50}                                     # a trace of the first n test utterances (n: 0 = none)

A grid entry is a list of values for one key (`decorrelation: [0.0, 1e4]`) or a list of override mappings for
keys that move together (`rate:` above). A point trains with `train()` (resuming a killed run), is scored with
`sinkscope eval` (`RUN/eval-TAG/`), recorded with `sinkscope record --checkpoint RUN` (`RUN/trace`), and
summarised (`analysis.sink_statistics`); then its one row is appended to `results`. Finished steps are kept in
`RUN/sweep_point.json`, finished rows are read back from `results`, so running the same command again continues
where it stopped. A row names the sweep file, the point's config hash and the command.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sinkscope.config import (
    atomic_write_text,
    claim_output,
    command_line,
    config_hash,
    load_config,
    write_run_files,
)
from sinkscope.errors import SinkscopeError
from sinkscope.train.avsr import TrainConfig, read_train_config, train
from sinkscope.train.results import append_row, read_rows

POINT_COLUMNS = ["point", "mode", "compression", "k_audio", "k_video", "decorrelation", "seed", "epochs"]
TRAIN_COLUMNS = ["val_wer_by_epoch", "ce_last", "decorrelation_last", "train_minutes"]
STAT_COLUMNS = ["trace_samples", "sinks_per_utt_delimiter", "sinks_per_utt_audio", "sinks_per_utt_video",
                "sinks_per_utt_prompt", "cos_mid_delimiter", "cos_mid_audio", "cos_mid_video", "cos_mid_prompt",
                "cos_last_delimiter", "cos_last_audio", "cos_last_video", "cos_last_prompt", "massive_max",
                "massive_max_segment", "massive_on_non_bos", "massive_features"]
TAIL_COLUMNS = ["run", "trace", "overrides", "sweep", "config_hash", "command"]


@dataclass
class SweepConfig:
    base: str
    out: str
    results: str
    grid: dict = field(default_factory=dict)
    points: list = field(default_factory=list)
    set: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
    record: dict = field(default_factory=dict)
    path: str = "sweep"

    def __post_init__(self) -> None:
        for name, kind, what in (("grid", dict, "a mapping of axis -> list of values"),
                                 ("points", list, "a list of mappings"), ("set", dict, "a mapping of overrides"),
                                 ("eval", dict, "a mapping (snr, limit, split)"),
                                 ("record", dict, "a mapping (n, split)")):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise ValueError(f"{name} must be {what}, not {value!r}")
        for name in ("base", "out", "results"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a path, not {getattr(self, name)!r}")
        self.grid, self.points, self.set = self.grid or {}, self.points or [], self.set or {}
        self.eval = {"snr": [None], "limit": None, "split": "test", **(self.eval or {})}
        if not isinstance(self.eval["snr"], list):
            self.eval["snr"] = [self.eval["snr"]]
        self.record = {"n": 0, "split": "test", **(self.record or {})}
        for name, section, known in (("eval", self.eval, {"snr", "limit", "split"}),
                                     ("record", self.record, {"n", "split"})):
            unknown = sorted(set(section) - known)
            if unknown:
                raise ValueError(f"{name}: unknown field(s) {unknown}; known: {sorted(known)}")
            if not isinstance(section["split"], str) or not section["split"]:
                raise ValueError(f"{name}.split must be a split name such as test, not {section['split']!r}")
        # checked here, not when a point reaches its scoring or recording after minutes of training
        from sinkscope.data.media import check_snr

        for k, snr in enumerate(self.eval["snr"]):
            if snr is not None:
                check_snr(snr, f"eval.snr[{k}]")
        if len(set(self.tags)) != len(self.tags):
            raise ValueError(f"eval.snr lists an SNR twice: {self.eval['snr']}")
        limit = self.eval["limit"]
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"eval.limit must be a whole number >= 1 or null (every utterance), not {limit!r}")
        n = self.record["n"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"record.n must be a whole number >= 0 (0: no trace), not {n!r}")

    @property
    def tags(self) -> list[str]:
        return [snr_tag(s) for s in self.eval["snr"]]

    @property
    def columns(self) -> list[str]:
        metrics = [f"{m}_{tag}" for tag in self.tags for m in ("wer", "cer", "n")]
        stats = STAT_COLUMNS if self.record["n"] else []
        return [*POINT_COLUMNS, *metrics, *TRAIN_COLUMNS, *stats, *TAIL_COLUMNS]

    @property
    def all_points(self) -> list[tuple[str, dict]]:
        """`(name, overrides)` for every point: the grid's cross product, then `points`, in a fixed order."""
        axes = []
        for key, values in self.grid.items():
            if not isinstance(values, list) or not values:
                raise SinkscopeError(f"{self.path}: grid.{key} must be a non-empty list")
            axes.append([dict(v) if isinstance(v, dict) else {key: v} for v in values])
        combos = [{k: v for part in combo for k, v in part.items()} for combo in itertools.product(*axes)] \
            if axes else []
        for k, extra in enumerate(self.points):
            if not isinstance(extra, dict) or not extra:
                raise SinkscopeError(f"{self.path}: points[{k}] must be a non-empty mapping of overrides")
            combos.append(dict(extra))
        named = [(point_name(c), {**self.set, **c}) for c in combos]
        names = [n for n, _ in named]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise SinkscopeError(f"{self.path}: points {twice} are listed twice")
        return named


def _short(key: str) -> str:
    return {"model.k_audio": "ka", "model.k_video": "kv", "decorrelation": "dec", "model.compression": "",
            "model.mode": ""}.get(key, key.split(".")[-1])


def point_name(overrides: dict) -> str:
    """A run-directory name from a point's overrides, e.g. `asr-ka32-dec10000-seed1`; a rate set reads
    `rates4x1+16x1`, and a mapping (e.g. `model.mome`) its key plus a short hash of its content."""
    def text(v) -> str:
        if isinstance(v, float):
            return f"{v:g}"
        if isinstance(v, dict):
            return hashlib.sha1(json.dumps(v, sort_keys=True).encode()).hexdigest()[:6]
        if isinstance(v, list | tuple):
            return "+".join("x".join(text(x) for x in item) if isinstance(item, list | tuple) else text(item)
                            for item in v)
        return str(v)
    return "-".join(f"{_short(k)}{text(v)}" for k, v in overrides.items()) or "base"


def snr_tag(snr) -> str:
    return "clean" if snr is None else f"snr{float(snr):g}"


def load_sweep(path: str | Path, overrides: list[str] = ()) -> SweepConfig:
    """A sweep file, validated now (points included) rather than after hours of training."""
    spec = load_config(SweepConfig, path, overrides, defaults={"path": str(path)})
    for name, point in spec.all_points:
        read_train_config(spec.base, [*_overrides(point), f"out={Path(spec.out) / name}"])
    return spec


def _overrides(mapping: dict) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in mapping.items()]


def read_results(spec: SweepConfig) -> list[dict]:
    return read_rows(spec.results, spec.columns)


def _blank_unused(mode: str, k_audio: int, k_video: int) -> tuple:
    return (k_audio if mode != "vsr" else "", k_video if mode != "asr" else "")


def point_rates(cfg: TrainConfig) -> list[tuple[str | None, str, int, int]]:
    """`(rate, suffix, k_audio, k_video)` for each row a point gives: one, for a single-rate model (rate None, no
    suffix); one per rate of a Matryoshka (MoME) model's rate set, each scored and recorded at that rate, with the
    `eval --rate` string and a suffix such as `-ka16` (ASR), `-kv5` (VSR) or `-ka16-kv5` (AVSR) for its row."""
    if not cfg.model.rates:
        return [(None, "", cfg.model.k_audio, cfg.model.k_video)]
    out = []
    for k_audio, k_video in cfg.model.rate_set:
        parts = {"asr": [("ka", k_audio)], "vsr": [("kv", k_video)],
                 "avsr": [("ka", k_audio), ("kv", k_video)]}[cfg.model.mode]
        out.append((",".join(str(k) for _, k in parts), "".join(f"-{a}{k}" for a, k in parts), k_audio, k_video))
    return out


def _point_row(spec: SweepConfig, name: str, overrides: dict, cfg: TrainConfig, run_dir: Path,
               done: dict, suffix: str = "", k_audio: int | None = None, k_video: int | None = None) -> dict:
    k_audio, k_video = _blank_unused(cfg.model.mode, cfg.model.k_audio if k_audio is None else k_audio,
                                     cfg.model.k_video if k_video is None else k_video)
    history = done["history"]
    row = {"point": name + suffix, "mode": cfg.model.mode, "compression": cfg.model.compression, "k_audio": k_audio,
           "k_video": k_video, "decorrelation": cfg.decorrelation, "seed": cfg.seed, "epochs": cfg.epochs,
           "val_wer_by_epoch": " ".join(f"{h['wer']:.4f}" for h in history),
           "ce_last": f"{history[-1]['ce']:.4f}", "decorrelation_last": f"{history[-1].get('decorrelation', 0):.5f}",
           "train_minutes": f"{done['train_minutes']:.1f}", "run": str(run_dir),
           "trace": str(run_dir / f"trace{suffix}") if spec.record["n"] else "",
           "overrides": json.dumps(overrides, sort_keys=True), "sweep": spec.path,
           "config_hash": config_hash(cfg, ignore=("out",)), "command": command_line()}
    for tag in spec.tags:
        scored = done["eval"].get(tag + suffix)
        for m in ("wer", "cer", "n"):
            row[f"{m}_{tag}"] = "" if scored is None else (scored[m] if m == "n" else f"{scored[m]:.6f}")
    for key, value in done.get("stats" + suffix, {}).items():
        row[key] = f"{value:.4f}" if isinstance(value, float) else value
    return row


def run_point(spec: SweepConfig, name: str, overrides: dict, log: Callable[[str], None] = print,
              progress: Callable | None = None, until_epoch: int | None = None) -> list[dict] | None:
    """Train, score, record and summarise one point; returns its rows (one, or one per rate of a Matryoshka
    model), or None when training stopped early. Every step that finished is kept in RUN/sweep_point.json and not
    redone."""
    from sinkscope.analysis import sink_statistics
    from sinkscope.eval import EvalConfig, run_eval
    from sinkscope.record.run import RecordConfig, run_record
    from sinkscope.trace import Trace

    run_dir = Path(spec.out) / name
    cfg = read_train_config(spec.base, [*_overrides(overrides), f"out={run_dir}"])
    marker = run_dir / "sweep_point.json"
    done = json.loads(marker.read_text()) if marker.is_file() else {"eval": {}}
    if done.get("config_hash") not in (None, config_hash(cfg, ignore=("out",))):
        raise SinkscopeError(f"{marker}: made with another config of point {name}; move {run_dir} away")
    done["config_hash"] = config_hash(cfg, ignore=("out",))
    start = time.time()
    state = train(cfg, log=log, progress=progress, until_epoch=until_epoch, verb="sweep")
    if state["epoch"] < cfg.epochs:
        log(f"{name}: stopped after epoch {state['epoch']} of {cfg.epochs}")
        return None
    done["history"] = state["history"]
    done["train_minutes"] = sum(h.get("seconds", 0.0) for h in state["history"]) / 60 or (time.time() - start) / 60

    def save() -> None:
        atomic_write_text(marker, json.dumps(done, indent=2))

    save()
    rows = []
    for rate, suffix, k_audio, k_video in point_rates(cfg):
        for snr, tag in zip(spec.eval["snr"], spec.tags, strict=True):
            if tag + suffix in done["eval"] or (snr is not None and cfg.model.mode == "vsr"):
                continue
            result = run_eval(EvalConfig(checkpoint=str(run_dir), data=cfg.data, split=spec.eval["split"], snr=snr,
                                         limit=spec.eval["limit"], batch_size=cfg.batch_size, rate=rate,
                                         max_new_tokens=cfg.max_new_tokens, out=str(run_dir / f"eval-{tag}{suffix}")))
            done["eval"][tag + suffix] = {k: result[k] for k in ("wer", "cer", "n")}
            save()
            log(f"{name}{suffix} {tag}: WER {result['wer']:.3f}, CER {result['cer']:.3f} on {result['n']}")
        if spec.record["n"] and "stats" + suffix not in done:
            run_record(RecordConfig(out=str(run_dir / f"trace{suffix}"), checkpoint=str(run_dir), data=cfg.data,
                                    split=spec.record["split"], n=int(spec.record["n"]), batch_size=8, resume=True,
                                    rate=rate))
            done["stats" + suffix] = sink_statistics(Trace.load(run_dir / f"trace{suffix}"))
            save()
        rows.append(_point_row(spec, name, overrides, cfg, run_dir, done, suffix, k_audio, k_video))
    return rows


def row_names(spec: SweepConfig, name: str, overrides: dict) -> list[str]:
    """The rows a point writes: its name, or its name with each rate's suffix for a Matryoshka model."""
    cfg = read_train_config(spec.base, [*_overrides(overrides), f"out={Path(spec.out) / name}"])
    return [name + suffix for _, suffix, _, _ in point_rates(cfg)]


def run_sweep(spec: SweepConfig, log: Callable[[str], None] = print, progress: Callable | None = None,
              until_epoch: int | None = None, only: list[str] | None = None) -> list[dict]:
    """Run every point that has no row yet (or those named in `only`); returns all rows."""
    claim_output(spec.out, "sweep", lock=False)  # points in parallel (--point) share it; each run locks its own
    write_run_files(spec.out, "sweep", spec)
    points = spec.all_points
    if only:
        unknown = sorted(set(only) - {n for n, _ in points})
        if unknown:
            raise SinkscopeError(f"{spec.path}: no point named {unknown}; the points are {[n for n, _ in points]}")
    rows = {r["point"]: r for r in read_results(spec)}
    for k, (name, overrides) in enumerate(points, start=1):
        finished = all(n in rows for n in row_names(spec, name, overrides))
        if finished or (only and name not in only):
            log(f"[{k}/{len(points)}] {name}: " + ("done" if finished else "skipped"))
            continue
        log(f"[{k}/{len(points)}] {name}: training into {Path(spec.out) / name}")
        new_rows = run_point(spec, name, overrides, log, progress, until_epoch)
        for row in new_rows or []:
            if row["point"] in rows:
                continue
            append_row(spec.results, row, spec.columns)
            rows[row["point"]] = row
            log(f"[{k}/{len(points)}] {row['point']}: row written to {spec.results}")
    return read_results(spec)
