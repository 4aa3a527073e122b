"""The README's table of the decorrelation experiment, from experiments/results/decorrelation.csv (markdown).

    python experiments/decorrelation_table.py [RESULTS_CSV]

One line per (mode, rates, lambda, epochs): WER (and CER) clean and at babble 0 dB as the mean over seeds with each
seed's value, the validation WER after each epoch, intermediate sinks per utterance, mean cos-to-BOS of the
non-BOS input tokens at the last layer, and the largest massive activation with the segment it sits on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from sinkscope.errors import SinkscopeError
from sinkscope.train.results import load_results

RESULTS = Path(__file__).resolve().parent / "results" / "decorrelation.csv"
GROUPS = ("delimiter", "audio", "video", "prompt")


def _values(series: pd.Series) -> str:
    values = pd.to_numeric(series, errors="coerce").dropna()
    if values.empty:
        return "–"
    text = f"{values.mean():.1%}"
    return text + (f" ({', '.join(f'{v:.1%}' for v in values)})" if len(values) > 1 else "")


def main(path: Path = RESULTS) -> None:
    try:
        df = pd.DataFrame(load_results(path))
    except SinkscopeError as exc:
        sys.exit(str(exc))
    df["lam"] = pd.to_numeric(df["decorrelation"])
    df["rate"] = [f"K_a={a}" if m == "asr" else f"K_v={v}" if m == "vsr" else f"K_a={a}, K_v={v}"
                  for m, a, v in zip(df["mode"], df["k_audio"], df["k_video"], strict=True)]
    print("| mode | rate | λ | epochs | seeds | WER clean | CER clean | WER 0 dB | val. WER by epoch | sinks / utt | "
          "cos-to-BOS, last layer | largest massive (segment) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (mode, rate, lam, epochs), g in df.groupby(["mode", "rate", "lam", "epochs"], sort=False):
        sinks = sum(pd.to_numeric(g[f"sinks_per_utt_{x}"]).mean() for x in GROUPS if f"sinks_per_utt_{x}" in g)
        cos = pd.concat([pd.to_numeric(g[f"cos_last_{x}"], errors="coerce") for x in GROUPS]).mean()
        peak = g.iloc[0]
        print(f"| {mode.upper()} | {rate} | {lam:g} | {epochs} | {', '.join(g['seed'])} | {_values(g['wer_clean'])} | "
              f"{_values(g['cer_clean'])} | {_values(g['wer_snr0'])} | {' / '.join(g['val_wer_by_epoch'])} | "
              f"{sinks:.2f} | {cos:.3f} | {float(peak['massive_max']):.0f} ({peak['massive_max_segment']}) |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, nargs="?", default=RESULTS, help="the sweep's results CSV")
    main(ap.parse_args().results)
