"""Reading traces: `Trace.load(path)` validates the manifest; samples are read lazily and their arrays are
memory-mapped."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from sinkscope import __version__
from sinkscope.errors import TraceError
from sinkscope.trace.schema import (
    _ST_DTYPES,
    FORMAT,
    MANIFEST,
    REQUIRED_MANIFEST_FIELDS,
    SAMPLES,
    SCHEMA_VERSION,
)


def _mmap_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Memory-map every tensor of a safetensors file as a read-only numpy array (format: u64 header size,
    JSON header with dtype/shape/data_offsets, then the raw little-endian buffer)."""
    if not path.is_file():
        raise TraceError(f"{path} is missing")
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a file of {size}")
            header = json.loads(fh.read(n))
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in _ST_DTYPES:
                raise ValueError(f"tensor '{name}' has unsupported dtype {info['dtype']}")
            start, end = info["data_offsets"]
            dtype = np.dtype(_ST_DTYPES[info["dtype"]])
            shape = tuple(info["shape"])
            if 8 + n + end > size or end - start != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
                raise ValueError(f"tensor '{name}' runs past the end of the file (truncated?)")
            if end == start:
                out[name] = np.zeros(shape, dtype=dtype)
            else:
                out[name] = np.memmap(path, dtype=dtype, mode="r", offset=8 + n + start, shape=shape)
        return out
    except TraceError:
        raise
    except Exception as exc:
        raise TraceError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc})") from exc


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
    if not path.is_file():
        raise TraceError(f"{path} is missing: {what}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TraceError(f"{path} is not valid JSON ({exc}); {what}") from exc
    if not isinstance(data, dict):
        raise TraceError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


class TraceSample:
    """A sample of a trace on disk. Arrays are read lazily and memory-mapped."""

    def __init__(self, directory: Path, manifest: dict, root: Path | None = None):
        self.directory = directory
        self._manifest = manifest
        self._root = root
        meta = _read_json(self._file("meta.json"), "every sample needs its meta.json")
        for key in ("id", "tokens", "segments"):
            if key not in meta:
                raise TraceError(f"{directory / 'meta.json'} has no field '{key}'")
        self.sample_id: str = str(meta["id"])
        self.tokens: list[str] = list(meta["tokens"])
        try:
            self.segments: list[tuple[str, int, int]] = [(str(n), int(s), int(e)) for n, s, e in meta["segments"]]
        except (TypeError, ValueError) as exc:
            raise TraceError(f"{directory / 'meta.json'}: field 'segments' must be [name, start, end] rows") from exc
        self.extra: dict = dict(meta.get("extra", {}))
        if not self._file("arrays.safetensors").is_file():
            raise TraceError(f"{directory / 'arrays.safetensors'} is missing")

    def __len__(self) -> int:
        return len(self.tokens)

    def _file(self, name: str) -> Path:
        """A file of this sample; under a root (the app), refused when it resolves outside it."""
        return confined(self.directory / name, self._root)

    def __repr__(self) -> str:
        return f"TraceSample(id={self.sample_id!r}, T={len(self)})"

    @cached_property
    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = _mmap_safetensors(self._file("arrays.safetensors"))
        L, H, T = self._manifest["n_layers"], self._manifest["n_heads"], len(self.tokens)
        expected = {"attention_received": (L, H, T), "bos_cosine": (L, T), "max_abs": (L, T), "median_abs": (L,)}
        for name, shape in expected.items():
            if name not in arrays:
                raise TraceError(f"{self.directory / 'arrays.safetensors'} has no field '{name}'")
            if arrays[name].shape != shape:
                raise TraceError(f"{self.directory / 'arrays.safetensors'}: field '{name}' has shape "
                                 f"{arrays[name].shape}, expected {shape} from the manifest and tokens")
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

    @cached_property
    def massive(self) -> pd.DataFrame:
        path = self._file("massive.parquet")
        if not path.is_file():
            raise TraceError(f"{path} is missing")
        try:
            df = pq.read_table(path).to_pandas()
        except Exception as exc:
            raise TraceError(f"{path} is not a readable parquet file ({type(exc).__name__}: {exc})") from exc
        missing = [c for c in ("layer", "token", "feature", "value", "attn_share", "mlp_share") if c not in df]
        if missing:
            raise TraceError(f"{path} lacks the columns {missing}")
        return df

    @cached_property
    def attention_maps(self) -> dict[tuple[int, int], np.ndarray]:
        path = self._file("attention_maps.safetensors")
        if not path.exists():
            return {}
        out = {}
        for name, arr in _mmap_safetensors(path).items():
            layer, head = name.removeprefix("L").split(".H")
            out[(int(layer), int(head))] = arr
        return out

    @cached_property
    def hidden_states(self) -> dict[int, np.ndarray]:
        path = self._file("hidden_states.safetensors")
        if not path.exists():
            return {}
        return {int(name.removeprefix("L")): arr for name, arr in _mmap_safetensors(path).items()}


class Trace:
    """A recorded trace directory. `Trace.load(path)` validates it; samples are read lazily."""

    def __init__(self, path: Path, manifest: dict, sample_dirs: list[Path], root: Path | None = None):
        self.path = path
        self.manifest = manifest
        self._root = root
        self._dirs = sample_dirs
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
        sample_root = confined(path / SAMPLES, root)
        dirs = sorted(p for p in sample_root.iterdir() if p.is_dir() and not p.name.startswith(".")) \
            if sample_root.is_dir() else []
        return cls(path, manifest, dirs, root)

    def __len__(self) -> int:
        return len(self._dirs)

    def __getitem__(self, i: int) -> TraceSample:
        if not -len(self) <= i < len(self):
            raise IndexError(f"trace {self.path} has {len(self)} samples; index {i} is out of range")
        i %= len(self)
        if i not in self._samples:
            self._samples[i] = TraceSample(confined(self._dirs[i], self._root), self.manifest, self._root)
        return self._samples[i]

    def __iter__(self) -> Iterator[TraceSample]:
        return (self[i] for i in range(len(self)))

    def sample(self, sample_id: str) -> TraceSample:
        if sample_id not in self._index:
            raise KeyError(f"trace {self.path} has no sample '{sample_id}'")
        return self[self._index[sample_id]]

    def __repr__(self) -> str:
        return f"Trace({str(self.path)!r}, model={self.manifest.get('model')!r}, samples={len(self)})"


def read_manifest(path: Path, root: Path | None = None) -> dict:
    """Read and validate `path/manifest.json`; raise TraceError naming the file and field otherwise."""
    file = confined(path / MANIFEST, root)
    if not file.is_file():
        raise TraceError(f"{path} is not a sinkscope trace: it has no {MANIFEST}")
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
    for key in ("n_layers", "n_heads", "hidden_size"):
        if not isinstance(manifest[key], int) or manifest[key] <= 0:
            raise TraceError(f"{file}: field '{key}' must be a positive integer, not {manifest[key]!r}")
    return manifest
