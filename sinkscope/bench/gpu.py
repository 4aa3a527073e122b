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
import contextlib
import json
import os
import statistics
import time
import traceback
from pathlib import Path
from unittest import mock

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


def recorded_forward(rec, model, ids: torch.Tensor, switches=()) -> None:
    """One decoder-body forward (no LM head) inside `rec` (a `Recorder`, entered for it; its samples dropped
    after), with each of `switches` ((module, attribute, value)) set for that forward only."""
    with contextlib.ExitStack() as stack:
        for module, name, value in switches:
            stack.enter_context(mock.patch.object(module, name, value))
        with rec:
            model.model(input_ids=ids, use_cache=False)
    rec.samples.clear()


def run_case(model, batch: int, t: int, reps: int, torch_path: bool, eager: bool = False,
             host_ab: bool = False, graphs: bool = False, fresh: bool = False) -> dict:
    """One case: plain SDPA, the recorder (and the torch path, HF eager) timed in interleaved repetitions. Each
    recorder is one `Recorder` entered for each forward, as `sinkscope record` keeps one over a corpus (since
    session 20: it keeps its buffers and launch plan for the next forward of a shape; until session 19 this bench
    made a new one per forward). `host_ab`: also the recorder with session 19's host-side changes off
    (`kernels.FAST_LAUNCH`, `kernels.LAYER_PLAN`, `recorder.PREFAULT`), as `recorder_host_before`. `graphs`: also
    the recorder with CUDA graphs (`kernels.CUDA_GRAPHS`), as `recorder_graphs`, with how many graphs it captured
    and replayed. `fresh`: also a new Recorder for every forward (a one-off recording), as `recorder_fresh`."""
    from sinkscope.record import Recorder
    from sinkscope.record import kernels as kernels_module
    from sinkscope.record import recorder as recorder_module

    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    ids = torch.randint(3, model.config.vocab_size, (batch, t), device=device)
    ids[:, 0] = 1

    @torch.no_grad()
    def sdpa():
        model.model(input_ids=ids, use_cache=False)

    def recorder(flag: str, new_each_time: bool = False, *switches):
        kept = Recorder(model)

        @torch.no_grad()
        def run():
            os.environ["SINKSCOPE_TRITON"] = flag
            recorded_forward(Recorder(model) if new_each_time else kept, model, ids, switches)

        run.recorder = kept
        return run

    @torch.no_grad()
    def hf_eager():  # what a user without sinkscope runs: every attention map and hidden state
        model.set_attn_implementation("eager")
        try:
            model.model(input_ids=ids, use_cache=False, output_attentions=True, output_hidden_states=True)
        finally:
            model.set_attn_implementation("sdpa")

    methods = {"sdpa": sdpa, "recorder": recorder("1")}
    if host_ab:
        methods["recorder_host_before"] = recorder("1", False, (kernels_module, "FAST_LAUNCH", False),
                                                   (kernels_module, "LAYER_PLAN", False),
                                                   (recorder_module, "PREFAULT", False))
    if graphs:
        methods["recorder_graphs"] = recorder("1", False, (kernels_module, "CUDA_GRAPHS", True))
    if fresh:
        methods["recorder_fresh"] = recorder("1", new_each_time=True)
    if torch_path:
        methods["recorder_torch_path"] = recorder("0")
    if eager:
        methods["eager"] = hf_eager
    notes = {}
    for name, fn in list(methods.items()):  # warm-up: Triton compilation, cuBLAS heuristics (and for graphs: the
        try:  # addresses seen twice, then the capture)
            for _ in range(3 if name == "recorder_graphs" else 1):
                fn()
        except torch.OutOfMemoryError:
            if name != "eager":
                raise
            notes["eager_error"] = "out of memory"
            del methods[name]
            torch.cuda.empty_cache()
    runs = {name: ([], []) for name in methods}
    for _ in range(reps):  # interleaved, so that machine noise hits every method alike
        for name, fn in methods.items():
            times, peaks = timed(fn, 1, cuda)
            runs[name][0].extend(times)
            runs[name][1].extend(peaks)
    base_t = statistics.median(runs["sdpa"][0])
    # the kept recorders' device buffers are allocated in every method's forward, the plain one's too: each
    # method's peak counts its own, the plain forward's none
    held = {name: _state_bytes(getattr(fn, "recorder", None)) for name, fn in methods.items()}
    base_peak = max(max(runs["sdpa"][1]) - sum(held.values()), 1)
    out = {"sdpa_s": base_t, "sdpa_peak_gib": base_peak / 2**30, "reps": reps, **notes}
    for name in methods:
        if name == "sdpa":
            continue
        out[f"{name}_s"] = statistics.median(runs[name][0])
        out[f"{name}_ratio"] = out[f"{name}_s"] / base_t
        peak = max(runs[name][1]) - sum(held.values()) + held[name]
        out[f"{name}_extra_peak_pct"] = 100.0 * (peak - base_peak) / base_peak if cuda else float("nan")
    if "recorder_graphs" in methods:
        state = methods["recorder_graphs"].recorder._device_state
        graph_set = None if state is None else state.graphs
        out["graphs_captured"] = None if graph_set is None else graph_set.captures
        out["graphs_replayed"] = None if graph_set is None else graph_set.replays
        out["graphs_failed"] = list(kernels_module._GRAPHS_FAILED)
    os.environ.pop("SINKSCOPE_TRITON", None)
    return out


def _state_bytes(recorder) -> int:
    """The device memory a `Recorder` keeps between forwards (its buffers for the last shape; 0 without)."""
    state = getattr(recorder, "_device_state", None)
    if state is None:
        return 0
    tensors = (state.buf, *state.massive, state.first, state.valid, state.real_tokens)
    return sum(t.untyped_storage().nbytes() for t in tensors if t is not None)


COLSUM_CONFIGS = [  # (keys as MMA rows, half the exps on FMA units, BLOCK_M queries, BLOCK_N keys, warps, stages,
    #                   heaviest key blocks first over all heads, next tile's product before this tile's exps)
    (False, False, 64, 64, 4, 2, False, False), (False, False, 64, 128, 4, 2, False, False),
    (True, False, 64, 64, 4, 2, False, False), (True, False, 128, 64, 4, 2, False, False),
    (True, False, 64, 128, 4, 2, False, False), (True, True, 64, 64, 4, 2, False, False),
    (False, False, 64, 64, 4, 2, True, False), (False, False, 64, 64, 4, 2, False, True),
    (False, False, 64, 64, 4, 2, True, True), (False, False, 64, 64, 4, 3, True, True),
    (False, False, 64, 128, 4, 2, True, True), (True, False, 64, 128, 4, 2, True, False),
]
"""The column-sum kernel's variants and launch settings timed by `--colsum` (kernels.COLSUM_CONFIG). Session 16
dropped the 128 x 128 tiles (0.94-1.36x of the cuDNN call in session 15, against 0.66-0.83x for the best) and added
`heavy_first` and `pipe` (not yet timed)."""


def _colsum_label(cfg: tuple) -> str:
    rows, poly, bm, bn, warps, stages, heavy, pipe = cfg
    return (f"{'rows' if rows else 'cols'}{'+poly' if poly else ''}{'+heavy' if heavy else ''}"
            f"{'+pipe' if pipe else ''} {bm}x{bn} w{warps} s{stages}")


def event_time(fn, reps: int = 10) -> float:
    """Median seconds of `fn` on the current CUDA stream, by CUDA events, after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def colsum_bench(shape: str, t: int) -> list[dict]:
    """The attention of one layer alone: PyTorch's flash SDPA and the recorder's cuDNN call with its log-sum-exp,
    against the Triton column sums at each of COLSUM_CONFIGS, with each config's largest alpha difference from
    the first (the shipped kernel before session 14; the tests check every variant against float64)."""
    from sinkscope.record.attention import sdpa_with_lse
    from sinkscope.record.kernels import colsum_triton

    cfg = SHAPES[shape]
    hq, hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg["hidden_size"] // hq
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, t, d, device="cuda", dtype=torch.bfloat16) for h in (hq, hkv, hkv))
    scale = d**-0.5
    _, lse = sdpa_with_lse(q, k, v, None, scale)
    flash = event_time(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                 enable_gqa=True))
    with_lse = event_time(lambda: sdpa_with_lse(q, k, v, None, scale))
    count = torch.arange(t, 0, -1, device="cuda", dtype=torch.float32)
    ref = None
    rows = []
    for config in COLSUM_CONFIGS:
        r, poly, bm, bn, warps, stages, heavy, pipe = config
        kwargs = dict(rows=r, poly=poly, block_m=bm, block_n=bn, num_warps=warps, num_stages=stages,
                      heavy_first=heavy, pipe=pipe)
        try:
            got = colsum_triton(q, k, lse, scale, **kwargs)
            ref = got if ref is None else ref
            sec = event_time(lambda kw=kwargs: colsum_triton(q, k, lse, scale, **kw))
            rows.append(dict(shape=shape, t=t, config=_colsum_label(config), colsum_ms=1e3 * sec,
                             flash_ms=1e3 * flash, sdpa_with_lse_ms=1e3 * with_lse, colsum_over_with_lse=sec / with_lse,
                             alpha_diff_vs_first=float(((got - ref) / count).abs().max())))
        except Exception as exc:  # noqa: BLE001 - a config the compiler refuses (shared memory) is reported
            rows.append(dict(shape=shape, t=t, config=_colsum_label(config),
                             error=f"{type(exc).__name__}: {str(exc)[:160]}"))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def choose_colsum(rows: list[dict]) -> str | None:
    """Set kernels.COLSUM_CONFIG to the config with the smallest mean time over the recorder's cuDNN call across
    the shapes timed, among those that ran everywhere within alpha 1e-3 of the first (the bf16 bound)."""
    from sinkscope.record.kernels import COLSUM_CONFIG

    by_config: dict[str, list[float]] = {}
    for row in rows:
        if "config" not in row:  # a stage's error record (`_guarded`), not a config's row
            continue
        ok = "error" not in row and row["alpha_diff_vs_first"] <= 1e-3
        by_config.setdefault(row["config"], []).append(row["colsum_over_with_lse"] if ok else float("inf"))
    scores = {label: statistics.mean(v) for label, v in by_config.items()}
    if not scores:
        return None
    label = min(scores, key=scores.get)
    if scores[label] == float("inf"):
        return None
    config = next(c for c in COLSUM_CONFIGS if _colsum_label(c) == label)
    COLSUM_CONFIG.update(zip(("rows", "poly", "block_m", "block_n", "num_warps", "num_stages", "heavy_first", "pipe"),
                             config, strict=True))
    print(f"column sums: fastest {label} (mean {scores[label]:.3f}x the cuDNN call), used from here on", flush=True)
    return label


@torch.no_grad()
def body_forward(model, ids: torch.Tensor, record, graphs: bool = False) -> None:
    """The decoder body's forward (no LM head), inside a device-path `Recorder` when `record` (True: a new one; or
    the `Recorder` to enter), with `kernels.CUDA_GRAPHS` set to `graphs` for it."""
    from sinkscope.record import Recorder, kernels

    if record:
        recorded_forward(Recorder(model) if record is True else record, model, ids,
                         [(kernels, "CUDA_GRAPHS", graphs)])
    else:
        model.model(input_ids=ids, use_cache=False)


def profile_case(shape: str, batch: int, t: int, out: Path) -> dict:
    """torch.profiler over one recorded forward (after a warm-up): the top CUDA kernels and the launch count."""
    from torch.profiler import ProfilerActivity, profile

    model = build(shape)
    ids = torch.randint(3, model.config.vocab_size, (batch, t), device="cuda")
    os.environ["SINKSCOPE_TRITON"] = "1"
    result = {}
    for label, record in (("sdpa", False), ("recorder", True)):
        body_forward(model, ids, record)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            body_forward(model, ids, record)
            torch.cuda.synchronize()
        events = prof.key_averages()
        table = events.table(sort_by="cuda_time_total" if hasattr(events[0], "cuda_time_total")
                             else "device_time_total", row_limit=25)
        with (out / "profile.txt").open("a") as f:  # one file: the device tool brings back at most 8
            f.write(f"\n== {shape} B={batch} T={t} {label}\n{table}\n")
        launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                            "cudaLaunchKernelExC", "cuLaunchKernelEx"))
        syncs = sum(e.count for e in events if "Synchronize" in e.key or e.key == "cudaMemcpyAsync")
        result[label] = {"launches": launches, "sync_or_copy_calls": syncs}
        print(f"profile {shape} B={batch} T={t} {label}: {launches} kernel launches, "
              f"{syncs} synchronize/memcpy calls", flush=True)
    os.environ.pop("SINKSCOPE_TRITON", None)
    return result


def host_case(shape: str, batch: int, t: int, out: Path, reps: int = 5, graphs: bool = False) -> dict:
    """Where a recorded forward's wall time goes on the host: the time until the decoder body's end hook runs (the
    host enqueueing every layer's work), the wait in its synchronisation (the GPU still busy: a GPU-bound
    forward), and the host work after it (unpacking, the samples); with the GPU span (CUDA events, forward start
    to the end hook) and the plain forward's wall and GPU span for comparison. The recorder is one `Recorder`
    entered for each forward (since session 20); `graphs`: also one with CUDA graphs (`recorder_graphs`). Then
    cProfile over `reps` recorded forwards, its top functions by own time appended to `host_profile.txt`."""
    import cProfile
    import io
    import pstats

    from sinkscope.record import Recorder
    from sinkscope.record import recorder as recorder_module

    model = build(shape)
    ids = torch.randint(3, model.config.vocab_size, (batch, t), device="cuda")
    os.environ["SINKSCOPE_TRITON"] = "1"
    marks: dict[str, float] = {}
    body_end = recorder_module.Recorder._on_body_end
    stream_sync = torch.cuda.Stream.synchronize

    def timed_body_end(self, *args, **kwargs):
        marks["enqueued"] = time.perf_counter()
        marks["event"] = torch.cuda.Event(enable_timing=True)
        marks["event"].record()
        return body_end(self, *args, **kwargs)

    def timed_sync(self):
        t0 = time.perf_counter()
        stream_sync(self)
        marks["sync_s"] = marks.get("sync_s", 0.0) + time.perf_counter() - t0

    kept = {"recorder": Recorder(model), "recorder_graphs": Recorder(model)}

    def one(record: str | None) -> dict:
        marks.clear()
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        body_forward(model, ids, kept[record] if record else False, graphs=record == "recorder_graphs")
        if not record:  # the plain forward's end, where the recorder's end hook would run
            marks["enqueued"] = time.perf_counter()
            marks["event"] = torch.cuda.Event(enable_timing=True)
            marks["event"].record()
        t_ret = time.perf_counter()
        torch.cuda.synchronize()
        t_end = time.perf_counter()
        return dict(wall_ms=1e3 * (t_end - t0), enqueue_ms=1e3 * (marks["enqueued"] - t0),
                    sync_wait_ms=1e3 * marks.get("sync_s", 0.0), after_end_hook_ms=1e3 * (t_ret - marks["enqueued"]),
                    gpu_span_ms=start.elapsed_time(marks["event"]))

    recorder_module.Recorder._on_body_end = timed_body_end
    torch.cuda.Stream.synchronize = timed_sync
    labels = ("sdpa", "recorder", "recorder_graphs") if graphs else ("sdpa", "recorder")
    try:
        for _ in range(3):  # warm-up (graphs: addresses seen twice, then captured)
            for label in labels:
                one(None if label == "sdpa" else label)
        rows = {label: [] for label in labels}
        for _ in range(reps):
            for label in labels:
                rows[label].append(one(None if label == "sdpa" else label))
    finally:
        recorder_module.Recorder._on_body_end = body_end
        torch.cuda.Stream.synchronize = stream_sync
    result = {label: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for label, runs in rows.items()}
    result.update(shape=shape, batch=batch, t=t)
    if graphs:
        state = kept["recorder_graphs"]._device_state
        result["graphs"] = None if state is None or state.graphs is None else {
            "captured": state.graphs.captures, "replayed": state.graphs.replays}
    print("host", json.dumps(result), flush=True)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(reps):
        body_forward(model, ids, kept["recorder_graphs" if graphs else "recorder"], graphs=graphs)
        torch.cuda.synchronize()
    prof.disable()
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(45)
    with (out / "host_profile.txt").open("a") as f:
        f.write(f"\n== {shape} B={batch} T={t}: {reps} recorded forwards\n{text.getvalue()}\n")
    os.environ.pop("SINKSCOPE_TRITON", None)
    return result


def check_case(shape: str, t: int, dtype: torch.dtype) -> dict:
    """The device path against the torch path (what main shipped, checked against eager by the tests) at a real
    shape: largest |alpha| difference, cos-to-BOS difference, median equality, and the massive sets (thresholds
    lowered so that random weights have some)."""
    import numpy as np

    from sinkscope.record import Recorder
    from sinkscope.record.attention import sdpa_with_lse

    # the log-sum-exp the column sums are built on, from the kernel the recorder calls, against float32 in torch
    cfg = SHAPES[shape]
    hq, hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg["hidden_size"] // hq
    q, k, v = (torch.randn(1, h, t, d, device="cuda", dtype=dtype) for h in (hq, hkv, hkv))
    _, lse = sdpa_with_lse(q, k, v, None, d**-0.5)
    kk = k.float().repeat_interleave(hq // hkv, dim=1)
    ref = torch.cat([torch.matmul(q[:, :, i:i + 512].float(), kk.transpose(-1, -2)).mul_(d**-0.5)
                     .masked_fill_(torch.ones(min(512, t - i), t, dtype=torch.bool, device="cuda")
                                   .triu_(i + 1), float("-inf")).logsumexp(-1) for i in range(0, t, 512)], dim=-1)
    lse_diff = None if lse is None else float((lse - ref).abs().max())
    # cuDNN is given grouped-query K and V unrepeated: its output against the same call on repeated K and V
    gqa_out_diff = None
    if dtype in (torch.bfloat16, torch.float16):
        out_gqa = sdpa_with_lse(q, k, v, None, d**-0.5)[0]
        rep = hq // hkv
        out_rep = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), None, True, 0.0, True, False,
            scale=d**-0.5)[0]
        gqa_out_diff = float((out_gqa.float() - out_rep.float()).abs().max())
    del q, k, v, kk

    model = build(shape).to(dtype)
    ids = torch.randint(3, model.config.vocab_size, (2, t), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, : t // 4] = 0  # left padding in the second row
    samples = {}
    for flag in ("1", "0"):
        os.environ["SINKSCOPE_TRITON"] = flag
        with torch.no_grad(), Recorder(model, rel_threshold=20.0, abs_threshold=0.0) as rec:
            model.model(input_ids=ids, attention_mask=mask, use_cache=False)
        samples[flag] = rec.samples
    os.environ.pop("SINKSCOPE_TRITON", None)
    fast, slow = samples["1"], samples["0"]
    row = dict(shape=shape, t=t, dtype=str(dtype).removeprefix("torch."), lse_max_diff_vs_fp32=lse_diff,
               gqa_out_max_diff_vs_repeated=gqa_out_diff,
               alpha_max_diff=max(float(np.abs(a.attention_received - b.attention_received).max())
                                  for a, b in zip(fast, slow, strict=True)),
               cos_max_diff=max(float(np.abs(a.bos_cosine - b.bos_cosine).max()) for a, b in zip(fast, slow,
                                                                                               strict=True)),
               median_equal=all(bool(np.array_equal(a.median_abs, b.median_abs)) for a, b in zip(fast, slow,
                                                                                                 strict=True)),
               massive_entries=[len(a.massive) for a in fast],
               massive_equal=all(a.massive[["layer", "token", "feature"]].equals(b.massive[["layer", "token",
                                                                                             "feature"]])
                                 for a, b in zip(fast, slow, strict=True)))
    print(json.dumps(row), flush=True)
    del model
    torch.cuda.empty_cache()
    return row


def unpack_bench(reps: int = 9) -> list[dict]:
    """The device path's host work at the end of a forward, alone: `_unpack_layers` copying every layer's results
    from the landing block `[L, N]` into the sample-major fields (alpha divided by the query counts), into fresh
    `_host_blocks` as the recorder does, and into blocks already touched (the floor without page faults); medians
    of `reps`, at the issue's shapes (B=1, top-k 8); `touched_numpy_ms`: into touched blocks with numpy's copies
    instead of torch's (`recorder.UNPACK_TORCH`, session 21). In host-bound forwards this is wall time after the
    GPU is done (session 15: 10.8 ms at the 135M shape, T=8192)."""
    import numpy as np

    from sinkscope.record import kernels, recorder
    from sinkscope.record.recorder import _host_blocks, _query_count, _touch_pages, _unpack_layers

    rows = []
    for shape, batch, t in (("smollm2-135m", 1, 8192), ("llama-3.2-1b", 1, 8192), ("llama-3.2-1b", 32, 256),
                            ("llama-3.2-1b", 1, 32768)):
        cfg = SHAPES[shape]
        n_layers, heads, hidden = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["hidden_size"]
        layout = kernels.layer_layout(batch, t, hidden, heads, 8)
        landing = torch.rand(n_layers, layout.total - layout.feat)
        count = _query_count(np.ones((batch, t), dtype=bool))
        touched = _host_blocks(batch, t, n_layers, heads, hidden, 8)
        times: dict[str, list[float]] = {"fresh": [], "touched": [], "touch": [], "touched_numpy": []}
        for _ in range(reps):
            for label in times:
                out = touched if label.startswith("touched") else _host_blocks(batch, t, n_layers, heads, hidden, 8)
                switch = mock.patch.object(recorder, "UNPACK_TORCH", recorder.UNPACK_TORCH and label != "touched_numpy")
                with switch:
                    start = time.perf_counter()
                    if label == "touch":  # the CUDA path's prefault thread's work (recorder.PREFAULT)
                        _touch_pages(out)
                    else:
                        _unpack_layers(landing, [None] * n_layers, layout, out, count, [True] * n_layers,
                                       touched=label.startswith("touched"))
                    times[label].append(time.perf_counter() - start)
                del out
        rows.append(dict(shape=shape, batch=batch, t=t, landing_mib=landing.numel() * 4 / 2**20,
                         unpack_torch=recorder.UNPACK_TORCH, threads=torch.get_num_threads(),
                         fresh_ms=1e3 * statistics.median(times["fresh"]),
                         touched_ms=1e3 * statistics.median(times["touched"]),
                         touched_numpy_ms=1e3 * statistics.median(times["touched_numpy"]),
                         touch_ms=1e3 * statistics.median(times["touch"])))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def launch_bench(shape: str = "smollm2-135m", t: int = 2048, n: int = 200, device: str = "cuda") -> list[dict]:
    """The host's cost of each call the device path makes per layer, on CUDA at a host-bound shape (135M, T=2048):
    `n` calls back to back, host time over n (the GPU runs each in less time than the host takes to launch it, so
    the loop measures the host), against a small torch launch (`x.add_(0)`). Tells how much of a recorded layer's
    ~0.9 ms of extra host time (session 15) each call takes. `device="cpu"` under TRITON_INTERPRET=1 is the
    tests' smoke run of this stage."""
    from sinkscope.record import kernels
    from sinkscope.record.attention import sdpa_with_lse

    cfg = SHAPES[shape]
    hq, hkv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    torch.manual_seed(0)
    q = torch.randn(1, hq, t, d // hq, device=device, dtype=torch.bfloat16)
    k = torch.randn(1, hkv, t, d // hq, device=device, dtype=torch.bfloat16)
    h, a, m = (torch.randn(1, t, d, device=device, dtype=torch.bfloat16) for _ in range(3))
    first = torch.zeros(1, dtype=torch.long, device=device)
    _, lse = sdpa_with_lse(q, k, k, None, (d // hq) ** -0.5)
    layout = kernels.layer_layout(1, t, d, hq, 8)
    buf = kernels.layer_buffer(layout, h.device)
    massive = kernels.massive_buffers(1, t, h.device)
    radix = kernels.median_abs_triton(h, final=False)
    x = torch.zeros(1, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    calls = {
        "torch add_ (one small launch)": lambda: x.add_(0),
        "layer_buffer (empty + zero_)": lambda: kernels.layer_buffer(layout, h.device),
        "colsum_triton": lambda: kernels.colsum_triton(q, k, lse, (d // hq) ** -0.5,
                                                       out=kernels.colsum_view(buf, layout)),
        "median_abs_triton passes (2 launches)": lambda: kernels.median_abs_triton(h, final=False),
        "radix_final": lambda: kernels.radix_final(radix),
        "token_stats_triton (final step folded)": lambda: kernels.token_stats_triton(
            h, m, a, first, radix.out[1], None, 8, 0, massive, radix=radix),
        "colmax_triton": lambda: kernels.colmax_triton(h, m, None),
        "reduce_layer_device (all of a layer's reductions)": lambda: kernels.reduce_layer_device(
            h, a, m, kernels.layer_buffer(layout, h.device), layout, first, None, None, 0, (100.0, 1000.0), massive),
    }
    rows = []
    saved = kernels.FAST_LAUNCH
    try:
        # Triton's dispatch on every call, then kernels.launch's own cache (the same thing under the interpreter)
        for fast in (False, True) if device == "cuda" else (False,):
            kernels.FAST_LAUNCH = fast
            for name, fn in calls.items():
                try:
                    for _ in range(5):
                        fn()
                    sync()
                    start = time.perf_counter()
                    for _ in range(n):
                        fn()
                    host = (time.perf_counter() - start) / n
                    sync()
                    wall = (time.perf_counter() - start) / n
                    rows.append(dict(call=name, fast_launch=fast, shape=shape, t=t, host_us=1e6 * host,
                                     wall_us=1e6 * wall))
                except Exception as exc:  # noqa: BLE001 - one failing call must not lose the others' numbers
                    rows.append(dict(call=name, fast_launch=fast, error=f"{type(exc).__name__}: {str(exc)[:200]}"))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        kernels.FAST_LAUNCH = saved
    return rows


def stubbed_host_methods(layers: int = 30, batch: int = 1) -> dict:
    """The forwards that `host_python_bench` times and `bench.hostcount` counts, with the kernels stubbed (this
    process's `kernels` and `attention` modules are patched for good): a tiny Llama (hidden 64, `layers` layers,
    T=16, `batch` samples) on the CPU, every Triton launch a no-op and attention zeros (in the recorded forwards and
    in the plain one alike), plain (`plain`), recorded
    (`recorded`, one Recorder entered for each forward, as in `run_case`) and recorded with each layer's launches
    replayed as graphs (`graphs`: `kernels.LaunchGraphs` with a no-op graph whose inputs are taken to repeat, as a
    GPU's caching allocator repeats them); each also at 2 layers (`short_*`), so that the recorder's cost splits
    into a part a forward and a part a layer. Name -> a function of no arguments that runs one forward."""
    from types import SimpleNamespace

    from transformers import LlamaConfig, LlamaForCausalLM

    from sinkscope.record import Recorder, kernels
    from sinkscope.record import attention as attention_module

    # SINKSCOPE_MALLOPT=0: without the CPU forwards' heap trim (_malloc.trim, 0.7 ms a forward here), which a
    # CUDA forward does not do (session 20; session 19's figures include it)
    os.environ.update(TRITON_INTERPRET="1", SINKSCOPE_TRITON="1", SINKSCOPE_MALLOPT="0")

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    stubs = SimpleNamespace(**{name: NoLaunch() for name in (  # one object per kernel, as _kernels() gives
        "colsum", "exp2_fma", "radix_pass", "radix_final", "token_stats", "colmax")})
    kernels._kernels = lambda: stubs
    attention_module.sdpa_with_lse = lambda query, key, value, mask, scale: (
        torch.zeros_like(query), torch.zeros(query.shape[:3]))
    # the plain forward's attention zeros too (transformers' SDPA integration calls torch's through this
    # attribute): the recorded forwards skip it, so a real one in the plain forward only would be counted against
    # the recorder (until session 24 it was: at batch 32 the plain forward came out dearer than the recorded one)
    torch.nn.functional.scaled_dot_product_attention = lambda query, key, value, *args, **kwargs: torch.zeros_like(
        query)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (batch, 16))

    def llama(n_layers: int):
        return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                            attn_implementation="sdpa")).eval()

    class NoGraph:
        def replay(self):
            pass

    class SameAddresses(kernels.LaunchGraphs):  # as on a GPU in a loop of one shape (the CPU heap moves them)
        def run(self, key, inputs, calls):
            super().run(key, key, calls)  # `inputs` were taken by the plan all the same

    kernels.LaunchGraphs = SameAddresses

    def recorder(model, graphs: bool):
        kept = Recorder(model)  # one recorder entered for each forward, as run_case does (since session 20)
        switch = [(kernels, "GRAPH_CAPTURE", (lambda calls: NoGraph()) if graphs else None)]
        return lambda: recorded_forward(kept, model, ids, switch)

    # the model of `layers` layers, and one of 2 (`short`), so that the recorder's cost splits into a fixed part a
    # forward (its hooks set and removed, the end-of-forward unpacking and records) and a part a layer
    methods = {}
    for tag, n_layers in (("", layers), ("short_", 2)):
        model = llama(n_layers)
        methods.update({f"{tag}plain": lambda m=model: m.model(input_ids=ids, use_cache=False),
                        f"{tag}recorded": recorder(model, False), f"{tag}graphs": recorder(model, True)})
    return methods


def split_per_layer(cost: dict[str, float], layers: int) -> dict[str, float]:
    """From one cost a forward of each of `stubbed_host_methods`' forwards (any unit): each recorder's extra over
    the plain forward as `{name}_fixed` (a forward) and `{name}_per_layer`, the straight line through `layers` and
    2 layers."""
    out = {}
    for name in ("recorded", "graphs"):
        long_extra, short_extra = cost[name] - cost["plain"], cost[f"short_{name}"] - cost["short_plain"]
        per_layer = (long_extra - short_extra) / (layers - 2)
        out[f"{name}_per_layer"], out[f"{name}_fixed"] = per_layer, short_extra - 2 * per_layer
    return out


def host_python_bench(layers: int = 30, reps: int = 60) -> dict:
    """The recorder's own Python on the device path, without a GPU: `stubbed_host_methods`' forwards timed (medians
    of `reps` interleaved forwards), so that what is left of a recorded forward over a plain one is the recorder's
    hooks and the wrappers around its launches; `graphs_*` the host Python that graphs leave. `*_fixed_us` and
    `*_us_per_layer` split each recorder's extra time into a part a forward and a part a layer. The development
    CPU's timings vary up to 2x within an hour; `python -m sinkscope.bench.hostcount` counts the same forwards'
    instructions instead. Runs in a process of its own: it stubs the kernels module."""
    methods = stubbed_host_methods(layers)
    times: dict[str, list[float]] = {name: [] for name in methods}
    with torch.no_grad():
        for _ in range(5):
            for fn in methods.values():
                fn()
        for _ in range(reps):
            for label, fn in methods.items():
                start = time.perf_counter()
                fn()
                times[label].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    plain, rec, graphs = med["plain"], med["recorded"], med["graphs"]
    result = dict(layers=layers, plain_ms=1e3 * plain, recorded_ms=1e3 * rec,
                  extra_us_per_layer=1e6 * (rec - plain) / layers,
                  graphs_ms=1e3 * graphs, graphs_extra_us_per_layer=1e6 * (graphs - plain) / layers)
    for key, value in split_per_layer(med, layers).items():  # extra(L) = fixed + L * per_layer
        name, part = key.split("_", 1)
        result[f"{name}_us_per_layer" if part == "per_layer" else f"{name}_fixed_us"] = 1e6 * value
    print("host python", json.dumps(result), flush=True)
    return result


def kernel_bench(t: int, d: int) -> list[dict]:
    """The recorder's per-layer Triton reductions alone on one bf16 block output [1, T, D]: the token-stats pass
    at several num_warps and the radix median at several (BLOCK, num_warps), with the bandwidth each reaches
    (bytes it must read over its time) and whether its outputs equal the default configuration's (bit for bit:
    the token-stats buffer also holds cos-to-BOS, whose sums depend on the reduction order, so other num_warps
    differ in its last bits)."""
    from triton import next_power_of_2 as triton_next_power_of_2

    from sinkscope.record.kernels import (
        TOKEN_CONFIG,
        colmax_triton,
        massive_buffers,
        token_stats_triton,
    )

    torch.manual_seed(0)
    h, a, m = (torch.randn(1, t, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    first = torch.zeros(1, dtype=torch.long, device="cuda")
    thr = torch.full((1,), 1e4, device="cuda")
    buffers = massive_buffers(1, t, h.device)
    rows = []
    block_d = triton_next_power_of_2(d)
    ref = token_stats_triton(h, m, a, first, thr, None, 8, 0, buffers, rows=1, num_warps=4)
    n = t  # B = 1: the buffer's fields are cos [n], max [n], then four [n, 8] parts; cos depends on the sum order
    best = None
    for per_program, warps_list in ((1, (2, 4)), (2, (4,)), (4, (8,))):  # around session 11's fastest
        for warps in warps_list:
            if per_program * block_d // (32 * warps) > 64 or per_program * block_d < 32 * warps:
                continue  # more than 64 keys a thread spills; fewer than one element a thread idles lanes
            try:
                got = token_stats_triton(h, m, a, first, thr, None, 8, 0, buffers, rows=per_program, num_warps=warps)
                sec = event_time(lambda r=per_program, w=warps: token_stats_triton(
                    h, m, a, first, thr, None, 8, 0, buffers, rows=r, num_warps=w))
            except Exception as exc:  # noqa: BLE001 - a config the compiler refuses is reported, not fatal
                rows.append(dict(kernel="token_stats", t=t, d=d, config=f"r{per_program} w{warps}",
                                 error=f"{type(exc).__name__}: {str(exc)[:160]}"))
                continue
            same = bool(torch.equal(got[n:], ref[n:])) and bool(torch.allclose(got[:n], ref[:n], atol=1e-6))
            rows.append(dict(kernel="token_stats", t=t, d=d, config=f"r{per_program} w{warps}", us=1e6 * sec,
                             gb_per_s=2 * h.numel() * 2 / sec / 1e9, same=same))
            print(json.dumps(rows[-1]), flush=True)
            if same and (best is None or sec < best[0]):
                best = (sec, per_program, warps)
    if best is not None:  # this run's table uses the fastest exact configuration
        TOKEN_CONFIG[block_d] = best[1:]
        print(f"token_stats D={d}: fastest r{best[1]} w{best[2]} ({1e6 * best[0]:.0f} us), used from here on",
              flush=True)
    ref = torch.stack([torch.linalg.vector_norm(x, ord=float("inf"), dim=1).float() for x in (h, m)])
    torch_sec = event_time(lambda: [torch.linalg.vector_norm(x, ord=float("inf"), dim=1).float() for x in (h, m)])
    rows.append(dict(kernel="feature_max", t=t, d=d, config="torch vector_norm x2 (before)", us=1e6 * torch_sec,
                     gb_per_s=2 * h.numel() * 2 / torch_sec / 1e9, same=True))
    for block_t, cols, warps in ((32, 128, 4), (64, 128, 4)):
        got = colmax_triton(h, m, None, block_t=block_t, block_d=cols, num_warps=warps)
        sec = event_time(lambda bt=block_t, bd=cols, w=warps: colmax_triton(h, m, None, block_t=bt, block_d=bd,
                                                                             num_warps=w))
        rows.append(dict(kernel="feature_max", t=t, d=d, config=f"T{block_t} D{cols} w{warps}", us=1e6 * sec,
                         gb_per_s=2 * h.numel() * 2 / sec / 1e9, same=bool(torch.equal(got, ref))))
        print(json.dumps(rows[-1]), flush=True)
    if best is not None:  # the same pass with int64 keys (before session 14) for comparison
        sec = event_time(lambda: token_stats_triton(h, m, a, first, thr, None, 8, 0, buffers, rows=best[1],
                                                    num_warps=best[2], narrow_keys=False))
        rows.append(dict(kernel="token_stats", t=t, d=d, config=f"r{best[1]} w{best[2]} int64 keys", us=1e6 * sec,
                         gb_per_s=2 * h.numel() * 2 / sec / 1e9, same=True))
        print(json.dumps(rows[-1]), flush=True)
    return rows + radix_bench(t, d, h)


def radix_bench(t: int, d: int, h: torch.Tensor | None = None) -> list[dict]:
    """The radix median alone (both passes and the final launch) in each of RADIX_CONFIGS on one bf16 block output
    [1, T, D] (`h`, else a fresh random one), against the shipped configuration's median; `--kernels` and
    `--radix`. Also the shipped configuration with the passes as they were before session 22 (`lean=False`: every
    pass in 2**bits bins, both ranks' counts in one loop), kernel "median_before", which no choice takes."""
    from sinkscope.record.kernels import median_abs_triton

    if h is None:
        torch.manual_seed(0)
        h = torch.randn(1, t, d, device="cuda", dtype=torch.bfloat16)
    rows = []
    ref = median_abs_triton(h, bits=8, onehot=False, block=4096, num_warps=8, spread=0)[0]  # the shipped config
    fastest = None
    for config in RADIX_CONFIGS:
        bits, onehot, block, warps, spread = config
        passes = -(-15 // bits)  # bf16: passes over its 15 bits, each reading h once
        label = radix_label(config)
        try:
            got = median_abs_triton(h, bits=bits, onehot=onehot, block=block, num_warps=warps, spread=spread)[0]
            sec = event_time(lambda c=config: median_abs_triton(
                h, bits=c[0], onehot=c[1], block=c[2], num_warps=c[3], spread=c[4]))
        except Exception as exc:  # noqa: BLE001 - a config the compiler refuses is reported, not fatal
            rows.append(dict(kernel="median", t=t, d=d, config=label, error=f"{type(exc).__name__}: {str(exc)[:160]}"))
            continue
        same = bool(torch.equal(got, ref))
        rows.append(dict(kernel="median", t=t, d=d, config=label, us=1e6 * sec,
                         gb_per_s=passes * h.numel() * 2 / sec / 1e9, same=same))
        print(json.dumps(rows[-1]), flush=True)
        if same and (fastest is None or sec < fastest[0]):
            fastest = (sec, config)
    try:
        got = median_abs_triton(h, bits=8, onehot=False, block=4096, num_warps=8, spread=0, lean=False)[0]
        sec = event_time(lambda: median_abs_triton(h, bits=8, onehot=False, block=4096, num_warps=8, spread=0,
                                                   lean=False))
        rows.append(dict(kernel="median_before", t=t, d=d, config=radix_label(RADIX_CONFIGS[0]) + " before s22",
                         us=1e6 * sec, gb_per_s=2 * h.numel() * 2 / sec / 1e9, same=bool(torch.equal(got, ref))))
        print(json.dumps(rows[-1]), flush=True)
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        rows.append(dict(kernel="median_before", t=t, d=d, error=f"{type(exc).__name__}: {str(exc)[:160]}"))
    if fastest is not None:
        rows.append(dict(kernel="median", t=t, d=d, fastest=list(fastest[1]), us=1e6 * fastest[0]))
    return rows


RADIX_CONFIGS = [(8, False, 4096, 8, 0), (5, False, 4096, 8, 0), (8, False, 4096, 8, 2), (5, False, 4096, 8, 3),
                 (4, False, 4096, 8, 2), (8, False, 2048, 8, 0), (5, False, 2048, 8, 0)]
"""(digit bits, one-hot counting, BLOCK, num_warps, spread) of the radix median timed by `--kernels` and `--radix`
on bf16 input. Session 15 also timed 16,384-entry blocks (about 2x slower) and one-hot counting (3-4x slower),
dropped since; session 21 added the digits counted in 2**spread copies of their bins (`kernels.RADIX_CONFIG`),
which only pay where Triton counts with shared-memory atomics (3.9), not with ballots (3.6: `_count_digits`);
session 22 dropped 8-bit digits in 16 copies (1,933 spill instructions in Triton 3.6's second pass,
`python -m sinkscope.bench.sass`) and added 2,048-entry blocks, whose passes need fewer registers under Triton 3.6
(8-bit second pass: 74 against 128, so three 8-warp programs fit an SM instead of two)."""


def radix_label(config: tuple) -> str:
    bits, onehot, block, warps, spread = config
    return (f"{bits}-bit {'one-hot' if onehot else 'histogram'} B{block} w{warps}"
            + (f" x{1 << spread} copies" if spread else ""))


def choose_radix(rows: list[dict]) -> tuple | None:
    """Set kernels.RADIX_CONFIG for bf16 and fp16 to the config with the smallest total time over the shapes timed,
    among those exact everywhere."""
    from sinkscope.record.kernels import RADIX_CONFIG

    totals: dict[str, float] = {}
    for row in rows:
        if row.get("kernel") == "median" and "config" in row:
            ok = "error" not in row and row["same"]
            totals[row["config"]] = totals.get(row["config"], 0.0) + (row["us"] if ok else float("inf"))
    if not totals or min(totals.values()) == float("inf"):
        return None
    label = min(totals, key=totals.get)
    config = next(c for c in RADIX_CONFIGS if radix_label(c) == label)
    RADIX_CONFIG[1] = RADIX_CONFIG[2] = config
    print(f"radix median (bf16/fp16): fastest {label} ({totals[label]:.0f} us over the shapes), used from here on",
          flush=True)
    return config


def _guarded(fn, *args):
    """Run one extra measurement; an exception is printed and recorded, never fatal (GPU time is short)."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001
        # the innermost frames too: GPU time is too short to rerun a failure just to see where it came from
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}"
                            for f in reversed(traceback.extract_tb(exc.__traceback__)[-4:]))
        print(f"{fn.__name__}{args}: {type(exc).__name__}: {str(exc)[:300]} at {where}", flush=True)
        torch.cuda.empty_cache()
        return {"error": f"{type(exc).__name__}: {str(exc)[:300]}", "args": [str(a) for a in args]}


def _rows(result) -> list:
    """A stage's rows from `_guarded`: its list, or its error record as the one row (a dict extended into a list
    would add its keys)."""
    return result if isinstance(result, list) else [result]


def check_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, through `ap.error` (usage and one line, exit status 2), what would fail later with a traceback or
    run nothing: a device that is not here, an unknown shape, a malformed --cases entry."""
    if args.device not in ("cuda", "cpu"):
        ap.error(f"--device {args.device!r}: cuda or cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: this torch has no CUDA device here (torch.cuda.is_available() is False); run on a "
                 "machine with a GPU, or --device cpu for a smoke test")
    unknown = [s for s in args.shapes.split(",") if s and s not in SHAPES]
    if unknown:
        ap.error(f"--shapes: unknown {unknown}; known: {', '.join(SHAPES)}")
    args.case_list = None
    if args.cases is not None:
        args.case_list = []
        for entry in args.cases.split(","):
            parts = entry.split(":")
            if len(parts) != 3 or parts[0] not in SHAPES or not all(x.isdigit() and int(x) > 0 for x in parts[1:]):
                ap.error(f"--cases: {entry!r} is not SHAPE:B:T with a known shape ({', '.join(SHAPES)}) and B, T "
                         "whole numbers >= 1")
            args.case_list.append((parts[0], int(parts[1]), int(parts[2])))
    if args.reps < 1:
        ap.error(f"--reps {args.reps}: at least 1")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "experiments/results")))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of the shapes")
    ap.add_argument("--max-t", type=int, default=32768)
    ap.add_argument("--torch-path", action="store_true", help="also time the torch path (slow: 8-36x)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting new cases after this long")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test of this script")
    ap.add_argument("--cases", default=None, help="SHAPE:B:T,... instead of the issue's cases")
    ap.add_argument("--eager", action="store_true", help="also time HF eager (attentions + hidden states), T<=8192")
    ap.add_argument("--host-ab", action="store_true",
                    help="also time the recorder without session 19's host changes (fast launch, layer plan, "
                         "prefault)")
    ap.add_argument("--graphs", action="store_true",
                    help="also time the recorder with CUDA graphs of each layer's launches (kernels.CUDA_GRAPHS)")
    ap.add_argument("--fresh", action="store_true", help="also time a new Recorder for every forward")
    ap.add_argument("--check", action="store_true", help="first: device path vs torch path at real shapes")
    ap.add_argument("--colsum", action="store_true", help="first: the column-sum kernel's configs vs flash SDPA")
    ap.add_argument("--profile", action="store_true", help="last: profiler tables of one recorded forward")
    ap.add_argument("--host", action="store_true", help="last: where a recorded forward's host time goes")
    ap.add_argument("--diagnostics-s", type=float, default=90.0,
                    help="--profile and --host run after the table while fewer than budget + this many s have passed")
    ap.add_argument("--kernels", action="store_true", help="first: the per-layer Triton reductions' configs")
    ap.add_argument("--radix", action="store_true", help="first: the radix median's configs only (in --kernels)")
    ap.add_argument("--launch", action="store_true", help="first: the host's cost of each per-layer call (CUDA)")
    ap.add_argument("--host-python", action="store_true",
                    help="only: the recorder's own Python per layer, launches stubbed (CPU; stubs this process)")
    ap.add_argument("--unpack", action="store_true",
                    help="first: the host's unpacking at the end of a recorded forward (no GPU needed: with "
                         "--device cpu --shapes '' only this runs)")
    args = ap.parse_args(argv)
    check_args(ap, args)
    import transformers

    start = time.time()
    cuda = args.device == "cuda"
    env = {"torch": torch.__version__, "transformers": transformers.__version__,
           "gpu": torch.cuda.get_device_name(0) if cuda else args.device,
           # below 8.0 the bf16/fp16 column sums take COLSUM_FP32's tiles (kernels._tensor_core_dot)
           "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
           "date": time.strftime("%Y-%m-%d %H:%M")}
    all_cases = CASES if args.cases is None else args.case_list
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    print(json.dumps(env), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    extra: dict[str, list] = {"checks": [], "colsum": [], "profile": [], "kernels": [], "host": [], "unpack": [],
                              "launch": []}

    def save_extra() -> None:  # after every stage: a call cut short by its time limit keeps what it measured
        (args.out / "bench_gpu_extra.json").write_text(json.dumps({"env": env, **extra}, indent=2, default=str))

    if args.host_python:  # stubs the kernels: nothing else can run in this process afterwards
        (args.out / "bench_host_python.json").write_text(json.dumps({"env": env, **host_python_bench()}, indent=2))
        return
    if args.unpack:
        extra["unpack"] = _guarded(unpack_bench) or []
        save_extra()
    if args.launch:
        extra["launch"] = _guarded(launch_bench) or []
        save_extra()
    if args.kernels or args.radix:
        for t, d in ((8192, 2048), (8192, 4096), (8192, 576)):
            extra["kernels"].extend(_rows(_guarded(kernel_bench if args.kernels else radix_bench, t, d)))
        from sinkscope.record.kernels import RADIX_CONFIG, TOKEN_CONFIG

        choose_radix(extra["kernels"])
        env["token_config"] = {str(k): list(v) for k, v in TOKEN_CONFIG.items()}
        env["radix_config"] = {str(k): list(v) for k, v in RADIX_CONFIG.items()}
        print("token-stats and radix configuration of this run:", env["token_config"], env["radix_config"], flush=True)
    save_extra()
    if args.colsum:
        for shape, t in (("llama-3.2-1b", 8192), ("llama-3.1-8b", 8192), ("llama-3.2-1b", 32768)):
            extra["colsum"].extend(_rows(_guarded(colsum_bench, shape, t)))
        choose_colsum(extra["colsum"])
    from sinkscope.record.kernels import COLSUM_CONFIG

    env["colsum_config"] = dict(COLSUM_CONFIG)
    save_extra()
    if args.check:
        for shape, t, dtype in (("smollm2-135m", 2048, torch.float32), ("llama-3.2-1b", 4096, torch.bfloat16)):
            extra["checks"].append(_guarded(check_case, shape, t, dtype))
    save_extra()
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
                row = run_case(model, batch, t, args.reps, args.torch_path and t <= 8192,
                               eager=args.eager and batch * t <= 8192, host_ab=args.host_ab, graphs=args.graphs,
                               fresh=args.fresh)
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
          f" {'torch path/SDPA':>16} {'eager/SDPA':>11} {'SDPA ms':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:<14} {r['batch']:>3} {r['t']:>6} {r['error']}")
            continue
        torch_ratio = f"{r['recorder_torch_path_ratio']:.2f}x" if "recorder_torch_path_ratio" in r else "-"
        eager = f"{r['eager_ratio']:.2f}x" if "eager_ratio" in r else r.get("eager_error", "-")
        mark = "" if r["recorder_ratio"] <= r["target"] else "  MISSED"
        if "recorder_host_before_ratio" in r:
            mark += f"  (host changes off: {r['recorder_host_before_ratio']:.2f}x)"
        if "recorder_graphs_ratio" in r:
            mark += (f"  (graphs: {r['recorder_graphs_ratio']:.2f}x, {r['graphs_captured']} captured, "
                     f"{r['graphs_replayed']} replayed)")
        if "recorder_fresh_ratio" in r:
            mark += f"  (new Recorder each forward: {r['recorder_fresh_ratio']:.2f}x)"
        print(f"{r['shape']:<14} {r['batch']:>3} {r['t']:>6} {r['recorder_ratio']:>13.2f}x {r['target']:>6.1f}x "
              f"{r['recorder_extra_peak_pct']:>10.1f}% {torch_ratio:>16} {eager:>11} {1e3 * r['sdpa_s']:>8.1f}{mark}")
    (args.out / "bench_gpu.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    # diagnostics after the table (where the time goes), while the call's time lasts
    if args.profile and time.time() - start < args.budget_s + args.diagnostics_s:
        for shape, batch, t in (("llama-3.2-1b", 1, 8192), ("smollm2-135m", 1, 8192)):
            extra["profile"].append(_guarded(profile_case, shape, batch, t, args.out))
            torch.cuda.empty_cache()
    save_extra()
    if args.host:  # the host-bound cases first; each case saved as it ends (a call cut short keeps the others)
        for shape, batch, t in (("smollm2-135m", 1, 2048), ("llama-3.2-1b", 1, 2048), ("smollm2-135m", 1, 8192),
                                ("llama-3.2-1b", 1, 8192)):
            if time.time() - start >= args.budget_s + args.diagnostics_s:
                print(f"diagnostics budget spent: --host {shape} T={t} not run", flush=True)
                break
            extra["host"].append(_guarded(host_case, shape, batch, t, args.out, 5, args.graphs))
            torch.cuda.empty_cache()
            save_extra()
    save_extra()


if __name__ == "__main__":
    main()
