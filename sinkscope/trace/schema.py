"""The trace schema: file names, format tag, schema version, array fields, and the in-memory sample record."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

FORMAT = "sinkscope-trace"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SAMPLES = "samples"
INDEX = "index.safetensors"
"""Optional, at the trace's root: every sample's per-token arrays side by side (`trace.columns`), a cache."""
REQUIRED_MANIFEST_FIELDS = ("format", "schema_version", "model", "n_layers", "n_heads", "hidden_size")
ARRAY_FIELDS = ("attention_received", "bos_cosine", "max_abs", "median_abs")
OPTIONAL_ARRAY_FIELDS = ("feature_max_abs", "mlp_feature_max_abs", "top_features", "top_values",
                         "mlp_top_features", "mlp_top_values", "router_ids", "router_gates", "token_ids")
"""Fields a sample may lack (older traces; `router_*` only for MoME models). Adding an optional field keeps the
schema version: readers of this version ignore tensors they do not know."""
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I32": np.int32, "I64": np.int64,
              "U8": np.uint8, "BOOL": np.bool_}


@dataclass
class SampleRecord:
    """One recorded sample in memory; the same fields as a sample read from a trace."""

    sample_id: str
    tokens: list[str]
    segments: list[tuple[str, int, int]]
    attention_received: np.ndarray  # [L, H, T] float32
    bos_cosine: np.ndarray  # [L, T] float32
    max_abs: np.ndarray  # [L, T] float32
    median_abs: np.ndarray  # [L] float32
    massive: pd.DataFrame  # MASSIVE_COLUMNS
    feature_max_abs: np.ndarray | None = None  # [L, D] max over tokens of |h|
    mlp_feature_max_abs: np.ndarray | None = None  # [L, D] max over tokens of |mlp_out|
    top_features: np.ndarray | None = None  # [L, T, k] int32, features with the largest |h|
    top_values: np.ndarray | None = None  # [L, T, k] float32, signed h at those features
    mlp_top_features: np.ndarray | None = None  # [L, T, k] int32, same for the MLP output
    mlp_top_values: np.ndarray | None = None  # [L, T, k] float32
    attention_maps: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)  # (layer, head) -> [T, T]
    hidden_states: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> [T, D]
    extra: dict[str, Any] = field(default_factory=dict)  # JSON-able: source text, mode, ...
    router_ids: np.ndarray | None = None  # [L, T, k] int32, MoME: the top-k experts of each token
    router_gates: np.ndarray | None = None  # [L, T, k] float32, their gate weights (sum to 1)
    token_ids: np.ndarray | None = None  # [T] int64, the vocabulary id fed at each position; -1: an embedding (AV)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def router(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """MoME models: layer -> (expert ids `[T, k]`, gates `[T, k]`), the form ARCHITECTURE.md names; {} for
        other models."""
        return router_by_layer(self.router_ids, self.router_gates)


def router_by_layer(ids, gates) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """`router_ids` / `router_gates` `[L, T, k]` as layer -> (ids `[T, k]`, gates `[T, k]`); {} without them."""
    if ids is None or gates is None:
        return {}
    ids, gates = np.asarray(ids), np.asarray(gates)
    return {layer: (ids[layer], gates[layer]) for layer in range(ids.shape[0])}
