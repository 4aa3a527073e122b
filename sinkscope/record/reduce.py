"""The recorder's per-layer reductions, in torch on the model's device (the numpy formulas they stream are in
`sinkscope.metrics`, which tests compare them against).

For a block output `h[B, T, D]` they give, per sample: cos-to-BOS `[T]`, max |h| `[T]`, the exact median of |h|
over the sample's real tokens and features, the per-feature max over tokens `[D]` of |h| and |mlp_out|, the top-k
features per token of |h| and |mlp_out|, and the massive entries (Sun et al.) with the block's attention and MLP
contributions at each of them. Only these `[T]`/`[D]`-sized results leave the device.
"""

from __future__ import annotations

import functools

import numpy as np
import torch


def median_abs(h: torch.Tensor) -> torch.Tensor:
    """`median(|h|)` over every entry of `h`, as numpy defines it (mean of the two middle values)."""
    return median_nonneg(h.detach().abs().float().reshape(-1))


SUBSAMPLE = 8192
"""Entries drawn to bracket the median's ranks. The bracket is +-(2 sqrt(SUBSAMPLE) + 8) ranks of the sample wide:
the number of sampled entries below the median has a standard deviation of sqrt(SUBSAMPLE) / 2, so the bracket
misses with a probability of about 3e-5 (4.2 standard deviations each side), and a miss only costs the full
selection. (It was 4 sqrt(SUBSAMPLE) + 8 until session 13: twice the entries to select from, for nothing.)"""
MARGIN_SQRT = 2


def median_nonneg(flat: torch.Tensor) -> torch.Tensor:
    """Exact median of a 1-D tensor, numpy convention.

    A sorted random subsample brackets the middle ranks, so the selection runs only over the few entries
    inside the bracket; the full selection runs only when the bracket misses (adversarial inputs). On the CPU
    the same algorithm runs in numpy, whose counting and selection passes are 3x faster than torch's here
    (T = 2048 x 576 entries: 11.6 -> 3.6 ms per layer, 2 threads).
    """
    if flat.device.type == "cpu":
        return torch.as_tensor(_median_numpy(flat.numpy()))
    return _median_torch(flat)


def _median_torch(flat: torch.Tensor) -> torch.Tensor:
    """`median_nonneg` in torch, for tensors off the CPU (the torch path on CUDA: no Triton, `SINKSCOPE_TRITON=0`,
    or the radix median's fallback); the tests run it on the CPU too."""
    n = flat.numel()
    lo_rank, hi_rank = (n + 1) // 2, n // 2 + 1  # 1-based middle ranks (equal when n is odd)
    if n > 65536:
        # a random subsample: a plain stride could alias with the feature dimension and see few features
        gen = torch.Generator(device=flat.device).manual_seed(n)
        sub = flat[torch.randint(0, n, (SUBSAMPLE,), generator=gen, device=flat.device)]
        m = sub.numel()
        margin = int(MARGIN_SQRT * m**0.5) + 8
        centre = (lo_rank - 1) * m // n
        lo = sub.kthvalue(max(1, centre - margin)).values
        hi = sub.kthvalue(min(m, centre + margin + 2)).values
        below = int((flat < lo).sum())
        band = flat[(flat >= lo) & (flat <= hi)]
        if below < lo_rank and hi_rank <= below + band.numel():
            flat, lo_rank, hi_rank = band, lo_rank - below, hi_rank - below
    low = flat.kthvalue(lo_rank).values
    return low if hi_rank == lo_rank else 0.5 * (low + flat.kthvalue(hi_rank).values)


def _median_numpy(a: np.ndarray):
    """`median_nonneg` for a numpy array: the same bracket, `_two_ranks` for the selections. The subsample's
    positions depend only on the size (`_subsample_index`, cached), and the band is taken with one mask and
    `np.compress` (a boolean index with the same mask cost 2.6x as much on this project's 2-core CPU; the whole
    median of 512 x 576 entries of |N(0, 1)| went from 0.68 to 0.53 ms, session 16)."""
    n = a.size
    if n > 65536:
        sub = a[_subsample_index(n)]
        lo, hi = _two_ranks(sub, *subsample_ranks(n))
        inside = a >= lo
        below = n - int(np.count_nonzero(inside))
        inside &= a <= hi
        return median_from_band(np.compress(inside, a), below, n, lambda: a)
    return median_from_band(None, 0, n, lambda: a)


def median_from_band(band: np.ndarray | None, below: int, n: int, everything):
    """numpy's median (the mean of the two middle values) of n non-negative entries, from the `band` of those inside
    a bracket and the count `below` it; `everything()` gives all n entries when the band does not hold both middle
    ranks (the bracket missed) or is None. The CPU medians of both paths end here."""
    lo_rank, hi_rank = (n + 1) // 2, n // 2 + 1
    if band is not None and below < lo_rank and hi_rank <= below + band.size:
        a, lo_rank, hi_rank = band, lo_rank - below, hi_rank - below
    else:
        a = everything()
    low, high = _two_ranks(a, lo_rank, hi_rank)
    return low if hi_rank == lo_rank else (low + high) * a.dtype.type(0.5)


def _two_ranks(a: np.ndarray, r_lo: int, r_hi: int):
    """The r_lo-th and r_hi-th smallest (1-based, r_lo <= r_hi) entries of a non-negative 1-D array. For float32, a
    histogram (`np.bincount`, at most 4097 bins) of the entries' bits, whose integer order is the values' order,
    then a sort of the one or two bins that hold the ranks: 32-38 us for the 8,000-15,000 entries of a median's
    subsample and band, where `np.partition` took 100-160 us (its branches are unpredictable on fresh data;
    session 17). Other dtypes: `np.partition`."""
    if a.dtype != np.float32:
        part = np.partition(a, sorted({r_lo - 1, r_hi - 1}))
        return part[r_lo - 1], part[r_hi - 1]
    keys = a.view(np.int32)
    kmin = int(keys.min())
    shift = max(0, (int(keys.max()) - kmin).bit_length() - 12)
    bins = keys - np.int32(kmin)
    if shift:
        bins >>= shift
    counts = np.bincount(bins)
    cum = np.cumsum(counts)
    b_lo, b_hi = (int(b) for b in np.searchsorted(cum, [r_lo, r_hi]))  # the first bins whose counts reach them
    sorted_lo = np.sort(np.compress(bins == b_lo, a))
    sorted_hi = sorted_lo if b_hi == b_lo else np.sort(np.compress(bins == b_hi, a))
    return (sorted_lo[r_lo - int(cum[b_lo] - counts[b_lo]) - 1], sorted_hi[r_hi - int(cum[b_hi] - counts[b_hi]) - 1])


def subsample_ranks(n: int) -> tuple[int, int]:
    """The 1-based ranks in the sorted subsample of an array of n entries whose values bracket its median's ranks."""
    margin = int(MARGIN_SQRT * SUBSAMPLE**0.5) + 8
    centre = ((n + 1) // 2 - 1) * SUBSAMPLE // n
    return max(1, centre - margin), min(SUBSAMPLE, centre + margin + 2)


@functools.lru_cache(maxsize=32)
def _subsample_index(n: int) -> np.ndarray:
    """The SUBSAMPLE random positions (seeded by n) the CPU median brackets an array of n entries with: drawn once
    per size (a generator's set-up and draw cost about as much as the selection that follows)."""
    index = np.random.default_rng(n).integers(0, n, SUBSAMPLE)
    index.flags.writeable = False
    return index


def massive_threshold(median: torch.Tensor, abs_threshold: float, rel_threshold: float) -> torch.Tensor:
    """`max(abs_threshold, rel_threshold * median)`, elementwise (see `metrics.massive_threshold`)."""
    return torch.clamp(median * rel_threshold, min=abs_threshold)


MASSIVE_PER_TOKEN = 8
"""On the device path the massive entries of a forward are gathered into one fixed-size buffer (no host sync) of
MASSIVE_PER_TOKEN entries per token of one layer on average (at least MASSIVE_MIN_CAP), shared by all layers; more
than that is refused with a message at the end of the forward (Sun et al. find 2-4 massive features on a few
tokens)."""
MASSIVE_MIN_CAP = 65536


CHUNK_ELEMENTS = 1 << 22
"""Token chunks of at most this many `B x tokens x D` entries: every float32 temporary of the reductions is at most
16 MiB, whatever the context length (the CPU's RSS and the GPU's peak memory stay flat)."""


@torch.no_grad()
def reduce_layer(h: torch.Tensor, attn_out: torch.Tensor, mlp_out: torch.Tensor, valid: torch.Tensor, padded: bool,
                 top_k: int, abs_threshold: float, rel_threshold: float, first: torch.Tensor | None = None,
                 workspace: dict | None = None) -> tuple[dict, list[tuple]]:
    """Reductions of one block output `h[B, T, D]` (with the block's `attn_out`, `mlp_out` of the same shape and
    `valid[B, T]`, True on real tokens), in torch. Returns the per-layer fields (torch, on h's device) and the
    massive entries as a list of `(batch, token, feature, value, attn_out, mlp_out)` index/value tensors (one per
    token chunk that has any).

    The median needs all of h; everything else runs over token chunks of CHUNK_ELEMENTS entries, upcast to float32
    one chunk at a time. When h fits one chunk, |h| is taken once for the median and the chunk. (On CUDA with
    Triton the recorder uses `kernels.reduce_layer_device` instead: the same fields in four launches (bf16) and no host
    synchronisation.) `first`: each row's first real position, when the caller has it. `workspace`: a dict the
    caller keeps across layers, where the |h| and |mlp_out| temporaries are reused instead of allocated per layer
    (on the CPU a fresh multi-MiB block costs about as much in page faults as the pass that fills it)."""
    b, t, d = h.shape
    if first is None:
        first = valid.int().argmax(dim=1)  # first real position of each row
    h0 = h[torch.arange(b, device=h.device), first].float()  # [B, D]
    step = max(1, CHUNK_ELEMENTS // (b * d))
    whole = _abs(h, workspace, "h") if step >= t else None  # one chunk: |h| serves the median and the chunk
    rows = whole if whole is not None else h
    med = torch.stack([median_nonneg(_abs_flat(rows[i][valid[i]] if padded else rows[i], whole is None))
                       for i in range(b)])  # [B]
    thr = massive_threshold(med, abs_threshold, rel_threshold)  # [B]
    h0_norm = torch.linalg.vector_norm(h0, dim=-1).clamp_min(COS_EPS)  # [B]
    parts: list[dict] = []
    massive: list[tuple] = []
    for s0 in range(0, t, step):
        s1 = min(t, s0 + step)
        habs = whole if whole is not None else _abs(h[:, s0:s1], workspace, "h")
        part, found = _reduce_chunk(h[:, s0:s1], habs, attn_out[:, s0:s1], mlp_out[:, s0:s1], valid[:, s0:s1],
                                    padded, h0, h0_norm, thr, s0, top_k, workspace)
        parts.append(part)
        if found is not None:
            massive.append(found)
    if len(parts) == 1:
        stats = parts[0]
    else:
        stats = {key: torch.cat([q[key] for q in parts], dim=1) for key in parts[0] if key not in _FEATURE_MAX}
        for key in _FEATURE_MAX:
            stats[key] = torch.stack([q[key] for q in parts]).amax(dim=0)
    stats["median_abs"] = med
    return stats, massive


_FEATURE_MAX = ("feature_max_abs", "mlp_feature_max_abs")
COS_EPS = 1e-12
"""Each norm of cos-to-BOS is clamped at this (as `F.cosine_similarity` does), so a zero row gives 0."""


def _abs(x: torch.Tensor, workspace: dict | None, key: str) -> torch.Tensor:
    """`|x|` in float32, written into the workspace's block `key` (grown when too small) when there is one."""
    if x.dtype != torch.float32:
        return x.float().abs_()  # the upcast is a fresh copy already
    if workspace is None:
        return x.abs()
    buf = workspace.get(key)
    if buf is None or buf.numel() < x.numel() or buf.device != x.device:
        buf = workspace[key] = torch.empty(x.numel(), dtype=torch.float32, device=x.device)
    return torch.abs(x, out=buf[:x.numel()].view(x.shape))


def _abs_flat(x: torch.Tensor, take_abs: bool) -> torch.Tensor:
    return (x.abs().float() if take_abs else x).reshape(-1)


def _reduce_chunk(hc, habs, ac, mc, vc, padded, h0, h0_norm, thr, offset, top_k, workspace):
    """The per-token fields of one token chunk (`habs` its |h| in float32), its per-feature maxima, and its massive
    entries (tokens counted from the start of the sequence)."""
    h = hc.float()  # [B, c, D]
    top_v, top_i = habs.topk(top_k, dim=-1)  # [B, c, k], sorted: top_v[..., 0] is max_abs
    # cos-to-BOS as a batched matrix-vector product over two norms: no [B, c, D] temporary (on the CPU, in full
    # float32; elementwise where a matmul may round through TF32 or bfloat16)
    if h.is_cuda or torch.get_float32_matmul_precision() != "highest":
        dot = (h * h0[:, None, :]).sum(-1)  # [B, c]
    else:
        dot = torch.bmm(h, h0[:, :, None])[..., 0]  # [B, c]
    norm = torch.linalg.vector_norm(h, dim=-1).clamp_min_(COS_EPS)
    cos = dot / (norm * h0_norm[:, None])
    massive = None
    candidate = top_v[..., 0] >= thr[:, None]  # tokens with at least one massive entry
    if padded:
        candidate &= vc
    if bool(candidate.any()):
        bi, ti = candidate.nonzero(as_tuple=True)
        r, ji = (habs[bi, ti] >= thr[bi, None]).nonzero(as_tuple=True)  # the same (b, t, j) order as one nonzero
        bi, ti = bi[r], ti[r]
        massive = (bi, ti + offset, ji, h[bi, ti, ji], ac[bi, ti, ji].float(), mc[bi, ti, ji].float())
    m = mc.float()
    mabs = _abs(mc, workspace, "mlp")
    mtop_v, mtop_i = mabs.topk(top_k, dim=-1)
    if padded:
        habs = habs.masked_fill_(~vc[..., None], 0)  # both are this function's own temporaries
        mabs = mabs.masked_fill_(~vc[..., None], 0)
    return {
        "bos_cosine": cos,
        "max_abs": top_v[..., 0],
        "feature_max_abs": habs.amax(dim=1),  # [B, D]
        "mlp_feature_max_abs": mabs.amax(dim=1),
        "top_features": top_i.int(),
        "top_values": h.gather(-1, top_i),
        "mlp_top_features": mtop_i.int(),
        "mlp_top_values": m.gather(-1, mtop_i),
    }, massive
