"""Triton kernels for recording on CUDA (issue 16), used when Triton is importable and the tensors are on a GPU.

- `colsum_triton`: the attention each key receives, summed over the queries that see it, from Q, K and the row
  log-sum-exp of the forward's own SDPA kernel. One program per (key block, batch x query head) walks the query
  blocks at and after its keys, recomputes `exp(q.k * scale - lse[q])` in fp32 and sums over queries, so it
  needs no atomics and O(1) extra memory; it is the column-sum counterpart of a flash-attention pass (about half
  the causal attention work, since only the causal triangle is visited).
- `median_abs_triton`: the exact median of |h| over each sample's real tokens and all features, by radix
  selection on the bit pattern (|h| >= 0, so the bits order like the values): digit-histogram passes that follow
  both middle ranks at once (over the 31 bits of float32, or the 15 bits of bf16 or fp16, read raw), each
  reading h once and deriving its prefixes from the earlier passes' histograms on the device, then a final
  launch; no host synchronisation. The mean of the two middle values is taken for an even count, as numpy does.

- `token_stats_triton`: one pass over the token rows (cos to BOS, max |h|, top-k features of |h| and |mlp_out|,
  the massive entries); `colmax_triton`: one pass over the columns (per-feature maxima of |h| and |mlp_out|).
- `layer_layout`, `layer_buffer`, `reduce_layer_device`, `unpack_layer`: the recorder's one device buffer per
  layer, which all of the above write into and which goes to the host in one copy.
- `launch`, `LayerPlan`, `LaunchGraphs`: how the launches are made with little host time: compiled kernels kept
  and handed their arguments directly, a layer's launches repeated at the other layers (and forwards) with their
  own tensors, and (off by default, `CUDA_GRAPHS`) replayed as CUDA graphs once a layer's inputs repeat.

All run on the CPU under `TRITON_INTERPRET=1`, which is how the tests check them against the torch reference on
machines without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import operator
import os
import warnings
from types import SimpleNamespace

import torch

LOG2E = 1.4426950408889634


def available(device: torch.device) -> bool:
    """Whether the recorder takes its device path on `device`: the Triton kernels and no host synchronisation
    inside the forward. On by default on CUDA when Triton is importable. `SINKSCOPE_TRITON=0` turns it off;
    `SINKSCOPE_TRITON=1` turns it on, also on the CPU when `TRITON_INTERPRET=1` (how the tests check it)."""
    flag = os.environ.get("SINKSCOPE_TRITON")
    if flag == "0" or not (device.type == "cuda" or (flag == "1" and os.environ.get("TRITON_INTERPRET") == "1")):
        return False
    return _triton_installed()


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints (Triton's own helpers cost a wrapper call each on the host; a layer needs about ten)."""
    return -(-a // b)


def _pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << (int(n) - 1).bit_length()


@functools.cache
def _kernels() -> SimpleNamespace:
    """Compile-on-first-use: Triton is imported only when a kernel runs (0.4 s that CPU users never pay)."""
    from sinkscope.record import _triton

    return SimpleNamespace(triton=_triton.triton, colsum=_triton.colsum_kernel, exp2_fma=_triton.exp2_fma_kernel,
                           radix_pass=_triton.radix_pass_kernel,
                           radix_final=_triton.radix_final_kernel, token_stats=_triton.token_stats_kernel,
                           colmax=_triton.colmax_kernel)


LAYER_PLAN = os.environ.get("SINKSCOPE_LAYER_PLAN", "1") != "0"
"""The recorder's device path repeats each forward's first-layer launches at its later layers (`LayerPlan`).
`SINKSCOPE_LAYER_PLAN=0` (read at import) or False here: every layer runs the wrappers."""

FAST_LAUNCH = os.environ.get("SINKSCOPE_FAST_LAUNCH", "1") != "0"
"""Launch the kernels through `launch`'s own cache of compiled kernels (below) instead of Triton's per-call
dispatch. `SINKSCOPE_FAST_LAUNCH=0` (read at import) or False here: Triton's dispatch on every call."""

_LAUNCHES: dict[tuple, tuple] = {}
"""`launch`'s cache: key (kernel, every argument that Triton could specialise on, the constexprs and the options)
-> (compiled kernel, the constexprs' values in the kernel's parameter order)."""

_LAUNCH_CAP = 4096
"""Entries kept before `launch`'s cache is emptied (each new shape adds one per kernel, the token pass one per
layer: its layer index is an argument)."""


def launch(fn, grid: tuple[int, ...], tensors: tuple, scalars: tuple, consts: dict, **options) -> None:
    """`fn[grid](*tensors, *scalars, **consts, **options)`, the way every kernel here is launched (each takes its
    pointers first, then its scalars, then its constexprs). On a GPU, Triton's dispatch costs tens of microseconds
    of host time a launch (it binds and specialises every argument, then looks the compiled kernel up: 31-83 us a
    call of the recorder's wrappers against 8 us for a small torch launch on the H200's host, session 19), and
    the recorder makes five launches a layer, which is what the short-context forwards wait on. So the first call
    with a given key goes through Triton (compiling if need be) and keeps the compiled kernel it returns; later
    calls with the same key hand the arguments to that kernel's own launcher, each tensor as its address (taken for
    the key already; a tensor would cost the launcher a `data_ptr()` call and a driver query). The key holds what Triton
    specialises on, conservatively: the tensors' device and dtypes, each pointer's address modulo 16 (Triton
    specialises on 16-byte alignment; a layer buffer's threshold sits 4 bytes into a 16-byte word), every
    scalar's exact type and value (so any integer property Triton looks at, being 1 or a multiple of 16, is the
    same), the constexprs and the launch options. Under the interpreter (`TRITON_INTERPRET=1`), with FAST_LAUNCH
    off, or when Triton returns no compiled kernel, every call goes through Triton."""
    if not FAST_LAUNCH or os.environ.get("TRITON_INTERPRET") == "1":
        fn[grid](*tensors, *scalars, **consts, **options)
    else:
        ptrs = tuple(map(torch.Tensor.data_ptr, tensors))
        key = _launch_key(fn, tensors, ptrs, scalars, consts, options)
        hit = _LAUNCHES.get(key)
        if hit is not None:
            compiled, tail = hit
            run = compiled[(*grid, 1, 1)[:3]]
            if _INT_POINTERS_FAILED:
                run(*tensors, *scalars, *tail, stream=_stream(key[1]))
            else:
                try:  # the addresses as integers: the launcher neither calls data_ptr() nor asks the driver again
                    run(*ptrs, *scalars, *tail, stream=_stream(key[1]))
                except (TypeError, ValueError) as exc:  # a launcher that takes only tensors: tensors from now on
                    _INT_POINTERS_FAILED.append(f"{type(exc).__name__}: {str(exc)[:200]}")
                    run(*tensors, *scalars, *tail, stream=_stream(key[1]))
        else:
            compiled = fn[grid](*tensors, *scalars, **consts, **options)
            tail = _constexpr_tail(fn, len(tensors) + len(scalars), consts)
            if tail is not None and hasattr(compiled, "function") and hasattr(compiled, "__getitem__"):
                if len(_LAUNCHES) >= _LAUNCH_CAP:
                    _LAUNCHES.clear()
                _LAUNCHES[key] = (compiled, tail)
    if _RECORDING is not None:  # a LayerPlan is taking this layer's launches down (those that went through)
        _RECORDING.append((fn, grid, tensors, scalars, consts, options))


def _launch_key(fn, tensors: tuple, ptrs: tuple, scalars: tuple, consts: dict, options: dict) -> tuple:
    """`launch`'s cache key (see there); `ptrs` the tensors' addresses."""
    return (fn, tensors[0].get_device(), tuple(map(_DTYPE, tensors)),
            tuple(map(operator.and_, ptrs, _FIFTEENS)),  # each address % 16
            scalars, tuple(map(type, scalars)), tuple(consts.items()), tuple(options.items()))


def _execute(calls: list) -> None:
    """Run a plan's calls in order: `launch`'s arguments, or (kernel None) `tensors[0].zero_()`."""
    for fn, grid, tensors, scalars, consts, options in calls:
        if fn is None:
            tensors[0].zero_()
        else:
            launch(fn, grid, tensors, scalars, consts, **options)


_INT_POINTERS_FAILED: list[str] = []
"""Set when a compiled kernel's launcher refused addresses given as integers (every Triton 3 launcher takes them:
an integer is used as it is, where a tensor costs a `data_ptr()` call and a `cuPointerGetAttribute` query each):
`launch` then hands it the tensors."""

_DTYPE = operator.attrgetter("dtype")
_FIFTEENS = itertools.repeat(15)
_RECORDING: list | None = None
"""Set by `LayerPlan` while the wrappers run for a forward's first layer: `launch` appends each call's arguments."""


def _constexpr_tail(fn, n_args: int, consts: dict) -> tuple | None:
    """The values of `fn`'s parameters after the first `n_args`, in its order: from `consts` by name, else the
    parameter's default. None when that is not the whole of `consts` or a parameter has neither (then `launch`
    keeps using Triton's dispatch for this call)."""
    params = getattr(fn, "params", None)
    if params is None or len(params) < n_args:
        return None
    rest = params[n_args:]
    if not set(consts) <= {p.name for p in rest}:
        return None  # a keyword that is no parameter of fn
    tail = []
    for p in rest:
        if p.name in consts:
            tail.append(consts[p.name])
        elif getattr(p, "has_default", False):
            tail.append(p.default)
        else:
            return None
    return tuple(tail)


def _stream(device: int) -> int:
    """The current CUDA stream of `device`, as Triton's launch takes it."""
    return _stream_getter()(device)


@functools.cache
def _stream_getter():
    return _kernels().triton.runtime.driver.active.get_current_stream


COLSUM_CONFIG: dict[str, int | bool] = {"rows": False, "poly": False, "block_m": 64, "block_n": 0, "num_warps": 4,
                                        "num_stages": 2, "heavy_first": False, "pipe": False}
"""The column-sum kernel `colsum_triton` runs by default: `rows` the keys as the MMA's rows (`colsum_kernel`'s ROWS:
a `[BLOCK_N]` accumulator instead of a `[BLOCK_M, BLOCK_N]` register tile), `poly` (bf16/fp16 inputs with `rows`
only) half the exponentials on the FMA units; the block sizes (`block_n` 0: 128 keys for head dim >= 128, else
64; measured on an H200, session 11) and launch settings. `python -m sinkscope.bench.gpu --colsum` times the
alternatives at real shapes and uses its run's fastest exact one from there on. Session 15 (H200, bf16): the default
0.825x / 0.664x / 0.698x of the cuDNN call at 1B T=8192 / 8B T=8192 / 1B T=32768, the best alternative within 2 %,
ROWS+POLY 0.81-1.36x: the default stays. `heavy_first` (the longest runs first, over all heads) and `pipe` (the
next tile's matrix product before this tile's exponentials) were added in session 16 without a GPU: exact under
the interpreter, not yet timed; off until `--colsum` shows them faster."""


COLSUM_FP32: dict[str, int] = {"block_m": 32, "block_n": 32, "num_warps": 8}
"""COLSUM_CONFIG's block sizes and warps replaced wherever the products run on the FMA units: float32 inputs (IEEE
precision), and bf16/fp16 on GPUs older than Ampere (compute capability < 8.0: T4, V100), for which Triton 3.6 and
3.9 emit no tensor-core instruction for `tl.dot`. A register tile of FMA products needs far more registers: at
COLSUM_CONFIG's 64 x 64 (head dim 64, the 1B shape) and 64 x 128 (head dim 128, the 8B shape) with 4 warps the
kernel spilled, in float32 for sm_90, 304 and 40,985 instructions' worth of registers under Triton 3.6 (12,347 and
50,977 under 3.9), and in fp16 for sm_75 300 and 20,533 (3.6); at 32 x 32 with 8 warps none under 3.6 on sm_75 to
sm_90, and under 3.9 only in float32 at head dim 128 (274 on sm_90) (`python -m sinkscope.bench.sass`, session 23;
static counts: neither float32 nor a pre-Ampere GPU was ever timed)."""


def _tensor_core_dot(device: torch.device) -> bool:
    """Whether Triton runs `colsum_kernel`'s `tl.dot` on tensor cores for bf16/fp16 on `device`'s GPU (compute
    capability 8.0 and up). Off CUDA (Triton's interpreter in the tests, `sinkscope.bench.sass`'s stand-in driver)
    the architecture Triton compiles for, when it has one."""
    if device.type == "cuda":
        return _capability(device.index if device.index is not None else torch.cuda.current_device()) >= (8, 0)
    try:
        return _kernels().triton.runtime.driver.active.get_current_target().arch >= 80
    except Exception:  # noqa: BLE001 - no driver (the interpreter on a machine without CUDA): the default tiles
        return True


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def colsum_triton(query: torch.Tensor, key: torch.Tensor, lse: torch.Tensor, scale: float,
                  valid: torch.Tensor | None = None, block_m: int | None = None, block_n: int | None = None,
                  num_warps: int | None = None, num_stages: int | None = None, out: torch.Tensor | None = None,
                  rows: bool | None = None, poly: bool | None = None, heavy_first: bool | None = None,
                  pipe: bool | None = None, plan: LayerPlan | None = None, layer: int = -1) -> torch.Tensor:
    """`sum_q A[b, h, q, k]` over the (valid) queries that see key k: `[B, Hq, T]` float32.

    `query` `[B, Hq, T, d]`, `key` `[B, Hkv, T, d]` (grouped-query heads map `h -> h // (Hq // Hkv)`), `lse` the
    forward's row log-sum-exp `[B, Hq, T]` (natural log, scores scaled by `scale`), `valid` `[B, T]` bool (False:
    padding, which neither attends nor is attended). `out`: a contiguous `[B, Hq, T]` float32 to write into (the
    recorder's per-layer buffer), or None for a new one. The kernel variant and launch settings: COLSUM_CONFIG's
    where None; `poly` is ignored for float32 inputs, whose alpha must stay within 1e-5 (exp2_fma's relative error
    is up to 7.5e-5); `pipe` applies without `rows` only. `plan`: the recorder's `LayerPlan` for this forward (its
    later layers repeat the first one's launch with their own Q, K and log-sum-exp), and `layer` the layer's index
    (which of the plan's graphs to use)."""
    recording = False
    if plan is not None and out is not None:
        if plan.replay_colsum(query, key, lse, scale, valid, out, layer):
            return out
        recording = True  # a plan without a column-sum launch, or one for other inputs: this one replaces it
        incoming = (_layout_of(query), _layout_of(key), _layout_of(lse))
    b, hq, t, d = query.shape
    hkv = key.shape[1]
    query, key, lse = _colsum_operands(query, key, lse)
    kern = _kernels()
    if out is None:
        out = torch.empty(b, hq, t, dtype=torch.float32, device=query.device)
    elif out.shape != (b, hq, t) or not out.is_contiguous():
        raise ValueError(f"colsum_triton: out has shape {tuple(out.shape)}, expected a contiguous {(b, hq, t)}")
    fma = query.dtype == torch.float32 or not _tensor_core_dot(query.device)
    cfg = {**COLSUM_CONFIG, **COLSUM_FP32} if fma else COLSUM_CONFIG
    rows = bool(cfg["rows"] if rows is None else rows)
    poly = bool(cfg["poly"] if poly is None else poly) and rows and query.dtype != torch.float32
    block_m = int(block_m or cfg["block_m"])
    block_n = int(block_n or cfg["block_n"] or (128 if d >= 128 else 64))
    num_warps, num_stages = int(num_warps or cfg["num_warps"]), int(num_stages or cfg["num_stages"])
    heavy_first = bool(cfg["heavy_first"] if heavy_first is None else heavy_first)
    pipe = bool(cfg["pipe"] if pipe is None else pipe) and not rows
    # the mask's own bytes (a view: the same address at every layer), or a placeholder pointer when unused
    v = (valid if valid.dtype == torch.bool else valid != 0).contiguous().view(torch.int8) if valid is not None else out
    block_d = max(16, _pow2(d))
    grid = (b * hq, _cdiv(t, block_n)) if heavy_first else (_cdiv(t, block_n), b * hq)
    if recording:
        _start_recording()
    try:
        launch(kern.colsum, grid, (query, key, lse, v, out), (
            query.stride(0), query.stride(1), query.stride(2), key.stride(0), key.stride(1), key.stride(2),
            lse.stride(0), lse.stride(1), v.stride(0) if valid is not None else 0, out.stride(0), out.stride(1),
            t, hq, hq // hkv, scale * LOG2E),
            dict(HAS_VALID=valid is not None, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
                 IEEE=query.dtype == torch.float32, UPCAST=os.environ.get("TRITON_INTERPRET") == "1",
                 ROWS=rows, POLY=poly, HEAVY_FIRST=heavy_first, PIPE=pipe), num_warps=num_warps,
            num_stages=num_stages)
    finally:
        if recording:
            plan.keep_colsum(_stop_recording(), incoming, scale, valid, out)
    return out


def _colsum_operands(query: torch.Tensor, key: torch.Tensor, lse: torch.Tensor) -> tuple:
    """Q and K with contiguous rows, the log-sum-exp as contiguous float32: what the column-sum kernel reads."""
    return (query if query.stride(-1) == 1 else query.contiguous(), key if key.stride(-1) == 1 else key.contiguous(),
            lse.float().contiguous())


def exp2_fma(x: torch.Tensor) -> torch.Tensor:
    """`_triton.exp2_fma` (2**x on the FMA units, x <= 0) over a float32 tensor, for its accuracy test."""
    kern = _kernels()
    x = x.float().contiguous()
    out = torch.empty_like(x)
    kern.exp2_fma[(_cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
    return out


RADIX_PROGRAMS = 1024
"""Programs per radix pass (all rows together): enough to fill a GPU, few enough that the per-program histogram
atomics stay negligible."""


RADIX_CONFIG: dict[int, tuple[int, bool, int, int, int]] = {0: (8, False, 4096, 8, 0), 1: (8, False, 4096, 8, 0),
                                                           2: (8, False, 4096, 8, 0)}
"""(digit bits, one-hot counting, BLOCK, num_warps, spread) of the radix median by input format (0: float32, 1:
bf16, 2: fp16). 8-bit digits counted by Triton's histogram: two passes over bf16's 15 bits (session 8's sweep of
block and warps), the first over its 7 leftover bits in 128 bins. Narrower digits mean more passes of cheaper
counting; `python -m sinkscope.bench.gpu --radix` times the alternatives (RADIX_CONFIGS there) and uses its run's
fastest exact one. Session 15 (H200, Triton 3.6, T=8192, bf16, hidden 2048/4096/576): 8-bit 240/419/189 us,
5-bit 217/398/231 us (a tie over the three), one-hot counting 3-4x slower: the default stays. Those passes read
0.3-0.6 TB/s, bound by their counting: in Triton 3.6 `tl.histogram` is warp ballots and popcounts (in proportion
to the bins), and the second 8-bit pass held both ranks' counts in one loop, 255 registers and 72 bytes a thread
spilled; since session 22 the first pass counts in 128 bins and the second keeps one count in its common loop (128
registers, none spilled; `python -m sinkscope.bench.sass`, `experiments/results/sass/`), not yet timed on a GPU.
`spread`: see `_triton._count_digits` (more work under Triton 3.6's ballots; aimed at 3.9's shared-memory atomics)."""


def median_abs_triton(h: torch.Tensor, valid: torch.Tensor | None = None, block: int | None = None,
                      num_warps: int | None = None, thresholds: tuple[float, float] = (0.0, 0.0),
                      count: torch.Tensor | None = None, hist: torch.Tensor | None = None,
                      out: torch.Tensor | None = None, bits: int | None = None, onehot: bool | None = None,
                      final: bool = True, spread: int | None = None, lean: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor] | SimpleNamespace:
    """Exact `median(|h[b]|)` over each sample's valid tokens and all features, and the massive-activation
    threshold `max(thresholds[0], thresholds[1] * median)`: two `[B]` float32. `h` `[B, T, D]` in any float dtype;
    `valid` `[B, T]` bool or None (all tokens). numpy's convention: the mean of the two middle values for an even
    count. A few launches, whatever B and T and without host synchronisation: the radix passes (both middle ranks
    at once, reading h once each: `ceil(31 / bits)` for float32, `ceil(15 / bits)` over the raw 15 bits of |h|
    for bf16 and fp16), then a final one. `bits`, `onehot`, `block`, `num_warps`: RADIX_CONFIG's for the format
    when None; `spread`: count each digit in one of 2**spread copies of its bin (RADIX_CONFIG's when None; 0 off,
    at most 4); `lean=False`: the passes as they were before session 22 (the benchmark's baseline). The recorder
    passes its per-layer buffer's parts: `count` (real tokens per sample, int32 `[B]`), `hist` (a zeroed int32
    block of at least 4 * B * 512) and `out` (a `[2, B]` float32 for the median and the threshold); otherwise they
    are allocated here. `final=False`: only the passes; returns what
    `token_stats_triton(radix=...)` needs to take the final step itself (the recorder's way: one launch fewer)."""
    b, t, d = h.shape
    flat = h.reshape(b, t * d)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    fmt = {torch.bfloat16: 1, torch.float16: 2}.get(flat.dtype, 0)
    if fmt:  # 16-bit formats: their raw bits, passes over 15 bits instead of 31
        flat = flat.view(torch.int16)
    cfg_bits, cfg_onehot, cfg_block, cfg_warps, cfg_spread = RADIX_CONFIG[fmt]
    bits, onehot = bits or cfg_bits, cfg_onehot if onehot is None else onehot
    block, num_warps = block or cfg_block, num_warps or cfg_warps
    spread = cfg_spread if spread is None else spread
    if not 1 <= bits <= 8:
        raise ValueError(f"median_abs_triton: bits must be 1-8, got {bits}")
    if not 0 <= spread <= 4 or (spread and onehot):
        raise ValueError(f"median_abs_triton: spread must be 0-4 and 0 with one-hot counting, got {spread}")
    passes = -(-(15 if fmt else 31) // bits)
    kern = _kernels()
    n = t * d
    if hist is None:
        hist = torch.zeros(passes, b, 2, 1 << bits, dtype=torch.int32, device=h.device)
    elif hist.numel() < passes * b * 2 * (1 << bits):
        raise ValueError(f"median_abs_triton: hist has {hist.numel()} entries, {passes * b * 2 * (1 << bits)} needed")
    if count is None:
        count = valid.sum(dim=1, dtype=torch.int32) if valid is not None else hist  # a placeholder when unused
    v = valid.contiguous().view(torch.int8) if valid is not None else hist
    programs = max(1, min(_cdiv(n, block), RADIX_PROGRAMS // b))
    for p in range(passes):
        launch(kern.radix_pass, (programs, b),
               (flat, v, count, hist), (n, t, d, flat.stride(0), v.stride(0) if valid is not None else 0, b),
               dict(PASS=p, FMT=fmt, HAS_VALID=valid is not None, BLOCK=block, BITS=bits, ONEHOT=onehot,
                    SPREAD=spread, LEAN=bool(lean)),
               num_warps=num_warps)
    if out is None:
        out = torch.empty(2, b, dtype=torch.float32, device=h.device)
    radix = SimpleNamespace(hist=hist, count=count, fmt=fmt, bits=bits, out=out, shape=(b, t, d),
                            has_valid=valid is not None, thresholds=(float(thresholds[0]), float(thresholds[1])))
    if not final:
        return radix
    radix_final(radix)
    return out[0], out[1]


def radix_final(radix: SimpleNamespace) -> None:
    """The radix median's final launch for `median_abs_triton(final=False)`'s passes: the median and the threshold
    into `radix.out`."""
    b, t, d = radix.shape
    launch(_kernels().radix_final, (b,), (radix.hist, radix.count, radix.out[0], radix.out[1]),
           (*radix.thresholds, t, d, b),
           dict(FMT=radix.fmt, HAS_VALID=radix.has_valid, BITS=radix.bits))


def massive_buffers(batch: int, t: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward-wide buffers `token_stats_triton` appends massive entries to: a count `[1]` int32, the entries'
    `(layer, batch, token, feature)` `[cap, 4]` int32 and `(value, attn_out, mlp_out)` `[cap, 3]` float32, with
    cap = MASSIVE_PER_TOKEN entries per token on average over one layer (at least 65,536) for all layers
    together. Past the cap, entries are counted but not kept, and the recorder refuses the forward."""
    from sinkscope.record.reduce import MASSIVE_MIN_CAP, MASSIVE_PER_TOKEN

    cap = max(MASSIVE_MIN_CAP, MASSIVE_PER_TOKEN * batch * t)
    return (torch.zeros(1, dtype=torch.int32, device=device), torch.empty(cap, 4, dtype=torch.int32, device=device),
            torch.empty(cap, 3, dtype=torch.float32, device=device))


TOKEN_FIELDS = ("bos_cosine", "max_abs", "top_features", "top_values", "mlp_top_features", "mlp_top_values")


def token_stats_triton(h: torch.Tensor, mlp_out: torch.Tensor, attn_out: torch.Tensor, first: torch.Tensor,
                       thr: torch.Tensor, valid: torch.Tensor | None, top_k: int, layer: int,
                       buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                       num_warps: int | None = None, out: torch.Tensor | None = None,
                       rows: int | None = None, narrow_keys: bool = True,
                       radix: SimpleNamespace | None = None) -> torch.Tensor:
    """The per-token fields of one block output `h` `[B, T, D]` in one launch (see `token_stats_kernel`), packed
    in one float32 buffer (`out` when given: at least `B * T * (2 + 4 * top_k)` contiguous entries) that
    `unpack_token_stats` reads. The massive entries (|h| >= `thr[b]`, real tokens only) go to `buffers`
    (`massive_buffers`). `first` `[B]` (int64): each sample's first real position, whose row of h is its BOS.
    `narrow_keys`: bf16 and fp16 inputs rank their features on int32 keys (the same result as int64 keys over
    float32 bits, at half the comparison cost); False forces int64 keys (the benchmark's comparison). `radix`:
    `median_abs_triton(final=False)`'s result, whose final step this launch then takes (the median and the
    threshold written to `radix.out`, `thr` ignored)."""
    b, t, d = h.shape
    kern = _kernels()
    h, a, m = (x if x.stride(-1) == 1 else x.contiguous() for x in (h, attn_out, mlp_out))
    if out is None:
        out = torch.empty(b * t * (2 + 4 * top_k), dtype=torch.float32, device=h.device)
    count, ent_i, ent_v = buffers
    v = valid.contiguous().view(torch.int8) if valid is not None else count
    block_d = _pow2(d)
    default_rows, default_warps = token_config(block_d)
    rows = rows or default_rows

    def fmt(x: torch.Tensor) -> int:
        return {torch.bfloat16: 1, torch.float16: 2}.get(x.dtype, 0) if narrow_keys and block_d <= 32768 else 0

    if radix is not None:  # the radix median's final step in this launch
        thr, hist, real, med = radix.out[1], radix.hist, radix.count, radix.out[0]
        thresholds, radix_fmt, radix_bits = radix.thresholds, radix.fmt, radix.bits
    else:  # placeholders, unused
        hist, real, med, thresholds, radix_fmt, radix_bits = count, count, thr, (0.0, 0.0), 0, 8

    def run(h_fmt: int, m_fmt: int) -> None:
        launch(kern.token_stats, (_cdiv(t, rows), b), (
            h, a, m, first, thr, v, out, out.view(torch.int32), count, ent_i, ent_v, hist, real, med), (
            thresholds[0], thresholds[1],
            t, d, b * t, b, h.stride(0), h.stride(1), a.stride(0), a.stride(1), m.stride(0), m.stride(1),
            v.stride(0) if valid is not None else 0, layer, ent_i.shape[0]),
            dict(K=top_k, BLOCK_D=block_d, HAS_VALID=valid is not None, ROWS=rows, FMT=h_fmt, MLP_FMT=m_fmt,
                 FROM_HIST=radix is not None, RADIX_FMT=radix_fmt, RADIX_BITS=radix_bits),
            num_warps=num_warps or default_warps)

    formats = (fmt(h), fmt(m))
    if formats != (0, 0) and not _NARROW_KEYS_FAILED:
        try:
            run(*formats)
            return out
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - the int32-key variant is new (session 14): never the only way
            _NARROW_KEYS_FAILED.append(f"{type(exc).__name__}: {str(exc)[:300]}")
            warnings.warn("sinkscope: the token pass with int32 keys did not compile here; using int64 keys "
                          f"(the same result): {_NARROW_KEYS_FAILED[0]}", RuntimeWarning, stacklevel=2)
    run(0, 0)
    return out


_NARROW_KEYS_FAILED: list[str] = []
"""Set when the int32-key token pass failed to compile on this machine: later layers use int64 keys directly."""
_RADIX_FAILED: list[str] = []
"""Set when the radix median failed to compile on this machine: later layers use torch's selection."""
_FOLD_FAILED: list[str] = []
"""Set when the token pass with the radix median's final step (FOLD_RADIX_FINAL) failed to compile on this machine:
later layers launch the final step on its own."""


TOKEN_CONFIG: dict[int, tuple[int, int]] = {1024: (1, 4), 2048: (1, 4), 4096: (1, 2)}
"""(rows per program, num_warps) of the token-stats pass by feature block (the hidden size rounded up to a power
of two): the fastest exact ones on an H200 at T = 8192, bf16, with int32 top-k keys (`python -m sinkscope.bench.gpu
--kernels`, session 15: hidden 576 93 us (2 warps: 95), 2048 151 us (2 warps: 163), 4096 241 us (4 warps: 287);
int64 keys took 168 / 319 / 710 us). The benchmark's `--kernels` overwrites them with its own run's fastest."""


def token_config(block_d: int) -> tuple[int, int]:
    """Rows per program and num_warps of the token-stats pass for a feature block of `block_d`: TOKEN_CONFIG's,
    else one row and 2 warps up to 1,024 features, 4 above."""
    return TOKEN_CONFIG.get(block_d, (1, 2 if block_d <= 1024 else 4))


COLMAX_PROGRAMS = 2048
"""Programs of the per-feature max (feature blocks x samples x token runs): enough to fill a GPU."""


def colmax_triton(h: torch.Tensor, mlp_out: torch.Tensor, valid: torch.Tensor | None,
                  out: torch.Tensor | None = None, block_t: int = 32, block_d: int = 128,
                  num_warps: int = 4) -> torch.Tensor:
    """`max over real tokens of |h|` and of `|mlp_out|` per sample and feature, `[2, B, D]` float32, in one launch
    (`out`, when given, must be zeroed). Exact: the max is taken on the bit patterns of |x|."""
    b, t, d = h.shape
    kern = _kernels()
    h, m = (x if x.stride(-1) == 1 else x.contiguous() for x in (h, mlp_out))
    if out is None:
        out = torch.zeros(2, b, d, dtype=torch.float32, device=h.device)
    v = valid.contiguous().view(torch.int8) if valid is not None else out
    d_blocks = _cdiv(d, block_d)
    splits = max(1, min(_cdiv(t, block_t), COLMAX_PROGRAMS // (d_blocks * b)))
    rows = _cdiv(_cdiv(t, splits), block_t) * block_t
    launch(kern.colmax, (d_blocks, b, _cdiv(t, rows)), (h, m, v, out.view(torch.int32)), (
        t, d, b, h.stride(0), h.stride(1), m.stride(0), m.stride(1),
        v.stride(0) if valid is not None else 0, rows),
        dict(HAS_VALID=valid is not None, BLOCK_T=block_t, BLOCK_D=block_d), num_warps=num_warps)
    return out


def unpack_token_stats(packed: torch.Tensor, b: int, t: int, top_k: int) -> dict[str, torch.Tensor]:
    """Views of `token_stats_triton`'s buffer (on the device or copied to the host): `bos_cosine`, `max_abs`
    `[B, T]`; `top_features` (int32), `top_values`, `mlp_top_features` (int32), `mlp_top_values` `[B, T, k]`.
    A `packed` with leading dimensions (several layers' buffers, `[..., N]`) gives fields with those in front."""
    n = b * t
    lead = tuple(packed.shape[:-1])
    bt, btk = (*lead, b, t), (*lead, b, t, top_k)
    sizes = (n, n, n * top_k, n * top_k, n * top_k, n * top_k)
    parts = packed[..., : sum(sizes)].split(sizes, dim=-1)
    shapes = (bt, bt, btk, btk, btk, btk)
    out = {key: part.reshape(shape) for key, part, shape in zip(TOKEN_FIELDS, parts, shapes, strict=True)}
    for key in ("top_features", "mlp_top_features"):
        out[key] = out[key].view(torch.int32)
    return out


# ------------------------------------------------------------------------------------------ one buffer per layer
_ALIGN = 32
"""Each part of a layer buffer starts on a 32-word (128-byte) boundary, so that every pointer the kernels get is
as aligned as a fresh tensor's."""


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


@functools.lru_cache(maxsize=64)
def layer_layout(batch: int, tokens: int, hidden: int, heads: int, top_k: int) -> SimpleNamespace:
    """Where one layer's results sit in its float32 device buffer (offsets in 4-byte words):

    `hist` the radix median's histograms (int32, room for four passes) and `feat` the per-feature maxima
    `[2, B, D]` (|h|, |mlp_out|), both zeroed by one launch (`[0, stats)`); `stats` the median and the massive
    threshold `[2, B]`; `tok` the per-token fields (`unpack_token_stats`); `col` the column sums `[B, Hq, T]`.
    Everything from `feat` on goes to the host in one copy."""
    feat = _aligned(4 * batch * 512)
    stats = _aligned(feat + 2 * batch * hidden)
    tok = _aligned(stats + 2 * batch)
    col = _aligned(tok + batch * tokens * (2 + 4 * top_k))
    return SimpleNamespace(batch=batch, tokens=tokens, hidden=hidden, heads=heads, top_k=top_k, feat=feat,
                           stats=stats, tok=tok, col=col, total=col + batch * heads * tokens)


def layer_buffer(layout: SimpleNamespace, device: torch.device) -> torch.Tensor:
    """A layer's device buffer (`layer_layout`), with its histogram and per-feature-max parts zeroed."""
    buf = torch.empty(layout.total, dtype=torch.float32, device=device)
    buf[: layout.stats].zero_()
    return buf


def colsum_view(buf: torch.Tensor, layout: SimpleNamespace) -> torch.Tensor:
    """The `[B, Hq, T]` column-sum part of a layer buffer, for `colsum_triton(out=...)`."""
    return buf[layout.col:].view(layout.batch, layout.heads, layout.tokens)


FOLD_RADIX_FINAL = True
"""The recorder's device path takes the radix median's final step inside the token pass (`token_stats_triton(radix=
...)`) instead of in a launch of its own: five launches a layer instead of six for bf16 (session 16; on a GPU host
each Triton launch costs tens of microseconds of host time, and the short-context cases are bound by that time).
False restores the separate launch (`radix_final_kernel`); the outputs are the same bit for bit (tested)."""


def reduce_layer_device(h: torch.Tensor, attn_out: torch.Tensor, mlp_out: torch.Tensor, buf: torch.Tensor,
                        layout: SimpleNamespace, first: torch.Tensor, valid: torch.Tensor | None,
                        count: torch.Tensor | None, layer: int, thresholds: tuple[float, float],
                        buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                        plan: LayerPlan | None = None) -> torch.Tensor:
    """The recorder's reductions of one block output `h` `[B, T, D]` on the device, into the layer's buffer: the
    exact median of |h| and the massive threshold (radix select), the per-token fields and massive entries (one
    pass over the rows, which also takes the median's final step (FOLD_RADIX_FINAL); entries to `buffers`), and the
    per-feature maxima (one pass over the columns). Four launches for bf16 and fp16 (two radix passes), six for
    float32 (four), no host synchronisation. `valid` `[B, T]` bool (None: no padding), `count` its per-sample sums
    (int32), `first` each sample's first real position. Returns the part of `buf` that goes to the host. `plan`:
    the recorder's `LayerPlan` for this forward, whose `buf` is the same for every layer: the first layer runs
    the wrappers below and the plan keeps their launches, later layers repeat them with their own h, attn_out,
    mlp_out and layer index."""
    if plan is not None and plan.replay_reductions(h, attn_out, mlp_out, layer, buf):
        return buf[layout.feat:]
    zero = buf[: layout.stats]
    zero.zero_()  # the histograms and feature maxima start from zero at every layer
    recording = plan is not None and not (_RADIX_FAILED or _FOLD_FAILED)
    if recording:
        _start_recording()
    try:
        result = _reduce_layer_device(h, attn_out, mlp_out, buf, layout, first, valid, count, layer, thresholds,
                                      buffers)
    finally:
        if recording:
            calls = _stop_recording()
    if recording and not (_RADIX_FAILED or _FOLD_FAILED):  # kept only when no fallback took a launch's place
        plan.keep_reductions(calls, h, attn_out, mlp_out, layer, buf, zero)
    return result


def _reduce_layer_device(h, attn_out, mlp_out, buf, layout, first, valid, count, layer, thresholds,
                         buffers) -> torch.Tensor:
    b, t, d = h.shape
    if (b, t, d) != (layout.batch, layout.tokens, layout.hidden):
        from sinkscope.errors import RecorderError

        raise RecorderError(f"block {layer} output has shape {tuple(h.shape)}, expected "
                            f"{(layout.batch, layout.tokens, layout.hidden)} (batch, tokens, hidden size)")
    ints = buf.view(torch.int32)
    stats = buf[layout.stats: layout.stats + 2 * b].view(2, b)
    radix = None  # the radix passes' state when the final step is left to the token pass
    fold = FOLD_RADIX_FINAL and not _FOLD_FAILED
    if not _RADIX_FAILED:
        try:
            result = median_abs_triton(h, valid, thresholds=thresholds, count=count, hist=ints[: layout.feat],
                                       out=stats, final=not fold)
            radix = result if fold else None
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - the radix passes changed in session 14: never the only way
            _RADIX_FAILED.append(f"{type(exc).__name__}: {str(exc)[:300]}")
            warnings.warn("sinkscope: the radix median did not compile here; using torch's selection (exact, "
                          f"with a host synchronisation per layer): {_RADIX_FAILED[0]}", RuntimeWarning,
                          stacklevel=2)
    if _RADIX_FAILED:
        from sinkscope.record.reduce import massive_threshold, median_nonneg

        rows = [h[i][valid[i]] if valid is not None else h[i] for i in range(b)]
        stats[0] = torch.stack([median_nonneg(r.abs().float().reshape(-1)) for r in rows])
        stats[1] = massive_threshold(stats[0], *thresholds)
    thr = buf[layout.stats + b: layout.stats + 2 * b]
    tok = buf[layout.tok: layout.col]
    folded = False
    if radix is not None:
        narrow_failed = len(_NARROW_KEYS_FAILED)
        try:
            token_stats_triton(h, mlp_out, attn_out, first, thr, valid, layout.top_k, layer, buffers, out=tok,
                               radix=radix)
            folded = True
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - the folded final step is new (session 16): never the only way
            del _NARROW_KEYS_FAILED[narrow_failed:]  # the fold failed, not the int32 keys
            _FOLD_FAILED.append(f"{type(exc).__name__}: {str(exc)[:300]}")
            warnings.warn("sinkscope: the token pass with the radix median's final step did not compile here; "
                          f"using a launch of its own (the same result): {_FOLD_FAILED[0]}", RuntimeWarning,
                          stacklevel=2)
    if not folded:
        if radix is not None:  # the fold failed to compile: the final step on its own
            radix_final(radix)
        token_stats_triton(h, mlp_out, attn_out, first, thr, valid, layout.top_k, layer, buffers, out=tok)
    colmax_triton(h, mlp_out, valid, out=buf[layout.feat: layout.feat + 2 * b * d].view(2, b, d))
    return buf[layout.feat:]


def unpack_layer(host: torch.Tensor, layout: SimpleNamespace) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The fields of a layer buffer's host part (`reduce_layer_device`'s result, copied): the per-token fields,
    `feature_max_abs`, `mlp_feature_max_abs` `[B, D]`, `median_abs` `[B]`; and the column sums `[B, Hq, T]`.
    `host` `[L, N]` (several layers' host parts stacked) gives every field with a leading `[L]`."""
    b, d, base = layout.batch, layout.hidden, layout.feat
    lead = tuple(host.shape[:-1])
    fields = unpack_token_stats(host[..., layout.tok - base: layout.col - base], b, layout.tokens, layout.top_k)
    feat = host[..., : 2 * b * d].reshape(*lead, 2, b, d)
    fields["feature_max_abs"], fields["mlp_feature_max_abs"] = feat[..., 0, :, :], feat[..., 1, :, :]
    fields["median_abs"] = host[..., layout.stats - base: layout.stats - base + b]
    return fields, host[..., layout.col - base:].reshape(*lead, b, layout.heads, layout.tokens)


def _start_recording() -> None:
    global _RECORDING
    _RECORDING = []


def _stop_recording() -> list:
    global _RECORDING
    calls, _RECORDING = _RECORDING, None
    return calls


def _layout_of(x: torch.Tensor) -> tuple:
    return x.shape, x.stride(), x.dtype, x.device


class LayerPlan:
    """A forward's per-layer launches, taken down at a layer that runs the wrappers and repeated at the others
    (session 19; kept across forwards of one shape since session 20).

    The recorder's device path makes the same launches at every layer: the same grids, constexprs, buffers (the
    recorder keeps one layer buffer per input shape, reused in stream order: a layer's copy to the host is queued
    before the next layer's kernels write it) and scalars, except for the layer's own tensors and its index. The
    wrappers that build those launches (`colsum_triton`, `median_abs_triton`, `token_stats_triton`, `colmax_triton`
    and `reduce_layer_device`'s views of the buffer) cost about 100 us of host Python a layer (session 19,
    `bench.gpu --host-python`, launches stubbed), which the short-context forwards wait on. So one layer runs
    them while `launch` records each call, and every later layer (of this forward and of the next ones with the
    same shape: the recorder keeps the plan with its buffers) substitutes its own tensors into the recorded calls:
    the radix passes' h (reshaped and reinterpreted as the recorded layer's was), the token pass's h, attn_out
    and mlp_out and its layer index, the feature maxima's h and mlp_out, and the column sums' Q, K and log-sum-exp.
    A layer whose tensors differ from the recorded ones in shape, strides, dtype or device (the recorded scalars
    hold their strides), or in the column sums' scale or padding mask, takes the wrappers again, and its launches
    replace the plan's. `graphs`: a `LaunchGraphs` that runs each layer's calls (as a CUDA graph once the same
    layer has had the same inputs twice), or None to launch them."""

    def __init__(self, graphs: LaunchGraphs | None = None) -> None:
        self.reductions: list | None = None
        self.colsum: tuple | None = None
        self.graphs = graphs
        self._flat: tuple | None = None
        self._inputs: tuple = ()
        self._colsum_inputs: tuple = ()
        self._version = (next(_PLAN_VERSIONS), next(_PLAN_VERSIONS))  # (reductions, column sums) as recorded

    def keep_reductions(self, calls: list, h: torch.Tensor, attn_out: torch.Tensor, mlp_out: torch.Tensor,
                        layer: int, buf: torch.Tensor, zero: torch.Tensor | None = None) -> None:
        """`zero`: the part of `buf` that the layer zeroes before its launches (repeated with them)."""
        kern = _kernels()
        roles = {kern.radix_pass: "radix", kern.token_stats: "token", kern.colmax: "colmax"}
        if not calls or any(fn not in roles for fn, *_ in calls):
            self.reductions = None  # a launch the plan does not know how to repeat: every layer takes the wrappers
            return
        for fn, _, tensors, scalars, _, _ in calls:  # the layer's own tensors where the replay puts them
            role = roles[fn]
            if (role == "radix" and tensors[0].data_ptr() != h.data_ptr()) or (
                    role == "token" and (tensors[0] is not h or tensors[1] is not attn_out
                                         or tensors[2] is not mlp_out or scalars[-2] != layer)) or (
                    role == "colmax" and (tensors[0] is not h or tensors[1] is not mlp_out)):
                self.reductions = None
                return
        # the layer's own tensors are dropped (None): kept, they would hold the recorded layer's h, attn_out and
        # mlp_out for the rest of the forward (3 x 38 MB at the 135M shape, T=32768)
        subst = {"radix": 1, "token": 3, "colmax": 2}
        self.reductions = ([("zero", None, None, (zero,), (), {}, {})] if zero is not None else []) + [
            (roles[fn], fn, grid, (None,) * subst[roles[fn]] + tuple(tensors[subst[roles[fn]]:]), scalars, consts,
             options) for fn, grid, tensors, scalars, consts, options in calls]
        radix = next((tensors[0] for fn, _, tensors, *_ in calls if roles[fn] == "radix"), None)
        self._flat = None if radix is None else (radix.shape[0], radix.dtype)
        self._inputs = (_layout_of(h), _layout_of(attn_out), _layout_of(mlp_out), buf)
        self._version = (next(_PLAN_VERSIONS), self._version[1])

    def replay_reductions(self, h: torch.Tensor, attn_out: torch.Tensor, mlp_out: torch.Tensor, layer: int,
                          buf: torch.Tensor) -> bool:
        if self.reductions is None or (
                (_layout_of(h), _layout_of(attn_out), _layout_of(mlp_out)) != self._inputs[:3]
                or buf is not self._inputs[3]):
            return False

        def calls() -> list:
            out, flat = [], None
            for role, fn, grid, tensors, scalars, consts, options in self.reductions:
                if role == "radix":
                    if flat is None:
                        flat = h.reshape(self._flat[0], -1)
                        if flat.dtype != self._flat[1]:
                            flat = flat.view(self._flat[1])
                    out.append((fn, grid, (flat, *tensors[1:]), scalars, consts, options))
                elif role == "token":
                    out.append((fn, grid, (h, attn_out, mlp_out, *tensors[3:]), (*scalars[:-2], layer, scalars[-1]),
                                consts, options))
                elif role == "colmax":
                    out.append((fn, grid, (h, mlp_out, *tensors[2:]), scalars, consts, options))
                else:
                    out.append((fn, grid, tensors, scalars, consts, options))
            return out

        self._run((layer, "reductions"), (self._version[0], h.data_ptr(), attn_out.data_ptr(),
                                          mlp_out.data_ptr()), calls)
        return True

    def keep_colsum(self, calls: list, incoming: tuple, scale: float, valid: torch.Tensor | None,
                    out: torch.Tensor) -> None:
        """`incoming`: the layouts of Q, K and the log-sum-exp as `colsum_triton` received them (before the copies
        it makes of rows that are not contiguous and of a log-sum-exp that is not contiguous float32)."""
        self.colsum = None
        if len(calls) == 1 and calls[0][0] is _kernels().colsum:
            fn, grid, tensors, scalars, consts, options = calls[0]
            self.colsum = (fn, grid, (None, None, None, *tensors[3:]), scalars, consts, options)  # Q, K, lse dropped
            self._colsum_inputs = (*incoming, scale, valid, out)
            self._version = (self._version[0], next(_PLAN_VERSIONS))

    def replay_colsum(self, query: torch.Tensor, key: torch.Tensor, lse: torch.Tensor, scale: float,
                      valid: torch.Tensor | None, out: torch.Tensor, layer: int = -1) -> bool:
        if self.colsum is None:
            return False
        layouts, (q_scale, q_valid, q_out) = self._colsum_inputs[:3], self._colsum_inputs[3:]
        if (scale != q_scale or valid is not q_valid or out is not q_out
                or (_layout_of(query), _layout_of(key), _layout_of(lse)) != layouts):
            return False
        fn, grid, tensors, scalars, consts, options = self.colsum
        operands = _colsum_operands(query, key, lse)
        self._run((layer, "colsum"), (self._version[1], *map(torch.Tensor.data_ptr, operands)),
                  lambda: [(fn, grid, (*operands, *tensors[3:]), scalars, consts, options)])
        return True

    def _run(self, key: tuple, inputs: tuple, calls) -> None:
        """One layer's calls (`calls()` builds them): through the graphs when the plan has them."""
        if self.graphs is None:
            _execute(calls())
        else:
            self.graphs.run(key, inputs, calls)


_PLAN_VERSIONS = itertools.count()
"""Numbers the launches a `LayerPlan` records, so that a graph captured from older ones is never replayed."""


CUDA_GRAPHS = os.environ.get("SINKSCOPE_CUDA_GRAPHS", "0") == "1"
"""Replay each layer's launches as a CUDA graph (`LaunchGraphs`) once the same layer has had the same inputs, at
the same addresses, in two forwards (session 20: built and tested on the CPU with a stand-in graph, NOT yet run on
a GPU, so off by default). `SINKSCOPE_CUDA_GRAPHS=1` (read at import) or True here turns it on for recorders
entered after."""

GRAPH_CAPTURE = None
"""A stand-in for `_cuda_graph` (`LaunchGraphs`'s `capture`), which also turns graphs on on any device: for the
CPU tests of the graph logic."""

_GRAPHS_FAILED: list[str] = []
"""Set when a CUDA graph capture failed on this machine: later layers launch their calls directly."""


class LaunchGraphs:
    """A plan's per-layer calls as CUDA graphs (session 20; `CUDA_GRAPHS`).

    On a GPU host each of a layer's five launches costs tens of microseconds of host time (session 19: a layer's
    reductions 203-307 us, a small torch launch 8 us), which the short-context forwards wait on. A graph replays
    them in one launch. It holds its kernels' arguments, addresses included, as they were at capture, so it is
    replayed only for exactly the inputs it was captured with: `run` gets the layer's input addresses (and the
    plan's version, which covers every other argument) and compares them with those of the same layer at its
    previous run. Equal twice in a row (the caching allocator hands a forward of one shape the same addresses
    each time, and the recorder keeps its own buffers per shape), the calls are captured once and replayed from
    then on; any change and the calls are launched as they are. `capture(calls)` returns a graph (an object with
    `replay()`), or None for "not now" (a launch not compiled yet); the default captures on a side stream of
    `device`. A failed capture warns once and turns graphs off for the process."""

    def __init__(self, device: torch.device, capture=None) -> None:
        self._capture = capture or functools.partial(_cuda_graph, device=device)
        self._entries: dict[tuple, list] = {}  # (layer, site) -> [inputs, graph | None | False]
        self.captures = self.replays = 0

    def run(self, key: tuple, inputs: tuple, calls) -> None:
        entry = self._entries.get(key)
        if entry is None or entry[0] != inputs:
            self._entries[key] = [inputs, None]
        else:
            if entry[1] is None and not _GRAPHS_FAILED:
                entry[1] = self._take(calls())
            if entry[1]:
                try:
                    entry[1].replay()
                except Exception as exc:  # noqa: BLE001 - a graph launch is refused as a whole: launch instead
                    entry[1] = self._fail(exc)
                else:
                    self.replays += 1
                    return
        _execute(calls())

    def _take(self, calls: list):
        try:
            graph = self._capture(calls)
        except Exception as exc:  # noqa: BLE001 - never the only way: the calls run as launches
            return self._fail(exc)
        if graph is not None:
            self.captures += 1
        return graph

    @staticmethod
    def _fail(exc: Exception) -> bool:
        """A capture or replay that raised: warned once, graphs off for the process. False (the entry's graph)."""
        _GRAPHS_FAILED.append(f"{type(exc).__name__}: {str(exc)[:300]}")
        if len(_GRAPHS_FAILED) == 1:
            warnings.warn(f"sinkscope: a CUDA graph of the recorder's launches failed; launching them directly: "
                          f"{_GRAPHS_FAILED[0]}", RuntimeWarning, stacklevel=4)
        return False


def _cuda_graph(calls: list, device: torch.device):
    """`calls` captured as a `torch.cuda.CUDAGraph` on a side stream (thread-local capture; the calls allocate
    nothing, so the graph's own memory pool stays empty), or None when a launch among them has not been compiled
    yet (no compilation under capture)."""
    for fn, _, tensors, scalars, consts, options in calls:
        if fn is not None and (not FAST_LAUNCH or _launch_key(fn, tensors, tuple(t.data_ptr() for t in tensors),
                                                               scalars, consts, options) not in _LAUNCHES):
            return None
    stream = _graph_stream(torch.device(device))
    graph = torch.cuda.CUDAGraph()
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        graph.capture_begin(capture_error_mode="thread_local")
        try:
            _execute(calls)
        finally:
            graph.capture_end()
    return graph


@functools.cache
def _graph_stream(device: torch.device):
    """The side stream that `_cuda_graph` captures on, per device."""
    return torch.cuda.Stream(device)
