"""Tabulate the `sinkscope eval --json` results of experiments/train_demo_models.sh as markdown.

    python experiments/summarize_eval.py > experiments/results/demo_models.md
    python experiments/summarize_eval.py --results DIR     # another directory of `<mode>_e<N>_<cond>.json`

`<mode>-v3_*` files are the models on the v3 encoders (audio encoder CTC-pretrained 24 epochs instead of 8).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import pandas as pd

RESULTS = Path(__file__).resolve().parent / "results" / "eval"
# the audio encoder each model version was trained on, in CTC epochs (experiments/configs/*: v2 = no suffix)
AUDIO_CTC_EPOCHS = {None: 8, "-v3": 24}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=RESULTS, help="directory of the eval JSON files")
    results = ap.parse_args(argv).results
    rows = []
    for path in sorted(results.glob("*.json")):
        match = re.fullmatch(r"(avsr|asr|vsr)(-v\d+)?_e(\d+)_(clean|snr0)", path.stem)
        if not match:
            continue
        if match[2] not in AUDIO_CTC_EPOCHS:
            sys.exit(f"{path}: model version {match[2]!r} is not in AUDIO_CTC_EPOCHS of {__file__}")
        try:
            result = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            sys.exit(f"{path}: not the JSON line of `sinkscope eval --json` ({exc})")
        missing = [k for k in ("wer", "cer", "n") if not isinstance(result, dict) or k not in result]
        if missing:
            sys.exit(f"{path}: not the JSON line of `sinkscope eval --json` (no {', '.join(missing)})")
        rows.append({"mode": match[1].upper(), "audio CTC epochs": AUDIO_CTC_EPOCHS[match[2]], "epoch": int(match[3]),
                     "condition": "clean" if match[4] == "clean" else "babble 0 dB",
                     "WER": result["wer"], "CER": result["cer"], "n": result["n"]})
    if not rows:
        sys.exit(f"no results under {results}")
    table = pd.DataFrame(rows).sort_values(["audio CTC epochs", "epoch", "mode", "condition"],
                                            ascending=[True, True, True, False])
    table["WER"] = table["WER"].map("{:.1%}".format)
    table["CER"] = table["CER"].map("{:.1%}".format)
    print("| " + " | ".join(table.columns) + " |")
    print("|" + "---|" * len(table.columns))
    for row in table.itertuples(index=False):
        print("| " + " | ".join(str(v) for v in row) + " |")


if __name__ == "__main__":
    main()
