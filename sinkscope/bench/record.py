"""The recorder benchmark. `python -m sinkscope.bench record` compares, in one run and on one model:

- `sdpa`: the plain forward (the baseline of every ratio);
- `recorder`: the same forward inside `Recorder` (all reductions, moved to the CPU);
- `eager`: HF eager attention with `output_attentions=True, output_hidden_states=True`;
- `tl4`: TransformerLens 4 `TransformerBridge.run_with_cache` with a names_filter on
  `attn.hook_pattern`, `hook_resid_post` and `hook_mlp_out`.

Time is the median over repetitions, the methods interleaved so that machine noise hits all of them alike.
Peak memory: on CUDA, `torch.cuda.max_memory_allocated` above the memory in use before the call; on the CPU,
the peak resident set size sampled every 0.5 ms by a thread during the call, above the RSS before it (after
`malloc_trim`). Both are reported as extra over the plain SDPA forward of the same length.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import typer

from sinkscope.bench import app
from sinkscope.models.llm import load_llm, resolve_llm_dir
from sinkscope.record import Recorder

METHODS = ("sdpa", "recorder", "eager", "tl4")
TARGETS = {512: 1.10, 2048: 1.25}
MEMORY_TARGET_MIB = 96


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak memory during `fn()` above the memory in use just before it."""
    _trim()
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    before = _rss_bytes()
    peak = before
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(0.0005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(peak, _rss_bytes()) - before


def make_methods(model, tokenizer, model_dir, device, compile: bool = True) -> dict[str, Callable]:
    """One callable per method; each runs a whole forward and returns what that method records."""
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(str(model_dir), tokenizer=tokenizer, device=str(device))

    def names(name: str) -> bool:
        return name.endswith(("attn.hook_pattern", "hook_resid_post", "hook_mlp_out"))

    def sdpa(ids):
        return model(input_ids=ids, use_cache=False).logits

    def recorder(ids):
        with Recorder(model, compile=compile) as rec:
            model(input_ids=ids, use_cache=False)
        return rec.samples

    def eager(ids):
        model.set_attn_implementation("eager")
        try:
            return model(input_ids=ids, use_cache=False, output_attentions=True, output_hidden_states=True)
        finally:
            model.set_attn_implementation("sdpa")

    def tl4(ids):
        return bridge.run_with_cache(ids, names_filter=names)

    return {"sdpa": sdpa, "recorder": recorder, "eager": eager, "tl4": tl4}


def _ids(tok, t: int, dev: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(t)
    ids = torch.randint(100, tok.vocab_size, (1, t), generator=gen)
    if tok.bos_token_id is not None:
        ids[0, 0] = tok.bos_token_id
    return ids.to(dev)


def time_methods(fns: dict, ids: torch.Tensor, reps: int, dev: torch.device) -> dict[str, list[float]]:
    """Wall time of each method, `reps` times, the order rotated every repetition."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():  # warm-up (and torch.compile)
            fn(ids)
        for rep in range(reps):
            order = list(fns)[rep % len(fns):] + list(fns)[: rep % len(fns)]
            for name in order:
                gc.collect()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                out = fns[name](ids)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
                del out
    return times


def bench_record(model_name: str, lengths: list[int], reps: int, device: str, methods: list[str],
                 compile: bool = True) -> dict:
    """Times in this process; CPU peak memory in a child process (see `memory`), CUDA peaks here."""
    dev = torch.device(device)
    model, tok = load_llm(model_name, device=dev)
    fns = make_methods(model, tok, resolve_llm_dir(model_name), dev, compile=compile)
    fns = {k: v for k, v in fns.items() if k in methods}
    rows = []
    for t in lengths:
        ids = _ids(tok, t, dev)
        times = time_methods(fns, ids, reps, dev)
        if dev.type == "cuda":
            with torch.no_grad():
                peaks = {name: peak_extra_bytes(lambda fn=fn, ids=ids: fn(ids), dev) for name, fn in fns.items()}
        else:
            peaks = _cpu_peaks_in_child(model_name, t, list(fns), compile)
        base_t, base_m = statistics.median(times["sdpa"]), peaks["sdpa"]
        for name in fns:
            med = statistics.median(times[name])
            rows.append({
                "T": t, "method": name, "median_s": med, "ratio": med / base_t,
                "peak_mib": peaks[name] / 2**20, "extra_peak_mib": (peaks[name] - base_m) / 2**20,
                "reps": reps,
            })
    info = {
        "model": model_name, "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "recorder_compile": compile,
    }
    return {"info": info, "rows": rows}


def _cpu_peaks_in_child(model_name: str, t: int, methods: list[str], compile: bool) -> dict[str, int]:
    # glibc keeps freed blocks in its heap, so RSS would overstate live tensors; with a fixed mmap threshold
    # every large block goes back to the OS on free. That slows allocation, hence a separate process.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, "-m", "sinkscope.bench", "memory", "--model", model_name, "--length", str(t),
           "--methods", ",".join(methods), "--compile" if compile else "--no-compile"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def markdown(result: dict) -> str:
    """The result as a Markdown table with target verdicts."""
    info = result["info"]
    lines = [
        f"{info['model']} on {info['device']} ({info['threads']} threads), torch {info['torch']}, {info['date']}, "
        f"B=1, median of {result['rows'][0]['reps']} interleaved repetitions, recorder compile="
        f"{info['recorder_compile']}.",
        "",
        "| T | method | median time (s) | time / SDPA | peak extra memory (MiB) | extra over SDPA (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['T']} | {r['method']} | {r['median_s']:.3f} | {r['ratio']:.2f}x | "
                     f"{r['peak_mib']:.0f} | {r['extra_peak_mib']:+.0f} |")
    lines.append("")
    for r in result["rows"]:
        if r["method"] != "recorder":
            continue
        if r["T"] in TARGETS:
            ok = r["ratio"] <= TARGETS[r["T"]]
            lines.append(f"- T={r['T']}: recorder {r['ratio']:.2f}x SDPA, target <= {TARGETS[r['T']]:.2f}x: "
                         f"{'met' if ok else 'MISSED'}")
        if r["T"] == 2048:
            ok = r["extra_peak_mib"] <= MEMORY_TARGET_MIB
            lines.append(f"- T=2048: recorder extra peak memory {r['extra_peak_mib']:+.0f} MiB, target <= "
                         f"{MEMORY_TARGET_MIB} MiB: {'met' if ok else 'MISSED'}")
    return "\n".join(lines) + "\n"


@app.command()
def record(
    model: str = typer.Option("smollm2-135m"),
    lengths: str = typer.Option("512,2048", help="Comma-separated sequence lengths."),
    reps: int = typer.Option(5, min=1),
    device: str = typer.Option("cuda" if torch.cuda.is_available() else "cpu"),
    methods: str = typer.Option(",".join(METHODS)),
    compile: bool = typer.Option(True, help="Record with torch.compile fusion (Recorder(compile=True))."),
    out: Path = typer.Option(None, help="Write JSON and Markdown here (stem; .json and .md are added)."),
    shapes: str = typer.Option(None, help="With --random-weights: comma-separated Llama shapes "
                               "(smollm2-135m, llama-3.2-1b, llama-3.1-8b)."),
    random_weights: bool = typer.Option(False, help="Random-weight bf16 Llama configs with real shapes, built on "
                                        "the device (the GPU benchmark of issue 16: sinkscope.bench.gpu)."),
) -> None:
    """Time and memory of the recorder against plain SDPA, HF eager and TransformerLens 4."""
    if random_weights:
        from sinkscope.bench import gpu

        argv = ["--device", device, "--reps", str(min(reps, 3)), "--eager",
                "--out", str(out or "experiments/results/gpu")]
        gpu.main(argv + (["--shapes", shapes] if shapes else []))
        return
    result = bench_record(model, [int(x) for x in lengths.split(",")], reps, device, methods.split(","),
                          compile=compile)
    table = markdown(result)
    print(table)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=2))
        out.with_suffix(".md").write_text(table)


@app.command()
def memory(
    model: str = typer.Option("smollm2-135m"),
    length: int = typer.Option(2048),
    methods: str = typer.Option(",".join(METHODS)),
    compile: bool = typer.Option(True),
) -> None:
    """(internal) CPU peak memory of each method at one length, printed as JSON bytes."""
    dev = torch.device("cpu")
    llm, tok = load_llm(model, device=dev)
    fns = make_methods(llm, tok, resolve_llm_dir(model), dev, compile=compile)
    ids = _ids(tok, length, dev)
    peaks = {}
    with torch.no_grad():
        for name in methods.split(","):
            fns[name](ids)  # warm-up, so that one-time allocations (and compilation) are not counted
            peaks[name] = peak_extra_bytes(lambda fn=fns[name]: fn(ids), dev)
    print(json.dumps(peaks))
