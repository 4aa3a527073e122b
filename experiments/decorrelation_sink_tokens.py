"""Where each decorrelation point's sink sits: BOS or a delimiter, read from the point's trace.

    python experiments/decorrelation_sink_tokens.py [--root CHECKOUT] [--layers 5,15,25]

For every row of experiments/results/decorrelation.csv whose trace is on disk (`trace`, relative to --root, the
checkout the sweep ran in: by default the worktree `sweep` beside this checkout that run_decorrelation_sweep.sh
uses, or this checkout where there is none), and for BOS and each delimiter (`<audio>`, `<video>`, ...): the
head-mean alpha at the chosen layers (mean over the trace's utterances), the mean number of layers in which the
token is a sink (`metrics.sink_layers` at the trace's thresholds), and how many massive-activation records sit on
it. Prints a table and writes experiments/results/decorrelation_sink_tokens.csv, keeping the rows it wrote earlier
for points whose trace is not on this machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from sinkscope.analysis import dataset_sinks, trace_massive
from sinkscope.errors import SinkscopeError
from sinkscope.trace import Trace
from sinkscope.trace.columns import trace_columns
from sinkscope.train.results import TABLE_COLUMNS, load_results, read_rows

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


def _layers(text: str) -> list[int]:
    try:
        layers = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be layer numbers separated by commas, not {text!r}") from None
    if any(layer < 0 for layer in layers):
        raise argparse.ArgumentTypeError(f"layer numbers start at 0, not {text!r}")
    return layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    worktree = HERE.parent.parent / "sweep"  # run_decorrelation_sweep.sh's WT
    ap.add_argument("--root", type=Path, default=worktree if worktree.is_dir() else HERE.parent,
                    help="The checkout the sweep ran in (its runs/ hold the traces); default: the worktree `sweep` "
                         "beside this checkout (run_decorrelation_sweep.sh's) where it exists, else this checkout.")
    ap.add_argument("--layers", type=_layers, default="5,15,25")
    ap.add_argument("--results", type=Path, default=HERE / "results" / "decorrelation.csv")
    args = ap.parse_args()
    try:
        table = load_results(args.results, (*TABLE_COLUMNS, "trace"))
        written = HERE / "results" / "decorrelation_sink_tokens.csv"
        earlier = read_rows(written, ("point", "token"))  # [] when the file does not exist yet
        before = pd.DataFrame(earlier) if earlier else pd.DataFrame(columns=["point"])
        out = []
        for row in table:
            path = args.root / row["trace"]
            if not row["trace"] or not (path / "manifest.json").is_file():  # a fresh machine: earlier rows kept
                kept = before[before["point"] == row["point"]]
                print(f"{row['point']}: no trace at {path}; " + (f"its {len(kept)} earlier rows kept" if len(kept)
                                                                 else "skipped"))
                out.extend(kept.to_dict("records"))
                continue
            trace = Trace.load(path)
            n_layers = trace.manifest["n_layers"]
            if max(args.layers) >= n_layers:
                raise SinkscopeError(f"--layers {max(args.layers)}: the trace {path} has layers 0-{n_layers - 1}")
            for entry in sink_tokens(trace, args.layers):
                out.append({"point": row["point"], "decorrelation": row["decorrelation"], **entry})
    except SinkscopeError as exc:
        sys.exit(str(exc))
    frame = pd.DataFrame(out)
    frame.to_csv(written, index=False, float_format="%.4f")
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
