"""Triton kernels for recording on CUDA (issue 16), used when Triton is importable and the tensors are on a GPU.

- `colsum_triton`: the attention each key receives, summed over the queries that see it, from Q, K and the row
  log-sum-exp of the forward's own SDPA kernel. One program per (key block, batch x query head) walks the query
  blocks at and after its keys, recomputes `exp(q.k * scale - lse[q])` in fp32 and sums over queries, so it
  needs no atomics and O(1) extra memory; it is the column-sum counterpart of a flash-attention pass (about half
  the causal attention work, since only the causal triangle is visited).
- `median_abs_triton`: the exact median of |h| over each sample's real tokens and all features, by radix
  selection on the bit pattern (|h| >= 0, so the bits order like the values): 8-bit histogram passes that follow
  both middle ranks at once (four over the 31 bits of float32; two over the 15 bits of bf16 or fp16, read raw),
  each reading h once and deriving its prefixes from the earlier passes' histograms on the device, then a final
  launch; no host synchronisation. The mean of the two middle values is taken for an even count, as numpy does.

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
                           radix_final=_triton.radix_final_kernel, token_stats=_triton.token_stats_kernel)


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


def median_abs_triton(h: torch.Tensor, valid: torch.Tensor | None = None, block: int = 4096, num_warps: int = 8,
                      thresholds: tuple[float, float] = (0.0, 0.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact `median(|h[b]|)` over each sample's valid tokens and all features, and the massive-activation
    threshold `max(thresholds[0], thresholds[1] * median)`: two `[B]` float32. `h` `[B, T, D]` in any float dtype;
    `valid` `[B, T]` bool or None (all tokens). numpy's convention: the mean of the two middle values for an even
    count. At most six launches, whatever B and T: a zeroed histogram buffer, the radix passes (both middle
    ranks at once, reading h once each: four for float32, two over the raw 15 bits of |h| for bf16 and fp16)
    and a final one."""
    b, t, d = h.shape
    flat = h.reshape(b, t * d)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    fmt = {torch.bfloat16: 1, torch.float16: 2}.get(flat.dtype, 0)
    if fmt:  # 16-bit formats: their raw bits, two passes over 15 bits instead of four over 31
        flat = flat.view(torch.int16)
    passes = 2 if fmt else 4
    kern = _kernels()
    n = t * d
    hist = torch.zeros(passes, b, 2, 256, dtype=torch.int32, device=h.device)
    count = valid.sum(dim=1, dtype=torch.int32) if valid is not None else hist  # a placeholder pointer when unused
    v = valid.contiguous().view(torch.int8) if valid is not None else hist
    programs = max(1, min(kern.triton.cdiv(n, block), RADIX_PROGRAMS // b))
    for p in range(passes):
        kern.radix_pass[(programs, b)](flat, v, count, hist, n, t, d, flat.stride(0),
                                       v.stride(0) if valid is not None else 0, b,
                                       PASS=p, FMT=fmt, HAS_VALID=valid is not None, BLOCK=block,
                                       num_warps=num_warps)
    out = torch.empty(2, b, dtype=torch.float32, device=h.device)
    kern.radix_final[(b,)](hist, count, out[0], out[1], float(thresholds[0]), float(thresholds[1]), t, d, b,
                           FMT=fmt, HAS_VALID=valid is not None)
    return out[0], out[1]


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


def token_stats_triton(h: torch.Tensor, mlp_out: torch.Tensor, attn_out: torch.Tensor, h0: torch.Tensor,
                       thr: torch.Tensor, valid: torch.Tensor | None, top_k: int, layer: int,
                       buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                       num_warps: int | None = None) -> torch.Tensor:
    """The per-token fields of one block output `h` `[B, T, D]` in one launch (see `token_stats_kernel`), packed
    in one float32 buffer so that one copy moves them (`unpack_token_stats` gives the fields). The massive
    entries (|h| >= `thr[b]`, real tokens only) go to `buffers` (`massive_buffers`). `h0` `[B, D]` is each
    sample's first real token, in float32."""
    b, t, d = h.shape
    kern = _kernels()
    h, a, m = (x if x.stride(-1) == 1 else x.contiguous() for x in (h, attn_out, mlp_out))
    packed = torch.empty(b * t * (2 + 4 * top_k), dtype=torch.float32, device=h.device)
    cos, mx, top_i, top_v, mtop_i, mtop_v = unpack_token_stats(packed, b, t, top_k).values()
    count, ent_i, ent_v = buffers
    v = valid.contiguous().view(torch.int8) if valid is not None else count
    block_d = kern.triton.next_power_of_2(d)
    kern.token_stats[(b * t,)](
        h, a, m, h0, thr, v, cos, mx, top_i, top_v, mtop_i, mtop_v, count, ent_i, ent_v,
        t, d, h.stride(0), h.stride(1), a.stride(0), a.stride(1), m.stride(0), m.stride(1),
        v.stride(0) if valid is not None else 0, layer, ent_i.shape[0],
        K=top_k, BLOCK_D=block_d, HAS_VALID=valid is not None,
        num_warps=num_warps or (2 if block_d <= 1024 else 4))  # measured best on an H200 (bench --kernels)
    return packed


def unpack_token_stats(packed: torch.Tensor, b: int, t: int, top_k: int) -> dict[str, torch.Tensor]:
    """Views of `token_stats_triton`'s buffer (on the device or copied to the host): `bos_cosine`, `max_abs`
    `[B, T]`; `top_features` (int32), `top_values`, `mlp_top_features` (int32), `mlp_top_values` `[B, T, k]`."""
    n = b * t
    bt, btk = (b, t), (b, t, top_k)
    sizes = (n, n, n * top_k, n * top_k, n * top_k, n * top_k)
    parts = packed.split(sizes)
    shapes = (bt, bt, btk, btk, btk, btk)
    out = {key: part.view(shape) for key, part, shape in zip(TOKEN_FIELDS, parts, shapes, strict=True)}
    for key in ("top_features", "mlp_top_features"):
        out[key] = out[key].view(torch.int32)
    return out
