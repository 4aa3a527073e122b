"""The MoME experiment's figure (issue 15): WER at each rate of the one MoME model (experiments/results/mome.csv,
written by `sinkscope sweep --config experiments/configs/sweep_mome.yaml`) against the single-rate models at the
same rates (the lambda = 0 rows of experiments/results/decorrelation.csv).

    python experiments/mome_figure.py      # writes experiments/results/mome_vs_single.{html,png}
"""

from __future__ import annotations

import sys
from pathlib import Path

from sinkscope.errors import SinkscopeError
from sinkscope.train.results import load_results, mome_comparison_figure, write_figure

RESULTS = Path(__file__).resolve().parent / "results"

if __name__ == "__main__":
    try:
        mome, single = (load_results(RESULTS / f"{name}.csv") for name in ("mome", "decorrelation"))
    except SinkscopeError as exc:
        sys.exit(str(exc))
    print(write_figure(mome_comparison_figure(mome, single), RESULTS / "mome_vs_single"))
