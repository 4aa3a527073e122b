"""The tensor edits behind every intervention, written once; `hf.py` (HF forward hooks) and `lens.py`
(TransformerLens 4 hooks) only decide where they apply.

Positions are one list for the whole batch or one list per sample. `past` is the number of positions before the
tensor's first one (a KV cache during generation), so positions always index the whole sequence.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch


def checked_positions(positions, what: str):
    """`positions` (one list, or one list per sample) after checking that every entry is a whole number >= 0:
    positions index the whole sequence from 0 (BOS), so a negative one would never match and the edit would
    silently do nothing. Returns them as lists of ints. Raises ValueError naming `what` and the entry."""
    positions = list(positions)
    nested = bool(positions) and _is_list(positions[0])
    rows = [list(p) for p in positions] if nested else [positions]
    for row in rows:
        for p in row:
            if isinstance(p, bool) or not isinstance(p, (int, np.integer)) and not (
                    isinstance(p, torch.Tensor) and p.numel() == 1 and not p.is_floating_point()):
                raise ValueError(f"{what}: {p!r} is not a position (a whole number >= 0)")
            if int(p) < 0:
                raise ValueError(f"{what}: position {int(p)} is negative; positions count from 0 (BOS) over the "
                                 "whole sequence, so write n - 1 for the last of n tokens")
    return [[int(p) for p in row] for row in rows] if nested else [int(p) for p in rows[0]]


def checked_reference(reference) -> int | list[int]:
    """A rotation's reference position (one for every sample) or positions (one per sample), checked as
    `checked_positions` checks positions."""
    if _is_list(reference):
        return checked_positions(reference, "reference")
    return checked_positions([reference], "reference")[0]


def _is_list(x) -> bool:
    """Whether `x` is a list of positions rather than one (a 0-d tensor iterates, but is one number)."""
    return isinstance(x, Iterable) and not isinstance(x, str) and not (isinstance(x, torch.Tensor) and x.dim() == 0)


def checked_features(features: Iterable[int], hidden: int | None = None) -> list[int]:
    """`features` as ints after checking that each is a feature index in [0, hidden) (>= 0 when `hidden` is not
    known yet): a negative index would wrap around to another feature, one past the end would fail mid-forward."""
    out = []
    for f in features:
        if isinstance(f, bool) or not isinstance(f, (int, np.integer)):
            raise ValueError(f"features: {f!r} is not a feature index (a whole number)")
        if f < 0 or (hidden is not None and f >= hidden):
            bound = f"[0, {hidden})" if hidden is not None else ">= 0"
            raise ValueError(f"features: {int(f)} is outside the residual stream's features, {bound}")
        out.append(int(f))
    if not out:
        raise ValueError("features: the list is empty; name at least one feature to set")
    return out


def per_sample(positions, batch: int) -> list[list[int]]:
    """One list of positions per sample, from one shared list or from a list of lists."""
    positions = list(positions)
    if positions and _is_list(positions[0]):
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
    f = torch.as_tensor(checked_features(features, h.shape[-1]), dtype=torch.long, device=h.device)
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
