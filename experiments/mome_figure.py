"""The MoME experiment's figure (issue 15): WER at each rate of the one MoME model (experiments/results/mome.csv,
written by `sinkscope sweep --config experiments/configs/sweep_mome.yaml`) against the single-rate models at the
same rates (the lambda = 0 rows of experiments/results/decorrelation.csv).

    python experiments/mome_figure.py      # writes experiments/results/mome_vs_single.{html,png}
    python experiments/mome_figure.py --mome M.csv --single S.csv --out DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sinkscope.errors import SinkscopeError
from sinkscope.train.results import load_results, mome_comparison_figure, write_figure

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mome", type=Path, default=RESULTS / "mome.csv", help="the MoME sweep's results CSV")
    ap.add_argument("--single", type=Path, default=RESULTS / "decorrelation.csv",
                    help="results CSV of the single-rate models (its lambda = 0 rows)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="directory of the figure (overwritten there)")
    args = ap.parse_args(argv)
    try:
        mome, single = load_results(args.mome), load_results(args.single)
    except SinkscopeError as exc:
        sys.exit(str(exc))
    args.out.mkdir(parents=True, exist_ok=True)
    print(write_figure(mome_comparison_figure(mome, single), args.out / "mome_vs_single"))


if __name__ == "__main__":
    main()
