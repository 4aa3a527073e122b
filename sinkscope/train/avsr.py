"""Training and decoding of the AVSR model (`sinkscope train`, `sinkscope eval`).

The projectors and LoRA adapters train (the encoders and the LLM stay frozen) on cross-entropy over the
transcript, plus `decorrelation * metrics.decorrelation_loss` when `decorrelation > 0`. accelerate drives the
loop, so `accelerate launch -m sinkscope train ...` runs data-parallel on several GPUs; one CPU process is the
tested case. Checkpoints hold only the trainable weights plus the resolved config, and a killed run resumes
from the last epoch with identical results.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import jiwer
import torch
import yaml
from torch.utils.data import DataLoader

from sinkscope.data.dataset import AVSRDataset, BucketBatchSampler, collate
from sinkscope.errors import SinkscopeError
from sinkscope.metrics import decorrelation_loss
from sinkscope.models.avsr import AVSRConfig, AVSRModel
from sinkscope.models.encoders import AudioEncoderConfig, VideoEncoderConfig
from sinkscope.train.checkpoint import load_checkpoint, load_weights, save_checkpoint, save_half

OUTPUT_SEGMENTS = {"bos", "transcript", "eos"}


@dataclass
class TrainConfig:
    data: str = ""
    out: str = ""
    model: AVSRConfig = field(default_factory=AVSRConfig)
    encoders: str | None = None  # a `pretrain-encoders` run directory
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


def _build(cls, data: dict, where: str):
    names = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise SinkscopeError(f"{where}: unknown field(s) {unknown}; known: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        if key == "model":
            value = _build(AVSRConfig, value or {}, f"{where}: model")
        elif key == "audio":
            value = _build(AudioEncoderConfig, value or {}, f"{where}: audio")
        elif key == "video":
            value = _build(VideoEncoderConfig, value or {}, f"{where}: video")
        elif key == "lora_targets":
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def read_yaml_mapping(path: str | Path, what: str) -> dict:
    """A YAML file that must hold a mapping (empty file: {}), with errors that name the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SinkscopeError(f"{path}: not a readable YAML {what} ({exc})") from exc
    if not isinstance(data, dict):
        raise SinkscopeError(f"{path}: the {what} must be a mapping of fields")
    return data


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """A TrainConfig from YAML, with `key=value` overrides (dotted keys reach nested fields, e.g. model.k_audio=8)."""
    data = read_yaml_mapping(path, "config") if path is not None else {}
    for item in overrides:
        if "=" not in item:
            raise SinkscopeError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        target = data
        parts = key.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = yaml.safe_load(raw)
    return _build(TrainConfig, data, str(path or "config"))


def context_mask(segments: list[list[tuple[str, int, int]]], width: int) -> torch.Tensor:
    """True on the non-output tokens (delimiters, modality tokens, prompt) of each sample."""
    mask = torch.zeros(len(segments), width, dtype=torch.bool)
    for i, spans in enumerate(segments):
        for name, start, end in spans:
            if name not in OUTPUT_SEGMENTS:
                mask[i, start:end] = True
    return mask


def load_encoders(model: AVSRModel, run: str | Path) -> None:
    """Load CTC-pretrained encoder weights: a `pretrain-encoders` run directory (`audio/state.json`, ...) or a
    directory of exported `audio.safetensors` / `video.safetensors` (fp16 is cast to the model's dtype)."""
    run = Path(run)
    for modality, encoder in (("audio", model.audio_encoder), ("video", model.video_encoder)):
        if encoder is None:
            continue
        exported = run / f"{modality}.safetensors"
        if exported.is_file():
            from safetensors.torch import load_file

            weights = {k: v.float() if v.is_floating_point() else v for k, v in load_file(exported).items()}
        else:
            _, weights = load_weights(run / modality)
        state = {k.removeprefix("encoder."): v for k, v in weights.items() if k.startswith("encoder.")}
        missing, unexpected = encoder.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise SinkscopeError(f"{run / modality}: the encoder weights do not fit this model's {modality} encoder "
                                 f"(missing {missing[:3]}, unexpected {unexpected[:3]}); check the encoder config")


@torch.no_grad()
def decode(model: AVSRModel, batch: dict, max_new_tokens: int = 24, beams: int = 1,
           built: dict | None = None) -> list[str]:
    """Greedy (or beam) decoding through `generate(inputs_embeds=...)`, left-padded; `built` passes the inputs
    of `model.build(batch, with_transcript=False, padding_side="left")` when the caller already has them."""
    if built is None:
        built = model.build(batch, with_transcript=False, padding_side="left")
    tok = model.tokenizer
    out = model.llm.generate(inputs_embeds=built["inputs_embeds"], attention_mask=built["attention_mask"],
                             max_new_tokens=max_new_tokens, num_beams=beams, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return [" ".join(t.lower().split()) for t in tok.batch_decode(out, skip_special_tokens=True)]


def score(refs: list[str], hyps: list[str]) -> dict:
    hyps = [h if h else "<empty>" for h in hyps]
    return {"wer": jiwer.wer(refs, hyps), "cer": jiwer.cer(refs, hyps), "n": len(refs)}


def train(cfg: TrainConfig, log: Callable[[str], None] = print, progress: Callable | None = None,
          model: AVSRModel | None = None, until_epoch: int | None = None) -> dict:
    """Train (or resume) into `cfg.out`; returns the history.

    `until_epoch` stops after that epoch of the configured schedule (the learning rate still follows
    `cfg.epochs`), so a long run can be trained in slices across sessions and resumed identically."""
    from accelerate import Accelerator

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    resolved = asdict(cfg)
    config_file = out / "config.yaml"
    if config_file.exists():
        previous = yaml.safe_load(config_file.read_text())
        changed = sorted(k for k in resolved if k not in ("epochs", "out") and
                         json.dumps(previous.get(k), sort_keys=True) != json.dumps(resolved[k], sort_keys=True))
        if changed:
            raise SinkscopeError(f"{config_file}: the run in {out} used other settings for {changed}; "
                                 "resume it with the same config or choose another out")
    config_file.write_text(yaml.safe_dump(json.loads(json.dumps(resolved)), sort_keys=False))
    torch.manual_seed(cfg.seed)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model = model if model is not None else AVSRModel(cfg.model)
    if cfg.encoders:
        load_encoders(model, cfg.encoders)
    k_v = cfg.model.k_video if "video" in model.cfg.mode or model.cfg.mode == "avsr" else 1
    train_set = AVSRDataset(cfg.data, "train", snr=cfg.snr, seed=cfg.seed, video_multiple=k_v)
    if cfg.max_train:
        train_set.items = train_set.items[: cfg.max_train]
    test_set = AVSRDataset(cfg.data, "test", video_multiple=k_v)
    if cfg.max_eval:
        test_set.items = test_set.items[: cfg.max_eval]
    sampler = BucketBatchSampler(train_set.lengths(), cfg.batch_size, seed=cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=cfg.lr)
    state = {"epoch": 0, "step": 0, "history": []}
    if (out / "state.json").exists():
        state, weights = load_checkpoint(out, optimiser)
        model.load_state_dict(weights, strict=False)
        log(f"resuming after epoch {state['epoch']}")
    model, optimiser = accelerator.prepare(model, optimiser)
    total = cfg.epochs * len(sampler)
    stop = cfg.epochs if until_epoch is None else min(cfg.epochs, until_epoch)
    while state["epoch"] < stop:
        sampler.set_epoch(state["epoch"])
        train_set.set_epoch(state["epoch"])
        loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=collate)
        if accelerator.num_processes > 1:  # `accelerate launch`: each process takes its shard of the batches
            loader = accelerator.prepare_data_loader(loader)
        start, tokens, ce_sum, dec_sum, seen = time.time(), 0, 0.0, 0.0, 0
        model.train()
        for k, batch in enumerate(loader):
            if batch is None:
                continue
            step = state["step"]
            lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps)) * max(0.0, 1 - step / max(1, total))
            for group in optimiser.param_groups:
                group["lr"] = lr
            result = model(batch, output_hidden_states=cfg.decorrelation > 0)
            ce = loss = result["loss"]
            if cfg.decorrelation > 0:
                dec = decorrelation_loss(result["hidden_states"], context_mask(result["segments"], result["width"]))
                loss = loss + cfg.decorrelation * dec
                dec_sum += float(dec.detach())
            optimiser.zero_grad()
            accelerator.backward(loss)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimiser.step()
            state["step"] += 1
            ce_sum += float(ce.detach())
            seen += 1
            tokens += int(result["n_tokens"])
            if progress is not None:
                progress(k + 1, len(sampler), float(ce.detach()), lr, tokens / max(1e-9, time.time() - start))
        metrics = evaluate(accelerator.unwrap_model(model), test_set, cfg)
        state["epoch"] += 1
        state["history"].append({"epoch": state["epoch"], "ce": ce_sum / max(1, seen),
                                 "decorrelation": dec_sum / max(1, seen), "wer": metrics["wer"],
                                 "cer": metrics["cer"], "tokens_per_s": tokens / max(1e-9, time.time() - start)})
        inner = accelerator.unwrap_model(model)
        trainable = {n: p for n, p in inner.named_parameters() if p.requires_grad}
        save_checkpoint(out, f"epoch-{state['epoch']:03d}", trainable, optimiser, state)
        log(f"epoch {state['epoch']}/{cfg.epochs}: CE {ce_sum / max(1, seen):.3f}, test WER {metrics['wer']:.3f}, "
            f"CER {metrics['cer']:.3f}")
    return state


def evaluate(model: AVSRModel, dataset: AVSRDataset, cfg: TrainConfig, beams: int = 1) -> dict:
    loader = DataLoader(dataset, batch_sampler=BucketBatchSampler(dataset.lengths(), cfg.batch_size, shuffle=False),
                        collate_fn=collate)
    model.eval()
    refs, hyps, ids = [], [], []
    for batch in loader:
        if batch is None:
            continue
        hyps += decode(model, batch, cfg.max_new_tokens, beams)
        refs += batch["transcripts"]
        ids += batch["ids"]
    result = score(refs, hyps)
    result["hypotheses"] = list(zip(ids, refs, hyps, strict=True))
    return result


DEMO = "demo"
DEMO_DIR = Path(__file__).resolve().parents[2] / "experiments" / "weights" / "demo"


def resolve_checkpoint(checkpoint: str | Path) -> Path:
    """A checkpoint directory: a path, or `demo` for the small AVSR model shipped in the repository checkout."""
    path = Path(checkpoint)
    if str(checkpoint) == DEMO and not path.exists():
        if not (DEMO_DIR / "config.yaml").is_file():
            raise SinkscopeError(f"the demo checkpoint is not at {DEMO_DIR}: it ships with the sinkscope repository "
                                 "checkout (experiments/weights/demo), not with a wheel; pass a run directory")
        return DEMO_DIR
    return path


def load_trained(run: str | Path) -> tuple[AVSRModel, TrainConfig]:
    """An AVSR model from a training run directory (or `demo`, or an `export_checkpoint` copy): its config.yaml,
    encoders and trainable weights. A relative `encoders` path is read from the working directory, else from
    the checkpoint directory."""
    run = resolve_checkpoint(run)
    if not (run / "config.yaml").is_file():
        raise SinkscopeError(f"{run} is not a training run: it has no config.yaml")
    cfg = load_config(run / "config.yaml")
    model = AVSRModel(cfg.model)
    if cfg.encoders:
        encoders = Path(cfg.encoders)
        if not encoders.is_absolute() and not encoders.exists() and (run / encoders).exists():
            encoders = run / encoders
        load_encoders(model, encoders)
    _, weights = load_weights(run)
    weights = {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    if missing or unexpected:
        raise SinkscopeError(f"{run}: the checkpoint does not match its config (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
    wrong = [f"{n} {tuple(weights[n].shape)} vs {tuple(p.shape)}" for n, p in params.items()
             if weights[n].shape != p.shape]
    if wrong:
        raise SinkscopeError(f"{run}: the checkpoint's tensors do not fit the model its config.yaml builds "
                             f"(checkpoint vs model: {wrong[:2]}); was config.yaml edited or taken from another run?")
    model.load_state_dict(weights, strict=False)
    return model.eval(), cfg


def export_checkpoint(run: str | Path, out: str | Path, encoders: str | None = None) -> Path:
    """Copy a run's latest checkpoint for sharing: its trainable weights in fp16 (`model.safetensors`), its
    config (with `encoders` replaced when given, e.g. by a path relative to `out`) and its history. The
    optimiser state is left behind. Files already in `out` are replaced; nothing else there is touched."""
    run, out = Path(run), Path(out)
    state, weights = load_weights(run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    if encoders is not None:
        cfg["encoders"] = encoders
    out.mkdir(parents=True, exist_ok=True)
    save_half(weights, out / "model.safetensors", {"source": str(run), "epoch": str(state["epoch"])})
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    exported = {"epoch": state["epoch"], "step": state.get("step"), "history": state.get("history", []),
                "checkpoint": "model", "exported_from": str(run)}
    (out / "state.json").write_text(json.dumps(exported, indent=2) + "\n")
    return out
