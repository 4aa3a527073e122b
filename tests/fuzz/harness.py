"""The fuzz harness: run a corrupted input through the code a user would run it through, in this process, with a
time limit, and classify what happened.

Outcomes of a case whose input is corrupt (`expect="error"`):
- **clean**: a `SinkscopeError` (or a CLI exit with an `error:` / usage message and no other exception);
- **raw**: any other exception, i.e. what a user would see as a traceback;
- **silent**: no error at all: the corruption was accepted;
- **hang**: the time limit ran out.
Outcomes of a valid variant (`expect="ok"`): **correct** when the check on the result passes, **wrong** when it
does not or when the input is refused. **loss**, for either, when a file that existed before the case changed or
disappeared (an error case must leave every file as it was; an ok case names the files it must not touch).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from sinkscope.errors import SinkscopeError

OUTCOMES = ("clean", "raw", "silent", "hang", "loss", "correct", "wrong")
FAILURES = ("raw", "silent", "hang", "loss", "wrong")


class Hang(BaseException):  # noqa: N818 - not an Exception: `except Exception` in the code under test must not catch it
    pass


class CleanExit(Exception):  # noqa: N818
    """A CLI command ended with its own error message (exit code != 0, no exception of ours)."""


@dataclass
class Case:
    family: str
    name: str
    setup: Callable[[Path], Any]  # builds the input in a fresh directory; returns what `act` needs
    act: Callable[[Any], Any]  # runs the code under test
    expect: str = "error"  # "error" or "ok"
    check: Callable[[Any, Any], bool] | None = None  # ok cases: check(context, result)
    protect: Callable[[Path], list[Path]] | None = None  # ok cases: files that must stay byte-identical
    limit: float = 20.0  # seconds before the case counts as a hang


@dataclass
class Outcome:
    family: str
    name: str
    outcome: str
    seconds: float
    detail: str = ""
    extra: dict = field(default_factory=dict)
    cpu_seconds: float = 0.0  # the process's CPU time: unlike wall time, not stretched by other jobs on the machine


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def _alarm(signum, frame):
    raise Hang()


def run_case(case: Case, workdir: Path) -> Outcome:
    work = workdir / f"{case.family}-{case.name}".replace("/", "_")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cwd = os.getcwd()
    os.chdir(work)  # whatever a command writes into its working directory stays in the case's directory
    try:
        return _run_in(case, work)
    finally:
        os.chdir(cwd)


def _run_in(case: Case, work: Path) -> Outcome:
    context = case.setup(work)
    if case.expect == "error":
        before = _snapshot(work)
    else:
        protected = case.protect(work) if case.protect else []
        before = {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in protected}
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, case.limit)
    start, cpu_start = time.perf_counter(), time.process_time()
    result, error = None, None
    try:
        result = case.act(context)
        if Path("PWNED").exists():
            raise AssertionError("a planted pickle payload ran")
    except Hang:
        error = "hang"
    except (SinkscopeError, CleanExit) as exc:
        error = ("clean", str(exc))
    except Exception as exc:  # noqa: BLE001 - what the harness is here to find
        error = ("raw", "".join(traceback.format_exception_only(exc)).strip())
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    if error == "hang":
        outcome, detail = "hang", f"still running after {case.limit} s"
    elif error is not None:
        kind, detail = error
        outcome = kind if case.expect == "error" or kind == "raw" else "wrong"
    elif case.expect == "error":
        outcome, detail = "silent", f"accepted; returned {str(result)[:200]}"
    else:
        ok = case.check(context, result) if case.check else True
        outcome, detail = ("correct", "") if ok else ("wrong", f"check failed on {str(result)[:200]}")
    if case.expect == "error":
        after = _snapshot(work)
        changed = sorted(k for k, v in before.items() if after.get(k) != v)
    else:
        changed = sorted(k for k, v in before.items() if not Path(k).is_file()
                         or hashlib.sha256(Path(k).read_bytes()).hexdigest() != v)
    if changed and outcome not in ("raw", "hang"):
        outcome, detail = "loss", f"changed or removed: {changed[:3]}; {detail}"
    return Outcome(case.family, case.name, outcome, seconds, detail, cpu_seconds=cpu_seconds)


def run_all(cases: list[Case], workdir: Path, log: Callable[[str], None] | None = None) -> list[Outcome]:
    out = []
    for case in cases:
        result = run_case(case, workdir)
        if log is not None and result.outcome in FAILURES:
            log(f"{result.family}/{result.name}: {result.outcome} ({result.detail})")
        out.append(result)
    return out


def table(outcomes: list[Outcome]) -> pd.DataFrame:
    """Cases per family and outcome, with a total row."""
    df = pd.DataFrame([{"family": o.family, "outcome": o.outcome} for o in outcomes])
    counts = pd.crosstab(df["family"], df["outcome"]).reindex(columns=list(OUTCOMES), fill_value=0)
    counts.insert(0, "cases", counts.sum(axis=1))
    counts.loc["all"] = counts.sum()
    return counts


def markdown(counts: pd.DataFrame) -> str:
    """The table as GitHub markdown (what the README shows)."""
    header = ["family", *counts.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for family, row in counts.iterrows():
        name = f"**{family}**" if family == "all" else family
        lines.append("| " + " | ".join([name, *(str(int(v)) for v in row)]) + " |")
    return "\n".join(lines)
