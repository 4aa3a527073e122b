"""What the device path's Triton kernels compile to on a GPU architecture, without a GPU:
`python -m sinkscope.bench.sass [--arch 90] [--shapes llama-3.2-1b:8192,...] [--out FILE]`.

The recorder's own wrappers (`kernels.median_abs_triton`, `token_stats_triton`, `colmax_triton`, `colsum_triton`)
are called on CPU tensors with the real shapes, but each launch is compiled instead of run: Triton's own
specialisation (dtypes, 16-byte alignment, integers equal to 1 or divisible by 16) and compiler, for a CUDA
target given here, then the SASS listed by the `cuobjdump` that ships with Triton. Per kernel and launch
configuration it reports the instruction count, the instruction mix that decides the cost of the kernels here
(VOTE and POPC: Triton's ballot histograms; ATOMS: shared-memory atomics; MUFU: exponentials; HGMMA/HMMA: tensor
cores; LDL/STL: register spills) and what `cuobjdump -res-usage` reports: registers a thread, the stack that holds
spilled registers, static shared memory.

These are static counts of the code, not timings: the loops run as many times as the data says, and a count says
nothing about latency or contention. They answer questions such as which way Triton lowers `tl.histogram` (ballots
and popcounts in Triton 3.6, what the H200 machine runs; one shared-memory atomic per element in 3.9) or whether
a configuration spills. Run it with the Triton of the GPU machine to see what that machine compiles: `pip download
--no-deps triton==3.6.0`, unzip the wheel into a folder and put it first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from sinkscope.bench.gpu import SHAPES

SASS_LINE = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")
RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
CLASSES = ("VOTE", "POPC", "ATOMS", "ATOMG", "RED", "MUFU", "HGMMA", "HMMA", "LDG", "STG", "LDS", "STS", "LDL",
           "STL", "BAR", "SHFL")


class _Target:
    """The part of a Triton driver that compiling needs: a CUDA target of the chosen architecture."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        # the JIT functions keep their compiled kernels per device, and the target with them: one "device" per
        # architecture, or a second architecture in one process would get the first one's kernels back
        return self.target.arch

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self) -> bool:
        return True


def _tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise SystemExit(f"sinkscope.bench.sass: {path} is missing: this Triton has no bundled {name}")
    return str(path)


def sass_profile(cubin: bytes) -> dict:
    """Instruction count, mix and resource use of one kernel's cubin (from cuobjdump): `stack` holds the spilled
    registers (bytes a thread), `shared` the static shared memory only (the kernel's metadata has the dynamic)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        listing = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                                 check=True).stdout
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    ops = collections.Counter(m.group(1) for m in map(SASS_LINE.match, listing.splitlines()) if m)
    ops.pop("NOP", None)
    res = RESOURCES.search(usage)
    out = dict(instructions=sum(ops.values()), **{k.lower(): ops.get(k, 0) for k in CLASSES})
    if res:
        out.update(registers=int(res.group(1)), stack=int(res.group(2)), shared=int(res.group(3)),
                   local=int(res.group(4)))
    out["top"] = ops.most_common(8)
    return out


@contextlib.contextmanager
def compiling(arch: int):
    """Inside: `kernels.launch` compiles each launch for sm_`arch` (Triton's own binder and compiler, no GPU) and
    appends (kernel name, constexprs, options, CompiledKernel) to the yielded list instead of running it."""
    from triton.runtime import driver

    from sinkscope.record import kernels

    previous_driver = driver._active  # None without a GPU (no driver is active), restored as it was
    previous_launch = kernels.launch
    env = os.environ.pop("TRITON_INTERPRET", None)
    compiled: list = []

    def capture(fn, grid, tensors, scalars, consts, **options):
        kernel = fn.run(*tensors, *scalars, grid=grid, warmup=True, **consts, **options)
        compiled.append((fn.__name__, dict(consts), dict(options), kernel))

    driver.set_active(_Target(arch))
    kernels.launch = capture
    try:
        yield compiled
    finally:
        kernels.launch = previous_launch
        driver._active = previous_driver
        if env is not None:
            os.environ["TRITON_INTERPRET"] = env


def layer_kernels(shape: str, t: int, arch: int, radix_configs: list[tuple],
                  dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """The kernels of one recorded layer of `shape` at T=`t` (B=1, `dtype`, no padding), as the recorder launches
    them, plus the radix median's passes in each of `radix_configs`."""
    from sinkscope.record import kernels

    cfg = SHAPES[shape]
    d, hq, hkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = d // hq
    h, a, m = (torch.zeros(1, t, d, dtype=dtype) for _ in range(3))
    q = torch.zeros(1, hq, t, head_dim, dtype=dtype)
    k = torch.zeros(1, hkv, t, head_dim, dtype=dtype)
    lse = torch.zeros(1, hq, t)
    first = torch.zeros(1, dtype=torch.long)
    thr = torch.zeros(2, 1)
    buffers = kernels.massive_buffers(1, t, torch.device("cpu"))
    rows = []
    with compiling(arch) as compiled:
        kernels.colsum_triton(q, k, lse, head_dim ** -0.5)
        radix = kernels.median_abs_triton(h, final=False)
        kernels.token_stats_triton(h, m, a, first, thr[1], None, 8, 0, buffers, radix=radix)
        kernels.colmax_triton(h, m, None)
        shipped = len(compiled)
        for bits, onehot, block, warps, spread in radix_configs:
            kernels.median_abs_triton(h, bits=bits, onehot=onehot, block=block, num_warps=warps, spread=spread,
                                      final=False)
    for i, (name, consts, options, kernel) in enumerate(compiled):
        keep = {k: v for k, v in consts.items() if k not in ("HAS_VALID",)}
        rows.append(dict(shape=shape, t=t, arch=arch, dtype=str(dtype).removeprefix("torch."), kernel=name,
                         shipped=i < shipped, consts=keep,
                         num_warps=options.get("num_warps"), **sass_profile(kernel.asm["cubin"]),
                         dynamic_shared=getattr(kernel.metadata, "shared", None)))
    return rows


def main(argv: list[str] | None = None) -> int:
    from sinkscope.bench.gpu import RADIX_CONFIGS

    ap = argparse.ArgumentParser(prog="python -m sinkscope.bench.sass", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="90",
                    help="CUDA compute capabilities x10, comma-separated (75: T4, 80: A100, 86: A10/RTX 30, "
                         "89: L4/L40/RTX 40, 90: H100/H200)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                    help="the model's dtype (the block outputs' and the attention's)")
    ap.add_argument("--shapes", default="llama-3.2-1b:8192",
                    help="shape:T pairs, comma-separated (shapes: " + ", ".join(SHAPES) + ")")
    ap.add_argument("--shipped", action="store_true",
                    help="only the launches the recorder makes (not the radix alternatives that --radix times)")
    ap.add_argument("--out", type=Path, help="JSON file for the rows")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("TRITON_INTERPRET=1 is set: Triton then interprets its kernels instead of compiling them; unset it")
    import triton

    archs = [a.strip() for a in args.arch.split(",")]
    if not all(a.isdigit() and 70 <= int(a) <= 120 for a in archs):
        ap.error(f"--arch: {args.arch!r} is not a comma-separated list of compute capabilities x10 (70-120)")
    dtype = getattr(torch, args.dtype)
    rows = []
    for arch in map(int, archs):
        for item in args.shapes.split(","):
            shape, _, t = item.partition(":")
            if shape not in SHAPES or not t.isdigit() or int(t) < 1:
                ap.error(f"--shapes: {item!r} is not shape:T with a shape among {', '.join(SHAPES)}")
            try:
                rows += layer_kernels(shape, int(t), arch, [] if args.shipped else RADIX_CONFIGS, dtype)
            except Exception as exc:  # noqa: BLE001 - a kernel that does not compile for a target is the finding
                rows.append(dict(shape=shape, t=int(t), arch=arch, dtype=args.dtype,
                                 error=f"{type(exc).__name__}: {str(exc)[:400]}"))
    env = dict(triton=triton.__version__, torch=torch.__version__, arch=args.arch, dtype=args.dtype)
    print(f"Triton {triton.__version__}, sm_{args.arch}, {args.dtype}: static SASS counts, not timings")
    print(f"{'kernel':<18} {'config':<58} {'instr':>6} {'VOTE':>5} {'POPC':>5} {'ATOMS':>5} {'MUFU':>5} "
          f"{'MMA':>5} {'spill':>5} {'regs':>4}")
    for r in rows:
        if "error" in r:
            print(f"sm_{r['arch']} {r['shape']} T={r['t']}: did not compile: {r['error']}")
            continue
        consts = ",".join(f"{k}={v}" for k, v in r["consts"].items() if k in (
            "PASS", "BITS", "BLOCK", "SPREAD", "ONEHOT", "ROWS", "BLOCK_D", "BLOCK_M", "BLOCK_N", "BLOCK_T"))
        label = ("" if r["shipped"] else "alt ") + (f"sm_{r['arch']} " if len(archs) > 1 else "") + \
            f"{consts} w{r['num_warps']}"
        print(f"{r['kernel']:<18} {label:<58} {r['instructions']:>6} {r['vote']:>5} {r['popc']:>5} {r['atoms']:>5} "
              f"{r['mufu']:>5} {r['hgmma'] + r['hmma']:>5} {r['ldl'] + r['stl']:>5} {r.get('registers', '-'):>4}")
    if args.out:
        args.out.write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
