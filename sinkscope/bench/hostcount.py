"""The recorder's host work as instructions, not seconds: `python -m sinkscope.bench.hostcount [--out DIR]`.

`bench.gpu --host-python` times the recorder's own Python with its launches stubbed, but the development CPU's
timings of it vary up to 2x within an hour, more than most host-side changes are worth. This counts the
instructions of the same forwards (`bench.gpu.stubbed_host_methods`: plain, recorded, recorded with graphs, at 30
and at 2 layers) under valgrind's callgrind, which counts the same for the same program whatever else the machine
is doing, and splits each recorder's extra instructions over the plain forward into a part a forward and a part a
layer. Instructions are not time (a cache miss costs more than an add), so a change is judged by both.

The process re-runs itself under `valgrind --tool=callgrind --instr-atstart=no`; the child counts only between
client requests around each method's forwards (a 4-function C library built with the system's compiler against
`valgrind/callgrind.h`), so the imports and set-up are not counted. It needs valgrind and its headers (Debian:
valgrind); about 4 minutes on the development CPU at the default batch of 1, far longer at `--batch 32` (the
stub's matrix products under valgrind). Never under a GPU: it stubs the kernels.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sinkscope.errors import SinkscopeError

_TOGGLE_C = """#include <valgrind/callgrind.h>
void cg_zero(void) { CALLGRIND_ZERO_STATS; }
void cg_start(void) { CALLGRIND_START_INSTRUMENTATION; }
void cg_stop(void) { CALLGRIND_STOP_INSTRUMENTATION; }
void cg_dump(const char *name) { CALLGRIND_DUMP_STATS_AT(name); }
"""


def _tools() -> tuple[str, str]:
    """valgrind and a C compiler (whether it finds `valgrind/callgrind.h` shows when the toggle is built), or a
    SinkscopeError that says what is missing."""
    valgrind = shutil.which("valgrind")
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if valgrind is None or cc is None:
        missing = " and ".join(name for name, path in (("valgrind", valgrind), ("a C compiler", cc)) if path is None)
        raise SinkscopeError(f"bench.hostcount needs {missing} (Debian: apt-get install valgrind gcc)")
    return valgrind, cc


def _build_toggle(cc: str, directory: Path) -> Path:
    src, lib = directory / "cgtoggle.c", directory / "libcgtoggle.so"
    src.write_text(_TOGGLE_C)
    done = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(lib), str(src)], capture_output=True, text=True,
                          timeout=120)
    if done.returncode != 0:
        raise SinkscopeError(f"bench.hostcount could not build its callgrind toggle with {cc} (are valgrind's "
                             f"headers installed? valgrind/callgrind.h): {done.stderr.strip()[:500]}")
    return lib


def count(layers: int = 30, batch: int = 1, forwards: int = 10, log=print) -> dict:
    """Instructions a forward of each of `stubbed_host_methods`' forwards (callgrind's Ir, the mean over `forwards`
    forwards after 3 uncounted ones) and the split of each recorder's extra into a part a forward and a part a
    layer. Runs the counting in a child process under valgrind."""
    valgrind, cc = _tools()
    with tempfile.TemporaryDirectory(prefix="sinkscope-hostcount-") as tmp:
        directory = Path(tmp)
        lib = _build_toggle(cc, directory)
        cmd = [valgrind, "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={directory}/cg.%p",
               sys.executable, "-m", "sinkscope.bench.hostcount", "--child", str(lib), "--layers", str(layers),
               "--batch", str(batch), "--forwards", str(forwards)]
        env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
        start = time.time()
        log(f"hostcount: counting under callgrind ({layers} and 2 layers, batch {batch}, {forwards} forwards each)")
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
        if done.returncode != 0:
            raise SinkscopeError(f"bench.hostcount's child under valgrind failed (exit {done.returncode}): "
                                 f"{done.stderr.strip()[-1500:]}")
        totals = {}
        for dump in directory.glob("cg.*"):
            text = dump.read_text(errors="replace")
            trigger = re.search(r"^desc: Trigger: Client Request: (\S+)$", text, re.M)
            total = re.search(r"^totals: (\d+)", text, re.M)
            if trigger and total:
                totals[trigger.group(1)] = int(total.group(1)) / forwards
        log(f"hostcount: {time.time() - start:.0f} s under callgrind")
    from sinkscope.bench.gpu import split_per_layer

    expected = {f"{tag}{name}" for tag in ("", "short_") for name in ("plain", "recorded", "graphs")}
    if set(totals) != expected:
        raise SinkscopeError(f"bench.hostcount found counts for {sorted(totals)}, expected {sorted(expected)}")
    result = {"layers": layers, "batch": batch, "forwards": forwards,
              **{f"{name}_instructions": round(value) for name, value in sorted(totals.items())}}
    for key, value in split_per_layer(totals, layers).items():
        result[f"{key}_instructions"] = round(value)
    return result


def _child(lib_path: str, layers: int, batch: int, forwards: int) -> None:
    """Under callgrind: each method's forwards counted between client requests, one dump per method."""
    import torch

    from sinkscope.bench.gpu import stubbed_host_methods

    lib = ctypes.CDLL(lib_path)
    methods = stubbed_host_methods(layers, batch)
    with torch.no_grad():
        for _ in range(3):  # uncounted: first-forward work (the layer plan, kept buffers, caches)
            for fn in methods.values():
                fn()
        for name, fn in methods.items():
            lib.cg_zero()
            lib.cg_start()
            for _ in range(forwards):
                fn()
            lib.cg_stop()
            lib.cg_dump(name.encode())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="also write DIR/bench_hostcount.json")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--forwards", type=int, default=10)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.layers <= 2 or args.batch < 1 or args.forwards < 1:
        ap.error("--layers must be above 2 (the split needs two depths), --batch and --forwards at least 1")
    if args.child is not None:
        _child(args.child, args.layers, args.batch, args.forwards)
        return
    try:
        result = count(args.layers, args.batch, args.forwards)
    except SinkscopeError as exc:
        sys.exit(f"error: {exc}")
    print(json.dumps(result, indent=2))
    if args.out is not None:
        import torch
        import transformers

        args.out.mkdir(parents=True, exist_ok=True)
        env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0],
               "date": time.strftime("%Y-%m-%d %H:%M")}
        (args.out / "bench_hostcount.json").write_text(json.dumps({"env": env, **result}, indent=2))


if __name__ == "__main__":
    main()
