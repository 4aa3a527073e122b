"""A whole trace as columns: every sample's per-token arrays concatenated (N tokens in all), so that trace-level
tables (the app's Dataset and Compare views, `sinkscope summary`) are a few array operations, not one Python pass
and three file reads per sample.

The columns are built from the samples on first use and kept on the `Trace` object. A recorder also writes them to
`index.safetensors` at the trace's root when a recording run ends (`write_index`), so that opening a large trace
reads one file instead of thousands. The index is a cache of the samples, never the record: it is used only when
its list of sample directories, sample ids and token counts equals the trace's, and its values pass the same
range checks as a sample's; otherwise the columns are built from the samples and `Trace.index_note` says why.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from sinkscope.errors import TraceError
from sinkscope.metrics import MIN_QUERIES, SINK_HEAD_FRACTION, check_sink_rule
from sinkscope.trace.read import check_values, confined, read_safetensors
from sinkscope.trace.schema import INDEX

INDEX_FORMAT = "sinkscope-trace-index"
INDEX_VERSION = "1"


def token_segments(segments, n_tokens: int) -> np.ndarray:
    """The segment name of every position (`""` where no segment covers it)."""
    names = np.full(n_tokens, "", dtype=object)
    for name, start, end in segments:
        names[start:end] = name
    return names


@dataclass(frozen=True)
class TraceColumns:
    """The per-token arrays of a whole trace, side by side (N tokens), plus small per-sample ones (S samples).

    `needed_alpha[l, n]` is the alpha that the `heads_needed`-th largest head gives token n at layer l. Token n is a
    sink at layer l for a threshold eps (`metrics.sink_layers`) exactly when it exceeds eps, so the sink rule at
    any eps needs no pass over the heads."""

    ids: np.ndarray  # [S] sample ids
    sample: np.ndarray  # [N] index of each token's sample
    position: np.ndarray  # [N] position within its sample
    length: np.ndarray  # [N] tokens in its sample
    start: np.ndarray  # [S + 1] where each sample's tokens begin (the last entry is N)
    segment: np.ndarray  # [N] segment name ("" where none)
    token: np.ndarray  # [N] token text
    heads_needed: int
    needed_alpha: np.ndarray  # [L, N]
    mean_alpha: np.ndarray  # [L, N] alpha averaged over heads
    bos_cosine: np.ndarray  # [L, N]
    alpha_first: np.ndarray  # [S, L, H] alpha of position 0
    top_abs: np.ndarray  # [S, L] largest |h| over the sample's tokens
    median_abs: np.ndarray  # [S, L]
    massive: dict  # every massive-activation record, column by column, with `sample` (the sample's index)

    def sink_flags(self, eps: float, min_queries: int = MIN_QUERIES) -> np.ndarray:
        """`[L, N]` bool: `metrics.sink_layers` of every sample, side by side."""
        check_sink_rule(eps, min_queries=min_queries)
        flags = np.ones(self.needed_alpha.shape, dtype=bool) if self.heads_needed == 0 else self.needed_alpha > eps
        flags &= (self.length - self.position >= min_queries)[None, :]
        return flags


ARRAYS = ("needed_alpha", "mean_alpha", "bos_cosine", "alpha_first", "top_abs", "median_abs")
"""The TraceColumns fields an index stores (the rest come from the samples' meta.json, read on opening anyway)."""


def heads_needed(n_heads: int, head_fraction: float) -> int:
    """The fewest heads c with c / H >= head_fraction (the share as `sink_layers` computes it); H + 1 if none."""
    return next((c for c in range(n_heads + 1) if c / n_heads >= head_fraction), n_heads + 1)


def trace_columns(trace, head_fraction: float = SINK_HEAD_FRACTION) -> TraceColumns:
    """The trace's columns: from its index when that is current, else built from the samples; cached on the trace."""
    cache = trace.__dict__.setdefault("_columns", {})
    check_sink_rule(head_fraction=head_fraction)
    if head_fraction not in cache:
        columns = _from_index(trace, head_fraction)
        cache[head_fraction] = columns if columns is not None else build_columns(trace, head_fraction)
    return cache[head_fraction]


def _layout(trace) -> dict:
    """The TraceColumns fields that the samples' meta.json give (ids, per-token sample, position, sample length,
    segment and text, and where each sample starts): the same whether the arrays come from the samples or the
    index."""
    lengths = np.array([len(s.tokens) for s in trace], dtype=np.int64)
    start = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    sample = np.repeat(np.arange(len(trace)), lengths)
    segment = np.empty(int(start[-1]), dtype=object)
    token = np.empty(int(start[-1]), dtype=object)
    for i, s in enumerate(trace):
        segment[start[i]:start[i + 1]] = token_segments(s.segments, len(s.tokens))
        token[start[i]:start[i + 1]] = s.tokens
    return {"ids": np.asarray(trace.sample_ids, dtype=object), "sample": sample,
            "position": np.arange(int(start[-1])) - start[sample], "length": lengths[sample], "start": start,
            "segment": segment, "token": token}


def build_columns(trace, head_fraction: float = SINK_HEAD_FRACTION) -> TraceColumns:
    """The columns, read from every sample (their arrays and massive records, range-checked as always)."""
    check_sink_rule(head_fraction=head_fraction)
    n_layers, n_heads = int(trace.manifest["n_layers"]), int(trace.manifest["n_heads"])
    need = heads_needed(n_heads, head_fraction)
    layout = _layout(trace)
    start = layout["start"]
    n = int(start[-1])
    needed = np.empty((n_layers, n), dtype=np.float32)
    mean = np.empty((n_layers, n), dtype=np.float32)
    cos = np.empty((n_layers, n), dtype=np.float32)
    first = np.empty((len(trace), n_layers, n_heads), dtype=np.float32)
    top = np.empty((len(trace), n_layers))
    median = np.empty((len(trace), n_layers))
    massive = []
    for i, s in enumerate(trace):
        a, b = start[i], start[i + 1]
        cached = {"_arrays", "massive_columns"} & set(vars(s))
        alpha = np.asarray(s.attention_received)  # [L, H, T]
        if 0 < need <= n_heads:
            needed[:, a:b] = np.partition(alpha, n_heads - need, axis=1)[:, n_heads - need, :]
        else:  # every token is a sink (need 0) or none is (need > H): flags never read these values
            needed[:, a:b] = 1.0 if need == 0 else -1.0
        mean[:, a:b] = alpha.mean(axis=1)
        cos[:, a:b] = s.bos_cosine
        first[i] = alpha[:, :, 0]
        top[i] = np.asarray(s.max_abs).max(axis=1)
        median[i] = s.median_abs
        massive.append(s.massive_columns)
        for name in {"_arrays", "massive_columns"} - cached:  # keep memory flat: a sample viewed later reads again
            vars(s).pop(name, None)
    return TraceColumns(**layout, heads_needed=need, needed_alpha=needed, mean_alpha=mean, bos_cosine=cos,
                        alpha_first=first, top_abs=top, median_abs=median, massive=_concatenate_massive(massive))


def _concatenate_massive(frames: list[dict]) -> dict:
    """The samples' massive records in one table (the columns every sample with records has), with the sample
    index. Samples without records are left out of the concatenation: their empty columns are written as floats
    and would turn the integer columns into floats."""
    full = [(i, f) for i, f in enumerate(frames) if len(f["layer"])]
    if not full:
        return {"layer": np.zeros(0, np.int64), "token": np.zeros(0, np.int64), "feature": np.zeros(0, np.int64),
                "value": np.zeros(0, np.float32), "sample": np.zeros(0, np.int64)}
    names = [c for c in full[0][1] if all(c in f for _, f in full)]
    table = {c: np.concatenate([f[c] for _, f in full]) for c in names}
    table["sample"] = np.repeat(np.array([i for i, _ in full], dtype=np.int64), [len(f["layer"]) for _, f in full])
    return table


# ------------------------------------------------------------------------------------------------ the index
def _fingerprint(trace) -> dict[str, str]:
    """What an index must match: the sample directories, the ids and the token counts, in order."""
    digest = hashlib.sha256()
    for directory, s in zip(trace._dirs, trace, strict=True):
        digest.update(f"{directory.name}\t{s.sample_id}\t{len(s.tokens)}\n".encode())
    return {"samples": str(len(trace)), "fingerprint": digest.hexdigest()}


def write_index(path: str | os.PathLike, head_fraction: float | None = None) -> Path:
    """Write (atomically) the index of the trace at `path`, from its samples; returns the index's path."""
    from sinkscope.trace.read import Trace

    trace = Trace.load(path)
    if head_fraction is None:
        head_fraction = float(trace.manifest.get("thresholds", {}).get("sink_head_fraction", SINK_HEAD_FRACTION))
    c = build_columns(trace, head_fraction)
    tensors = {name: np.ascontiguousarray(getattr(c, name)) for name in ARRAYS}
    for name, column in c.massive.items():
        if column.dtype.kind not in "fiub":  # the recorder writes numbers only; anything else is not indexed
            continue
        tensors[f"massive.{name}"] = np.ascontiguousarray(column)
    metadata = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "head_fraction": repr(float(head_fraction)),
                "massive_columns": json.dumps([k[len("massive."):] for k in tensors if k.startswith("massive.")]),
                **_fingerprint(trace)}
    target = Path(path) / INDEX
    tmp = target.with_name(f".{INDEX}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _index_metadata(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as fh:
            return dict(fh.metadata() or {})
    except Exception as exc:
        raise TraceError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc})") from exc


def _from_index(trace, head_fraction: float) -> TraceColumns | None:
    """The columns from the trace's index, or None (with `trace.index_note` saying why) when there is none or it
    does not describe these samples exactly."""
    path = Path(trace.path) / INDEX
    if not path.is_file():
        return None
    try:
        confined(path, getattr(trace, "_root", None))
        meta = _index_metadata(path)
        if meta.get("format") != INDEX_FORMAT or meta.get("version") != INDEX_VERSION:
            raise TraceError(f"{path}: field 'format' is {meta.get('format')!r} version {meta.get('version')!r}; "
                             f"expected {INDEX_FORMAT!r} version {INDEX_VERSION}")
        if meta.get("head_fraction") != repr(float(head_fraction)):
            return None  # indexed for another sink rule: build this one (not a defect)
        expected = _fingerprint(trace)
        if {k: meta.get(k) for k in expected} != expected:
            raise TraceError(f"{path} describes {meta.get('samples')} samples that differ from the {len(trace)} in "
                             "samples/ (appended or changed since it was written); rebuild it with `sinkscope index "
                             f"{trace.path}`")
        arrays = read_safetensors(path)
        try:  # the massive columns in the samples' order (safetensors sorts tensors by name)
            order = [str(k) for k in json.loads(meta.get("massive_columns", "[]"))]
        except (TypeError, ValueError) as exc:
            raise TraceError(f"{path}: field 'massive_columns' of its header is not a JSON list ({exc})") from exc
        arrays = {**{k: v for k, v in arrays.items() if not k.startswith("massive.")},
                  **{f"massive.{k}": arrays[f"massive.{k}"] for k in order if f"massive.{k}" in arrays},
                  **{k: v for k, v in arrays.items() if k.startswith("massive.")}}
        return _columns_from_arrays(trace, head_fraction, arrays, path)
    except TraceError as exc:
        trace.index_note = f"{exc}. The samples are read instead."
        return None


def _columns_from_arrays(trace, head_fraction: float, arrays: dict, path: Path) -> TraceColumns:
    n_layers, n_heads = int(trace.manifest["n_layers"]), int(trace.manifest["n_heads"])
    layout = _layout(trace)
    n, s = int(layout["start"][-1]), len(trace)
    shapes = {"needed_alpha": (n_layers, n), "mean_alpha": (n_layers, n), "bos_cosine": (n_layers, n),
              "alpha_first": (s, n_layers, n_heads), "top_abs": (s, n_layers), "median_abs": (s, n_layers)}
    for name, shape in shapes.items():
        if name not in arrays:
            raise TraceError(f"{path} has no field '{name}'")
        if arrays[name].shape != shape:
            raise TraceError(f"{path}: field '{name}' has shape {arrays[name].shape}, expected {shape}")
    ranges = {"needed_alpha": "attention_received", "mean_alpha": "attention_received",
              "alpha_first": "attention_received", "bos_cosine": "bos_cosine", "top_abs": "max_abs",
              "median_abs": "median_abs"}
    for name, like in ranges.items():  # the same ranges as the samples' own fields, named as the index's
        try:
            check_values({like: arrays[name]}, path, int(trace.manifest["hidden_size"]))
        except TraceError as exc:
            raise TraceError(str(exc).replace(f"field '{like}'", f"field '{name}'")) from exc
    massive = {name.removeprefix("massive."): array for name, array in arrays.items() if name.startswith("massive.")}
    for name in ("layer", "token", "feature", "value", "sample"):
        if name not in massive:
            raise TraceError(f"{path} has no field 'massive.{name}'")
    m = len(massive["sample"])
    if any(column.shape != (m,) for column in massive.values()):
        raise TraceError(f"{path}: the massive.* fields differ in length: "
                         f"{ {k: v.shape for k, v in massive.items()} }")
    bounds = {"sample": np.full(m, s), "layer": np.full(m, n_layers),
              "feature": np.full(m, int(trace.manifest["hidden_size"]))}
    for name, bound in bounds.items():
        column = massive[name]
        if column.dtype.kind not in "iu" or ((column < 0) | (column >= bound)).any():
            raise TraceError(f"{path}: field 'massive.{name}' holds entries that are not indices below {bound[0]}")
    token_bound = np.diff(layout["start"])[massive["sample"]]
    if massive["token"].dtype.kind not in "iu" or ((massive["token"] < 0) | (massive["token"] >= token_bound)).any():
        raise TraceError(f"{path}: field 'massive.token' holds positions past their sample's length")
    if not np.isfinite(massive["value"]).all():
        raise TraceError(f"{path}: field 'massive.value' holds non-finite entries")
    return TraceColumns(**layout, heads_needed=heads_needed(n_heads, head_fraction),
                        needed_alpha=arrays["needed_alpha"], mean_alpha=arrays["mean_alpha"],
                        bos_cosine=arrays["bos_cosine"], alpha_first=arrays["alpha_first"],
                        top_abs=arrays["top_abs"], median_abs=arrays["median_abs"], massive=massive)


__all__ = ["INDEX", "TraceColumns", "build_columns", "heads_needed", "token_segments", "trace_columns", "write_index"]
