"""Writing traces: each sample goes into a temporary directory renamed into place, then the manifest is
replaced atomically, so a killed writer leaves every finished sample readable and a resumed writer appends."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from safetensors.numpy import save_file

from sinkscope import __version__
from sinkscope.errors import TraceError
from sinkscope.metrics import MASSIVE_COLUMNS
from sinkscope.trace.read import SAMPLE_DIR, read_manifest, read_meta, sample_dirs
from sinkscope.trace.schema import (
    ARRAY_FIELDS,
    FORMAT,
    INDEX,
    MANIFEST,
    OPTIONAL_ARRAY_FIELDS,
    SAMPLES,
    SCHEMA_VERSION,
    SampleRecord,
)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class TraceWriter:
    """Create a trace directory or append to an existing one of the same model shape."""

    def __init__(self, path: str | os.PathLike, manifest: dict):
        self.path = Path(path)
        base = {"format": FORMAT, "schema_version": SCHEMA_VERSION, "sinkscope_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        base.update(manifest)
        if self.path.exists() and not self.path.is_dir():
            raise TraceError(f"{self.path} is a file; a trace is a directory; choose another path")
        if (self.path / MANIFEST).exists():
            existing = read_manifest(self.path)
            for key in ("model", "n_layers", "n_heads", "hidden_size"):
                if existing.get(key) != base.get(key):
                    raise TraceError(f"{self.path / MANIFEST}: field '{key}' is {existing.get(key)!r} but the new "
                                     f"samples have {base.get(key)!r}; record into a new --out directory")
            # what the samples were recorded with: a trace holds one setting (older traces may lack these fields)
            for key in ("thresholds", "top_k"):
                if key in existing and key in base and existing[key] != base[key]:
                    raise TraceError(f"{self.path / MANIFEST}: field '{key}' is {existing[key]!r} but the new "
                                     f"samples were recorded with {base[key]!r}; a trace holds samples recorded "
                                     "with one setting: record into a new --out directory")
            self.manifest = existing
        elif self.path.exists() and any(self.path.iterdir()):
            raise TraceError(f"{self.path} exists, is not empty and is not a sinkscope trace; choose another path")
        else:
            (self.path / SAMPLES).mkdir(parents=True, exist_ok=True)
            self.manifest = dict(base, sample_count=0)
            _atomic_write_text(self.path / MANIFEST, json.dumps(self.manifest, indent=2))
        (self.path / SAMPLES).mkdir(exist_ok=True)
        for stale in (self.path / SAMPLES).glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        self._dirs, self.skipped = sample_dirs(self.path / SAMPLES)  # stray entries stay, untouched
        self.sample_ids = {read_meta(d / "meta.json").id for d in self._dirs}
        numbered = [int(p.name) for p in (self.path / SAMPLES).iterdir() if SAMPLE_DIR.fullmatch(p.name)]
        self._next = max(numbered, default=-1) + 1

    def append(self, sample: SampleRecord) -> Path:
        """Write one sample atomically and bump the manifest's sample_count."""
        if sample.sample_id in self.sample_ids:
            raise TraceError(f"{self.path}: a sample with id '{sample.sample_id}' is already in the trace")
        (self.path / INDEX).unlink(missing_ok=True)  # trace.columns: stale once samples change
        index, self._next = self._next, self._next + 1
        tmp = self.path / SAMPLES / f".tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            _write_sample(tmp, sample)
            final = self.path / SAMPLES / f"{index:06d}"
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._dirs.append(final)
        self.sample_ids.add(sample.sample_id)
        self.manifest["sample_count"] = len(self._dirs)
        self.manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        _atomic_write_text(self.path / MANIFEST, json.dumps(self.manifest, indent=2))
        return final


def _write_sample(directory: Path, s: SampleRecord) -> None:
    meta = {"id": s.sample_id, "tokens": list(s.tokens), "segments": [list(seg) for seg in s.segments],
            "extra": s.extra}
    (directory / "meta.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
    arrays = {name: np.ascontiguousarray(getattr(s, name)) for name in ARRAY_FIELDS + OPTIONAL_ARRAY_FIELDS
              if getattr(s, name) is not None}
    save_file(arrays, str(directory / "arrays.safetensors"))
    massive = s.massive.reindex(columns=MASSIVE_COLUMNS) if len(s.massive.columns) else \
        pd.DataFrame({c: pd.Series(dtype="float32") for c in MASSIVE_COLUMNS})
    pq.write_table(pa.Table.from_pandas(massive, preserve_index=False), directory / "massive.parquet")
    if s.attention_maps:
        save_file({f"L{lay}.H{h}": np.ascontiguousarray(a) for (lay, h), a in s.attention_maps.items()},
                  str(directory / "attention_maps.safetensors"))
    if s.hidden_states:
        save_file({f"L{lay}": np.ascontiguousarray(a) for lay, a in s.hidden_states.items()},
                  str(directory / "hidden_states.safetensors"))
