"""The recorder benchmark. `python -m sinkscope.bench record` compares, in one run and on one model:

- `sdpa`: the plain forward (the baseline of every ratio);
- `recorder`: the same forward inside `Recorder` (all reductions, moved to the CPU);
- `eager`: HF eager attention with `output_attentions=True, output_hidden_states=True`;
- `tl4`: TransformerLens 4 `TransformerBridge.run_with_cache` with a names_filter on
  `attn.hook_pattern`, `hook_resid_post` and `hook_mlp_out`.

Time is the median over repetitions, the methods interleaved so that machine noise hits all of them alike. The
recorder is `Recorder(model)` as users run it (`--compile` times `Recorder(model, compile=True)` instead).

Peak memory, reported as extra over the plain SDPA forward of the same length:
- on CUDA, `torch.cuda.max_memory_allocated` above the memory in use before the call;
- on the CPU, two figures, each from fresh child processes:
  - `rss`: what a user sees, the process's peak resident set size with the default allocator, in one process per
    method that loads the model, resets the RSS high-water mark (`/proc/self/clear_refs`; otherwise loading the
    model, whose peak is higher, would hide the forward's) and runs the method twice (issue 16's target is on this);
  - `live`: the peak RSS sampled every 0.5 ms during one call above the RSS before it, in a process where glibc
    returns every freed block of 64 KiB or more to the OS (`MALLOC_MMAP_THRESHOLD_=65536`), so that it counts
    the memory the method holds rather than what the allocator keeps.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import re
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
from sinkscope.record import Recorder, fused_cpu

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


def make_methods(model, tokenizer, model_dir, device, compile: bool = False, with_tl4: bool = True
                 ) -> dict[str, Callable]:
    """One callable per method; each runs a whole forward and returns what that method records (`tl4` only
    with `with_tl4`: booting TransformerLens's bridge takes memory that the other methods' processes must not hold)."""
    bridge = None
    if with_tl4:
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


def say(message: str) -> None:
    """A progress line on stderr (the table goes to stdout), one per step, readable in a log file."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def time_methods(fns: dict, ids: torch.Tensor, reps: int, dev: torch.device) -> dict[str, list[float]]:
    """Wall time of each method, `reps` times, the order rotated every repetition."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    t = ids.shape[-1]
    with torch.no_grad():
        for name, fn in fns.items():  # warm-up (and torch.compile)
            start = time.perf_counter()
            fn(ids)
            say(f"T={t}: warm-up {name} {time.perf_counter() - start:.2f} s")
        for rep in range(reps):
            if rep:
                say(f"T={t}: repetition {rep}/{reps}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()))
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


def paired_ratio(times: list[float], base: list[float]) -> float:
    """The median over repetitions of `times[i] / base[i]`: the two ran one after the other in repetition i, so
    a slow drift of the machine (the plain forward took 0.86-1.23 s at T = 512 across runs here) cancels in each
    ratio, where the ratio of the two medians keeps it. Reported beside that ratio; the targets are judged on the
    ratio of the medians, as before."""
    return statistics.median(a / b for a, b in zip(times, base, strict=True))


def bench_record(model_name: str, lengths: list[int], reps: int, device: str, methods: list[str],
                 compile: bool = False, rss_reps: int = 3) -> dict:
    """Times in this process; CPU peak memory in a child process (see `memory`), CUDA peaks here."""
    dev = torch.device(device)
    model, tok = load_llm(model_name, device=dev)
    fns = make_methods(model, tok, resolve_llm_dir(model_name), dev, compile=compile, with_tl4="tl4" in methods)
    fns = {k: v for k, v in fns.items() if k in methods}
    rows = []
    for t in lengths:
        ids = _ids(tok, t, dev)
        say(f"T={t}: timing {', '.join(fns)}, {reps} interleaved repetitions after a warm-up")
        times = time_methods(fns, ids, reps, dev)
        say(f"T={t}: medians " + ", ".join(f"{k} {statistics.median(v):.3f} s" for k, v in times.items()))
        rss = {}
        if dev.type == "cuda":
            with torch.no_grad():
                peaks = {name: peak_extra_bytes(lambda fn=fn, ids=ids: fn(ids), dev) for name, fn in fns.items()}
        else:
            say(f"T={t}: live peak memory, one child process")
            peaks = _cpu_peaks_in_child(model_name, t, list(fns), compile)
            rss = {}
            for name in fns:
                say(f"T={t}: process peak RSS of {name}, {rss_reps} child process(es)")
                rss[name] = statistics.median(_maxrss_in_child(model_name, t, name, compile)
                                              for _ in range(rss_reps))
        base_t, base_m = statistics.median(times["sdpa"]), peaks["sdpa"]
        for name in fns:
            med = statistics.median(times[name])
            row = {"T": t, "method": name, "median_s": med, "ratio": med / base_t,
                   "paired_ratio": paired_ratio(times[name], times["sdpa"]), "times_s": times[name],
                   "peak_mib": peaks[name] / 2**20, "extra_peak_mib": (peaks[name] - base_m) / 2**20, "reps": reps}
            if rss:
                row.update(maxrss_mib=rss[name] / 2**20, extra_maxrss_mib=(rss[name] - rss["sdpa"]) / 2**20)
            rows.append(row)
    info = {
        "model": model_name, "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "recorder_compile": compile,
        "rss_reps": rss_reps,
        # which per-layer reductions a CPU recording took: the C passes, or torch's (SINKSCOPE_CPU_KERNELS=0, no
        # C compiler)
        "cpu_reductions": "C" if fused_cpu.available() else "torch",
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


def _reset_peak_rss() -> bool:
    """Reset the process's RSS high-water mark (Linux: "5" to /proc/self/clear_refs), so that the peak measured
    is the methods' and not that of loading the model (which is higher than a forward's at T <= 2048)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    """The RSS high-water mark (VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM")


def _maxrss_in_child(model_name: str, t: int, method: str, compile: bool) -> int:
    """The peak RSS (bytes) of a fresh process, default allocator, while it runs `method` twice (model loaded)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    cmd = [sys.executable, "-m", "sinkscope.bench", "memory", "--model", model_name, "--length", str(t),
           "--methods", method, "--maxrss", "--compile" if compile else "--no-compile"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return int(json.loads(out.strip().splitlines()[-1])[method])


def markdown(result: dict) -> str:
    """The result as a Markdown table with target verdicts."""
    info = result["info"]
    lines = [
        f"{info['model']} on {info['device']} ({info['threads']} threads), torch {info['torch']}, {info['date']}, "
        f"B=1, median of {result['rows'][0]['reps']} interleaved repetitions (paired: the median of the "
        f"per-repetition ratios to SDPA), recorder compile="
        f"{info['recorder_compile']}" + (f", CPU reductions: {info['cpu_reductions']}" if "cpu_reductions" in info
                                        and info["device"] == "cpu" else "") + ".",
        "",
    ]
    rss = "maxrss_mib" in result["rows"][0]
    if rss:
        lines += ["| T | method | median time (s) | time / SDPA | paired | process peak RSS (MiB) | RSS over SDPA's "
                  "(MiB) | live peak (MiB) | live over SDPA (MiB) |", "|---|---|---|---|---|---|---|---|---|"]
    else:
        lines += ["| T | method | median time (s) | time / SDPA | paired | peak extra memory (MiB) | extra over SDPA "
                  "(MiB) |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        paired = f"{r['paired_ratio']:.2f}x" if "paired_ratio" in r else "–"
        cells = [f"{r['T']}", r["method"], f"{r['median_s']:.3f}", f"{r['ratio']:.2f}x", paired]
        if rss:
            cells += [f"{r['maxrss_mib']:.0f}", f"{r['extra_maxrss_mib']:+.0f}"]
        cells += [f"{r['peak_mib']:.0f}", f"{r['extra_peak_mib']:+.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for r in result["rows"]:
        if r["method"] != "recorder":
            continue
        if r["T"] in TARGETS:
            ok = r["ratio"] <= TARGETS[r["T"]]
            lines.append(f"- T={r['T']}: recorder {r['ratio']:.2f}x SDPA, target <= {TARGETS[r['T']]:.2f}x: "
                         f"{'met' if ok else 'MISSED'}"
                         + (f" (paired: {r['paired_ratio']:.2f}x)" if "paired_ratio" in r else ""))
        if r["T"] == 2048:
            extra, what = ((r["extra_maxrss_mib"], "process peak RSS over SDPA's (default allocator)") if rss
                           else (r["extra_peak_mib"], "extra peak memory"))
            ok = extra <= MEMORY_TARGET_MIB
            lines.append(f"- T=2048: recorder {what} {extra:+.0f} MiB, target <= {MEMORY_TARGET_MIB} MiB: "
                         f"{'met' if ok else 'MISSED'}")
    return "\n".join(lines) + "\n"


def _lengths(spec: str) -> list[int]:
    """`--lengths` as whole numbers >= 2 (a BOS and one token), or a BadParameter naming the entry."""
    out = []
    for item in spec.split(","):
        item = item.strip()
        if not item.isdigit() or int(item) < 2:
            raise typer.BadParameter(f"{item!r} is not a sequence length (a whole number >= 2) in {spec!r}",
                                     param_hint="--lengths")
        out.append(int(item))
    return out


@app.command()
def record(
    model: str = typer.Option("smollm2-135m"),
    lengths: str = typer.Option(None, help="Comma-separated sequence lengths [default: 512,2048; with "
                                "--random-weights the issue's cases, 2048 to 32768, or these lengths at B=1]."),
    reps: int = typer.Option(5, min=1),
    device: str = typer.Option("cuda" if torch.cuda.is_available() else "cpu"),
    methods: str = typer.Option(",".join(METHODS)),
    compile: bool = typer.Option(False, help="Time Recorder(compile=True) (torch.compile fusion) instead of the "
                                 "default Recorder()."),
    out: Path = typer.Option(None, help="Write JSON and Markdown here (stem; .json and .md are added)."),
    rss_reps: int = typer.Option(3, min=1, help="CPU: fresh processes per method for the peak RSS (median; it "
                                 "varies by about 50 MiB from one process to the next)."),
    shapes: str = typer.Option(None, help="With --random-weights: comma-separated Llama shapes "
                               "(smollm2-135m, llama-3.2-1b, llama-3.1-8b)."),
    random_weights: bool = typer.Option(False, help="Random-weight bf16 Llama configs with real shapes, built on "
                                        "the device (the GPU benchmark of issue 16: sinkscope.bench.gpu)."),
) -> None:
    """Time and memory of the recorder against plain SDPA, HF eager and TransformerLens 4."""
    if device not in ("cpu", "cuda") and not re.fullmatch(r"cuda:\d+", device):
        raise typer.BadParameter(f"{device!r}: cpu, cuda or cuda:N", param_hint="--device")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise typer.BadParameter("CUDA is not available here (torch.cuda.is_available() is False); run on a machine "
                                 "with a GPU, or --device cpu", param_hint="--device")
    ts = _lengths(lengths) if lengths is not None else None
    unknown = [m for m in methods.split(",") if m not in METHODS]
    if unknown:
        raise typer.BadParameter(f"unknown {unknown}; known: {', '.join(METHODS)}", param_hint="--methods")
    if shapes is not None and not random_weights:
        raise typer.BadParameter("shapes are for --random-weights (the Llama configs of issue 16)",
                                 param_hint="--shapes")
    if random_weights:
        from sinkscope.bench import gpu

        names = [x for x in (shapes or ",".join(gpu.SHAPES)).split(",") if x]
        unknown = [x for x in names if x not in gpu.SHAPES]
        if unknown or not names:
            raise typer.BadParameter(f"unknown {unknown or shapes!r}; known: {', '.join(gpu.SHAPES)}",
                                     param_hint="--shapes")
        if out is None and not device.startswith("cuda"):
            # the default, experiments/results/gpu, holds the GPU's committed results: a CPU smoke run overwrote them
            raise typer.BadParameter("--random-weights on the CPU is a smoke test: give it --out DIR (the default, "
                                     "experiments/results/gpu, holds the GPU's measured results)", param_hint="--out")
        argv = ["--device", device.split(":")[0], "--reps", str(min(reps, 3)), "--eager",
                "--out", str(out or "experiments/results/gpu"), "--shapes", ",".join(names)]
        if ts is not None:  # these lengths at B=1 instead of the cases
            argv += ["--cases", ",".join(f"{name}:1:{t}" for name in names for t in ts), "--max-t", str(max(ts))]
        gpu.main(argv)
        return
    result = bench_record(model, ts or [512, 2048], reps, device, methods.split(","),
                          compile=compile, rss_reps=rss_reps)
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
    compile: bool = typer.Option(False),
    maxrss: bool = typer.Option(False, help="Report the process's peak RSS (ru_maxrss) after the methods instead."),
) -> None:
    """(internal) CPU peak memory of each method at one length, printed as JSON bytes."""
    import resource

    dev = torch.device("cpu")
    llm, tok = load_llm(model, device=dev)
    fns = make_methods(llm, tok, resolve_llm_dir(model), dev, compile=compile, with_tl4="tl4" in methods)
    ids = _ids(tok, length, dev)
    peaks = {}
    if maxrss:
        with torch.no_grad():
            for name in methods.split(","):
                reset = _reset_peak_rss()
                for _ in range(2):
                    fns[name](ids)
                peaks[name] = _peak_rss() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps(peaks))
        return
    with torch.no_grad():
        for name in methods.split(","):
            fns[name](ids)  # warm-up, so that one-time allocations (and compilation) are not counted
            peaks[name] = peak_extra_bytes(lambda fn=fns[name]: fn(ids), dev)
    print(json.dumps(peaks))
