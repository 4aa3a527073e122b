"""Aggregations over a whole trace (tables for `sinkscope summary`, the app and the notebooks)."""

from __future__ import annotations

from collections import Counter, defaultdict
from itertools import pairwise

import numpy as np
import pandas as pd

from sinkscope.arguments import index_into, unit_interval, whole_number
from sinkscope.metrics import (
    MIN_QUERIES,
    SINK_EPS,
    SINK_HEAD_FRACTION,
    check_sink_rule,
    jaccard,
    origin_table,
    sink_layers,
    sink_tokens,
)
from sinkscope.trace.columns import TraceColumns, token_segments, trace_columns


def missing_features(sample, mlp: bool = False) -> str | None:
    """Why `sample` cannot show per-feature views (`top_activations`, `ranked_features`, `feature_values`), or
    None: the per-token top features and per-feature maxima are optional trace fields, absent from traces recorded
    before sinkscope kept them."""
    names = (("mlp_feature_max_abs", "mlp_top_features", "mlp_top_values") if mlp else
             ("feature_max_abs", "top_features", "top_values"))
    absent = [n for n in names if getattr(sample, n, None) is None]
    if not absent:
        return None
    return (f"sample {sample.sample_id} holds no {', '.join(absent)} (optional trace fields; this trace was recorded "
            "without them): record it again with this sinkscope for the per-feature views")


def _needs_features(sample, mlp: bool = False) -> None:
    why = missing_features(sample, mlp)
    if why is not None:
        raise ValueError(why)


def layer_summary(trace, eps: float = SINK_EPS, top: int = 2, min_queries: int = MIN_QUERIES) -> pd.DataFrame:
    """One row per layer: the tokens that receive most attention among the keys seen by at least `min_queries`
    queries (as in the sink rule: the last keys' alpha is an average over a few queries, which put the last
    tokens of an 8,192-token prompt at the top of the early layers), Sink^eps of position 0, the massive features
    (with how many samples show each), and mean cos-to-BOS per segment (columns `cos:<segment>`). A sample
    shorter than `min_queries` tokens names no top token."""
    check_sink_rule(eps, min_queries=min_queries)
    top = whole_number(top, "top")
    n_layers = trace.manifest["n_layers"]
    c = trace_columns(trace)
    n = max(1, len(trace))
    sink0 = (c.alpha_first > eps).mean(axis=2).sum(axis=0) * 100.0 / n  # [L]
    # the `top` tokens of each (sample, layer) by head-mean alpha, among the keys that `min_queries` queries see,
    # as (layer, token) pairs in sample order
    seen = c.length - c.position >= min_queries  # [N] keys that enough queries see (as `TraceColumns.sink_flags`)
    best = []
    for a, b in pairwise(c.start):
        keys = a + np.flatnonzero(seen[a:b])
        if keys.size:
            best.append(keys[np.argsort(-c.mean_alpha[:, keys], axis=1)[:, :top]])
    layer_of = np.concatenate([np.repeat(np.arange(n_layers), x.shape[1]) for x in best] or [np.zeros(0, int)])
    token_of = np.concatenate([x.ravel() for x in best] or [np.zeros(0, int)])
    picks = pd.DataFrame({"layer": layer_of, "key": [f"{c.token[k]!r}@{c.position[k]}" for k in token_of],
                          "alpha": c.mean_alpha[layer_of, token_of].astype(float)})
    counted = picks.groupby(["layer", "key"], sort=False)["alpha"].agg(["size", "mean"]).reset_index()
    tops = {layer: "  ".join(f"{row.key} {row.mean:.2f} ({row.size})" for row in group.sort_values(
                "size", ascending=False, kind="stable").head(top).itertuples())
            for layer, group in counted.groupby("layer", sort=False)}
    features: list[Counter] = [Counter() for _ in range(n_layers)]
    records = trace_massive(trace)
    for (layer, feature), count in records.groupby(["layer", "feature"])["sample"].nunique().items():
        features[int(layer)][int(feature)] = int(count)
    _, segments, means = _group_means(c, c.segment != "", c.bos_cosine)  # per (sample, segment): [L]
    cos = {seg: means[segments == seg].mean(axis=0) for seg in dict.fromkeys(segments)}
    rows = []
    for layer in range(n_layers):
        rows.append({
            "layer": layer,
            "top_sinks": tops.get(layer, ""),
            "sink_rate_pos0": float(sink0[layer]),
            "massive_features": " ".join(f"{f} ({k})" for f, k in sorted(features[layer].items())),
            **{f"cos:{seg}": float(values[layer]) for seg, values in cos.items() if seg != "bos"},
        })
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------ per sample
def sink_rate_by_segment(alpha, segments, eps: float = SINK_EPS) -> pd.DataFrame:
    """Per layer (rows) and segment (columns): 100 * share of (head, token) pairs in the segment with alpha > eps."""
    check_sink_rule(eps)
    a = np.asarray(alpha)
    if a.ndim != 3:
        raise ValueError(f"alpha must be [L, H, T]; got shape {a.shape}")
    above = (a > eps).mean(axis=1)  # [L, T] share of heads
    names = token_segments(segments, a.shape[-1])
    data = {seg: 100.0 * above[:, names == seg].mean(axis=1) for seg in dict.fromkeys(n for n, _, _ in segments)
            if (names == seg).any()}
    frame = pd.DataFrame(data)
    frame.index.name = "layer"
    return frame


def top_activations(sample, k: int = 3) -> pd.DataFrame:
    """Per layer: the k largest |h| entries over all tokens and features, and median |h| (Sun et al., Fig. 1)."""
    k = whole_number(k, "k")
    _needs_features(sample)
    values = np.abs(np.asarray(sample.top_values))  # [L, T, K]; per-token top features hold the global top-k
    flat = values.reshape(values.shape[0], -1)
    top = -np.sort(-flat, axis=1)[:, :k]
    frame = pd.DataFrame({f"top{i + 1}": top[:, i] for i in range(top.shape[1])})
    frame["median"] = np.asarray(sample.median_abs)
    frame.index.name = "layer"
    return frame


def ranked_features(sample, k: int = 16, mlp: bool = False) -> np.ndarray:
    """The `k` features with the largest max |h| (or |mlp_out|) over layers and tokens, largest first."""
    k = whole_number(k, "k")
    _needs_features(sample, mlp)
    values = np.asarray(sample.mlp_feature_max_abs if mlp else sample.feature_max_abs)  # [L, D]
    return np.argsort(-values.max(axis=0), kind="stable")[:k]


def feature_values(sample, features, mlp: bool = False) -> np.ndarray:
    """|h| (or |mlp_out|) of `features` at every layer and token, `[L, T, F]`. Exact at layers whose full hidden
    state the trace holds; elsewhere from the recorded top-k features of each token, NaN where a feature was not
    among a token's top k (then its |h| is below the token's k-th largest)."""
    width = getattr(sample, "hidden_size", None)  # a trace's sample; an in-memory one: the recorded maxima's width
    if width is None and getattr(sample, "feature_max_abs", None) is not None:
        width = np.shape(sample.feature_max_abs)[-1]
    given = np.asarray(features).reshape(-1)
    if given.size and not np.issubdtype(given.dtype, np.integer):
        raise ValueError(f"features must be whole feature indices, not {given.dtype} values {given[:3].tolist()}")
    bad = given[(given < 0) | (given >= (width if width is not None else np.iinfo(np.int64).max))]
    if bad.size:
        raise ValueError(f"feature {int(bad[0])} is outside the hidden state's {width} features (0-{width - 1})"
                         if width is not None else f"feature {int(bad[0])} is not a feature index (they start at 0)")
    idx = sample.mlp_top_features if mlp else sample.top_features  # [L, T, k]
    val = sample.mlp_top_values if mlp else sample.top_values
    hidden = {} if mlp else sample.hidden_states
    if idx is None or val is None:  # an older trace, recorded without per-token top features
        if not hidden:  # nor a full hidden state to read them from
            _needs_features(sample, mlp)
        n_layers = np.shape(sample.attention_received)[0]
        idx = np.full((n_layers, len(sample.tokens), 0), -1, dtype=np.int64)
        val = np.zeros(idx.shape, dtype=np.float32)
    idx, val = np.asarray(idx), np.abs(np.asarray(val, dtype=np.float32))
    features = given.astype(np.int64)
    hit = idx[..., None, :] == features[:, None]  # [L, T, F, k]
    out = np.where(hit.any(-1), (val[..., None, :] * hit).sum(-1), np.nan).astype(np.float32)
    for layer, h in hidden.items():
        out[layer] = np.abs(np.asarray(h, dtype=np.float32)[:, features])
    return out


def sample_findings(sample, eps: float = SINK_EPS, head_fraction: float = SINK_HEAD_FRACTION,
                    min_queries: int = MIN_QUERIES) -> dict:
    """What a reader wants first: sink tokens (with how many layers), massive features and their origin."""
    flags = sink_layers(sample.attention_received, eps, head_fraction, min_queries)  # [L, T]
    counts = flags.sum(axis=0)
    names = token_segments(sample.segments, len(sample.tokens))
    sinks = [{"position": int(k), "token": sample.tokens[k], "segment": names[k], "layers": int(counts[k])}
             for k in np.argsort(-counts) if counts[k] > 0]
    massive = sample.massive
    features = (massive.groupby("feature").agg(first_layer=("layer", "min"), layers=("layer", "nunique"),
                                               max_value=("value", lambda v: float(np.abs(v).max())))
                .reset_index().sort_values("max_value", ascending=False)) if len(massive) else pd.DataFrame()
    return {"sinks": sinks, "massive_features": features, "origin": origin_table(massive) if len(massive) else
            pd.DataFrame()}


def sink_token_jaccard(sample, eps: float = SINK_EPS, min_queries: int = MIN_QUERIES) -> tuple[list[str], np.ndarray]:
    """Jaccard of the massive-feature sets (all layers) between the tokens that are sinks or carry massive
    activations. Returns token labels and the square matrix."""
    massive = sample.massive
    tokens = sorted(set(map(int, massive["token"])) | set(sink_tokens(sample.attention_received, eps,
                                                                                    min_queries=min_queries)))
    sets = {t: set(map(int, massive.loc[massive["token"] == t, "feature"])) for t in tokens}
    labels = [f"{t}: {sample.tokens[t]!r}" for t in tokens]
    matrix = np.array([[jaccard(sets[a], sets[b]) for b in tokens] for a in tokens], dtype=float)
    return labels, matrix.reshape(len(tokens), len(tokens))


# ------------------------------------------------------------------------------------------------ whole trace
def dataset_sinks(trace, eps: float = SINK_EPS, head_fraction: float = SINK_HEAD_FRACTION,
                  min_queries: int = MIN_QUERIES) -> pd.DataFrame:
    """Every (sample, token) that is a sink in at least one layer: position, relative position, segment."""
    c = trace_columns(trace, head_fraction)
    counts = c.sink_flags(eps, min_queries).sum(axis=0)
    k = np.flatnonzero(counts)
    return pd.DataFrame({"sample": c.ids[c.sample[k]], "position": c.position[k],
                         "relative_position": c.position[k] / np.maximum(1, c.length[k] - 1),
                         "segment": c.segment[k], "token": c.token[k], "layers": counts[k]},
                        columns=["sample", "position", "relative_position", "segment", "token", "layers"])


def trace_massive(trace) -> pd.DataFrame:
    """Every massive-activation record of the trace in one table, with its `sample` id (one concatenation, so
    that trace-level statistics are single group-bys rather than one per sample)."""
    c = trace_columns(trace)
    table = {name: column for name, column in c.massive.items() if name != "sample"}
    table["sample"] = c.ids[c.massive["sample"]] if len(c.ids) else np.zeros(0, dtype=object)
    return pd.DataFrame(table)


def dataset_massive_features(trace) -> pd.DataFrame:
    """How many samples show each massive feature index, and its largest |value|."""
    m = trace_massive(trace)
    frame = m[["feature", "sample"]].assign(max_abs=np.abs(m["value"].to_numpy(dtype=float)))
    return (frame.groupby("feature").agg(samples=("sample", "nunique"), max_abs=("max_abs", "max"))
            .reset_index().sort_values("samples", ascending=False, ignore_index=True, kind="stable"))


def dataset_massive_records(trace) -> pd.DataFrame:
    """Every massive-activation record of the trace, with its sample id and token text."""
    table = trace_massive(trace)
    if not len(table):
        return pd.DataFrame(columns=["sample", "layer", "token", "token_text", "feature", "value"])
    texts = {s.sample_id: np.asarray(s.tokens, dtype=object) for s in trace}
    token = table["token"].to_numpy(dtype=int)
    token_text = np.empty(len(table), dtype=object)
    for sid, where in table.groupby("sample", sort=False).indices.items():
        token_text[where] = texts[sid][token[where]]
    table["token_text"] = token_text
    first = ["sample", "layer", "token", "token_text", "feature", "value"]
    return table[first + [c for c in table.columns if c not in first]]


def dataset_cosine(trace, layer: int) -> pd.DataFrame:
    """cos-to-BOS of every token at one layer, with its segment, over all samples (position 0 excluded)."""
    layer = index_into(layer, int(trace.manifest["n_layers"]), "layer", "layers")
    c = trace_columns(trace)
    where = c.position > 0
    return pd.DataFrame({"sample": c.ids[c.sample[where]], "segment": c.segment[where],
                         "cos": c.bos_cosine[layer, where]})


SEGMENT_GROUPS = {"delimiter": ("audio_start", "audio_end", "video_start", "video_end"), "audio": ("audio",),
                  "video": ("video",), "prompt": ("prompt",)}
"""The non-BOS input segments an experiment row reports on (transcript and EOS are the model's output)."""


def sink_statistics(trace, eps: float = SINK_EPS, head_fraction: float = SINK_HEAD_FRACTION,
                    min_layer_share: float = 0.5) -> dict:
    """A trace in a few numbers, for experiment rows (the decorrelation sweep):

    - `sinks_per_utt_<group>`: intermediate sinks per utterance by segment group (SEGMENT_GROUPS): non-BOS
      tokens that are sinks (`metrics.sink_layers`) in at least `min_layer_share` of the layers;
    - `cos_mid_<group>`, `cos_last_<group>`: mean cos-to-BOS of the group's tokens at the middle layer (L // 2)
      and the last layer (L - 1);
    - `massive_max`: the largest |massive activation|, `massive_max_segment` the segment of its token and
      `massive_on_non_bos` whether any massive activation sits on a token other than BOS;
    - `massive_features`: the massive feature indices, with the number of samples that show each.
    """
    check_sink_rule(eps, head_fraction)
    unit_interval(min_layer_share, "min_layer_share")
    n_layers = int(trace.manifest["n_layers"])
    mid, last = n_layers // 2, n_layers - 1
    sinks = {g: 0 for g in SEGMENT_GROUPS}
    cos = {(g, at): [] for g in SEGMENT_GROUPS for at in ("mid", "last")}
    peak, peak_segment, non_bos = 0.0, "", False
    features: Counter = Counter()
    for s in trace:
        names = token_segments(s.segments, len(s.tokens))
        share = sink_layers(s.attention_received, eps, head_fraction).mean(axis=0)  # [T]
        bos_cos = np.asarray(s.bos_cosine)
        for group, members in SEGMENT_GROUPS.items():
            idx = np.flatnonzero(np.isin(names, members))
            idx = idx[idx > 0]
            sinks[group] += int((share[idx] >= min_layer_share).sum())
            cos[(group, "mid")].extend(bos_cos[mid, idx].tolist())
            cos[(group, "last")].extend(bos_cos[last, idx].tolist())
        m = s.massive
        if len(m):
            values = np.abs(m["value"].to_numpy())
            k = int(values.argmax())
            if values[k] > peak:
                peak, peak_segment = float(values[k]), str(names[int(m["token"].iloc[k])])
            non_bos |= bool((m["token"] != 0).any())
            features.update(set(map(int, m["feature"])))
    n = max(1, len(trace))
    out = {"trace_samples": len(trace)}
    out.update({f"sinks_per_utt_{g}": sinks[g] / n for g in SEGMENT_GROUPS})
    out.update({f"cos_{at}_{g}": float(np.mean(v)) if v else float("nan") for (g, at), v in cos.items()})
    out.update(massive_max=peak, massive_max_segment=peak_segment, massive_on_non_bos=non_bos,
               massive_features=" ".join(f"{f}({c})" for f, c in features.most_common()))
    return out


# ------------------------------------------------------------------------------------------------ two traces
def trace_profile(trace, eps: float = SINK_EPS, head_fraction: float = SINK_HEAD_FRACTION,
                  min_queries: int = MIN_QUERIES) -> dict:
    """A trace summarised per layer over its samples, for comparing two traces that need not share a sample
    (decorrelation off vs on, one rate vs another, fp32 vs bf16). Each table has one row per (sample, layer[,
    segment]); `profile_mean` averages them with a spread.

    - `sink_rate`: share of a segment's tokens that are sinks (`metrics.sink_layers`) at a layer, in %;
    - `activations`: the largest |h| over tokens and the median |h| at a layer;
    - `cosine`: mean cos-to-BOS of a segment's tokens at a layer (BOS itself left out);
    - `sink_positions`: every sink (sample, position, relative position, segment), as `dataset_sinks`;
    - `massive_features`: per feature, the share of samples in which it is massive.
    """
    c = trace_columns(trace, head_fraction)
    n_layers = int(trace.manifest["n_layers"])
    layers = np.arange(n_layers)
    where = (c.position > 0) & (c.segment != "")  # BOS itself and uncovered positions left out
    groups, seg_names, rates = _group_means(c, where, c.sink_flags(eps, min_queries))
    _, _, coss = _group_means(c, where, c.bos_cosine)

    def per_layer(samples: np.ndarray, values: dict[str, np.ndarray], segments=None) -> pd.DataFrame:
        table = {"sample": np.repeat(c.ids[samples], n_layers), "layer": np.tile(layers, len(samples))}
        if segments is not None:
            table["segment"] = np.repeat(np.asarray(segments, dtype=object), n_layers)
        for name, array in values.items():
            table[name] = array.reshape(-1).astype(float)
        return pd.DataFrame(table)

    everyone = np.arange(len(trace))
    features = dataset_massive_features(trace)
    features["share"] = features["samples"] / max(1, len(trace))
    return {"sink_rate": per_layer(groups, {"value": 100.0 * rates}, seg_names),
            "activations": per_layer(everyone, {"top": c.top_abs, "median": c.median_abs}),
            "cosine": per_layer(groups, {"value": coss}, seg_names),
            "sink_positions": dataset_sinks(trace, eps, head_fraction, min_queries),
            "massive_features": features[["feature", "samples", "share", "max_abs"]],
            "samples": len(trace)}


def profile_mean(table: pd.DataFrame, value: str = "value", by: tuple[str, ...] = ("segment", "layer")) -> pd.DataFrame:
    """Mean, standard deviation and sample count of `value` over samples, per `by`."""
    return (table.groupby(list(by))[value].agg(mean="mean", std="std", n="count").reset_index()
            .fillna({"std": 0.0}))


def feature_set_overlap(a: pd.DataFrame, b: pd.DataFrame, min_share: float = 0.5) -> dict:
    """The massive features present in at least `min_share` of each trace's samples, and their Jaccard
    (undefined, NaN, when both sets are empty)."""
    set_a = set(map(int, a.loc[a["share"] >= min_share, "feature"]))
    set_b = set(map(int, b.loc[b["share"] >= min_share, "feature"]))
    return {"a": sorted(set_a), "b": sorted(set_b), "both": sorted(set_a & set_b), "jaccard": jaccard(set_a, set_b)}


# ------------------------------------------------------------------------------------------------ MoME experts
def expert_usage(trace, layer: int, eps: float = SINK_EPS, head_fraction: float = SINK_HEAD_FRACTION,
                 min_queries: int = MIN_QUERIES) -> pd.DataFrame:
    """For a MoME trace, the share of each segment's gate mass that each routed expert receives at `layer`
    (rows: segments, then `sinks`: the tokens that are sinks at this layer, whatever their segment; columns:
    experts; each row sums to 1) with the number of tokens behind each row in column `tokens`. Empty when the
    trace holds no router fields."""
    check_sink_rule(eps, head_fraction, min_queries)
    samples = list(trace)  # a Trace, or any samples of one
    if samples:
        layer = index_into(layer, np.shape(samples[0].attention_received)[0], "layer", "layers")
    mass: dict[str, Counter] = defaultdict(Counter)
    tokens: Counter = Counter()
    n_experts = 0
    for s in samples:
        ids, gates = s.router_ids, s.router_gates
        if ids is None or gates is None:
            continue
        ids, gates = np.asarray(ids)[layer], np.asarray(gates)[layer]  # [T, k]
        n_experts = max(n_experts, int(ids.max()) + 1)
        names = token_segments(s.segments, len(s.tokens))
        sinks = sink_layers(s.attention_received, eps, head_fraction, min_queries)[layer]
        for t in range(len(s.tokens)):
            rows = [names[t] or "(none)"] + (["sinks"] if sinks[t] else [])
            for row in rows:
                tokens[row] += 1
                for e, g in zip(ids[t], gates[t], strict=True):
                    mass[row][int(e)] += float(g)
    if not mass:
        return pd.DataFrame()
    order = [r for r in mass if r != "sinks"] + (["sinks"] if "sinks" in mass else [])
    table = pd.DataFrame([[mass[r][e] for e in range(n_experts)] for r in order], index=order,
                         columns=[f"expert {e}" for e in range(n_experts)])
    table = table.div(table.sum(axis=1), axis=0)
    table["tokens"] = [tokens[r] for r in order]
    return table


def _group_means(columns: TraceColumns, where: np.ndarray, values: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per (sample, segment) group of the tokens in `where`, in order of the group's first token: the sample
    index, the segment name and the `[G, L]` mean of `values[:, token]` over the group's tokens."""
    tokens = np.flatnonzero(where)
    if not len(tokens):
        return np.zeros(0, int), np.zeros(0, dtype=object), np.zeros((0, values.shape[0]))
    names, codes = np.unique(columns.segment[tokens].astype(str), return_inverse=True)
    key = columns.sample[tokens] * len(names) + codes
    keys, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # groups in order of first appearance, as a loop over samples
    counts = np.bincount(inverse, minlength=len(keys)).astype(float)
    sums = np.stack([np.bincount(inverse, weights=values[layer, tokens].astype(float), minlength=len(keys))
                     for layer in range(values.shape[0])], axis=1)  # [G, L]
    return keys[order] // len(names), names[keys[order] % len(names)].astype(object), (sums / counts[:, None])[order]
