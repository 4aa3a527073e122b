"""Interventions on an HF decoder, as context managers built on forward hooks (no model code is forked).

    with ablate_features(model, layer=11, features=[507], tokens=[0]):
        out = model(input_ids=ids, labels=ids)          # the massive activation is set to 0 after block 11

`ablate_features` sets chosen features of the residual stream (a block's output) to a value, for chosen
token positions or for all of them; the change propagates to every later layer. `block_attention` stops queries
from attending to chosen key positions (sinks) in chosen layers. `rotate_states` turns the residual state of
chosen tokens, in the plane it spans with a reference token's state (BOS), to a set cosine with that state while
keeping its norm. `next_token_loss` measures the effect on the language-modelling loss of a batch.

The edits themselves are in `edits.py` (shared with the TransformerLens hooks of `lens.py`). The hooks follow a KV
cache, so they also hold during `generate()`: blocked keys stay blocked for every generated token, and states
are changed where the prefix is computed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager

import numpy as np
import torch
from torch import nn

from sinkscope.intervene.edits import (
    _is_list,
    apply_block,
    blocked,
    checked_features,
    checked_positions,
    checked_reference,
    rotate,
    set_features,
)
from sinkscope.record.blocks import find_decoder_layers, find_hf_model


def _blocks(model: nn.Module) -> nn.ModuleList:
    return find_decoder_layers(find_hf_model(model))[1]


def _layers(blocks, layers: Iterable[int] | None) -> list[int]:
    chosen = range(len(blocks)) if layers is None else list(layers)
    odd = [x for x in chosen if isinstance(x, bool) or not isinstance(x, (int, np.integer))]
    if odd:
        raise ValueError(f"layers must be whole numbers, not {odd[0]!r}")
    bad = [x for x in chosen if not -len(blocks) <= x < len(blocks)]
    if bad:
        raise ValueError(f"layers {bad} out of range for a model of {len(blocks)} layers")
    return [x % len(blocks) for x in chosen]


def _past_length(kwargs: dict, layer: int) -> int:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return int(cache.get_seq_length(layer)) if cache is not None else 0


class _Reach:
    """How far the forwards inside an intervention reached (their last position + 1, KV cache included), so that
    positions the edit never met are named when the intervention ends: a mistyped position (or one past every
    sample) would otherwise change nothing without a word."""

    def __init__(self, what: str, positions, extra: tuple[str, list[int]] | None = None):
        self.what, self.end, self.extra = what, 0, extra
        flat = positions if positions is None else [p for part in positions
                                                     for p in (part if _is_list(part) else [part])]
        self.positions = sorted(set(map(int, flat))) if flat is not None else []

    def saw(self, end: int) -> None:
        self.end = max(self.end, int(end))

    def report(self, stacklevel: int = 4) -> None:
        if self.end == 0:  # no forward ran inside the intervention
            return
        for what, positions in ((self.what, self.positions), *([self.extra] if self.extra else [])):
            missed = [p for p in positions if p >= self.end]
            if missed:
                warnings.warn(f"{what} {missed} never came up: the forwards inside the intervention had at most "
                              f"{self.end} positions, so nothing was changed there", stacklevel=stacklevel)


@contextmanager
def _edit_block_output(model: nn.Module, layer: int, edit: Callable[[torch.Tensor, int], torch.Tensor],
                       reach: _Reach | None = None) -> Iterator[None]:
    """Replace the residual stream after block `layer` by `edit(h.clone(), past)`, where `past` is the number of
    cached positions before this call's tokens (0 without a KV cache)."""
    blocks = _blocks(model)
    (layer,) = _layers(blocks, [layer])

    def hook(module, args, kwargs, output):
        h = output[0] if isinstance(output, tuple) else output
        past = max(0, _past_length(kwargs, layer) - h.shape[1])
        if reach is not None:
            reach.saw(past + h.shape[1])
        h = edit(h.clone(), past)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = blocks[layer].register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
    if reach is not None:
        reach.report(stacklevel=6)  # the user's `with` line, past two context managers


@contextmanager
def ablate_features(model: nn.Module, layer: int, features: Iterable[int], tokens: Sequence | None = None,
                    value: float = 0.0) -> Iterator[None]:
    """Set `h[layer, tokens, features] = value` in the residual stream after decoder block `layer`; `tokens` is
    one list of positions, one list per sample, or None for every position."""
    config = find_hf_model(model).config
    hidden = getattr(config.get_text_config() if hasattr(config, "get_text_config") else config, "hidden_size", None)
    features = checked_features(features, hidden if isinstance(hidden, int) else None)
    tokens = None if tokens is None else checked_positions(tokens, "tokens")
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not np.isfinite(value):
        raise ValueError(f"value must be a finite number, not {value!r}")
    reach = None if tokens is None else _Reach("tokens", tokens)
    with _edit_block_output(model, layer, lambda h, past: set_features(h, features, tokens, value, past), reach):
        yield


@contextmanager
def rotate_states(model: nn.Module, layer: int, tokens: Sequence, reference: int | Sequence[int] = 0,
                  cosine: float = 0.0) -> Iterator[None]:
    """After decoder block `layer`, turn the residual state of `tokens` to cosine `cosine` with the state of the
    `reference` token (BOS by default; one position for all samples or one per sample), keeping its norm.
    `cosine=0` makes sink states orthogonal to BOS; the change propagates to every later layer."""
    if not -1.0 <= cosine <= 1.0:
        raise ValueError(f"cosine must lie in [-1, 1], not {cosine}")
    tokens = checked_positions(tokens, "tokens")
    reference = checked_reference(reference)
    reach = _Reach("tokens", tokens, ("reference", [reference] if isinstance(reference, int) else list(reference)))
    with _edit_block_output(model, layer, lambda h, past: rotate(h, tokens, reference, cosine, past), reach):
        yield


@contextmanager
def block_attention(model: nn.Module, keys: Sequence, layers: Iterable[int] | None = None,
                    keep_self: bool = True) -> Iterator[None]:
    """No query attends to the key positions `keys` in decoder layers `layers` (all by default).

    The attention mask handed to each chosen layer's attention is edited (SDPA, eager or the sinkscope
    recorder function alike), so the attention freed from those keys is spread over the others by the softmax.
    `keep_self` lets a blocked token still attend to itself, so that no row is left with nothing to attend to.
    """
    blocks = _blocks(model)
    keys = checked_positions(keys, "keys")
    reach = _Reach("keys", keys)

    def make_hook(layer: int):
        def pre(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            b, tq = hidden.shape[:2]
            mask = kwargs.get("attention_mask")
            if mask is None:  # causal attention without a mask tensor: build the causal one
                past = _past_length(kwargs, layer)
                q_pos = torch.arange(past, past + tq, device=hidden.device)
                allowed = torch.arange(past + tq, device=hidden.device)[None, :] <= q_pos[:, None]
                mask = allowed[None, None].expand(b, 1, tq, past + tq)
            mask = mask.expand(b, *mask.shape[1:])
            reach.saw(mask.shape[-1])
            past = mask.shape[-1] - tq
            kwargs["attention_mask"] = apply_block(mask, blocked(keys, b, tq, mask.shape[-1], past, keep_self,
                                                                 hidden.device))
            return args, kwargs

        return pre

    with ExitStack() as stack:
        for layer in _layers(blocks, layers):
            attn = blocks[layer].self_attn
            stack.callback(attn.register_forward_pre_hook(make_hook(layer), with_kwargs=True).remove)
        yield
    reach.report()


@torch.no_grad()
def next_token_loss(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> float:
    """Mean next-token cross-entropy (nats) over the real tokens of a batch."""
    labels = input_ids.clone()
    if attention_mask is not None:
        labels[attention_mask == 0] = -100
    if not (labels[:, 1:] != -100).any():  # the loss predicts each real token from those before it
        raise ValueError(f"next_token_loss needs a real token after the first one; got input_ids of shape "
                         f"{tuple(input_ids.shape)}" + ("" if attention_mask is None else
                                                        f" with {int((attention_mask != 0).sum())} real tokens"))
    return float(model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss)
