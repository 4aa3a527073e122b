"""Where each decorrelation point's sink sits: BOS or a delimiter, read from the point's trace.

    python experiments/decorrelation_sink_tokens.py [--root /work/sweep] [--layers 5,15,25]

For every row of experiments/results/decorrelation.csv whose trace is on disk (`trace`, relative to --root, the
checkout the sweep ran in), and for BOS and each delimiter (`<audio>`, `<video>`, ...): the head-mean alpha at
the chosen layers (mean over the trace's utterances), the mean number of layers in which the token is a sink
(`metrics.sink_layers` at the trace's thresholds), and how many massive-activation records sit on it. Prints a
markdown table and writes experiments/results/decorrelation_sink_tokens.csv, keeping the rows it wrote earlier for
points whose trace is not on this machine.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from sinkscope.analysis import dataset_sinks, trace_massive
from sinkscope.trace import Trace
from sinkscope.trace.columns import trace_columns

HERE = Path(__file__).resolve().parent
TOKENS = {"bos": "BOS", "audio_start": "<audio>", "audio_end": "</audio>", "video_start": "<video>",
          "video_end": "</video>"}


def sink_tokens(trace: Trace, layers: list[int]) -> list[dict]:
    c = trace_columns(trace)
    sinks = dataset_sinks(trace)
    massive = trace_massive(trace)
    record_token = c.start[:-1][c.massive["sample"]] + c.massive["token"] if len(c.massive["sample"]) else []
    massive_segment = c.segment[np.asarray(record_token, dtype=int)] if len(record_token) else np.array([])
    rows = []
    for segment, label in TOKENS.items():
        where = c.segment == segment
        if not where.any():
            continue
        row = {"token": label}
        for layer in layers:
            row[f"alpha_L{layer}"] = float(c.mean_alpha[layer, where].mean())
        in_segment = sinks[sinks["segment"] == segment]
        row["sink_layers"] = float(in_segment["layers"].sum() / max(1, len(trace)))
        row["massive_records"] = int((massive_segment == segment).sum())
        rows.append(row)
    rows.append({"token": "(all records)", "massive_records": len(massive)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=Path("/work/sweep"), help="Where the sweep's runs/ are.")
    ap.add_argument("--layers", default="5,15,25")
    ap.add_argument("--results", type=Path, default=HERE / "results" / "decorrelation.csv")
    args = ap.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    table = pd.read_csv(args.results)
    written = HERE / "results" / "decorrelation_sink_tokens.csv"
    before = pd.read_csv(written) if written.is_file() else pd.DataFrame(columns=["point"])
    out = []
    for _, row in table.iterrows():
        path = args.root / str(row["trace"])
        if not (path / "manifest.json").is_file():  # a fresh machine: the rows written from it earlier are kept
            kept = before[before["point"] == row["point"]]
            print(f"{row['point']}: no trace at {path}; " + (f"its {len(kept)} earlier rows kept" if len(kept)
                                                             else "skipped"))
            out.extend(kept.to_dict("records"))
            continue
        for entry in sink_tokens(Trace.load(path), layers):
            out.append({"point": row["point"], "decorrelation": row["decorrelation"], **entry})
    frame = pd.DataFrame(out)
    frame.to_csv(written, index=False, float_format="%.4f")
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
