"""Interventions on an HF decoder, as context managers built on forward hooks (no model code is forked).

    with ablate_features(model, layer=11, features=[507], tokens=[0]):
        out = model(input_ids=ids, labels=ids)          # the massive activation is set to 0 after block 11

`ablate_features` sets chosen features of the residual stream (a block's output) to a value, for chosen
token positions or for all of them; the change propagates to every later layer. `next_token_loss` measures
the effect on the language-modelling loss of a batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from sinkscope.record.recorder import find_decoder_layers, find_hf_model


@contextmanager
def ablate_features(model: nn.Module, layer: int, features: Iterable[int], tokens: Iterable[int] | None = None,
                    value: float = 0.0) -> Iterator[None]:
    """Set `h[layer, tokens, features] = value` in the residual stream after decoder block `layer`."""
    _, blocks = find_decoder_layers(find_hf_model(model))
    feats = torch.as_tensor(list(features), dtype=torch.long)
    toks = None if tokens is None else torch.as_tensor(list(tokens), dtype=torch.long)

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h.clone()
        index = (slice(None), slice(None) if toks is None else toks.to(h.device))
        sub = h[index]  # [B, T', D]
        sub[..., feats.to(h.device)] = value
        h[index] = sub
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = blocks[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def next_token_loss(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> float:
    """Mean next-token cross-entropy (nats) over the real tokens of a batch."""
    labels = input_ids.clone()
    if attention_mask is not None:
        labels[attention_mask == 0] = -100
    return float(model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss)
