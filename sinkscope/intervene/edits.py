"""The tensor edits behind every intervention, written once; `hf.py` (HF forward hooks) and `lens.py`
(TransformerLens 4 hooks) only decide where they apply.

Positions are one list for the whole batch or one list per sample. `past` is the number of positions before the
tensor's first one (a KV cache during generation), so positions always index the whole sequence.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


def per_sample(positions, batch: int) -> list[list[int]]:
    """One list of positions per sample, from one shared list or from a list of lists."""
    positions = list(positions)
    if positions and isinstance(positions[0], Iterable):
        if len(positions) != batch:
            raise ValueError(f"{len(positions)} position lists for a batch of {batch}")
        return [list(map(int, p)) for p in positions]
    return [list(map(int, positions))] * batch


def in_call(positions: Sequence[int], past: int, t: int) -> list[int]:
    """The positions among this call's `t` tokens, as indices into them."""
    return [p - past for p in positions if past <= p < past + t]


def set_features(h: torch.Tensor, features: Iterable[int], tokens: Sequence | None, value: float,
                 past: int = 0) -> torch.Tensor:
    """`h[b, tokens, features] = value` in place on a residual stream `h[B, T, D]` (every position when `tokens`
    is None); returns `h`."""
    f = torch.as_tensor(list(features), dtype=torch.long, device=h.device)
    if tokens is None:
        h[..., f] = value
        return h
    for i, toks in enumerate(per_sample(tokens, h.shape[0])):
        local = torch.as_tensor(in_call(toks, past, h.shape[1]), dtype=torch.long, device=h.device)
        if len(local):
            rows = h[i, local]
            rows[:, f] = value
            h[i, local] = rows
    return h


def rotate_toward(h: torch.Tensor, ref: torch.Tensor, cosine: float) -> torch.Tensor:
    """`h` turned in the plane of `h` and `ref` so that cos(h', ref) = `cosine`, with |h'| = |h|."""
    r = ref / ref.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    along = (h * r).sum(-1, keepdim=True)
    ortho = h - along * r
    u = ortho / ortho.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return h.norm(dim=-1, keepdim=True) * (cosine * r + (1 - cosine**2) ** 0.5 * u)


def rotate(h: torch.Tensor, tokens: Sequence, reference: int | Sequence[int], cosine: float,
           past: int = 0) -> torch.Tensor:
    """Turn the states of `tokens` in `h[B, T, D]` (in place) to `cosine` with the state of `reference` (one
    position, or one per sample), keeping their norms; returns `h`."""
    if not -1.0 <= cosine <= 1.0:
        raise ValueError(f"cosine must lie in [-1, 1], not {cosine}")
    b, t = h.shape[:2]
    refs = [int(reference)] * b if isinstance(reference, int) else [int(r) for r in reference]
    for i, toks in enumerate(per_sample(tokens, b)):
        local, ref = in_call(toks, past, t), refs[i] - past
        if not local or not 0 <= ref < t:
            continue
        idx = torch.as_tensor(local, device=h.device)
        h[i, idx] = rotate_toward(h[i, idx].float(), h[i, ref].float()[None], cosine).to(h.dtype)
    return h


def blocked(keys: Sequence, batch: int, tq: int, tk: int, past: int, keep_self: bool,
            device: torch.device | str) -> torch.Tensor:
    """`[B, 1, tq, tk]` bool, True where a query must not attend to a key of `keys`: the attention-score entries
    that blocking sets to -inf before the softmax (a query keeps itself when `keep_self`)."""
    out = torch.zeros(batch, 1, tq, tk, dtype=torch.bool, device=device)
    q_pos = torch.arange(past, past + tq, device=device)
    for i, cols in enumerate(per_sample(keys, batch)):
        cols = [c for c in cols if 0 <= c < tk]
        if not cols:
            continue
        col = torch.as_tensor(cols, device=device)
        hit = torch.ones(tq, len(cols), dtype=torch.bool, device=device)
        if keep_self:
            hit &= q_pos[:, None] != col[None, :]
        out[i, 0][:, col] = hit
    return out


def apply_block(scores: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """Scores (or an additive mask) with the blocked entries at the dtype's minimum; a boolean mask (True =
    may attend) with them False."""
    if scores.dtype == torch.bool:
        return scores & ~block
    return scores.masked_fill(block, torch.finfo(scores.dtype).min)
