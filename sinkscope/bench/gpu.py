"""The recorder against a plain SDPA forward on CUDA (issue 16): `python -m sinkscope.bench.gpu --out DIR`.

Llama configs with the shapes of SmolLM2-135M, Llama-3.2-1B and Llama-3.1-8B, random weights built directly on
the GPU in bfloat16 (real weights cannot be copied to a lent GPU machine). For each shape and length it times, in
interleaved repetitions (median), the decoder body's forward (`model.model`, no LM head) plain, inside `Recorder`
on the device path (Triton column sums, radix median, no host sync), and, with `--torch-path`, inside `Recorder`
on the torch path (`SINKSCOPE_TRITON=0`, what main shipped before). Peak memory is
`torch.cuda.max_memory_allocated` of each call, reported as extra over the plain forward's peak.

It needs only torch, transformers, numpy, pandas, pyarrow, safetensors and pydantic (no typer), so that it runs
on a bare GPU machine from a copy of the repository: `PYTHONPATH=. python -m sinkscope.bench.gpu`. Targets
(issue 16): recorder <= 1.3x SDPA at T in {8192, 32768} and <= 1.5x at 2048 for the 1B and 8B shapes, <= 1.5x for
B=32, T=256 at the 1B shape, <= 2x at every T for the 135M shape; extra peak memory <= 10 % of SDPA's peak.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
}
CASES = [("smollm2-135m", 1, 2048), ("smollm2-135m", 1, 8192), ("smollm2-135m", 1, 32768),
         ("llama-3.2-1b", 1, 2048), ("llama-3.2-1b", 1, 8192), ("llama-3.2-1b", 1, 32768), ("llama-3.2-1b", 32, 256),
         ("llama-3.1-8b", 1, 2048), ("llama-3.1-8b", 1, 8192), ("llama-3.1-8b", 1, 32768)]
TARGETS = {("llama-3.2-1b", 1, 2048): 1.5, ("llama-3.1-8b", 1, 2048): 1.5, ("llama-3.2-1b", 32, 256): 1.5}


def target(shape: str, batch: int, t: int) -> float:
    if shape == "smollm2-135m":
        return 2.0
    return TARGETS.get((shape, batch, t), 1.3)


def build(shape: str, device: str = "cuda"):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=131072, attn_implementation="sdpa",
                         tie_word_embeddings=shape != "llama-3.1-8b")
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    return model


def timed(fn, reps: int, cuda: bool) -> tuple[list[float], list[int]]:
    times, peaks = [], []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        peaks.append(torch.cuda.max_memory_allocated() if cuda else 0)
    return times, peaks


def run_case(model, batch: int, t: int, reps: int, torch_path: bool) -> dict:
    from sinkscope.record import Recorder

    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    ids = torch.randint(3, model.config.vocab_size, (batch, t), device=device)
    ids[:, 0] = 1

    @torch.no_grad()
    def sdpa():
        model.model(input_ids=ids, use_cache=False)

    def recorder(flag: str):
        @torch.no_grad()
        def run():
            os.environ["SINKSCOPE_TRITON"] = flag
            with Recorder(model):
                model.model(input_ids=ids, use_cache=False)
        return run

    methods = {"sdpa": sdpa, "recorder": recorder("1")}
    if torch_path:
        methods["recorder_torch_path"] = recorder("0")
    for fn in methods.values():  # warm-up: Triton compilation, cuBLAS heuristics
        fn()
    runs = {name: ([], []) for name in methods}
    for _ in range(reps):  # interleaved, so that machine noise hits every method alike
        for name, fn in methods.items():
            times, peaks = timed(fn, 1, cuda)
            runs[name][0].extend(times)
            runs[name][1].extend(peaks)
    base_t = statistics.median(runs["sdpa"][0])
    base_peak = max(max(runs["sdpa"][1]), 1)
    out = {"sdpa_s": base_t, "sdpa_peak_gib": base_peak / 2**30, "reps": reps}
    for name in methods:
        if name == "sdpa":
            continue
        out[f"{name}_s"] = statistics.median(runs[name][0])
        out[f"{name}_ratio"] = out[f"{name}_s"] / base_t
        out[f"{name}_extra_peak_pct"] = 100.0 * (max(runs[name][1]) - base_peak) / base_peak if cuda else float("nan")
    os.environ.pop("SINKSCOPE_TRITON", None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "experiments/results")))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of the shapes")
    ap.add_argument("--max-t", type=int, default=32768)
    ap.add_argument("--torch-path", action="store_true", help="also time the torch path (slow: 8-36x)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting new cases after this long")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test of this script")
    ap.add_argument("--cases", default=None, help="SHAPE:B:T,... instead of the issue's cases")
    args = ap.parse_args()
    import transformers

    start = time.time()
    env = {"torch": torch.__version__, "transformers": transformers.__version__,
           "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else args.device,
           "date": time.strftime("%Y-%m-%d %H:%M")}
    all_cases = CASES if args.cases is None else [
        (c.split(":")[0], int(c.split(":")[1]), int(c.split(":")[2])) for c in args.cases.split(",")]
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    print(json.dumps(env), flush=True)
    rows = []
    shapes = args.shapes.split(",")
    for shape in shapes:
        cases = [c for c in all_cases if c[0] == shape and c[2] <= args.max_t]
        if not cases:
            continue
        if time.time() - start > args.budget_s:
            print(f"budget spent: {shape} not run", flush=True)
            break
        model = build(shape, args.device)
        for _, batch, t in cases:
            if time.time() - start > args.budget_s:
                print(f"budget spent: {shape} B={batch} T={t} not run", flush=True)
                break
            try:
                row = run_case(model, batch, t, args.reps, args.torch_path and t <= 8192)
            except torch.OutOfMemoryError as exc:
                row = {"error": f"out of memory: {str(exc)[:200]}"}
                torch.cuda.empty_cache()
            except Exception as exc:  # noqa: BLE001 - one failing case must not lose the others' numbers
                row = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            row.update(shape=shape, batch=batch, t=t, target=target(shape, batch, t))
            rows.append(row)
            print(json.dumps(row), flush=True)
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
    print(f"\n{'shape':<14} {'B':>3} {'T':>6} {'recorder/SDPA':>14} {'target':>7} {'extra peak':>11}"
          f" {'torch path/SDPA':>16}")
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:<14} {r['batch']:>3} {r['t']:>6} {r['error']}")
            continue
        torch_ratio = f"{r['recorder_torch_path_ratio']:.2f}x" if "recorder_torch_path_ratio" in r else "-"
        mark = "" if r["recorder_ratio"] <= r["target"] else "  MISSED"
        print(f"{r['shape']:<14} {r['batch']:>3} {r['t']:>6} {r['recorder_ratio']:>13.2f}x {r['target']:>6.1f}x "
              f"{r['recorder_extra_peak_pct']:>10.1f}% {torch_ratio:>16}{mark}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_gpu.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
