"""glibc's malloc, set once per process for recording on the CPU.

glibc adapts two thresholds as a process runs: blocks above the mmap threshold get pages of their own, and free
memory above the trim threshold at the top of the heap goes back to the kernel. Both start low and rise as large
blocks are freed, up to 32 MiB and 64 MiB on 64-bit Linux. How far they have risen depends on the process's
history, and a recorded forward frees blocks in a different order than a plain one (it holds a layer's attention
and MLP outputs until the layer's reductions ran). In some processes the heap top was then handed back and fetched
again several times a layer: 40 to 160 `brk` calls and 40,000 to 110,000 extra page faults a forward, the recorder
at 1.20-1.28x a plain forward instead of 1.11-1.15x (SmolLM2, T=512, session 16, `strace` and `getrusage` per
forward). Setting the thresholds to the values glibc's own adjustment tops out at removes that: 0 extra faults and
1.11-1.15x in four processes out of four.

The setting is process-wide and stays (glibc cannot go back to adapting once a threshold is set): up to 64 MiB of
freed heap is kept for reuse instead of being returned at once. That kept heap was still resident when a forward
allocates its logits, its largest block, and raised the process's peak RSS; `trim`, once a forward after the
decoder body, gives it back (session 18). `SINKSCOPE_MALLOPT=0`, or either threshold set
through glibc's environment variables (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`), leaves malloc as it is.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
"""glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit systems: the highest its dynamic mmap threshold goes."""
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD
"""Twice the mmap threshold, as glibc's dynamic adjustment sets it."""

_STATE: list[bool] = []
_TRIM: list = []


def tune() -> bool:
    """Set glibc's mmap and trim thresholds (once per process; a no-op elsewhere, and with `SINKSCOPE_MALLOPT=0`).
    Returns whether they are set."""
    if _STATE:
        return _STATE[0]
    ok = False
    # a threshold the user set through glibc's own variables is theirs (the benchmark's live-memory child sets
    # MALLOC_MMAP_THRESHOLD_ so that freed blocks go back to the OS at once; until session 17 this overrode it)
    user_set = any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"))
    if sys.platform.startswith("linux") and os.environ.get("SINKSCOPE_MALLOPT") != "0" and not user_set:
        try:
            libc = ctypes.CDLL(None)
            libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl's mallopt does nothing)
            mallopt = libc.mallopt
            mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
            ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
            malloc_trim = libc.malloc_trim
            malloc_trim.argtypes, malloc_trim.restype = (ctypes.c_size_t,), ctypes.c_int
            _TRIM.append(malloc_trim)
        except (OSError, AttributeError):
            ok = False
    _STATE.append(ok)
    return ok


def trim() -> None:
    """Give the heap's free pages back to the kernel (glibc's `malloc_trim(0)`), where `tune` set the thresholds.

    The recorder calls it once per CPU forward, when the decoder body has run: the layers' freed temporaries (kept
    in the heap by `tune`'s thresholds, and in holes between live blocks) would otherwise still be resident when
    the forward allocates its logits, the largest block of the forward, and raise the process's peak RSS by what
    they hold. SmolLM2 at T = 2048 (session 18, /tmp script, 3 processes each): a recording's peak RSS 1628-1669 MiB
    without, 1495-1497 MiB with it; a plain forward's 1510-1601 MiB."""
    if _STATE and _STATE[0]:
        _TRIM[0](0)
