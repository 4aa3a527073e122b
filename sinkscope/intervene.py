"""Interventions on an HF decoder, as context managers built on forward hooks (no model code is forked).

    with ablate_features(model, layer=11, features=[507], tokens=[0]):
        out = model(input_ids=ids, labels=ids)          # the massive activation is set to 0 after block 11

`ablate_features` sets chosen features of the residual stream (a block's output) to a value, for chosen
token positions or for all of them; the change propagates to every later layer. `block_attention` stops queries
from attending to chosen key positions (sinks) in chosen layers. `rotate_states` turns the residual state of
chosen tokens, in the plane it spans with a reference token's state (BOS), to a set cosine with that state while
keeping its norm. `next_token_loss` measures the effect on the language-modelling loss of a batch.

Positions are indices into the (padded) input of the forward pass. They may be one list for the whole batch or
one list per sample. The hooks follow a KV cache, so they also hold during `generate()`: blocked keys stay
blocked for every generated token, and states are changed where the prefix is computed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext

import pandas as pd
import torch
from torch import nn

from sinkscope.record.recorder import find_decoder_layers, find_hf_model


@contextmanager
def ablate_features(model: nn.Module, layer: int, features: Iterable[int], tokens: Sequence | None = None,
                    value: float = 0.0) -> Iterator[None]:
    """Set `h[layer, tokens, features] = value` in the residual stream after decoder block `layer`; `tokens` is
    one list of positions, one list per sample, or None for every position."""
    _, blocks = find_decoder_layers(find_hf_model(model))
    feats = torch.as_tensor(list(features), dtype=torch.long)

    def edit(h: torch.Tensor, past: int) -> torch.Tensor:
        f = feats.to(h.device)
        if tokens is None:
            h[..., f] = value
            return h
        for i, toks in enumerate(_per_sample(tokens, h.shape[0])):
            local = torch.as_tensor(_in_call(toks, past, h.shape[1]), dtype=torch.long, device=h.device)
            if len(local):
                rows = h[i, local]
                rows[:, f] = value
                h[i, local] = rows
        return h

    with _edit_block_output(blocks, layer, edit):
        yield


@contextmanager
def _edit_block_output(blocks, layer: int, edit: Callable[[torch.Tensor, int], torch.Tensor]) -> Iterator[None]:
    """Replace the residual stream after block `layer` by `edit(h.clone(), past)`, where `past` is the number of
    cached positions before this call's tokens (0 without a KV cache), so positions index the whole sequence."""
    (layer,) = _layers(blocks, [layer])

    def hook(module, args, kwargs, output):
        h = output[0] if isinstance(output, tuple) else output
        h = edit(h.clone(), max(0, _past_length(kwargs, layer) - h.shape[1]))
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = blocks[layer].register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _in_call(positions: list[int], past: int, t: int) -> list[int]:
    """The positions that this call's `t` tokens hold, as indices into them."""
    return [p - past for p in positions if past <= p < past + t]


def _per_sample(positions, batch: int) -> list[list[int]]:
    """One list of positions per sample, from one shared list or from a list of lists."""
    positions = list(positions)
    if positions and isinstance(positions[0], Iterable):
        if len(positions) != batch:
            raise ValueError(f"{len(positions)} position lists for a batch of {batch}")
        return [list(map(int, p)) for p in positions]
    return [list(map(int, positions))] * batch


def _past_length(kwargs: dict, layer: int) -> int:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return int(cache.get_seq_length(layer)) if cache is not None else 0


def _layers(blocks, layers: Iterable[int] | None) -> list[int]:
    chosen = range(len(blocks)) if layers is None else [int(x) for x in layers]
    bad = [x for x in chosen if not -len(blocks) <= x < len(blocks)]
    if bad:
        raise ValueError(f"layers {bad} out of range for a model of {len(blocks)} layers")
    return [x % len(blocks) for x in chosen]


@contextmanager
def block_attention(model: nn.Module, keys: Sequence, layers: Iterable[int] | None = None,
                    keep_self: bool = True) -> Iterator[None]:
    """No query attends to the key positions `keys` in decoder layers `layers` (all by default).

    The attention mask handed to each chosen layer's attention is edited (SDPA, eager or the sinkscope
    recorder function alike), so the attention freed from those keys is spread over the others by the softmax.
    `keep_self` lets a blocked token still attend to itself, so that no row is left with nothing to attend to.
    """
    _, blocks = find_decoder_layers(find_hf_model(model))

    def make_hook(layer: int):
        def pre(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            b, tq = hidden.shape[:2]
            mask = kwargs.get("attention_mask")
            past = _past_length(kwargs, layer)
            if mask is None:
                tk = past + tq
                q_pos = torch.arange(past, past + tq, device=hidden.device)
                allowed = torch.arange(tk, device=hidden.device)[None, :] <= q_pos[:, None]
                mask = allowed[None, None].expand(b, 1, tq, tk).clone()
            else:
                mask = mask.expand(b, *mask.shape[1:]).clone()
                past = mask.shape[-1] - tq
            q_pos = torch.arange(past, past + tq, device=hidden.device)
            for i, cols in enumerate(_per_sample(keys, b)):
                cols = [c for c in cols if c < mask.shape[-1]]
                if not cols:
                    continue
                col = torch.as_tensor(cols, device=hidden.device)
                hit = torch.ones(tq, len(cols), dtype=torch.bool, device=hidden.device)
                if keep_self:
                    hit &= q_pos[:, None] != col[None, :]
                rows = mask[i, :, :, col]  # [heads or 1, tq, n]
                blocked = False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min
                mask[i, :, :, col] = torch.where(hit, torch.as_tensor(blocked, dtype=mask.dtype,
                                                                       device=hidden.device), rows)
            kwargs["attention_mask"] = mask
            return args, kwargs

        return pre

    with ExitStack() as stack:
        for layer in _layers(blocks, layers):
            attn = blocks[layer].self_attn
            stack.callback(attn.register_forward_pre_hook(make_hook(layer), with_kwargs=True).remove)
        yield


def rotate_toward(h: torch.Tensor, ref: torch.Tensor, cosine: float) -> torch.Tensor:
    """`h` turned in the plane of `h` and `ref` so that cos(h', ref) = `cosine`, with |h'| = |h|."""
    r = ref / ref.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    along = (h * r).sum(-1, keepdim=True)
    ortho = h - along * r
    u = ortho / ortho.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return h.norm(dim=-1, keepdim=True) * (cosine * r + (1 - cosine**2) ** 0.5 * u)


@contextmanager
def rotate_states(model: nn.Module, layer: int, tokens: Sequence, reference: int | Sequence[int] = 0,
                  cosine: float = 0.0) -> Iterator[None]:
    """After decoder block `layer`, turn the residual state of `tokens` to cosine `cosine` with the state of the
    `reference` token (BOS by default; one position for all samples or one per sample), keeping its norm.
    `cosine=0` makes sink states orthogonal to BOS; the change propagates to every later layer."""
    if not -1.0 <= cosine <= 1.0:
        raise ValueError(f"cosine must lie in [-1, 1], not {cosine}")
    _, blocks = find_decoder_layers(find_hf_model(model))

    def edit(h: torch.Tensor, past: int) -> torch.Tensor:
        b, t = h.shape[:2]
        refs = [int(reference)] * b if isinstance(reference, int) else [int(r) for r in reference]
        for i, toks in enumerate(_per_sample(tokens, b)):
            local, ref = _in_call(toks, past, t), refs[i] - past
            if not local or not 0 <= ref < t:
                continue
            idx = torch.as_tensor(local, device=h.device)
            h[i, idx] = rotate_toward(h[i, idx].float(), h[i, ref].float()[None], cosine).to(h.dtype)
        return h

    with _edit_block_output(blocks, layer, edit):
        yield


@torch.no_grad()
def next_token_loss(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> float:
    """Mean next-token cross-entropy (nats) over the real tokens of a batch."""
    labels = input_ids.clone()
    if attention_mask is not None:
        labels[attention_mask == 0] = -100
    return float(model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss)


# --------------------------------------------------------------------------------------------- AVSR decoding
@torch.no_grad()
def decode_under(model, loader, intervention: Callable | None = None, max_new_tokens: int = 24,
                 recorder_kwargs: dict | None = None) -> pd.DataFrame:
    """Greedy-decode every batch of `loader` with the AVSR `model`, under an intervention chosen per batch.

    For each batch the prefix (everything before the transcript, left-padded as for generation) is first
    recorded with `Recorder`, so the intervention can target this batch's own sinks and massive features:
    `intervention(records, offsets)` gets the per-sample `SampleRecord`s (positions as in the unpadded sample)
    and the left-padding offsets (add them to a position to index the padded batch), and returns a context
    manager (or None for no intervention). Returns one row per utterance: id, reference, hypothesis."""
    from sinkscope.record import Recorder
    from sinkscope.train.avsr import decode

    rows = []
    for batch in loader:
        if batch is None:
            continue
        built = model.build(batch, with_transcript=False, padding_side="left")
        lengths = built["attention_mask"].sum(1).tolist()
        offsets = [built["attention_mask"].shape[1] - int(n) for n in lengths]
        with Recorder(model.llm, **(recorder_kwargs or {})) as rec:
            rec.annotate_next(sample_ids=batch["ids"], tokens=[t[:n] for t, n in zip(built["tokens"], lengths,
                                                                                    strict=True)],
                              segments=built["segments"])
            model.llm(inputs_embeds=built["inputs_embeds"], attention_mask=built["attention_mask"])
        context = intervention(rec.samples, offsets) if intervention is not None else None
        with context if context is not None else nullcontext():
            hyps = decode(model, batch, max_new_tokens, built=built)
        rows += [{"id": i, "reference": r, "hypothesis": h}
                 for i, r, h in zip(batch["ids"], batch["transcripts"], hyps, strict=True)]
    return pd.DataFrame(rows, columns=["id", "reference", "hypothesis"])
