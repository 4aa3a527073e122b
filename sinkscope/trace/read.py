"""Reading traces: `Trace.load(path)` validates the manifest; samples are read lazily and their arrays are
read through the official safetensors library and range-checked."""

from __future__ import annotations

import operator
import os
import re
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Annotated, overload

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, StringConstraints
from safetensors import safe_open

from sinkscope import __version__
from sinkscope.errors import TraceError
from sinkscope.metrics import MASSIVE_ABS, MASSIVE_REL, MIN_QUERIES, SINK_EPS, SINK_HEAD_FRACTION
from sinkscope.trace.schema import (
    FORMAT,
    MANIFEST,
    REQUIRED_MANIFEST_FIELDS,
    SAMPLES,
    SCHEMA_VERSION,
    router_by_layer,
)
from sinkscope.validation import check_record, read_json_file

SAMPLE_DIR = re.compile(r"\d{6}")
"""How the writer names sample directories; anything else under samples/ is not a sample."""
MAX_TOKENS = 1 << 20


class Thresholds(BaseModel):
    """manifest.json's `thresholds`: what the recorder used (massive activations) and what readers default to (sinks).
    Each may be missing (traces of older versions); one that is present must be a finite number in its range."""

    model_config = ConfigDict(strict=True, extra="allow")
    massive_abs: float = Field(default=MASSIVE_ABS, ge=0, allow_inf_nan=False)
    massive_rel: float = Field(default=MASSIVE_REL, ge=0, allow_inf_nan=False)
    sink_eps: float = Field(default=SINK_EPS, ge=0, le=1, allow_inf_nan=False)
    sink_head_fraction: float = Field(default=SINK_HEAD_FRACTION, gt=0, le=1, allow_inf_nan=False)
    sink_min_queries: int = Field(default=MIN_QUERIES, ge=1)


class TraceManifest(BaseModel):
    """The fields of manifest.json that readers rely on; sizes are bounded before anything is allocated. The
    optional ones (older traces lack some) are checked when present: readers use `thresholds` (the index's sink
    head fraction, the app's captions), and a `null` or a string there must not surface as a crash later."""

    model_config = ConfigDict(strict=True, extra="allow")
    format: str
    schema_version: int
    model: str
    n_layers: int = Field(ge=1, le=4096)
    n_heads: int = Field(ge=1, le=4096)
    hidden_size: int = Field(ge=1, le=1 << 20)
    thresholds: Thresholds = Field(default_factory=Thresholds)
    top_k: int = Field(default=8, ge=1, le=1 << 20)
    config: dict = Field(default_factory=dict)
    sample_count: int = Field(default=0, ge=0)


Segment = tuple[Annotated[StrictStr, StringConstraints(min_length=1, max_length=64)],
                Annotated[StrictInt, Field(ge=0)], Annotated[StrictInt, Field(ge=0)]]


class SampleMeta(BaseModel):
    """A sample's meta.json (strict scalars: a string of T characters is not T tokens; JSON lists are rows)."""

    model_config = ConfigDict(extra="allow")
    id: Annotated[StrictStr, StringConstraints(min_length=1, max_length=1024)]
    tokens: list[StrictStr] = Field(min_length=1, max_length=MAX_TOKENS)
    segments: list[Segment] = Field(max_length=4096)
    extra: dict = Field(default_factory=dict)


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file, read by the official library (which checks the header, the dtypes
    and that the tensors' byte ranges tile the buffer exactly: no overlap, no gap, nothing past the end)."""
    if not path.is_file():
        raise TraceError(f"{path} is missing")
    try:
        with safe_open(str(path), framework="numpy") as fh:
            return {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as exc:  # the library raises SafetensorError, OSError, ValueError, ... for corrupt files
        raise TraceError(f"{path} is not a readable safetensors file, truncated or corrupt ({type(exc).__name__}: "
                         f"{exc})") from exc


def confined(path: Path, root: Path | None) -> Path:
    """`path`, after checking that it resolves (symlinks followed) inside `root` when a root is given."""
    if root is not None:
        try:
            real = path.resolve()
        except (OSError, ValueError, RuntimeError) as exc:
            raise TraceError(f"{path}: cannot be resolved ({exc})") from exc
        if not real.is_relative_to(root):
            raise TraceError(f"{path} resolves to {real}, outside the trace root {root}; it is not opened")
    return path


def _read_json(path: Path, what: str) -> dict:
    return read_json_file(path, what, TraceError)


def read_meta(path: Path) -> SampleMeta:
    """A sample's meta.json, validated: segments within the tokens."""
    meta = check_record(SampleMeta, _read_json(path, "every sample needs its meta.json"), str(path), TraceError)
    T = len(meta.tokens)
    for k, (name, start, end) in enumerate(meta.segments):
        if not start <= end <= T:
            raise TraceError(f"{path}: field 'segments.{k}' is [{name!r}, {start}, {end}]: a span must satisfy "
                             f"0 <= start <= end <= {T} (the number of tokens)")
    return meta


def _bad_values(array: np.ndarray, low: float, high: float) -> np.ndarray:
    """Mask of entries that are not finite or fall outside [low, high]."""
    with np.errstate(invalid="ignore"):
        return ~np.isfinite(array) | (array < low) | (array > high)


def _within(array: np.ndarray, low: float, high: float) -> bool:
    """True when every entry is finite and within [low, high]: two reductions (NaN propagates through min and
    max), the common case; only a failing array pays for the element-wise mask that locates the culprit."""
    if array.size == 0:
        return True
    lo, hi = float(array.min()), float(array.max())
    return bool(np.isfinite(lo) and np.isfinite(hi) and lo >= low and hi <= high)


def check_values(arrays: dict[str, np.ndarray], where: Path, hidden_size: int) -> None:
    """Refuse values no recorder can produce: alpha outside [0, 1], cosines outside [-1, 1], negative or non-finite
    magnitudes, feature indices outside [0, hidden_size). The message names the field, the count and the first
    offending entry, so that nothing out of range is ever plotted."""
    tol = 1e-3
    ranges = {"attention_received": (-tol, 1 + tol), "bos_cosine": (-1 - tol, 1 + tol), "max_abs": (0, np.inf),
              "median_abs": (0, np.inf), "feature_max_abs": (0, np.inf), "mlp_feature_max_abs": (0, np.inf),
              "top_values": (-np.inf, np.inf), "mlp_top_values": (-np.inf, np.inf),
              "top_features": (0, hidden_size - 1), "mlp_top_features": (0, hidden_size - 1),
              "router_ids": (0, np.inf), "router_gates": (-tol, 1 + tol), "token_ids": (-1, np.inf)}
    for name, (low, high) in ranges.items():
        if name not in arrays:
            continue
        array = arrays[name]
        expected = "iu" if name.endswith(("top_features", "_ids")) else "f"
        if array.dtype.kind not in expected:
            kind = "integer indices" if expected == "iu" else "floating-point values"
            raise TraceError(f"{where}: field '{name}' has dtype {array.dtype}; expected {kind}")
        if _within(array, low, high):
            continue
        bad = _bad_values(array.astype(np.float64, copy=False), low, high)
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            value = array[first]
            raise TraceError(f"{where}: field '{name}' has {int(bad.sum())} values outside [{low:g}, {high:g}] "
                             f"or not finite (first: {value!r} at index {list(first)}); the trace is corrupt, "
                             "re-record it")


class _Recorded(dict):
    """The attention maps or hidden states a sample holds: a key that was not recorded is named with the keys that
    were (`record --attention-maps` / `--hidden-states` choose them)."""

    def __init__(self, what: str, option: str):
        super().__init__()
        self.what, self.option = what, option

    def __missing__(self, key):
        held = f"only {sorted(self)}" if self else f"none (`sinkscope record {self.option}` keeps them)"
        raise KeyError(f"{key!r} was not recorded: this sample holds {self.what} {held}")


class TraceSample:
    """A sample of a trace on disk. Arrays are read lazily, on first use, and range-checked."""

    def __init__(self, directory: Path, manifest: dict, root: Path | None = None, checked: bool = False):
        # `_file` relies on the directory resolving inside the root; `checked`: `Trace.load` resolved it (its
        # `sample_dirs`), and it has not become a symlink since
        self.directory = directory if checked and not os.path.islink(directory) else confined(directory, root)
        self._manifest = manifest
        self._root = root
        meta = read_meta(self._file("meta.json"))
        self.sample_id: str = meta.id
        self.tokens: list[str] = list(meta.tokens)
        self.segments: list[tuple[str, int, int]] = [tuple(seg) for seg in meta.segments]
        self.extra: dict = dict(meta.extra)
        if not self._file("arrays.safetensors").is_file():
            raise TraceError(f"{directory / 'arrays.safetensors'} is missing")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def hidden_size(self) -> int:
        """The width D of the model's residual stream (feature indices are 0..D-1)."""
        return int(self._manifest["hidden_size"])

    def _file(self, name: str) -> Path:
        """A file of this sample; under a root (the app), refused when it resolves outside it. The directory was
        resolved inside the root when the sample was opened (`Trace.__getitem__`), so a file in it that is not a
        symlink is inside too (its real path is the directory's plus its name): one `lstat` instead of resolving
        every component again (with `checked`, opening a 1,000-sample trace under a root: 0.19 -> 0.10 s). A
        symlink is resolved."""
        path = self.directory / name
        if self._root is None or not os.path.islink(path):
            return path
        return confined(path, self._root)

    def __repr__(self) -> str:
        return f"TraceSample(id={self.sample_id!r}, T={len(self)})"

    @cached_property
    def _arrays(self) -> dict[str, np.ndarray]:
        path = self._file("arrays.safetensors")
        arrays = read_safetensors(path)
        L, H, T = self._manifest["n_layers"], self._manifest["n_heads"], len(self.tokens)
        D = self._manifest["hidden_size"]
        expected = {"attention_received": (L, H, T), "bos_cosine": (L, T), "max_abs": (L, T), "median_abs": (L,)}
        for name, shape in expected.items():
            if name not in arrays:
                raise TraceError(f"{path} has no field '{name}'")
            if arrays[name].shape != shape:
                raise TraceError(f"{path}: field '{name}' has shape {arrays[name].shape}, expected {shape} from "
                                 "the manifest and tokens")
        for name, shape in (("feature_max_abs", (L, D)), ("mlp_feature_max_abs", (L, D)), ("token_ids", (T,))):
            if name in arrays and arrays[name].shape != shape:
                raise TraceError(f"{path}: field '{name}' has shape {arrays[name].shape}, expected {shape}")
        for pair in (("top_features", "top_values"), ("mlp_top_features", "mlp_top_values"),
                     ("router_ids", "router_gates")):
            shapes = {arrays[n].shape for n in pair if n in arrays}
            if shapes and (len(shapes) > 1 or any(s[:2] != (L, T) or len(s) != 3 for s in shapes)):
                raise TraceError(f"{path}: fields {list(pair)} have shapes {sorted(shapes)}, expected [{L}, {T}, k]")
        check_values(arrays, path, D)
        return arrays

    def _get(self, name: str) -> np.ndarray | None:
        return self._arrays.get(name)

    attention_received = property(lambda self: self._get("attention_received"))
    bos_cosine = property(lambda self: self._get("bos_cosine"))
    max_abs = property(lambda self: self._get("max_abs"))
    median_abs = property(lambda self: self._get("median_abs"))
    feature_max_abs = property(lambda self: self._get("feature_max_abs"))
    mlp_feature_max_abs = property(lambda self: self._get("mlp_feature_max_abs"))
    top_features = property(lambda self: self._get("top_features"))
    top_values = property(lambda self: self._get("top_values"))
    mlp_top_features = property(lambda self: self._get("mlp_top_features"))
    mlp_top_values = property(lambda self: self._get("mlp_top_values"))
    router_ids = property(lambda self: self._get("router_ids"))
    router_gates = property(lambda self: self._get("router_gates"))

    @property
    def router(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """MoME traces: layer -> (expert ids `[T, k]`, gates `[T, k]`) (ARCHITECTURE.md's form of `router_ids` /
        `router_gates`); {} for other models."""
        return router_by_layer(self.router_ids, self.router_gates)
    token_ids = property(lambda self: self._get("token_ids"))

    @cached_property
    def massive(self) -> pd.DataFrame:
        """The sample's massive-activation records (one row per layer, token and feature above the thresholds)."""
        return pd.DataFrame(self.massive_columns, copy=False)

    @cached_property
    def massive_columns(self) -> dict[str, np.ndarray]:
        """`massive` as plain arrays, column by column (fast to concatenate over thousands of samples)."""
        path = self._file("massive.parquet")
        if not path.is_file():
            raise TraceError(f"{path} is missing")
        try:
            table = pq.ParquetFile(path).read(use_threads=False)  # tiny files: threads cost more than they save
        except Exception as exc:
            raise TraceError(f"{path} is not a readable parquet file ({type(exc).__name__}: {exc})") from exc
        missing = [c for c in ("layer", "token", "feature", "value", "attn_share", "mlp_share")
                   if c not in table.column_names]
        if missing:
            raise TraceError(f"{path} lacks the columns {missing}")
        bounds = {"layer": self._manifest["n_layers"], "token": len(self), "feature": self._manifest["hidden_size"]}
        for column, bound in bounds.items():
            raw = table.column(column).to_numpy(zero_copy_only=False)
            if raw.dtype.kind in "iu":
                bad = (raw < 0) | (raw >= bound)
            else:  # floats or objects written by someone else: the slow, careful path
                values = pd.to_numeric(pd.Series(raw), errors="coerce").to_numpy(dtype=float)
                bad = np.isnan(values) | (values < 0) | (values >= bound) | (values != np.round(values))
            if bad.any():
                raise TraceError(f"{path}: column '{column}' has {int(bad.sum())} entries that are not indices in "
                                 f"[0, {bound}) (first: {raw[np.flatnonzero(bad)[0]]!r}); the trace is corrupt")
        raw = table.column("value").to_numpy(zero_copy_only=False)
        values = raw if raw.dtype.kind == "f" else pd.to_numeric(pd.Series(raw), errors="coerce").to_numpy(float)
        if (~np.isfinite(values)).any():
            raise TraceError(f"{path}: column 'value' holds non-finite or non-numeric entries; the trace is corrupt")
        # one column at a time: Table.to_pandas costs twice the read itself on files this small
        return {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}

    @cached_property
    def attention_maps(self) -> dict[tuple[int, int], np.ndarray]:
        path = self._file("attention_maps.safetensors")
        out = _Recorded("attention maps for (layer, head)", "--attention-maps 5:0,12:3")
        if not path.exists():
            return out
        for name, arr in read_safetensors(path).items():
            match = re.fullmatch(r"L(\d+)\.H(\d+)", name)
            if match is None or arr.shape != (len(self), len(self)):
                raise TraceError(f"{path}: tensor '{name}' {arr.shape} is not an attention map 'L<layer>.H<head>' "
                                 f"of shape ({len(self)}, {len(self)})")
            out[(int(match[1]), int(match[2]))] = arr
        return out

    @cached_property
    def hidden_states(self) -> dict[int, np.ndarray]:
        path = self._file("hidden_states.safetensors")
        out = _Recorded("hidden states for layers", "--hidden-states 3,5")
        if not path.exists():
            return out
        for name, arr in read_safetensors(path).items():
            if re.fullmatch(r"L\d+", name) is None or arr.ndim != 2 or arr.shape[0] != len(self):
                raise TraceError(f"{path}: tensor '{name}' {arr.shape} is not hidden states 'L<layer>' of shape "
                                 f"({len(self)}, D)")
            out[int(name[1:])] = arr
        return out


class Trace:
    """A recorded trace directory. `Trace.load(path)` validates it; samples are read lazily."""

    def __init__(self, path: Path, manifest: dict, sample_dirs: list[Path], root: Path | None = None):
        self.path = path
        self.manifest = manifest
        self._root = root
        self._dirs = sample_dirs
        self.skipped: list[tuple[str, str]] = []  # (entry under samples/, why it is not read as a sample)
        self.index_note: str | None = None  # why index.safetensors, when present, was not used (trace.columns)
        self._samples: dict[int, TraceSample] = {}
        self.sample_ids: list[str] = [self[i].sample_id for i in range(len(sample_dirs))]
        self._index = {sid: i for i, sid in enumerate(self.sample_ids)}

    @classmethod
    def load(cls, path: str | os.PathLike, root: str | os.PathLike | None = None) -> Trace:
        """Open the trace at `path`. With `root` (what the app passes), every file read must resolve, symlinks
        followed, inside `root`; anything that links outside is refused with a TraceError."""
        path = Path(path)
        root = None if root is None else Path(root).resolve()
        confined(path, root)
        if not path.is_dir():
            raise TraceError(f"{path} is not a directory; a trace is a directory with a {MANIFEST}")
        manifest = read_manifest(path, root)
        dirs, skipped = sample_dirs(confined(path / SAMPLES, root), root)
        trace = cls(path, manifest, dirs, root)
        trace.skipped = skipped
        return trace

    def __len__(self) -> int:
        return len(self._dirs)

    @overload
    def __getitem__(self, i: int | str) -> TraceSample: ...

    @overload
    def __getitem__(self, i: slice) -> list[TraceSample]: ...

    def __getitem__(self, i):
        """`trace[i]` (negative counts from the end), `trace[sample_id]`, or `trace[a:b]` (a list of samples)."""
        if isinstance(i, str):
            return self.sample(i)
        if isinstance(i, slice):
            return [self[j] for j in range(len(self))[i]]
        if isinstance(i, bool) or not hasattr(i, "__index__"):
            raise TypeError(f"trace {self.path}: a sample is picked by position (an int), id (a str) or a slice, "
                            f"not {type(i).__name__} {i!r}")
        i = operator.index(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"trace {self.path} has {len(self)} samples; index {i} is out of range")
        i %= len(self)
        if i not in self._samples:
            self._samples[i] = TraceSample(self._dirs[i], self.manifest, self._root, checked=True)
        return self._samples[i]

    def __iter__(self) -> Iterator[TraceSample]:
        return (self[i] for i in range(len(self)))

    def sample(self, sample_id: str) -> TraceSample:
        if sample_id not in self._index:
            raise KeyError(f"trace {self.path} has no sample '{sample_id}'")
        return self[self._index[sample_id]]

    def __repr__(self) -> str:
        return f"Trace({str(self.path)!r}, model={self.manifest.get('model')!r}, samples={len(self)})"


def sample_dirs(samples: Path, root: Path | None = None) -> tuple[list[Path], list[tuple[str, str]]]:
    """The sample directories under `samples` (numbered by the writer and holding meta.json), and every other
    entry with the reason it is not a sample, so that readers can say what they left out. Under a `root`, an
    entry that resolves outside it is refused before anything in it is looked at."""
    if not samples.exists():
        return [], []
    if not samples.is_dir():
        raise TraceError(f"{samples} is not a directory; a trace keeps its samples there")
    dirs, skipped = [], []
    # under a root, `samples` itself resolves inside it (the caller checked), so an entry that is no symlink does
    # too: only symlinks are resolved (one realpath per entry cost 0.12 s on a 1,000-sample trace)
    inside = root is not None and samples.resolve().is_relative_to(root)
    with os.scandir(samples) as it:
        entries = sorted(it, key=lambda e: e.name)
    for item in entries:
        entry = Path(item.path)
        if item.name.startswith("."):
            continue  # the writer's temporary directories
        if not inside or item.is_symlink():
            confined(entry, root)
        if not SAMPLE_DIR.fullmatch(item.name) or not item.is_dir():
            skipped.append((entry.name, "not a numbered sample directory"))
        elif not (entry / "meta.json").exists():
            skipped.append((entry.name, "no meta.json (incomplete or foreign)"))
        else:
            dirs.append(entry)
    return dirs, skipped


MAX_DEPTH = 3
"""How deep `find_traces` looks under its root."""


def find_traces(root: str | os.PathLike) -> list[str]:
    """Trace directories under `root` (a directory holding manifest.json), relative to it and sorted, up to
    MAX_DEPTH levels deep (what the app lists). A trace's own directory is not searched further (its thousands of
    sample directories are never walked), hidden directories are skipped, and links that leave the root are not
    followed."""
    base = Path(root)
    if not base.is_dir():
        return []
    resolved = base.resolve()
    found = []

    def walk(directory: Path, depth: int) -> None:
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            path = Path(entry.path)
            if (path / MANIFEST).is_file():
                if (path / MANIFEST).resolve().is_relative_to(resolved):
                    found.append(str(path.relative_to(base)))
            elif depth < MAX_DEPTH and path.resolve().is_relative_to(resolved):
                walk(path, depth + 1)

    walk(base, 1)
    return sorted(found)


def _traces_inside(path: Path, limit: int = 200) -> list[str]:
    """The trace directories directly under `path` (at most `limit` entries looked at), for an error message."""
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)[:limit]
    except OSError:
        return []
    return [str(path / e.name) for e in entries if e.is_dir() and (Path(e.path) / MANIFEST).is_file()]


def read_manifest(path: Path, root: Path | None = None) -> dict:
    """Read and validate `path/manifest.json`; raise TraceError naming the file and field otherwise."""
    file = confined(path / MANIFEST, root)
    if not file.is_file():
        inside = [] if root is not None else _traces_inside(path)  # a folder of traces given instead of one
        hint = f"; it holds the traces {', '.join(inside[:3])}{', ...' if len(inside) > 3 else ''}: pass one" \
            if inside else ""
        raise TraceError(f"{path} is not a sinkscope trace: it has no {MANIFEST}{hint}")
    manifest = _read_json(file, "the trace manifest")
    if manifest.get("format") != FORMAT:
        raise TraceError(f"{file}: field 'format' is {manifest.get('format')!r}, not '{FORMAT}' "
                         "(a foreign file, not a sinkscope trace)")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        hint = "upgrade sinkscope" if isinstance(version, int) and version > SCHEMA_VERSION else "re-record it"
        raise TraceError(f"{file}: field 'schema_version' is {version!r}; this sinkscope ({__version__}) reads "
                         f"schema {SCHEMA_VERSION}: {hint}")
    for key in REQUIRED_MANIFEST_FIELDS:
        if key not in manifest:
            raise TraceError(f"{file} has no field '{key}'")
    check_record(TraceManifest, manifest, str(file), TraceError)
    return manifest
