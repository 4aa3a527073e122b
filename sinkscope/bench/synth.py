"""Corpus benchmark: `python -m sinkscope.bench synth` (utterances per second of `sinkscope data synth`)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import typer

from sinkscope.bench import app


@app.command()
def synth(
    n: int = typer.Option(400, help="Utterances per run."),
    workers: str = typer.Option("1,2", help="Worker counts to compare."),
    out: Path = typer.Option(None, help="Write JSON here."),
) -> None:
    """Utterances per second of `sinkscope data synth` (GRID, fresh directory each run; target >= 50/s)."""
    import tempfile

    from sinkscope.data.synth import SynthConfig, synthesize

    result = {"n": n, "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "runs": []}
    for k in [int(x) for x in workers.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            synthesize(Path(tmp) / "corpus", SynthConfig(n=n, seed=0), workers=k)
            seconds = time.perf_counter() - start
        result["runs"].append({"workers": k, "seconds": seconds, "utterances_per_s": n / seconds})
        print(f"workers={k}: {n / seconds:.1f} utterances/s ({seconds:.1f} s for {n})")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
