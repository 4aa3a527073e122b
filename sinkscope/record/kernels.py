"""Triton kernels for recording on CUDA (issue 16), used when Triton is importable and the tensors are on a GPU.

- `colsum_triton`: the attention each key receives, summed over the queries that see it, from Q, K and the row
  log-sum-exp of the forward's own SDPA kernel. One program per (key block, batch x query head) walks the query
  blocks at and after its keys, recomputes `exp(q.k * scale - lse[q])` in fp32 and sums over queries, so it
  needs no atomics and O(1) extra memory; it is the column-sum counterpart of a flash-attention pass (about half
  the causal attention work, since only the causal triangle is visited).
- `median_abs_triton`: the exact median of |h| over each sample's real tokens and all features, by radix
  selection on the fp32 bit pattern (|h| >= 0, so the bits order like the values): four passes of an 8-bit
  histogram that follow both middle ranks at once, each reading h once and deriving its prefixes from the
  earlier passes' histograms on the device, then a final launch; six launches per layer and no host
  synchronisation. The mean of the two middle values is taken for an even count, as numpy does.

Both run on the CPU under `TRITON_INTERPRET=1`, which is how the tests check them against the torch reference
on machines without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import os
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


@functools.cache
def _kernels() -> SimpleNamespace:
    """Compile-on-first-use: Triton is imported only when a kernel runs (0.4 s that CPU users never pay)."""
    from sinkscope.record import _triton

    return SimpleNamespace(triton=_triton.triton, colsum=_triton.colsum_kernel, radix_pass=_triton.radix_pass_kernel,
                           radix_final=_triton.radix_final_kernel)


def colsum_triton(query: torch.Tensor, key: torch.Tensor, lse: torch.Tensor, scale: float,
                  valid: torch.Tensor | None = None, block_m: int = 64, block_n: int = 64, num_warps: int = 4,
                  num_stages: int = 2) -> torch.Tensor:
    """`sum_q A[b, h, q, k]` over the (valid) queries that see key k: `[B, Hq, T]` float32.

    `query` `[B, Hq, T, d]`, `key` `[B, Hkv, T, d]` (grouped-query heads map `h -> h // (Hq // Hkv)`), `lse` the
    forward's row log-sum-exp `[B, Hq, T]` (natural log, scores scaled by `scale`), `valid` `[B, T]` bool (False:
    padding, which neither attends nor is attended)."""
    b, hq, t, d = query.shape
    hkv = key.shape[1]
    if query.stride(-1) != 1:
        query = query.contiguous()
    if key.stride(-1) != 1:
        key = key.contiguous()
    kern = _kernels()
    triton = kern.triton
    lse = lse.float().contiguous()
    out = torch.empty(b, hq, t, dtype=torch.float32, device=query.device)
    v = valid.to(torch.int8).contiguous() if valid is not None else out  # a placeholder pointer when unused
    block_d = max(16, triton.next_power_of_2(d))
    grid = (triton.cdiv(t, block_n), b * hq)
    kern.colsum[grid](
        query, key, lse, v, out,
        query.stride(0), query.stride(1), query.stride(2), key.stride(0), key.stride(1), key.stride(2),
        lse.stride(0), lse.stride(1), v.stride(0) if valid is not None else 0, out.stride(0), out.stride(1),
        t, hq, hq // hkv, scale * LOG2E,
        HAS_VALID=valid is not None, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
        IEEE=query.dtype == torch.float32, UPCAST=os.environ.get("TRITON_INTERPRET") == "1",
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


RADIX_PROGRAMS = 1024
"""Programs per radix pass (all rows together): enough to fill a GPU, few enough that the per-program histogram
atomics stay negligible."""


def median_abs_triton(h: torch.Tensor, valid: torch.Tensor | None = None, block: int = 4096) -> torch.Tensor:
    """Exact `median(|h[b]|)` over each sample's valid tokens and all features: `[B]` float32. `h` `[B, T, D]` in
    any float dtype; `valid` `[B, T]` bool or None (all tokens). numpy's convention: the mean of the two middle
    values for an even count. Six launches, whatever B and T: a zeroed histogram buffer, four radix passes (both
    middle ranks at once, reading h once each) and a final one."""
    b, t, d = h.shape
    flat = h.reshape(b, t * d)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    kern = _kernels()
    n = t * d
    hist = torch.zeros(4, b, 2, 256, dtype=torch.int32, device=h.device)
    count = valid.sum(dim=1, dtype=torch.int32) if valid is not None else hist  # a placeholder pointer when unused
    v = valid.view(torch.int8) if valid is not None and valid.dtype == torch.bool else valid
    if v is not None and v.stride(-1) != 1:
        v = v.contiguous()
    v = v if v is not None else hist
    programs = max(1, min(kern.triton.cdiv(n, block), RADIX_PROGRAMS // b))
    for p in range(4):
        kern.radix_pass[(programs, b)](flat, v, count, hist, n, t, d, flat.stride(0),
                                       v.stride(0) if valid is not None else 0, b,
                                       PASS=p, HAS_VALID=valid is not None, BLOCK=block, num_warps=8)
    out = torch.empty(b, dtype=torch.float32, device=h.device)
    kern.radix_final[(b,)](hist, count, out, t, d, b, HAS_VALID=valid is not None)
    return out
