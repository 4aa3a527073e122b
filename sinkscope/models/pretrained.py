"""Trained models on disk: the checkpoint registry (`demo`), loading a model from a run or an export, loading
CTC-pretrained encoders, and exporting runs and encoders in fp16 for sharing.

A checkpoint directory holds `config.yaml` (the training config: `model:` builds the AVSR model, `encoders:`
names the encoder weights), `state.json` (which weights file is current, the epoch and the history) and the
trainable weights as safetensors. An export holds the same three, in fp16 and without optimiser state.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from sinkscope.config import build, make_writable_dir, read_yaml_mapping
from sinkscope.errors import SinkscopeError
from sinkscope.models.avsr import AVSRConfig, AVSRModel
from sinkscope.train.checkpoint import check_finite, load_weights, save_half

REPO = Path(__file__).resolve().parents[2]
CHECKPOINTS = {"demo": REPO / "experiments" / "weights" / "demo",
               "mome-demo": REPO / "experiments" / "weights" / "mome-demo"}
"""Names that `--checkpoint` accepts besides a directory: the models that ship with the repository checkout."""


def resolve_checkpoint(checkpoint: str | Path) -> Path:
    """A checkpoint directory: a path, or a registered name (`demo`) when no such path exists."""
    path = Path(checkpoint)
    name = str(checkpoint)
    if name in CHECKPOINTS and not path.exists():
        where = CHECKPOINTS[name]
        if not (where / "config.yaml").is_file():
            raise SinkscopeError(f"the {name} checkpoint is not at {where}: it ships with the sinkscope repository "
                                 "checkout (experiments/weights/), not with a wheel; pass a run directory")
        return where
    if not path.is_dir():
        raise SinkscopeError(f"checkpoint {checkpoint}: no such directory (and not one of {sorted(CHECKPOINTS)})")
    return path


def _float(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}


def load_encoders(model: AVSRModel, path: str | Path) -> None:
    """Load CTC-pretrained encoder weights into `model`: a `pretrain-encoders` run directory (`audio/state.json`,
    ...) or a directory of exported `audio.safetensors` / `video.safetensors` (fp16 is cast to float32)."""
    path = Path(path)
    for modality, encoder in (("audio", model.audio_encoder), ("video", model.video_encoder)):
        if encoder is None:
            continue
        exported = path / f"{modality}.safetensors"
        if exported.is_file():
            try:
                weights = _float(load_file(exported))
            except Exception as exc:
                raise SinkscopeError(f"{exported}: not a readable safetensors file ({exc})") from exc
            check_finite(weights, exported)
        elif (path / modality / "state.json").is_file():
            _, weights = load_weights(path / modality)
        else:
            raise SinkscopeError(f"{path}: no {modality} encoder ({exported.name}, or {modality}/state.json of a "
                                 "`sinkscope pretrain-encoders` run)")
        state = {k.removeprefix("encoder."): v for k, v in weights.items() if k.startswith("encoder.")}
        try:
            missing, unexpected = encoder.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # size mismatches
            lines = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
            raise SinkscopeError(f"{path}: the {modality} encoder weights do not fit this model's {modality} encoder "
                                 f"({lines[0] if lines else exc}); check `model.{modality}` in the config") from exc
        if missing or unexpected:
            raise SinkscopeError(f"{path}: the {modality} encoder weights do not fit this model's {modality} encoder "
                                 f"(missing {missing[:3]}, unexpected {unexpected[:3]}); check the encoder config")


def encoders_path(run: Path, encoders: str) -> Path:
    """A config's `encoders` path: as given (absolute, or relative to the working directory), else relative to
    the checkpoint directory (how exports point at their encoders)."""
    path = Path(encoders)
    if not path.is_absolute() and not path.exists() and (run / path).exists():
        return run / path
    return path


def load_trainable(model: torch.nn.Module, weights: dict[str, torch.Tensor], where: Path) -> None:
    """Put a checkpoint's trainable weights into `model`, refusing missing, unexpected or misshapen tensors."""
    weights = _float(weights)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(weights)), sorted(set(weights) - set(model.state_dict()))
    if missing or unexpected:
        raise SinkscopeError(f"{where}: the checkpoint does not match its config (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
    wrong = [f"{n} {tuple(weights[n].shape)} vs {tuple(p.shape)}" for n, p in params.items()
             if weights[n].shape != p.shape]
    if wrong:
        raise SinkscopeError(f"{where}: the checkpoint's tensors do not fit the model its config.yaml builds "
                             f"(checkpoint vs model: {wrong[:2]}); was config.yaml edited or taken from another run?")
    model.load_state_dict(weights, strict=False)


def load_trained(checkpoint: str | Path) -> tuple[AVSRModel, dict]:
    """An AVSR model in eval mode from a training run, an export, or a registered name, with the run's config
    (the mapping in its config.yaml)."""
    run = resolve_checkpoint(checkpoint)
    if not (run / "config.yaml").is_file():
        raise SinkscopeError(f"{run} is not a training run or export: it has no config.yaml")
    config = read_yaml_mapping(run / "config.yaml", "training config")
    model_cfg = build(AVSRConfig, config.get("model") or {}, f"{run / 'config.yaml'}: model")
    try:
        model_cfg.check()
    except ValueError as exc:
        raise SinkscopeError(f"{run / 'config.yaml'}: model: {exc}") from exc
    model = AVSRModel(model_cfg)
    if config.get("encoders"):
        load_encoders(model, encoders_path(run, str(config["encoders"])))
    _, weights = load_weights(run)
    load_trainable(model, weights, run)
    return model.eval(), config


def _refuse_overwrite(source: Path, out: Path) -> None:
    src, dst = source.resolve(), out.resolve()
    if dst == src or dst.is_relative_to(src):
        raise SinkscopeError(f"export {source} {out}: the output would overwrite files of the run itself; "
                             "choose a directory outside it")


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise SinkscopeError(f"export: {out} is a file; the export is a directory (model.safetensors, config.yaml, "
                             "state.json); choose another path")
    make_writable_dir(out, f"export: {out}")


def export_run(run: str | Path, out: str | Path, encoders: str | None = None) -> list[Path]:
    """Copy a training run's latest checkpoint for sharing: its trainable weights in fp16 (`model.safetensors`),
    its config (with `encoders` replaced when given, e.g. by a path relative to `out`) and its history. The
    optimiser state is left behind. Files already in `out` are replaced; nothing else there is touched."""
    run, out = Path(run), Path(out)
    _refuse_overwrite(run, out)
    _check_out(out)
    state, weights = load_weights(run)
    cfg = read_yaml_mapping(run / "config.yaml", "training config")
    if encoders is not None:
        cfg["encoders"] = encoders
    out.mkdir(parents=True, exist_ok=True)
    save_half(weights, out / "model.safetensors", {"source": str(run), "epoch": str(state["epoch"])})
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    exported = {"epoch": state["epoch"], "step": state.get("step"), "history": state.get("history", []),
                "checkpoint": "model", "exported_from": str(run)}
    (out / "state.json").write_text(json.dumps(exported, indent=2) + "\n")
    return [out / "model.safetensors", out / "config.yaml", out / "state.json"]


def is_encoder_run(run: Path) -> bool:
    return any((Path(run) / m / "state.json").is_file() for m in ("audio", "video"))


def export_encoders(run: str | Path, out: str | Path) -> list[Path]:
    """Copy the latest weights of each encoder a `pretrain-encoders` run holds to `out/<modality>.safetensors`
    in fp16 (what `encoders:` in a training config reads). Only those files are replaced, so an audio-only run
    can refresh the audio encoder of a directory that keeps its video encoder."""
    run, out = Path(run), Path(out)
    _refuse_overwrite(run, out)
    _check_out(out)
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


def export(run: str | Path, out: str | Path, encoders: str | None = None) -> list[Path]:
    """`sinkscope export`: a training run's checkpoint, or a `pretrain-encoders` run's encoders."""
    run = Path(run)
    if not run.is_dir():
        raise SinkscopeError(f"export: {run} is not a directory")
    return export_encoders(run, out) if is_encoder_run(run) else export_run(run, out, encoders)
