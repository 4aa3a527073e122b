"""The trace on disk: the only contract between recording and viewing (ARCHITECTURE.md, "Trace on disk").

Layout of a trace directory:

    manifest.json                       schema_version, model, shapes, thresholds, config, sample_count, ...
    samples/000000/meta.json            id, tokens, segments, extra
    samples/000000/arrays.safetensors   attention_received [L,H,T], bos_cosine [L,T], max_abs [L,T], ...
    samples/000000/massive.parquet      layer, token, feature, value, attn_share, mlp_share, ...
    samples/000000/attention_maps.safetensors   optional, "L{l}.H{h}" -> [T,T]
    samples/000000/hidden_states.safetensors    optional, "L{l}" -> [T,D]
    index.safetensors                   optional: every sample's per-token arrays side by side (trace.columns),
                                        written when a recording run ends; a cache, used only while it matches

Each sample is written into a temporary directory and renamed into place, then the manifest is replaced
atomically, so a killed writer leaves every finished sample readable and a resumed writer appends.
Arrays are read lazily through the official safetensors library, and their values are checked against the
ranges a recorder can produce. Nothing is ever pickled.
"""

from sinkscope.trace.read import Trace, TraceSample, find_traces, read_manifest
from sinkscope.trace.schema import (
    ARRAY_FIELDS,
    FORMAT,
    MANIFEST,
    OPTIONAL_ARRAY_FIELDS,
    SAMPLES,
    SCHEMA_VERSION,
    SampleRecord,
)
from sinkscope.trace.write import TraceWriter

__all__ = ["ARRAY_FIELDS", "FORMAT", "MANIFEST", "OPTIONAL_ARRAY_FIELDS", "SAMPLES", "SCHEMA_VERSION", "SampleRecord",
           "Trace", "TraceSample", "TraceWriter", "find_traces", "read_manifest"]
