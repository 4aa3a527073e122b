"""Where the word errors of a GRID model sit: the error rate of each of the six GRID slots
(command, colour, preposition, letter, digit, adverb), from the hypotheses CSVs of `sinkscope eval`
(columns id, reference, hypothesis), or from greedy CTC of the pretrained encoders (`--encoders`).

    python experiments/grid_slot_errors.py experiments/results/eval/avsr_e3_clean.csv ...
    python experiments/grid_slot_errors.py --encoders experiments/weights/encoders-grid-2k-v2 --data corpora/grid-2k
    python experiments/grid_slot_errors.py --encoders ... --data corpora/grid-2k --split train   # training voices

A hypothesis with another number of words than its reference counts as wrong in every slot. Prints a markdown
table, one row per source.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from sinkscope.errors import SinkscopeError

SLOTS = ["command", "colour", "preposition", "letter", "digit", "adverb"]


def slot_errors(refs: list[str], hyps: list[str]) -> dict[str, float]:
    wrong = [0] * len(SLOTS)
    for ref, hyp in zip(refs, hyps, strict=True):
        r, h = ref.split(), str(hyp if isinstance(hyp, str) else "").split()
        if len(r) != len(SLOTS):
            raise ValueError(f"not a GRID sentence (six words): {ref!r}")
        for i in range(len(SLOTS)):
            wrong[i] += len(h) != len(r) or r[i] != h[i]
    return {slot: w / max(1, len(refs)) for slot, w in zip(SLOTS, wrong, strict=True)} | {"n": len(refs)}


def from_csv(path: Path) -> dict:
    try:
        frame = pd.read_csv(path, keep_default_na=False)
        return slot_errors(list(frame["reference"]), list(frame["hypothesis"]))
    except (OSError, KeyError, ValueError, pd.errors.ParserError) as exc:
        sys.exit(f"{path}: not a hypotheses CSV of `sinkscope eval` ({exc})")


def from_encoders(encoders: Path, data: Path, limit: int, split: str = "test") -> dict[str, dict]:
    import torch
    from safetensors.torch import load_file
    from torch.utils.data import DataLoader

    from sinkscope.data.dataset import AVSRDataset, collate
    from sinkscope.models.encoders import AudioEncoderConfig, VideoEncoderConfig
    from sinkscope.train.ctc import CTCModel, greedy_decode

    test = AVSRDataset(data, split, limit=limit)
    rows = {}
    for modality in ("audio", "video"):
        model = CTCModel(modality, AudioEncoderConfig(max_seconds=4.0), VideoEncoderConfig()).eval()
        where = encoders / f"{modality}.safetensors"
        try:
            model.load_state_dict({k: v.float() for k, v in load_file(where).items()})
        except Exception as exc:  # missing, unreadable, or not a CTC model's weights
            raise SinkscopeError(f"{where}: not the {modality} encoder that `sinkscope export` writes from a "
                                 f"pretrain-encoders run ({str(exc).splitlines()[0]})") from exc
        refs, hyps = [], []
        with torch.no_grad():
            for batch in DataLoader(test, batch_size=16, collate_fn=collate):
                hyps += greedy_decode(*model(batch))
                refs += batch["transcripts"]
        where = "" if split == "test" else f", {split} speakers"
        rows[f"{modality} encoder ({encoders.name}), greedy CTC{where}"] = slot_errors(refs, hyps)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", nargs="*", type=Path)
    parser.add_argument("--encoders", type=Path)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--split", default="test", help="split scored with --encoders (test: held-out speakers)")
    args = parser.parse_args()
    if args.limit < 1:
        parser.error(f"--limit must be at least 1, not {args.limit}")
    if args.encoders and not args.data:
        parser.error("--encoders needs --data")
    if not args.csv and not args.encoders:
        parser.error("give hypotheses CSVs, or --encoders with --data")
    rows = {path.stem: from_csv(path) for path in args.csv}
    if args.encoders:
        try:
            rows |= from_encoders(args.encoders, args.data, args.limit, args.split)
        except SinkscopeError as exc:
            sys.exit(str(exc))
    print("| source | n | " + " | ".join(SLOTS) + " |")
    print("|---|---|" + "---|" * len(SLOTS))
    for name, r in rows.items():
        print(f"| {name} | {r['n']} | " + " | ".join(f"{r[s]:.1%}" for s in SLOTS) + " |")


if __name__ == "__main__":
    main()
