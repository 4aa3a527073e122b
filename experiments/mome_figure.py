"""The MoME experiment's figure (issue 15): WER at each rate of the one MoME model (experiments/results/mome.csv,
written by `sinkscope sweep --config experiments/configs/sweep_mome.yaml`) against the single-rate models at the
same rates (the lambda = 0 rows of experiments/results/decorrelation.csv).

    python experiments/mome_figure.py      # writes experiments/results/mome_vs_single.{html,png}
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from sinkscope.train.results import mome_comparison_figure, write_figure

RESULTS = Path(__file__).resolve().parent / "results"

if __name__ == "__main__":
    if not (RESULTS / "mome.csv").is_file():
        sys.exit(f"{RESULTS / 'mome.csv'} does not exist yet: run the MoME sweep first")
    mome, single = (pd.read_csv(RESULTS / f"{name}.csv", dtype=str, keep_default_na=False).to_dict("records")
                    for name in ("mome", "decorrelation"))
    print(write_figure(mome_comparison_figure(mome, single), RESULTS / "mome_vs_single"))
