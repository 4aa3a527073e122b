"""`python -m tests.fuzz [--json FILE] [--only FAMILY]`: run the fuzz suite and print its table of outcomes."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.fuzz.cases import all_cases, build_base  # noqa: E402
from tests.fuzz.harness import FAILURES, markdown, run_all, table  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", type=Path, help="write every case's outcome here")
    parser.add_argument("--only", help="run only this family")
    args = parser.parse_args()
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        build_base(Path(tmp) / "base")
        cases = [c for c in all_cases() if args.only in (None, c.family)]
        outcomes = run_all(cases, Path(tmp) / "cases", log=print)
    counts = table(outcomes)
    print(markdown(counts))
    print(f"{len(outcomes)} cases in {time.time() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps([o.__dict__ for o in outcomes], indent=1) + "\n")
    return int(any(o.outcome in FAILURES for o in outcomes))


if __name__ == "__main__":
    raise SystemExit(main())
