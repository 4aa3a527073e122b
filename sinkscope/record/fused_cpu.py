"""The recorder's per-layer reductions on the CPU, in two passes of C (`fused_cpu.c`).

`reduce.reduce_layer` takes them in about twenty torch operations a layer, each a pass over `[B, T, D]`; at T =
512 on SmolLM2 they cost 2.0-2.8 ms a layer, most of the recorder's time over a plain forward. Here each sample's
block output `h` and MLP output take one pass each, row by row while the row is in L1:

- `h`: cos-to-BOS (float64 sums), the top-k features of |h| (their signed values alongside), max |h|, the
  per-feature max over real tokens, the count of |h| below the median's bracket and the entries inside it, and
  the real tokens whose max |h| reaches the absolute massive threshold;
- the MLP output: its top-k features and per-feature max.

The median is the exact bracketed selection of `reduce.median_nonneg` (the bracket from the same random subsample,
the full selection when it misses), its selections `reduce._two_ranks`' histogram of the values' bits. The
massive entries are read from the candidate tokens once the median gives the threshold. The fields are written
straight into the recorder's sample-major blocks.

Top-k: a row is read as runs of 32 entries (`GROUP` in fused_cpu.c; faster than 16, 64 and 96 on SmolLM2's
activations); each column's max over the runs (with the run it is in) comes from
vector instructions, the k largest column maxima start the list, and only the columns whose max reaches its k-th
value are scanned. Ties go to the lower feature index. Built for a CPU with AVX-512 (and k <= 16, D >= 32), a
threshold route comes first: the smallest of 8 or 16 disjoint column groups' maxima is reached by at least k
entries, one pass compresses the indices of those reaching it into a short list, and its k largest are sorted
(more than 64 of them, i.e. ties, and the row takes the scan); the median's band is stored by register compression
too. At T = 512 on SmolLM2 the two passes took 14 ms a forward with AVX-512 against 30 ms without (30 layers,
captured activations, session 18); tests/test_fused_cpu.py runs both builds. A row with a NaN or an infinity makes
a pass stop and report it; the caller then takes torch's reductions for the layer, which propagate it as they
always did.

The fields equal the torch path's exactly (cos-to-BOS within float32 rounding: its sums are float64 here), which
tests/test_fused_cpu.py checks.

Why C and not numba: session 17 wrote these passes for numba, which met the time targets but not the memory one.
Its runtime (the numba modules, LLVM and the cached machine code) added about 100 MiB to the process's peak RSS,
more than the whole budget of 96 MiB at T = 2048. The same passes in C, built once by the system's compiler
(`cc`, or `$CC`; 0.2 s) into a shared library of 23 KiB that ctypes loads (5 ms), add only that library's pages,
and ran as fast before their AVX-512 routes (43 against 44 ms of reductions a forward at T = 512; 25 ms with
them, session 18). The library is cached under the user's cache directory (`SINKSCOPE_CACHE_DIR` moves it; a
private directory under the temporary one when it cannot be written), keyed by the source, the compiler, its flags
and the CPU (it is built for the CPU it runs on). Tried and dropped (session 17): the MLP pass in a second thread
next to the `h` pass. The forward's OpenMP threads spin on the other core after each matmul, and the two threads
were no faster.

`available()` is False with `SINKSCOPE_CPU_KERNELS=0`, without a C compiler, or after the library failed to build
or load (a warning says so); the recorder then uses the torch reductions, which record the same fields (slower).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import numpy as np

from sinkscope.record.reduce import SUBSAMPLE, _subsample_index, _two_ranks, median_from_band, subsample_ranks

SOURCE = Path(__file__).with_suffix(".c")
MAX_K = 256
"""The largest top-k the passes take (`MAX_K` in fused_cpu.c); a larger one takes the torch reductions."""
BAND_SLACK = 2
"""The band buffer holds BAND_SLACK times the expected band (plus a row); a band that outgrows it (adversarial
values) is counted, not stored, and the median takes the full selection."""
CFLAGS = ("-O3", "-shared", "-fPIC", "-std=c99", "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros",
          "-fassociative-math", "-freciprocal-math", "-ffp-contract=fast")
"""Reassociation lets the sums vectorise; no -ffinite-math-only, so that a NaN or an infinity still shows in a sum
of squares and the row is reported rather than silently mis-ranked."""
NATIVE = ("-march=native",)
"""Tried first (the library is built for, and cached per, the CPU it runs on); dropped if the compiler refuses."""

_STATE: dict = {}
_P = ctypes.c_void_p
_ARGTYPES = {
    "h_pass": (_P, _P, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, _P, ctypes.c_float, ctypes.c_float,
               ctypes.c_float, _P, ctypes.c_int64, _P, _P, _P, _P, _P, _P, _P),
    "m_pass": (_P, _P, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, _P, _P, _P),
}


def compiler() -> str | None:
    """The C compiler the passes are built with: `$CC` (default cc), else gcc or clang; None without one."""
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")


def available() -> bool:
    """Whether the recorder takes these passes on the CPU."""
    if os.environ.get("SINKSCOPE_CPU_KERNELS") == "0" or _STATE.get("failed"):
        return False
    if "lib" in _STATE:
        return True
    if "compiler" not in _STATE:
        _STATE["compiler"] = compiler()
    return _STATE["compiler"] is not None


def cache_dir() -> Path:
    """Where the built library is kept: `$SINKSCOPE_CACHE_DIR`, else the user's cache directory."""
    if os.environ.get("SINKSCOPE_CACHE_DIR"):
        return Path(os.environ["SINKSCOPE_CACHE_DIR"])
    import platformdirs

    return Path(platformdirs.user_cache_dir("sinkscope")) / "kernels"


def _cpu_id() -> str:
    """What the machine code may depend on (it is built with -march=native): the CPU's model and flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({x for x in lines if x.startswith(("model name", "flags", "Features", "CPU part"))}))
    except OSError:
        return platform.machine() + platform.processor()


def _open(cc: str) -> ctypes.CDLL:
    """The library, loaded from the cache directory, or from a private one under the temporary directory when the
    cache directory cannot be written (a read-only home, a full disk)."""
    try:
        return _open_in(cc, cache_dir())
    except OSError as exc:
        try:
            return _open_in(cc, _private_temp_dir())
        except OSError:
            raise exc from None


def _open_in(cc: str, directory: Path) -> ctypes.CDLL:
    """The library cached in `directory`, loaded; a cached file that does not load (truncated, or not a library)
    is built again."""
    path = _build(cc, directory)
    try:
        return ctypes.CDLL(str(path))
    except OSError:
        path.unlink(missing_ok=True)
        return ctypes.CDLL(str(_build(cc, directory)))


def _private_temp_dir() -> Path:
    """`sinkscope-kernels-<uid>` under the temporary directory, readable by this user only (a library found in a
    directory others can write to would be code they chose)."""
    uid = os.getuid() if hasattr(os, "getuid") else None
    path = Path(tempfile.gettempdir()) / f"sinkscope-kernels-{uid if uid is not None else 'user'}"
    path.mkdir(mode=0o700, exist_ok=True)
    st = path.stat()
    if uid is not None and (st.st_uid != uid or st.st_mode & 0o077):
        raise PermissionError(f"{path} is not private to this user (owner {st.st_uid}, mode {st.st_mode & 0o777:o})")
    return path


def _target(cc: str, directory: Path) -> Path:
    """Where the library for this source, compiler, flags and CPU is cached in `directory`."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), version.encode(), " ".join(CFLAGS).encode(),
                                     _cpu_id().encode()]))
    return directory / f"fused_cpu-{key.hexdigest()[:16]}.so"


def _build(cc: str, directory: Path) -> Path:
    """The library: from the cache, or built into it (a new file moved into place, so that two processes building
    at once both end with a whole file, and one that has the old file loaded keeps its copy)."""
    target = _target(cc, directory)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for extra in (NATIVE, ()):
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            done = subprocess.run([cc, *CFLAGS, *extra, "-o", tmp, str(SOURCE), "-lm"], capture_output=True,
                                  text=True, timeout=300)
            if done.returncode == 0:
                os.replace(tmp, target)
                return target
            errors.append(done.stderr.strip()[-400:])
        finally:
            Path(tmp).unlink(missing_ok=True)  # a failed or timed-out build leaves nothing behind
    raise RuntimeError(f"{cc} could not build {SOURCE.name}: {errors[-1]}")


def _load() -> ctypes.CDLL | None:
    """The library (built, loaded and tried on a small input once per process); None, with a warning the first
    time, when that fails."""
    if "lib" in _STATE or _STATE.get("failed"):
        return _STATE.get("lib")
    try:
        cc = _STATE.get("compiler") or compiler()
        if cc is None:
            raise RuntimeError("no C compiler found (looked for $CC, cc, gcc, clang)")
        lib = _open(cc)
        for name, argtypes in _ARGTYPES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, ctypes.c_int
        _smoke(lib)
    except Exception as exc:  # noqa: BLE001 - any failure leaves the torch reductions in charge
        _STATE["failed"] = True
        warnings.warn(f"sinkscope: the CPU recorder's C reductions are unavailable ({type(exc).__name__}: {exc}); "
                      "recording takes torch's reductions instead (slower, same results)", stacklevel=3)
        return None
    _STATE["lib"] = lib
    return lib


def _ptr(a: np.ndarray) -> int:
    if not a.flags.c_contiguous:
        raise ValueError("fused_cpu: an array handed to the C passes is not C-contiguous")
    return a.ctypes.data


def _smoke(lib) -> None:
    """Both passes once on a small input, checked against numpy (a library that loads but computes wrongly, e.g.
    a stale file from another build, is refused)."""
    x = np.arange(-40, 40, dtype=np.float32).reshape(2, 40)
    x[1, 7] = 100.0
    valid = np.ones(2, np.bool_)
    ti, tv = np.empty((2, 4), np.int32), np.empty((2, 4), np.float32)
    fm = np.zeros(40, np.float32)
    if lib.m_pass(_ptr(x), _ptr(valid), 2, 40, 4, _ptr(ti), _ptr(tv), _ptr(fm)) != 1:
        raise RuntimeError("m_pass refused a finite input")
    want = np.argsort(-np.abs(x), axis=1, kind="stable")[:, :4]
    if not ((ti == want).all() and (fm == np.abs(x).max(axis=0)).all()):
        raise RuntimeError(f"m_pass computed wrong top features on a test input: {ti.tolist()}")
    band, cand, res = np.empty(x.size + 41, np.float32), np.empty(2, np.int64), np.empty(4, np.int64)
    max_abs, cos = np.empty(2, np.float32), np.empty(2, np.float32)
    fm[:] = 0
    ok = lib.h_pass(_ptr(x), _ptr(valid), 2, 40, 4, _ptr(x[0]), 0.0, float("inf"), 50.0, _ptr(band), len(band),
                    _ptr(ti), _ptr(tv), _ptr(max_abs), _ptr(cos), _ptr(fm), _ptr(cand), _ptr(res))
    if not (ok == 1 and (ti == want).all() and (max_abs == np.abs(x).max(axis=1)).all() and abs(cos[0] - 1) < 1e-6
            and res.tolist() == [0, x.size, 1, 0] and cand[0] == 1):
        raise RuntimeError(f"h_pass computed wrong fields on a test input: {res.tolist()}")


def _bracket(a: np.ndarray, rows: np.ndarray | None, n: int) -> tuple[np.float32, np.float32, int]:
    """(lo, hi, band capacity) of the median's bracket for one sample's `a[T, D]` (its real rows `rows`, None when
    all are real), from the subsample of reduce.median_nonneg; below 65,537 entries all are in the band."""
    d = a.shape[1]
    if n <= 65536:
        return np.float32(0.0), np.float32(np.inf), n + d + 1
    index = _subsample_index(n)
    sub = np.abs(a.reshape(-1)[index] if rows is None else a[rows[index // d], index % d])
    i_lo, i_hi = subsample_ranks(n)
    lo, hi = _two_ranks(sub, i_lo, i_hi)
    return lo, hi, int(BAND_SLACK * n * (i_hi - i_lo + 1) / SUBSAMPLE) + 2 * d


FIELDS = ("bos_cosine", "max_abs", "median_abs", "feature_max_abs", "mlp_feature_max_abs", "top_features",
          "top_values", "mlp_top_features", "mlp_top_values")
"""The per-layer fields `reduce_layer_cpu` writes (`recorder._host_blocks` holds them, sample-major)."""


class MassiveBlock:
    """A forward's massive entries, in arrays allocated before its layers run and grown (doubled) only when full.

    They live until the end of the forward, and a few small arrays a layer allocated between the forward's
    multi-MiB temporaries kept the heap around them from being reused: at T = 2048 the process's peak RSS rose by
    about 250 MiB when each layer's entries were kept as small arrays of their own (session 17)."""

    def __init__(self, capacity: int):
        self.index = np.empty((capacity, 4), np.int64)  # layer, batch, token, feature
        self.value = np.empty((capacity, 3), np.float32)  # h, attn_out, mlp_out at the entry
        self.n = 0

    def add(self, layer: int, b: int, token: np.ndarray, feature: np.ndarray, h, a, m) -> None:
        k = len(token)
        if self.n + k > len(self.index):
            grow = max(2 * len(self.index), self.n + k)
            self.index = np.concatenate([self.index[: self.n], np.empty((grow - self.n, 4), np.int64)])
            self.value = np.concatenate([self.value[: self.n], np.empty((grow - self.n, 3), np.float32)])
        rows = slice(self.n, self.n + k)
        self.index[rows, 0], self.index[rows, 1], self.index[rows, 2], self.index[rows, 3] = layer, b, token, feature
        self.value[rows, 0], self.value[rows, 1], self.value[rows, 2] = h, a, m
        self.n += k

    def arrays(self) -> tuple:
        """(layer, batch, token, feature, value, attn_out, mlp_out), as the recorder's massive records."""
        i, v = self.index[: self.n], self.value[: self.n]
        return (i[:, 0], i[:, 1], i[:, 2], i[:, 3], v[:, 0], v[:, 1], v[:, 2])


def reduce_layer_cpu(h, attn_out, mlp_out, valid: np.ndarray, top_k: int, abs_threshold: float,
                     rel_threshold: float, out: dict[str, np.ndarray], layer: int, massive: MassiveBlock) -> bool:
    """`reduce.reduce_layer` for CPU tensors `[B, T, D]` (`valid` `[B, T]` as numpy): the fields go into `out[key][:,
    layer]` (blocks `[B, L, ...]` as `recorder._host_blocks` makes them), the massive entries into `massive`.
    Returns False (the caller then takes the torch path, which overwrites the fields; `massive` is left as it was)
    when a row holds a NaN or an infinity, a sample has no real token, or the kernels could not be compiled."""
    b_n, t_len, d = h.shape
    counts = valid.sum(axis=1)
    if not counts.all() or not 1 <= top_k <= min(MAX_K, d):
        return False
    lib = _load()
    if lib is None:
        return False
    hn = h.detach().float().contiguous().numpy()
    mn = mlp_out.detach().float().contiguous().numpy()
    valid = np.ascontiguousarray(valid, dtype=np.bool_)
    k = top_k
    abs_t, rel_t = np.float32(abs_threshold), np.float32(rel_threshold)
    res = np.empty(4, np.int64)
    found = []
    for b in range(b_n):
        o = {key: out[key][b, layer] for key in FIELDS if key != "median_abs"}  # views, [T, ...] / [D]
        o["feature_max_abs"][:] = 0
        o["mlp_feature_max_abs"][:] = 0
        if not lib.m_pass(_ptr(mn[b]), _ptr(valid[b]), t_len, d, k, _ptr(o["mlp_top_features"]),
                          _ptr(o["mlp_top_values"]), _ptr(o["mlp_feature_max_abs"])):
            return False
        rows = None if counts[b] == t_len else np.flatnonzero(valid[b])
        n = d * int(counts[b])
        lo, hi, cap = _bracket(hn[b], rows, n)
        band = np.empty(cap, np.float32)
        cand = np.empty(t_len, np.int64)
        if not lib.h_pass(_ptr(hn[b]), _ptr(valid[b]), t_len, d, k, _ptr(hn[b, int(np.argmax(valid[b]))]),
                          float(lo), float(hi), float(abs_t), _ptr(band), cap, _ptr(o["top_features"]),
                          _ptr(o["top_values"]), _ptr(o["max_abs"]), _ptr(o["bos_cosine"]),
                          _ptr(o["feature_max_abs"]), _ptr(cand), _ptr(res)):
            return False
        below, nb, nc, overflow = (int(x) for x in res)
        med = median_from_band(None if overflow else band[:nb], below, n,
                               lambda a=hn[b], rows=rows: np.abs(a if rows is None else a[rows]).reshape(-1))
        out["median_abs"][b, layer] = med
        thr = max(abs_t, np.float32(med) * rel_t)  # reduce.massive_threshold, in float32
        tok = cand[:nc]
        tok = tok[o["max_abs"][tok] >= thr]  # the candidates were taken at the absolute threshold
        if len(tok):
            ti, fj = np.nonzero(np.abs(hn[b, tok]) >= thr)
            found.append((b, tok[ti], fj))
    if found:
        an = attn_out.detach().float().numpy()
        for b, tok, fj in found:  # added once every sample passed, so that a refused layer adds nothing
            massive.add(layer, b, tok, fj, hn[b, tok, fj], an[b, tok, fj], mn[b, tok, fj])
    return True


