"""Recording runs (the engine behind `sinkscope record`): text prompts through an LLM, AV utterances through a
trained AVSR model, resumable, into a trace directory."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from sinkscope.config import releases_locks
from sinkscope.errors import SinkscopeError, TraceError
from sinkscope.record.recorder import Recorder
from sinkscope.trace import MANIFEST, TraceWriter


def read_text_file(path: str | os.PathLike) -> list[str]:
    """Prompts from a UTF-8 file, one per line; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise SinkscopeError(f"text file {path} does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise SinkscopeError(f"{path} is not UTF-8 text (line {line}, byte {exc.start}): {exc.reason}") from exc
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise SinkscopeError(f"{path} holds no prompts (every line is blank)")
    return prompts


def prompt_id(index: int, text: str) -> str:
    """Stable sample id: input position plus a content hash, so a resumed run never mixes up prompts."""
    return f"{index:05d}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:8]}"


def parse_attention_maps(spec: str | None) -> list[tuple[int, int]]:
    """`"5:0,12:3"` -> [(5, 0), (12, 3)]."""
    if not spec:
        return []
    pairs = []
    for item in spec.split(","):
        try:
            layer, head = item.strip().split(":")
            pairs.append((int(layer), int(head)))
        except ValueError as exc:
            raise SinkscopeError(f"--attention-maps: '{item}' is not LAYER:HEAD (for example 5:0,12:3)") from exc
    return pairs


def parse_layers(spec: str | None) -> list[int]:
    """`"3,5"` -> [3, 5]."""
    if not spec:
        return []
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError as exc:
        raise SinkscopeError(f"--hidden-states: '{spec}' is not a comma-separated list of layers") from exc


def encode_with_bos(tokenizer, text: str, max_length: int | None) -> list[int]:
    """Token ids of `text` that start with BOS (added when the tokenizer does not add it itself)."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids[:max_length] if max_length else ids


def check_context(model, texts: Sequence[str], ids: Sequence[str], encoded: dict[str, list[int]],
                  max_length: int | None) -> None:
    """Refuse, before anything is recorded, a prompt longer than the model's context (`max_position_embeddings`):
    its positions past the context are ones the model never saw in training, and the forward of a very long one
    runs for hours on a CPU (100,000 words took more than 5 minutes without a sign of progress)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    context = getattr(config, "max_position_embeddings", None)
    if not isinstance(context, int) or context < 2:
        return
    for i, (sid, text) in enumerate(zip(ids, texts, strict=True)):
        n = len(encoded.get(sid, ()))
        if n > context:
            preview = text[:40] + ("..." if len(text) > 40 else "")
            hint = (f"a --max-length of at most {context:,}" if max_length is not None
                    else f"--max-length {context} to truncate it")
            raise SinkscopeError(f"prompt {i + 1} of {len(texts)} (sample id {sid}, {preview!r}) is {n:,} tokens "
                                 f"with BOS, longer than the model's context of {context:,} "
                                 f"(max_position_embeddings): pass {hint}, or shorten it")


def existing_ids(out: Path, manifest: dict, resume: bool) -> set[str]:
    """Sample ids already in the trace at `out` (checked against `manifest`); a non-empty trace needs `resume`."""
    if not (out / MANIFEST).exists():
        return set()
    done = TraceWriter(out, manifest).sample_ids
    if done and not resume:
        raise TraceError(f"{out} already holds {len(done)} samples; pass --resume to continue it, "
                         "or choose a new --out")
    return done


def finish(out: Path) -> None:
    """After a recording run: write the trace's index (trace.columns), which a resumed run rewrites."""
    from sinkscope.trace.columns import write_index

    if (out / MANIFEST).is_file():
        write_index(out)


def record_texts(
    model,
    tokenizer,
    texts: Sequence[str],
    out: str | os.PathLike,
    batch_size: int = 1,
    attention_maps: Sequence[tuple[int, int]] = (),
    hidden_states: Sequence[int] = (),
    resume: bool = False,
    max_length: int | None = None,
    config: dict | None = None,
    progress: Callable | None = None,
) -> tuple[int, int]:
    """Record `texts` into the trace at `out`; return (recorded, skipped because already in the trace).

    Samples are appended after every batch, so an interrupted run keeps what finished; `resume=True` skips
    the ids already present (a non-empty trace without `resume` is an error, so nothing is overwritten).
    """
    out = Path(out)
    ids = [prompt_id(i, t) for i, t in enumerate(texts)]
    done = existing_ids(out, Recorder(model, attention_maps, hidden_states).manifest(config), resume)
    todo = [(sid, t) for sid, t in zip(ids, texts, strict=True) if sid not in done]
    encoded_all = {sid: encode_with_bos(tokenizer, t, max_length) for sid, t in todo}
    check_context(model, texts, ids, encoded_all, max_length)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    recorded = 0
    with Recorder(model, attention_maps, hidden_states, tokenizer=tokenizer) as rec:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            encoded = [encoded_all[sid] for sid, _ in batch]
            width = max(len(e) for e in encoded)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, e in enumerate(encoded):
                input_ids[row, : len(e)] = torch.tensor(e)
                mask[row, : len(e)] = 1
            rec.annotate_next(sample_ids=[sid for sid, _ in batch], extra=[{"text": t} for _, t in batch])
            with torch.no_grad():
                model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False)
            rec.save(out, config)
            recorded += len(batch)
            if progress is not None:
                progress(len(batch))
    finish(out)
    return recorded, len(texts) - len(todo)


def record_avsr(model, dataset, out: str | os.PathLike, batch_size: int = 4,
                attention_maps: Sequence[tuple[int, int]] = (), hidden_states: Sequence[int] = (),
                resume: bool = False, config: dict | None = None, progress: Callable | None = None,
                decode: bool = True, max_new_tokens: int = 24) -> tuple[int, int]:
    """Record AVSR samples (prompt + reference transcript, teacher-forced) with their segments and tokens. With
    `decode`, each sample's `extra` also holds the model's greedy hypothesis and its WER and CER against the
    reference (decoded before recording, without the recorder's hooks)."""
    from torch.utils.data import DataLoader

    from sinkscope.data.dataset import collate

    out = Path(out)
    items = list(range(len(dataset)))
    done = existing_ids(out, Recorder(model.llm, attention_maps, hidden_states).manifest(config), resume)
    todo = [i for i in items if dataset.items[i].id not in done]
    loader = DataLoader(torch.utils.data.Subset(dataset, todo), batch_size=batch_size, collate_fn=collate)
    recorded = 0
    for batch in loader:
        if batch is None:
            continue
        extra = [{"transcript": t, "mode": model.cfg.mode} for t in batch["transcripts"]]
        if decode:  # greedy hypothesis and its WER, before the recorder's hooks go on (they refuse cached decoding)
            from sinkscope.eval import score

            hyps = model.generate(batch, max_new_tokens=max_new_tokens)
            for info, hyp in zip(extra, hyps, strict=True):
                result = score([info["transcript"]], [hyp])
                info.update(hypothesis=hyp, wer=result["wer"], cer=result["cer"])
        with Recorder(model.llm, attention_maps, hidden_states, routing=getattr(model, "mome", None)) as rec, \
                torch.no_grad():
            built = model.build(batch)
            lengths = built["attention_mask"].sum(dim=1).tolist()
            rec.annotate_next(sample_ids=batch["ids"], tokens=[t[:k] for t, k in zip(built["tokens"], lengths,
                                                                                     strict=True)],
                              segments=built["segments"], extra=extra,
                              token_ids=[t[:k] for t, k in zip(built["token_ids"], lengths, strict=True)])
            model.llm(inputs_embeds=built["inputs_embeds"], attention_mask=built["attention_mask"])
        rec.save(out, config)
        recorded += len(batch["ids"])
        if progress is not None:
            progress(len(batch["ids"]))
    finish(out)
    return recorded, len(items) - len(todo)


@dataclass
class RecordConfig:
    """`sinkscope record`: text prompts through an LLM, or AV utterances through a trained AVSR model."""

    out: str = ""
    model: str = "smollm2-135m"  # text recording: a known name, a .gguf file, an HF directory or a cached hub id
    text: tuple[str, ...] = ()
    text_file: str | None = None
    max_length: int | None = None  # text recording: truncate prompts to this many tokens
    checkpoint: str | None = None  # AV recording: a training run, an export, or `demo`
    data: str | None = None  # AV recording: the corpus
    split: str = "test"
    n: int | None = None  # the first N prompts or utterances
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 1
    attention_maps: str | None = None  # "5:0,12:3"
    hidden_states: str | None = None  # "3,5"
    resume: bool = False
    rate: str | None = None  # AV recording of a Matryoshka (MoME) model: "K_a,K_v", "K_a" (ASR) or "K_v" (VSR)

    def __post_init__(self) -> None:
        if not self.out:
            raise ValueError("out is required (--out DIR)")
        if self.batch_size < 1 or (self.n is not None and self.n < 1):
            raise ValueError("batch_size and n must be >= 1")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, not {self.max_length}")
        if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be cpu, cuda, cuda:N or mps, not {self.device!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, not {self.dtype!r}")
        if self.checkpoint is not None:
            if self.data is None:
                raise ValueError("a checkpoint needs data: the corpus to record (--data DIR)")
            text_only = [name for name, given in (("model", self.model != "smollm2-135m"), ("text", bool(self.text)),
                                                  ("text_file", self.text_file is not None),
                                                  ("max_length", self.max_length is not None)) if given]
            if text_only:
                raise ValueError(f"{text_only} apply to text recording only; with a checkpoint the model is the "
                                 "checkpoint's and the inputs are the corpus utterances (--data)")
            if self.dtype != "float32":
                raise ValueError("AV recording runs in float32 (the encoders take float32 features); "
                                 f"dtype {self.dtype!r} is for text recording")
        elif self.rate is not None:
            raise ValueError("rate is for AV recording of a Matryoshka checkpoint (--checkpoint RUN)")
        elif self.data is not None:
            raise ValueError("data is for AV recording: give a checkpoint (--checkpoint RUN or demo) as well")
        if self.rate is not None and not re.fullmatch(r"\d+(,\d+)?", str(self.rate)):
            raise ValueError(f"rate must be K_a,K_v (AVSR), K_a (ASR) or K_v (VSR), e.g. 16,5; not {self.rate!r}")


def _device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SinkscopeError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise SinkscopeError(f"--device {name!r} is not a device (cpu, cuda or cuda:N)") from exc


@releases_locks
def run_record(cfg: RecordConfig, progress: Callable | None = None, total: Callable | None = None) -> dict:
    """Record as `cfg` says; writes config.yaml, run.json and results.json into the trace directory too.
    `total(n)` is told how many samples the run covers; `progress(k)` after every batch."""
    from sinkscope.config import claim_output, to_dict, write_results, write_run_files

    device = _device(cfg.device)
    for i, text in enumerate(cfg.text or [], 1):
        if not text.strip():
            raise SinkscopeError(f"--text {i} (config field text[{i - 1}]) is empty: a prompt needs at least one "
                                 "non-blank character")
    claim_output(cfg.out, "record", markers=(MANIFEST,))
    maps, layers = parse_attention_maps(cfg.attention_maps), parse_layers(cfg.hidden_states)
    config = to_dict(cfg)
    if cfg.checkpoint is not None:
        from sinkscope.models.avsr import dataset_for
        from sinkscope.models.pretrained import load_trained

        model, run_config = load_trained(cfg.checkpoint)
        if cfg.rate is not None:
            from sinkscope.eval import rate_index

            model.set_rate(rate_index(model.cfg, cfg.rate))
        dataset = dataset_for(model.cfg, cfg.data, cfg.split, limit=cfg.n)
        config.update(model=f"{model.cfg.llm} + AVSR ({cfg.checkpoint})", mode=model.cfg.mode,
                      compression=model.cfg.compression, k_audio=model.rate[0], k_video=model.rate[1],
                      decorrelation=run_config.get("decorrelation"))
        if total is not None:
            total(len(dataset))
        recorded, skipped = record_avsr(model.to(device), dataset, cfg.out, batch_size=cfg.batch_size,
                                        attention_maps=maps, hidden_states=layers, resume=cfg.resume, config=config,
                                        progress=progress)
    else:
        from sinkscope.models.llm import load_llm

        texts = list(cfg.text) + (read_text_file(cfg.text_file) if cfg.text_file else [])
        if not texts:
            raise SinkscopeError("give at least one --text or a --text-file")
        texts = texts[: cfg.n] if cfg.n else texts
        if total is not None:
            total(len(texts))
        llm, tokenizer = load_llm(cfg.model, device=str(device), dtype=cfg.dtype)
        recorded, skipped = record_texts(llm, tokenizer, texts, cfg.out, batch_size=cfg.batch_size,
                                         attention_maps=maps, hidden_states=layers, resume=cfg.resume,
                                         max_length=cfg.max_length, config=config, progress=progress)
    results = {"recorded": recorded, "skipped_existing": skipped, "samples": recorded + skipped}
    write_run_files(cfg.out, "record", cfg)
    write_results(cfg.out, results, cfg)
    return results
