"""Redraw the decorrelation figures from experiments/results/decorrelation.csv (what `sinkscope sweep` draws after
each row; run this after copying rows from a sweep that ran elsewhere).

    python experiments/decorrelation_figures.py      # experiments/results/decorrelation_{wer,sinks}.{html,png}
    python experiments/decorrelation_figures.py --results OTHER.csv --out DIR
"""

from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=RESULTS / "decorrelation.csv", help="the sweep's results CSV")
    ap.add_argument("--out", type=Path, default=RESULTS, help="directory of the figures (overwritten there)")
    args = ap.parse_args(argv)
    try:
        rows = load_results(args.results)
    except SinkscopeError as exc:
        sys.exit(str(exc))
    args.out.mkdir(parents=True, exist_ok=True)
    for name, fig in (("decorrelation_wer", decorrelation_wer_figure(pd.DataFrame(rows))),
                      ("decorrelation_sinks", decorrelation_sinks_figure(rows))):
        print(write_figure(fig, args.out / name))


if __name__ == "__main__":
    main()
