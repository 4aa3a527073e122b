"""Redraw the decorrelation figures from experiments/results/decorrelation.csv (what `sinkscope sweep` draws after
each row; run this after copying rows from a sweep that ran elsewhere).

    python experiments/decorrelation_figures.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from sinkscope.errors import SinkscopeError
from sinkscope.train.results import (
    decorrelation_sinks_figure,
    decorrelation_wer_figure,
    load_results,
    write_figure,
)

RESULTS = Path(__file__).resolve().parent / "results"

if __name__ == "__main__":
    try:
        rows = load_results(RESULTS / "decorrelation.csv")
    except SinkscopeError as exc:
        sys.exit(str(exc))
    for name, fig in (("decorrelation_wer", decorrelation_wer_figure(pd.DataFrame(rows))),
                      ("decorrelation_sinks", decorrelation_sinks_figure(rows))):
        print(write_figure(fig, RESULTS / name))
