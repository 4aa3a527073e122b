"""App benchmarks: `python -m sinkscope.bench app` (open a 1,000-sample trace, switch samples) and
`python -m sinkscope.bench app-start` (the cold start of a fresh process: imports and the first render)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import typer

from sinkscope.appserver import ENTRY
from sinkscope.bench import app


def write_prompt_trace(path: Path, n: int, model_name: str = "smollm2-135m", batch_size: int = 8,
                       dtype=None) -> Path:
    """A real trace of `n` short generated prompts (resumable), for the app benchmarks; `dtype` e.g. bfloat16."""
    from sinkscope.models.llm import load_llm
    from sinkscope.record.run import record_texts

    subjects = ["The committee", "A small dog", "My neighbour", "The old train", "Every student", "The river"]
    verbs = ["crossed", "watched", "described", "repaired", "ignored", "followed"]
    objects = ["the bridge at dawn", "a long list of numbers", "the quiet garden", "seven red boxes",
               "the final report", "an unexpected visitor"]
    texts = [f"{subjects[i % 6]} {verbs[(i // 6) % 6]} {objects[(i // 36) % 6]} on day {i}." for i in range(n)]
    llm, tok = load_llm(model_name, **({} if dtype is None else {"dtype": dtype}))
    config = {"model": model_name, **({} if dtype is None else {"dtype": str(dtype).removeprefix("torch.")})}
    record_texts(llm, tok, texts, path, batch_size=batch_size, resume=True, config=config)
    return path


def bench_app(trace_path: Path, reps: int = 5) -> dict:
    """Seconds to open the app on a trace and render its overview: the first load, then later loads."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    os.environ["SINKSCOPE_ROOT"] = str(trace_path.parent.resolve())
    script = str(ENTRY)
    st.cache_data.clear()
    st.cache_resource.clear()
    start = time.perf_counter()
    at = AppTest.from_file(script, default_timeout=600)
    at.run()
    first = time.perf_counter() - start
    if at.exception or at.error:
        raise RuntimeError(f"the app failed on {trace_path}: {[e.value for e in list(at.exception) + list(at.error)]}")
    later, switch = [], []
    n = len(at.sidebar.selectbox(key="main_sample").options)
    for rep in range(reps):
        start = time.perf_counter()
        fresh = AppTest.from_file(script, default_timeout=600)
        fresh.run()  # a new session: caches warm, overview of the first sample
        later.append(time.perf_counter() - start)
        start = time.perf_counter()
        fresh.sidebar.selectbox(key="main_sample").set_value((rep * 97 + 1) % n).run()
        switch.append(time.perf_counter() - start)
    return {"samples": n, "first_load_s": first, "reload_median_s": statistics.median(later),
            "switch_sample_median_s": statistics.median(switch), "reps": reps}


@app.command("app")
def app_speed(
    samples: int = typer.Option(1000, help="Samples in the benchmark trace."),
    trace: Path = typer.Option(Path("traces/bench/prompts-1000"), help="Where the trace is (made if missing)."),
    reps: int = typer.Option(5, min=1),
    out: Path = typer.Option(None, help="Write JSON here."),
) -> None:
    """Time to open a trace in the app and render the overview (target: <= 1 s after the first load)."""
    write_prompt_trace(trace, samples)
    result = bench_app(trace, reps)
    result["date"] = time.strftime("%Y-%m-%d")
    print(json.dumps(result, indent=2))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))


COLD_START = """
import sys, time
start = time.perf_counter()
from streamlit.testing.v1 import AppTest
at = AppTest.from_file(sys.argv[1], default_timeout=600)
at.run()
assert not at.exception, [e.value for e in at.exception]
print(time.perf_counter() - start, "torch" in sys.modules)
"""


def cold_start(root: Path, source: Path | None = None) -> tuple[float, bool]:
    """Seconds from a fresh interpreter to the app's first render of the first trace under `root` (imports
    included), and whether torch was imported. `source` runs another checkout of sinkscope (its PYTHONPATH)."""
    env = dict(os.environ, SINKSCOPE_ROOT=str(root.resolve()))
    entry, cwd = ENTRY, ENTRY.parents[1]
    if source is not None:  # `python -c` puts the working directory first on sys.path: run from that checkout
        env["PYTHONPATH"] = str(source.resolve())
        entry, cwd = source.resolve() / "sinkscope" / "_app_entry.py", source.resolve()
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", COLD_START, str(entry)], env=env, capture_output=True, text=True,
                          check=True, cwd=cwd)
    wall = time.perf_counter() - start
    torch_loaded = done.stdout.split()[-1] == "True"
    return wall, torch_loaded


@app.command("app-start")
def app_start(
    root: Path = typer.Option(Path("traces"), help="Trace root (the first trace is rendered)."),
    reps: int = typer.Option(5, min=1),
    before: Path = typer.Option(None, help="Another sinkscope checkout to compare with (e.g. a git worktree)."),
    out: Path = typer.Option(None, help="Write JSON here."),
) -> None:
    """Cold start of the app: a fresh process to its first render (median of reps; interleaved with --before)."""
    runs = {"this": [], "before": []}
    torch_loaded = {}
    for _ in range(reps):
        for name, source in (("this", None), ("before", before)):
            if name == "before" and before is None:
                continue
            wall, loaded = cold_start(root, source)
            runs[name].append(wall)
            torch_loaded[name] = loaded
    from sinkscope.config import command_line

    result = {"command": command_line(), "date": time.strftime("%Y-%m-%d"), "root": str(root), "reps": reps,
              **{f"{k}_median_s": statistics.median(v) for k, v in runs.items() if v},
              "torch_imported": torch_loaded, "runs_s": {k: v for k, v in runs.items() if v}}
    if before is not None:
        result["before"] = str(before)
    print(json.dumps(result, indent=2))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
