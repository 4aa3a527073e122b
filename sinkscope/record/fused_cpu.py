"""The recorder's per-layer reductions on the CPU, in two passes compiled by numba.

`reduce.reduce_layer` takes them in about twenty torch operations a layer, each a pass over `[B, T, D]`; at T =
512 on SmolLM2 they cost 2.0-2.8 ms a layer, most of the recorder's time over a plain forward. Here each sample's
block output `h` and MLP output take one pass each, row by row while the row is in L1 (1.5 ms a layer together in
a recorded forward at T = 512, session 17):

- `h`: cos-to-BOS (float64 sums), the top-k features of |h| (their signed values alongside), max |h|, the
  per-feature max over real tokens, the count of |h| below the median's bracket and the entries inside it, and
  the real tokens whose max |h| reaches the absolute massive threshold;
- the MLP output: its top-k features and per-feature max.

The median is the exact bracketed selection of `reduce.median_nonneg` (the bracket from the same random subsample,
the full selection when it misses), its selections `reduce._two_ranks`' histogram of the values' bits. The
massive entries are read from the candidate tokens once the median gives the threshold. The fields are written
straight into the recorder's sample-major blocks.

Top-k: a row is read as runs of GROUP entries; each column's max over the runs (with the run it is in) comes from
vector instructions, the k largest column maxima start the list, and only the columns whose max reaches its k-th
value are scanned. Ties go to the lower feature index. A row with a NaN or an infinity makes a pass stop and
report it; the caller then takes torch's reductions for the layer, which propagate it as they always did.

The fields equal the torch path's exactly (cos-to-BOS within float32 rounding: its sums are float64 here), which
tests/test_fused_cpu.py checks. Tried and dropped: the MLP pass in a second thread next to the `h` pass. The
forward's OpenMP threads spin on the other core after each matmul, and in a recorded forward the two threads were
no faster (56-58 ms of reductions a forward against 54-55 in one thread, T = 512, session 17).

`available()` is False without numba, with `SINKSCOPE_NUMBA=0`, or after the kernels failed to compile (a warning
says so); the recorder then uses the torch reductions. numba is imported, and the kernels compiled, at the first
recording on the CPU (about 4 s; numba caches the machine code on disk, after which it takes about 0.1 s).
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import numpy as np

from sinkscope.record.reduce import SUBSAMPLE, _subsample_index, _two_ranks, median_from_band, subsample_ranks

FASTMATH = {"reassoc", "contract", "arcp", "nsz"}
"""Reassociation lets the sums and counts vectorise; no `nnan`/`ninf`, so a NaN or infinity still shows in a sum of
squares and the row is reported rather than silently mis-ranked."""
GROUP = 32
"""Runs of the top-k scan (32 was faster than 16, 64 and 96 on SmolLM2's activations)."""
ABS_MASK = np.int32(0x7FFFFFFF)
"""The low 31 bits of a float32: as an integer they order like |x| (NaN excluded)."""
BAND_SLACK = 2
"""The band buffer holds BAND_SLACK times the expected band (plus a row); a band that outgrows it (adversarial
values) is counted, not stored, and the median takes the full selection."""
KERNELS = ("_insert", "_row_topk", "_h_pass", "_m_pass")
"""The module's functions numba compiles (callees first: a caller resolves them when it is compiled)."""

_STATE: dict[str, bool] = {}


def available() -> bool:
    """Whether the recorder takes these passes on the CPU."""
    if os.environ.get("SINKSCOPE_NUMBA") == "0" or _STATE.get("failed"):
        return False
    return _STATE.get("ready") or importlib.util.find_spec("numba") is not None


def _compile() -> bool:
    """Compile the kernels (once per process) and run them on a tiny input; on failure warn once and stay off."""
    if _STATE.get("ready") or _STATE.get("failed"):
        return bool(_STATE.get("ready"))
    try:
        import numba

        g = globals()
        for name in KERNELS:
            g[name] = numba.njit(nogil=True, cache=True, fastmath=FASTMATH)(_PYTHON[name])
        _smoke()
    except Exception as exc:  # noqa: BLE001 - any numba failure leaves the torch reductions in charge
        _STATE["failed"] = True
        warnings.warn(f"sinkscope: numba could not compile the CPU recorder's reductions ({type(exc).__name__}: "
                      f"{exc}); recording takes torch's reductions instead (slower, same results)", stacklevel=3)
        return False
    _STATE["ready"] = True
    return True


def _smoke() -> None:
    """Each kernel once on a small input (compiles them, or loads them from numba's cache)."""
    x = np.arange(-40, 40, dtype=np.float32).reshape(2, 40)
    valid = np.ones(2, np.bool_)
    ti, tv = np.empty((2, 4), np.int32), np.empty((2, 4), np.float32)
    band, cand = np.empty(x.size + 41, np.float32), np.empty(2, np.int64)
    _m_pass(x, valid, 4, ti, tv, np.zeros(40, np.float32))
    _h_pass(x, valid, 4, x[0], np.float32(0), np.float32(np.inf), np.float32(30), band, ti, tv,
            np.empty(2, np.float32), np.empty(2, np.float32), np.zeros(40, np.float32), cand)


def _insert(tv, ti, a, j, k):
    """Insert key a at index j into the sorted top list (key descending, index ascending) of length k, dropping the
    last entry."""
    p = k - 1
    while p > 0 and (tv[p - 1] < a or (tv[p - 1] == a and ti[p - 1] > j)):
        tv[p] = tv[p - 1]
        ti[p] = ti[p - 1]
        p -= 1
    tv[p] = a
    ti[p] = j


def _row_topk(row, bits, k, gm, gr, tv, ti, out_i, out_v):
    """The k largest |row| entries, sorted (value descending, index ascending), into out_i (indices) and out_v
    (signed values); returns max |row| as int32 bits. `bits`: the row's float32 bits as int32, whose low 31 bits
    order like |row| (the caller has refused NaN); gm, gr: int32 scratch of GROUP entries; tv, ti: scratch of k.

    The row is read as runs of GROUP entries: the max of each column over the runs (and the run it is in) comes
    from vector instructions, the k largest column maxima start the list, and only the columns whose max reaches
    its k-th value are scanned for more. (Indices go through slices: an index computed as `run * GROUP + column`
    made numba emit gathers, 3x slower.)"""
    d = row.shape[0]
    s = gm.shape[0]
    r_n = d // s
    seg = bits[:s]
    for c in range(s):
        gm[c] = seg[c] & ABS_MASK
        gr[c] = 0
    for r in range(1, r_n):
        seg = bits[r * s:r * s + s]
        for c in range(s):
            v = seg[c] & ABS_MASK
            g = v > gm[c]
            gm[c] = v if g else gm[c]
            gr[c] = r if g else gr[c]
    for q in range(k):
        tv[q] = -1
        ti[q] = d
    kv = np.int32(-1)
    kj = d
    for c in range(s):  # the k largest column maxima (ties: lower index first)
        a = gm[c]
        j = gr[c] * s + c
        if a > kv or (a == kv and j < kj):
            _insert(tv, ti, a, j, k)
            kv = tv[k - 1]
            kj = ti[k - 1]
    for c in range(s):  # columns that may hold more of the k largest (each column's max is in the list already)
        if gm[c] < kv:
            continue
        skip = gr[c]
        for r in range(r_n):
            if r == skip:
                continue
            j = r * s + c
            a = bits[j] & ABS_MASK
            if a > kv or (a == kv and j < kj):
                _insert(tv, ti, a, j, k)
                kv = tv[k - 1]
                kj = ti[k - 1]
    for j in range(r_n * s, d):  # the tail after the last whole run
        a = bits[j] & ABS_MASK
        if a > kv or (a == kv and j < kj):
            _insert(tv, ti, a, j, k)
            kv = tv[k - 1]
            kj = ti[k - 1]
    for q in range(k):
        out_i[q] = ti[q]
        out_v[q] = row[ti[q]]
    return tv[0]


def _h_pass(h, valid, k, h0, lo, hi, cand_min, band, top_i, top_v, max_abs, cos, feat_max, cand):
    """One sample's block output `h[T, D]` (float32, C-contiguous). Fills top_i/top_v `[T, k]`, max_abs and cos `[T]`,
    feat_max `[D]` (max over real tokens, from 0), band (entries in [lo, hi] of real tokens, while it has room) and
    cand (real tokens with max |h| >= cand_min). Returns (entries below lo, entries in the band, candidates,
    whether the band overflowed, whether every row is finite)."""
    t_len, d = h.shape
    bits = h.view(np.int32)
    n0 = 0.0
    for j in range(d):
        n0 += np.float64(h0[j]) * np.float64(h0[j])
    n0 = max(np.sqrt(n0), 1e-12)
    gm = np.empty(min(GROUP, d), np.int32)
    gr = np.empty(min(GROUP, d), np.int32)
    tv = np.empty(k, np.int32)
    ti = np.empty(k, np.int64)
    cand_bits = np.float32(cand_min).view(np.int32)
    below = 0
    nb = 0
    nc = 0
    cap = band.shape[0]
    overflow = False
    for t in range(t_len):
        row = h[t]
        dot = 0.0
        sq = 0.0
        for j in range(d):
            x = np.float64(row[j])
            dot += x * np.float64(h0[j])
            sq += x * x
        if not np.isfinite(sq):
            return below, nb, nc, overflow, False
        cos[t] = dot / (max(np.sqrt(sq), 1e-12) * n0)
        top = _row_topk(row, bits[t], k, gm, gr, tv, ti, top_i[t], top_v[t])
        max_abs[t] = abs(row[ti[0]])
        if not valid[t]:
            continue
        c = 0
        for j in range(d):
            a = abs(row[j])
            feat_max[j] = max(feat_max[j], a)
            c += a < lo
        below += c
        if nb + d < cap:  # branch-free store: every entry is written, the count moves only for those inside
            for j in range(d):
                a = abs(row[j])
                band[nb] = a
                nb += (a >= lo) & (a <= hi)
        else:
            overflow = True
            for j in range(d):
                a = abs(row[j])
                nb += (a >= lo) & (a <= hi)
        if top >= cand_bits:
            cand[nc] = t
            nc += 1
    return below, nb, nc, overflow, True


def _m_pass(m, valid, k, top_i, top_v, feat_max):
    """One sample's MLP output `m[T, D]`: top_i/top_v `[T, k]` and feat_max `[D]` (over real tokens, from 0). Returns
    whether every row is finite."""
    t_len, d = m.shape
    bits = m.view(np.int32)
    gm = np.empty(min(GROUP, d), np.int32)
    gr = np.empty(min(GROUP, d), np.int32)
    tv = np.empty(k, np.int32)
    ti = np.empty(k, np.int64)
    for t in range(t_len):
        row = m[t]
        sq = 0.0
        for j in range(d):
            x = np.float64(row[j])
            sq += x * x
        if not np.isfinite(sq):
            return False
        _row_topk(row, bits[t], k, gm, gr, tv, ti, top_i[t], top_v[t])
        if valid[t]:
            for j in range(d):
                feat_max[j] = max(feat_max[j], abs(row[j]))
    return True


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
    if not counts.all() or not _compile():
        return False
    hn = h.detach().float().contiguous().numpy()
    mn = mlp_out.detach().float().contiguous().numpy()
    k = top_k
    abs_t, rel_t = np.float32(abs_threshold), np.float32(rel_threshold)
    found = []
    for b in range(b_n):
        o = {key: out[key][b, layer] for key in FIELDS if key != "median_abs"}  # views, [T, ...] / [D]
        o["feature_max_abs"][:] = 0
        o["mlp_feature_max_abs"][:] = 0
        if not _m_pass(mn[b], valid[b], k, o["mlp_top_features"], o["mlp_top_values"], o["mlp_feature_max_abs"]):
            return False
        rows = None if counts[b] == t_len else np.flatnonzero(valid[b])
        n = d * int(counts[b])
        lo, hi, cap = _bracket(hn[b], rows, n)
        band = np.empty(cap, np.float32)
        cand = np.empty(t_len, np.int64)
        below, nb, nc, overflow, ok = _h_pass(
            hn[b], valid[b], k, hn[b, int(np.argmax(valid[b]))], np.float32(lo), np.float32(hi), abs_t, band,
            o["top_features"], o["top_values"], o["max_abs"], o["bos_cosine"], o["feature_max_abs"], cand)
        if not ok:
            return False
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


_PYTHON = {name: globals()[name] for name in KERNELS}
"""The kernels as plain Python functions, which `_compile` hands to numba."""
