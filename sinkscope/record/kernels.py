"""Triton kernels for recording on CUDA (issue 16), used when Triton is importable and the tensors are on a GPU.

- `colsum_triton`: the attention each key receives, summed over the queries that see it, from Q, K and the row
  log-sum-exp of the forward's own SDPA kernel. One program per (key block, batch x query head) walks the query
  blocks at and after its keys, recomputes `exp(q.k * scale - lse[q])` in fp32 and sums over queries, so it
  needs no atomics and O(1) extra memory; it is the column-sum counterpart of a flash-attention pass (about half
  the causal attention work, since only the causal triangle is visited).
- `median_abs_triton`: the exact median of |h| over each sample's real tokens and all features, by radix
  selection on the fp32 bit pattern (|h| >= 0, so the bits order like the values): for each of the two middle
  ranks, four passes of an 8-bit histogram, each reading h once, all on the device, with no host
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
    import triton
    import triton.language as tl

    @triton.jit
    def _colsum_kernel(q_ptr, k_ptr, lse_ptr, valid_ptr, out_ptr,
                       sqb, sqh, sqt, skb, skh, skt, slb, slh, svb, sob, soh,
                       T, H, GROUP, scale_log2,
                       HAS_VALID: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
                       UPCAST: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: b * stride passes 2**31 at B=16, T=32768
        b = pid_bh // H
        h = pid_bh % H
        kvh = h // GROUP
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        n_in = offs_n < T
        k = tl.load(k_ptr + b * skb + kvh * skh + offs_n[:, None] * skt + offs_d[None, :],
                    mask=n_in[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        if UPCAST:  # the interpreter's dot mishandles bf16; bf16 products are exact in fp32, so this is the same sum
            k = k.to(tl.float32)
        key_ok = n_in
        if HAS_VALID:
            key_ok = key_ok & (tl.load(valid_ptr + b * svb + offs_n, mask=n_in, other=0) != 0)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        start = (pid_n * BLOCK_N) // BLOCK_M * BLOCK_M  # the first query block that can see these keys
        for m0 in range(start, T, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_in = offs_m < T
            q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :],
                        mask=m_in[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
            lse = tl.load(lse_ptr + b * slb + h * slh + offs_m, mask=m_in, other=0.0)
            if IEEE or UPCAST:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            p = tl.exp2(s * scale_log2 - lse[:, None] * 1.4426950408889634)
            query_ok = m_in
            if HAS_VALID:
                query_ok = query_ok & (tl.load(valid_ptr + b * svb + offs_m, mask=m_in, other=0) != 0)
            seen = (offs_m[:, None] >= offs_n[None, :]) & query_ok[:, None] & key_ok[None, :]
            acc += tl.sum(tl.where(seen, p, 0.0), axis=0)
        tl.store(out_ptr + b * sob + h * soh + offs_n, acc, mask=n_in)

    @triton.jit
    def _digit_histogram_kernel(h_ptr, valid_ptr, prefix_ptr, hist_ptr, N, D, shb, svb,
                                SHIFT: tl.constexpr, HAS_VALID: tl.constexpr, BLOCK: tl.constexpr):
        """One radix pass: for the entries of row b whose higher bits equal prefix[b], count each 8-bit digit at
        SHIFT into hist[b, 256]."""
        pid = tl.program_id(0).to(tl.int64)  # 64-bit offsets: rows of T * D entries at large B
        b = tl.program_id(1).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        ok = offs < N
        if HAS_VALID:  # a token's D features share its validity
            ok = ok & (tl.load(valid_ptr + b * svb + offs // D, mask=ok, other=0) != 0)
        x = tl.abs(tl.load(h_ptr + b * shb + offs, mask=ok, other=0.0).to(tl.float32))
        bits = x.to(tl.int32, bitcast=True)
        prefix = tl.load(prefix_ptr + b)
        if SHIFT < 24:
            ok = ok & ((bits >> (SHIFT + 8)) == prefix)
        digit = (bits >> SHIFT) & 255
        hist = tl.histogram(digit, 256, mask=ok)
        tl.atomic_add(hist_ptr + b * 256 + tl.arange(0, 256), hist)

    return SimpleNamespace(triton=triton, colsum=_colsum_kernel, digit_histogram=_digit_histogram_kernel)


def colsum_triton(query: torch.Tensor, key: torch.Tensor, lse: torch.Tensor, scale: float,
                  valid: torch.Tensor | None = None, block_m: int = 64, block_n: int = 64) -> torch.Tensor:
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
    )
    return out


def _kth_smallest(h: torch.Tensor, valid: torch.Tensor | None, rank: torch.Tensor, block: int) -> torch.Tensor:
    """The `rank`-th smallest |h| (1-based, per row) of each row of `h` `[B, N]`: four radix passes."""
    kern = _kernels()
    b, n = h.shape
    d = n if valid is None else n // valid.shape[1]
    prefix = torch.zeros(b, dtype=torch.int32, device=h.device)
    rank = rank.clone()
    v = valid.to(torch.int8).contiguous() if valid is not None else prefix
    for shift in (24, 16, 8, 0):
        hist = torch.zeros(b, 256, dtype=torch.int32, device=h.device)
        kern.digit_histogram[(kern.triton.cdiv(n, block), b)](
            h, v, prefix, hist, n, d, h.stride(0), v.stride(0) if valid is not None else 0,
            SHIFT=shift, HAS_VALID=valid is not None, BLOCK=block)
        cum = hist.cumsum(dim=1)  # [B, 256]
        digit = (cum < rank[:, None]).sum(dim=1)  # the first digit whose cumulative count reaches the rank
        below = torch.where(digit > 0, cum.gather(1, (digit - 1).clamp(min=0)[:, None])[:, 0], 0)
        rank = rank - below
        prefix = (prefix << 8) | digit.to(torch.int32)
    return prefix.view(torch.float32)


def median_abs_triton(h: torch.Tensor, valid: torch.Tensor | None = None, block: int = 1024) -> torch.Tensor:
    """Exact `median(|h[b]|)` over each sample's valid tokens and all features: `[B]` float32. `h` `[B, T, D]` in
    any float dtype; `valid` `[B, T]` bool or None (all tokens). numpy's convention: the mean of the two middle
    values for an even count."""
    b, t, d = h.shape
    flat = h.reshape(b, t * d)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    count = torch.full((b,), t * d, dtype=torch.int64, device=h.device) if valid is None \
        else valid.sum(dim=1).to(torch.int64) * d
    lo = _kth_smallest(flat, valid, (count + 1) // 2, block)
    hi = _kth_smallest(flat, valid, count // 2 + 1, block)
    return torch.where(count % 2 == 1, lo, 0.5 * (lo + hi))
