"""Training losses beyond cross-entropy (torch, differentiable).

`decorrelation_loss` is the sinks paper's term (ARCHITECTURE.md, "Decorrelation loss"); `context_mask` picks the
tokens it averages over from an AVSR sample's segments.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sinkscope.segments import OUTPUT_SEGMENTS


def context_mask(segments: Sequence[Sequence[tuple[str, int, int]]], width: int) -> torch.Tensor:
    """`[B, width]` bool, True on the non-output tokens (delimiters, modality tokens, prompt) of each sample:
    False on BOS, transcript, EOS and padding."""
    mask = torch.zeros(len(segments), width, dtype=torch.bool)
    for i, spans in enumerate(segments):
        for name, start, end in spans:
            if name not in OUTPUT_SEGMENTS:
                mask[i, start:end] = True
    return mask


def decorrelation_loss(hidden_states: Sequence[torch.Tensor], context: torch.Tensor) -> torch.Tensor:
    """The decorrelation term of the sinks paper's code: the mean over layers 1..L-1 of the mean over non-output
    tokens of `cos(h[l, b, 0], h[l, b, i])^2`.

    `hidden_states` is HF's tuple (embeddings, block 0, ..., last block normed), so `hidden_states[1:-1]` are the
    layers 1..L-1 of ARCHITECTURE.md (neither the embeddings nor the final normed output). `context[B, T]` is
    True on the non-output tokens i >= 1 (see `context_mask`). The training loss is `CE + lambda * this`
    (lambda = 0 turns it off; the paper's code default is 1e4).
    """
    layers = hidden_states[1:-1]
    if not layers:
        raise ValueError("decorrelation_loss needs at least 3 hidden states (embeddings, blocks, final)")
    mask = context.to(layers[0].device).float().clone()
    mask[:, 0] = 0.0  # BOS itself never counts
    per_layer = []
    for h in layers:  # [B, T, D]
        cos = torch.nn.functional.cosine_similarity(h[:, :1, :], h, dim=-1, eps=1e-8)  # [B, T]
        per_layer.append(((cos**2) * mask).sum() / mask.sum().clamp(min=1.0))
    return torch.stack(per_layer).mean()
