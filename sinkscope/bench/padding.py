"""How much a sample's recorded numbers depend on the batch it was recorded in (`python -m sinkscope.bench
padding`). A sample re-recorded after a kill lands in another batch, with other padding; the attention of padded
positions is masked, but the matrix products run over padded shapes, so float32 rounding differs. This records
the same prompts alone (batch 1) and in padded batches and reports the largest differences per field."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import typer

from sinkscope.bench import app

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Attention sinks form at the first token.",
    "Massive activations appear in a few fixed feature dimensions of the residual stream, layer after layer.",
    "Hello.",
    "Speech recognition with large language models compresses audio and video tokens before the decoder.",
    "A short one.",
    "Why do language models attend so strongly to the beginning of sequence token, even when it means nothing?",
    "Numbers: 1, 2, 3.",
]
FIELDS = ("attention_received", "bos_cosine", "max_abs", "median_abs")


@app.command("padding")
def padding(
    model: str = typer.Option("smollm2-135m", help="LLM to record."),
    batch_size: int = typer.Option(4, help="Batch size of the padded recording."),
    out: Path = typer.Option(Path("experiments/results/bench_padding.json"), help="Where to write the result."),
) -> None:
    """Record PROMPTS alone and in padded batches; print the largest absolute and relative differences."""
    from sinkscope.models.llm import load_llm
    from sinkscope.record.run import record_texts
    from sinkscope.trace import Trace

    llm, tokenizer = load_llm(model)
    with tempfile.TemporaryDirectory() as tmp:
        record_texts(llm, tokenizer, PROMPTS, Path(tmp) / "alone", batch_size=1)
        record_texts(llm, tokenizer, PROMPTS, Path(tmp) / "batched", batch_size=batch_size)
        alone, batched = Trace.load(Path(tmp) / "alone"), Trace.load(Path(tmp) / "batched")
        result = {"model": model, "batch_size": batch_size, "prompts": len(PROMPTS), "fields": {}}
        for name in FIELDS:
            a = np.concatenate([getattr(s, name).ravel() for s in alone]).astype(np.float64)
            b = np.concatenate([getattr(s, name).ravel() for s in batched]).astype(np.float64)
            diff = np.abs(a - b)
            scale = np.maximum(np.abs(a), 1e-6)
            result["fields"][name] = {"max_abs_diff": float(diff.max()), "max_rel_diff": float((diff / scale).max()),
                                      "max_rel_diff_above_1e-3": float((diff / scale)[np.abs(a) > 1e-3].max())}
        massive_a = sorted(map(tuple, np.concatenate([s.massive[["layer", "token", "feature"]].to_numpy()
                                                      for s in alone]).tolist()))
        massive_b = sorted(map(tuple, np.concatenate([s.massive[["layer", "token", "feature"]].to_numpy()
                                                      for s in batched]).tolist()))
        result["massive_entries_identical"] = massive_a == massive_b
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
