"""Record traces of text prompts (the engine behind `sinkscope record`)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

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


def existing_ids(out: Path, manifest: dict, resume: bool) -> set[str]:
    """Sample ids already in the trace at `out` (checked against `manifest`); a non-empty trace needs `resume`."""
    if not (out / MANIFEST).exists():
        return set()
    done = TraceWriter(out, manifest).sample_ids
    if done and not resume:
        raise TraceError(f"{out} already holds {len(done)} samples; pass --resume to continue it, "
                         "or choose a new --out")
    return done


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
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    recorded = 0
    with Recorder(model, attention_maps, hidden_states, tokenizer=tokenizer) as rec:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            encoded = [encode_with_bos(tokenizer, t, max_length) for _, t in batch]
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
    return recorded, len(texts) - len(todo)


def record_avsr(model, dataset, out: str | os.PathLike, n: int | None = None, batch_size: int = 4,
                attention_maps: Sequence[tuple[int, int]] = (), hidden_states: Sequence[int] = (),
                resume: bool = False, config: dict | None = None, progress: Callable | None = None) -> tuple[int, int]:
    """Record AVSR samples (prompt + reference transcript, teacher-forced) with their segments and tokens."""
    from torch.utils.data import DataLoader

    from sinkscope.data.dataset import collate

    out = Path(out)
    items = list(range(len(dataset) if n is None else min(n, len(dataset))))
    done = existing_ids(out, Recorder(model.llm, attention_maps, hidden_states).manifest(config), resume)
    todo = [i for i in items if dataset.items[i].id not in done]
    loader = DataLoader(torch.utils.data.Subset(dataset, todo), batch_size=batch_size, collate_fn=collate)
    recorded = 0
    with Recorder(model.llm, attention_maps, hidden_states) as rec:
        for batch in loader:
            if batch is None:
                continue
            with torch.no_grad():
                built = model.build(batch)
                lengths = built["attention_mask"].sum(dim=1).tolist()
                rec.annotate_next(sample_ids=batch["ids"], tokens=[t[:k] for t, k in zip(built["tokens"], lengths,
                                                                                         strict=True)],
                                  segments=built["segments"],
                                  extra=[{"transcript": t, "mode": model.cfg.mode} for t in batch["transcripts"]])
                model.llm(inputs_embeds=built["inputs_embeds"], attention_mask=built["attention_mask"])
            rec.save(out, config)
            recorded += len(batch["ids"])
            if progress is not None:
                progress(len(batch["ids"]))
    return recorded, len(items) - len(todo)
