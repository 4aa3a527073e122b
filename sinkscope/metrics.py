"""Every metric formula of sinkscope, in one place (see ARCHITECTURE.md, "Metric definitions").

Functions take numpy arrays (or anything `np.asarray` takes, torch CPU tensors included) and return numpy /
pandas; this module does not import torch. The recorder's streamed torch reductions of the same quantities live
in `sinkscope.record.reduce`, and the decorrelation loss in `sinkscope.train.losses`.
Layer index l = 0..L-1 is the output of decoder block l (residual stream after the block, before the final norm).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import combinations

import numpy as np
import pandas as pd

from sinkscope.arguments import nonnegative, unit_interval, whole_number

SINK_EPS = 0.3
"""Default epsilon of Sink^eps (Gu et al., ICLR 2025)."""
SINK_HEAD_FRACTION = 0.5
"""A token is a sink in layer l when at least this share of the layer's heads have alpha > eps."""
MIN_QUERIES = 8
"""A key seen by fewer queries than this (the last positions of a sample, whose alpha averages over one to a few
queries) is never called a sink; its alpha is still stored."""
MASSIVE_ABS = 100.0
"""Massive activation: |h| >= MASSIVE_ABS ... (Sun et al., 2024)."""
MASSIVE_REL = 1000.0
"""... and |h| >= MASSIVE_REL * median(|h[l]|)."""

MASSIVE_COLUMNS = ["layer", "token", "feature", "value", "attn_share", "mlp_share", "attn_out", "mlp_out",
                   "origin_layer"]


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, converted without importing torch here
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def _checked(x, name: str, shape: str, ndim: int | tuple[int, ...]) -> np.ndarray:
    """`x` as a numeric numpy array of `ndim` dimensions (one of them, for a tuple), else a ValueError that names
    the argument, the shape it needs and the shape it got: these reference formulas are what users recompute the
    recorder's numbers with, and a wrong layout would otherwise return a plausible array of the wrong numbers."""
    a = _np(x)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise ValueError(f"{name} must be a numeric array {shape}, not {a.dtype} values")
    if a.ndim not in ((ndim,) if isinstance(ndim, int) else ndim):
        raise ValueError(f"{name} must be {shape}; got shape {a.shape}")
    return a


def check_sink_rule(eps=SINK_EPS, head_fraction=SINK_HEAD_FRACTION, min_queries=MIN_QUERIES) -> None:
    """Refuse a sink rule that cannot mean anything: `eps` and `head_fraction` are shares in [0, 1] (alpha is a
    mean of probabilities), `min_queries` a whole number >= 1 (an eps of 2 found no sink, one of -1 made every
    token a sink, and both were returned as findings)."""
    unit_interval(eps, "eps")
    unit_interval(head_fraction, "head_fraction")
    whole_number(min_queries, "min_queries")


# ----------------------------------------------------------------------------------------------- attention sinks
def attention_received(attn) -> np.ndarray:
    """Attention received by each key (Gu et al., "When Attention Sink Emerges", ICLR 2025).

    `alpha[..., k] = (1 / (T - k)) * sum_{i >= k} A[..., i, k]` for post-softmax causal attention `A[..., T, T]`
    (query i, key k, 0-based): the mean attention that key k gets from the queries that can see it.
    This is the reference computation from full maps; the recorder computes the same quantity streamed.
    """
    a = _checked(attn, "attn", "[..., T, T] (post-softmax maps, query rows, key columns)", (2, 3, 4, 5))
    if a.shape[-1] != a.shape[-2]:
        raise ValueError(f"attn must be [..., T, T] (square: a forward's queries against its keys); got shape "
                         f"{a.shape}")
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise ValueError("attn must hold post-softmax probabilities in [0, 1]; it has non-finite values")
    if a.size and (a.min() < 0 or a.max() > 1 + 1e-3):
        raise ValueError(f"attn must hold post-softmax probabilities in [0, 1]; its values span [{a.min():.3g}, "
                         f"{a.max():.3g}] (pre-softmax scores?)")
    t = a.shape[-1]
    col = np.tril(a).sum(axis=-2)
    return (col / np.arange(t, 0, -1, dtype=np.float64)).astype(np.float32)


def sink_rate(alpha, eps: float = SINK_EPS) -> np.ndarray:
    """`Sink_k^eps = 100 * mean_{l,h} 1[alpha[l,h,k] > eps]` for `alpha[L,H,T]`; returns `[T]` percentages."""
    check_sink_rule(eps)
    a = _checked(alpha, "alpha", "[L, H, T]", 3)
    return (100.0 * (a > eps).mean(axis=(0, 1))).astype(np.float32)


def sink_layers(alpha, eps: float = SINK_EPS, head_fraction: float = SINK_HEAD_FRACTION,
                min_queries: int = MIN_QUERIES) -> np.ndarray:
    """`[L, T]` bool: token k is a sink in layer l when the share of heads with `alpha > eps` is >= head_fraction
    and at least `min_queries` queries see it (T - k >= min_queries)."""
    check_sink_rule(eps, head_fraction, min_queries)
    a = _checked(alpha, "alpha", "[L, H, T]", 3)
    flags = (a > eps).mean(axis=1) >= head_fraction
    t = a.shape[-1]
    flags[:, max(0, t - min_queries + 1):] = False
    return flags


def sink_tokens(
    alpha,
    eps: float = SINK_EPS,
    head_fraction: float = SINK_HEAD_FRACTION,
    min_layers: int = 1,
    layers: Sequence[int] | None = None,
    min_queries: int = MIN_QUERIES,
) -> list[int]:
    """Token indices that are sinks (see `sink_layers`) in at least `min_layers` of the given layers."""
    flags = sink_layers(alpha, eps, head_fraction, min_queries)
    if layers is not None:
        flags = flags[list(layers)]
    return [int(k) for k in np.flatnonzero(flags.sum(axis=0) >= min_layers)]


# ------------------------------------------------------------------------------------------ massive activations
def massive_threshold(median, abs_threshold: float = MASSIVE_ABS, rel_threshold: float = MASSIVE_REL):
    """The magnitude an entry must reach to be massive: `max(abs_threshold, rel_threshold * median)`."""
    return np.maximum(np.asarray(median) * rel_threshold, abs_threshold)


def massive_mask(h, median, abs_threshold: float = MASSIVE_ABS, rel_threshold: float = MASSIVE_REL):
    """Massive activations (Sun et al., "Massive Activations in Large Language Models", 2024).

    An entry `h[l,t,j]` is massive when `|h| >= abs_threshold` AND `|h| >= rel_threshold * median(|h[l]|)`, the
    median taken over all tokens and features of that sample's layer-l hidden state. `h` is `[T, D]` with a
    scalar median, or `[L, T, D]` with `median[L]`.
    """
    thr = massive_threshold(_np(median), nonnegative(abs_threshold, "abs_threshold"),
                            nonnegative(rel_threshold, "rel_threshold"))
    h = _checked(h, "h", "[T, D] or [L, T, D]", (2, 3))
    if thr.size != (h.shape[0] if h.ndim == 3 else 1):
        raise ValueError(f"median must have one value per layer of h {h.shape}; got {thr.size}")
    return np.abs(h) >= (np.reshape(thr, (-1, 1, 1)) if h.ndim == 3 else thr)


def find_massive(
    hidden,
    attn_out=None,
    mlp_out=None,
    abs_threshold: float = MASSIVE_ABS,
    rel_threshold: float = MASSIVE_REL,
) -> pd.DataFrame:
    """Massive-activation records from full residual streams `hidden[L, T, D]` (block outputs).

    With the blocks' `attn_out[L,T,D]` and `mlp_out[L,T,D]`, each record also splits that layer's update
    `h[l] - h[l-1] = attn_out[l] + mlp_out[l]` into `attn_share` and `mlp_share` (they sum to 1), and names the
    `origin_layer`: the first layer where that (token, feature) is massive. Columns: `MASSIVE_COLUMNS`.
    """
    h = _checked(hidden, "hidden", "[L, T, D] (block outputs)", 3).astype(np.float32)
    for name, part in (("attn_out", attn_out), ("mlp_out", mlp_out)):
        if part is not None and _np(part).shape != h.shape:
            raise ValueError(f"{name} must have hidden's shape {h.shape}; got {_np(part).shape}")
    med = np.median(np.abs(h).reshape(h.shape[0], -1), axis=1)
    layer, token, feature = np.nonzero(massive_mask(h, med, abs_threshold, rel_threshold))
    a = _np(attn_out)[layer, token, feature] if attn_out is not None else np.full(len(layer), np.nan)
    m = _np(mlp_out)[layer, token, feature] if mlp_out is not None else np.full(len(layer), np.nan)
    return massive_frame(layer, token, feature, h[layer, token, feature], a, m)


def massive_frame(layer, token, feature, value, attn_out, mlp_out) -> pd.DataFrame:
    """Assemble massive records (one row per massive entry) and derive shares and origin layers, sorted by
    (layer, token, feature). Columns: `MASSIVE_COLUMNS`."""
    return massive_frames(np.zeros(np.size(layer), dtype=np.int32), layer, token, feature, value, attn_out, mlp_out,
                          n_samples=1)[0]


def massive_frames(sample, layer, token, feature, value, attn_out, mlp_out, n_samples: int) -> list[pd.DataFrame]:
    """`massive_frame` for a batch at once: the records of samples `0..n_samples-1` (`sample` names each record's)
    are sorted, their shares and origin layers (per sample, token and feature) derived in one pass of numpy
    calls, then one DataFrame is cut into one per sample (row slices, copy-on-write). The recorder calls it once
    per forward: 32 frames built one by one cost 4.4 ms on this CPU against 0.8 ms cut from one (pandas 3.1), and
    with the unpacking change of session 12 the host work after a forward of 32 samples fell from 38 to 23 ms on
    the H200 machine (issue 16)."""
    sample = np.asarray(sample, dtype=np.int64).reshape(-1)
    layer = np.asarray(layer, dtype=np.int32).reshape(-1)
    token = np.asarray(token, dtype=np.int32).reshape(-1)
    feature = np.asarray(feature, dtype=np.int32).reshape(-1)
    cols = {"value": value, "attn_out": attn_out, "mlp_out": mlp_out}
    cols = {name: np.asarray(x, dtype=np.float32).reshape(-1) for name, x in cols.items()}
    order = np.lexsort((feature, token, layer, sample))
    sample, layer, token, feature = sample[order], layer[order], token[order], feature[order]
    cols = {name: x[order] for name, x in cols.items()}
    update = cols["attn_out"].astype(np.float64) + cols["mlp_out"].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        attn_share = (cols["attn_out"] / update).astype(np.float32)
        mlp_share = (cols["mlp_out"] / update).astype(np.float32)
    # each record's (sample, token, feature) as one integer: np.unique over 1-D keys, 6x faster than over the
    # stacked triples (axis=1 sorts structured rows: 176 against 28 us at 100 records)
    key = np.ravel_multi_index((sample, token, feature), (n_samples, int(token.max()) + 1, int(feature.max()) + 1)
                               ) if len(sample) else np.zeros(0, dtype=np.int64)
    _, group = np.unique(key, return_inverse=True)
    group = group.reshape(-1)
    origin = np.full(group.max() + 1 if len(group) else 0, np.iinfo(np.int32).max, dtype=np.int32)
    np.minimum.at(origin, group, layer)  # the first layer at which each (sample, token, feature) is massive
    table = {"layer": layer, "token": token, "feature": feature, "value": cols["value"], "attn_share": attn_share,
             "mlp_share": mlp_share, "attn_out": cols["attn_out"], "mlp_out": cols["mlp_out"],
             "origin_layer": origin[group]}
    # the index given: pandas then skips inferring it from the columns (133 against 205 us a frame, pandas 3.1)
    frame = pd.DataFrame({name: table[name] for name in MASSIVE_COLUMNS}, index=pd.RangeIndex(len(layer)))
    if n_samples == 1:
        return [frame]
    bounds = np.searchsorted(sample, np.arange(n_samples + 1))  # row slices: 5x cheaper than a frame per sample
    frames = []
    for a, e in zip(bounds[:-1], bounds[1:], strict=True):
        part = frame.iloc[a:e]  # a new frame (copy-on-write): its index is set in place of reset_index's copy
        part.index = pd.RangeIndex(e - a)  # (22 against 58 us a sample)
        frames.append(part)
    return frames


def massive_feature_sets(massive: pd.DataFrame, tokens: Iterable[int] | None = None) -> dict[int, set[int]]:
    """Massive feature set of each layer: feature indices massive on any of `tokens` (all tokens if None)."""
    df = massive if tokens is None else massive[massive["token"].isin(list(tokens))]
    return {int(layer): set(map(int, g["feature"])) for layer, g in df.groupby("layer")}


def jaccard(a: set, b: set) -> float:
    """`|a & b| / |a | b|`; undefined (NaN) for two empty sets: tokens without massive features do not share a
    feature set."""
    union = a | b
    return float("nan") if not union else len(a & b) / len(union)


def mean_pairwise_jaccard(sets: Sequence[set]) -> float:
    """Mean Jaccard over the pairs of sets where it is defined (not both empty): consistency of massive features
    across tokens or prompts; NaN when no pair is defined."""
    values = [v for v in (jaccard(a, b) for a, b in combinations(sets, 2)) if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def origin_table(massive: pd.DataFrame) -> pd.DataFrame:
    """One row per massive (token, feature): its origin layer and the attention/MLP split of the jump there."""
    at_origin = massive[massive["layer"] == massive["origin_layer"]]
    cols = ["token", "feature", "origin_layer", "value", "attn_share", "mlp_share"]
    return at_origin[cols].sort_values(["token", "feature"], ignore_index=True)


# ------------------------------------------------------------------------------------------------ cosine to BOS
def bos_cosine(hidden) -> np.ndarray:
    """`cos(h[l, 0], h[l, t])` for every layer l and token t of `hidden[L, T, D]`; returns `[L, T]`."""
    h = _checked(hidden, "hidden", "[L, T, D] (block outputs; a single layer as hidden[None])", 3).astype(np.float64)
    h0 = h[:, :1, :]
    num = (h * h0).sum(-1)
    den = np.maximum(np.linalg.norm(h, axis=-1) * np.linalg.norm(h0, axis=-1), 1e-8)
    return (num / den).astype(np.float32)


def cosine_by_segment(bos_cos, segments: Sequence[tuple[str, int, int]], frame: bool = True
                      ) -> pd.DataFrame | dict[str, np.ndarray]:
    """Mean cos-to-BOS per layer (rows) and segment name (columns); segments of one name are pooled.
    `frame=False` returns the columns as a dict of `[L]` arrays (cheaper inside loops over samples)."""
    c = _np(bos_cos)
    names: dict[str, list[int]] = {}
    for name, start, end in segments:
        names.setdefault(name, []).extend(range(start, end))
    data = {name: c[:, idx].mean(axis=1) for name, idx in names.items() if idx}
    if not frame:
        return data
    frame = pd.DataFrame(data)
    frame.index.name = "layer"
    return frame
