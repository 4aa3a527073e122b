"""Aggregations over a whole trace (tables for `sinkscope summary`, the app and the notebooks)."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pandas as pd

from sinkscope.metrics import SINK_EPS, cosine_by_segment


def layer_summary(trace, eps: float = SINK_EPS, top: int = 2) -> pd.DataFrame:
    """One row per layer: the tokens that receive most attention, Sink^eps of position 0, the massive
    features (with how many samples show each), and mean cos-to-BOS per segment (columns `cos:<segment>`)."""
    n_layers = trace.manifest["n_layers"]
    top_tokens: list[Counter] = [Counter() for _ in range(n_layers)]
    top_alpha: list[defaultdict] = [defaultdict(list) for _ in range(n_layers)]
    sink0 = np.zeros(n_layers)
    features: list[Counter] = [Counter() for _ in range(n_layers)]
    cos_frames = []
    for s in trace:
        alpha = np.asarray(s.attention_received)  # [L, H, T]
        mean_alpha = alpha.mean(axis=1)  # [L, T]
        sink0 += (alpha[:, :, 0] > eps).mean(axis=1) * 100.0
        for layer in range(n_layers):
            for k in np.argsort(-mean_alpha[layer])[:top]:
                key = f"{s.tokens[k]!r}@{k}"
                top_tokens[layer][key] += 1
                top_alpha[layer][key].append(float(mean_alpha[layer, k]))
        for layer, group in s.massive.groupby("layer"):
            features[int(layer)].update(set(map(int, group["feature"])))
        cos_frames.append(cosine_by_segment(s.bos_cosine, s.segments))
    n = max(1, len(trace))
    cos = pd.concat(cos_frames).groupby(level=0).mean() if cos_frames else pd.DataFrame(index=range(n_layers))
    rows = []
    for layer in range(n_layers):
        best = top_tokens[layer].most_common(top)
        rows.append({
            "layer": layer,
            "top_sinks": "  ".join(f"{k} {np.mean(top_alpha[layer][k]):.2f} ({c})" for k, c in best),
            "sink_rate_pos0": sink0[layer] / n,
            "massive_features": " ".join(f"{f} ({c})" for f, c in sorted(features[layer].items())),
            **{f"cos:{seg}": float(cos.loc[layer, seg]) for seg in cos.columns if seg != "bos"},
        })
    return pd.DataFrame(rows)
