"""The Triton kernels of `sinkscope.record.kernels`, in a module of their own so that Triton is imported only when
a kernel first runs (about 0.4 s that CPU users never pay) and so that the kernels can call `@triton.jit`
helpers, which Triton resolves among a module's globals."""

import triton
import triton.language as tl


@triton.jit
def _query_tile(q_ptr, lse_ptr, valid_ptr, m0, b, h, sqb, sqh, sqt, slb, slh, svb, T, HAS_VALID: tl.constexpr,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, UPCAST: tl.constexpr,
                MASKED: tl.constexpr):
    """The BLOCK_M queries from m0 of one (sample, head) for the column sums: q `[BLOCK_M, BLOCK_D]`, their row
    log-sum-exp, their positions, and which of them are real (in the sequence and, with padding, valid). MASKED:
    the tile may run past the sequence, so loads are masked; otherwise they are not."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_in = offs_m < T
    q_ptrs = q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :]
    if MASKED:
        q = tl.load(q_ptrs, mask=m_in[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        lse = tl.load(lse_ptr + b * slb + h * slh + offs_m, mask=m_in, other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            q = tl.load(q_ptrs)
        else:
            q = tl.load(q_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        lse = tl.load(lse_ptr + b * slb + h * slh + offs_m)
    if UPCAST:  # the interpreter's dot mishandles bf16; bf16 products are exact in fp32, so this is the same sum
        q = q.to(tl.float32)
    query_ok = m_in
    if MASKED and HAS_VALID:
        query_ok = query_ok & (tl.load(valid_ptr + b * svb + offs_m, mask=m_in, other=0) != 0)
    return q, lse, offs_m, query_ok


@triton.jit
def _colsum_tile(q_ptr, lse_ptr, valid_ptr, k, offs_n, key_ok, m0, b, h, sqb, sqh, sqt, slb, slh, svb, T, scale_log2,
                 HAS_VALID: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                 IEEE: tl.constexpr, UPCAST: tl.constexpr, MASKED: tl.constexpr):
    """exp(q.k * scale - lse[q]) of one [BLOCK_M queries, BLOCK_N keys] tile, in fp32. MASKED: the tile crosses
    the causal diagonal, the end of the sequence or padding, so the unseen entries are zeroed; tiles wholly below
    the diagonal skip those comparisons."""
    q, lse, offs_m, query_ok = _query_tile(q_ptr, lse_ptr, valid_ptr, m0, b, h, sqb, sqh, sqt, slb, slh, svb, T,
                                           HAS_VALID, HEAD_DIM, BLOCK_D, BLOCK_M, UPCAST, MASKED)
    if IEEE or UPCAST:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    p = tl.exp2(s * scale_log2 - lse[:, None] * 1.4426950408889634)
    if MASKED:
        seen = (offs_m[:, None] >= offs_n[None, :]) & query_ok[:, None] & key_ok[None, :]
        p = tl.where(seen, p, 0.0)
    return p


@triton.jit
def _scores(q_ptr, lse_ptr, valid_ptr, k, m0, b, h, sqb, sqh, sqt, slb, slh, svb, T, scale_log2,
            HAS_VALID: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
            IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """The base-2 scores `q.k * scale * log2(e)` of one whole [BLOCK_M queries, BLOCK_N keys] tile below the
    diagonal, and its queries' log-sum-exp in base 2: `exp2(scores - lse)` is the tile's attention (PIPE)."""
    q, lse, offs_m, query_ok = _query_tile(q_ptr, lse_ptr, valid_ptr, m0, b, h, sqb, sqh, sqt, slb, slh, svb, T,
                                           HAS_VALID, HEAD_DIM, BLOCK_D, BLOCK_M, UPCAST, False)
    if IEEE or UPCAST:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    return s * scale_log2, lse * 1.4426950408889634


@triton.jit
def exp2_fma(x):
    """2**x for x <= 0 on the FMA units instead of the special-function units (which compute 16 exponentials a
    clock per SM against 128 fused multiply-adds): x = j + f with j an integer (rounded by adding 1.5 * 2**23)
    and f in [-0.5, 0.5], 2**f by a degree-3 polynomial fitted for relative error (at most 7.5e-5, see
    tests/test_kernels.py), and j added to the result's exponent bits. x is clamped at -125 (2**-125 ~ 2e-38 stands
    for anything smaller)."""
    x = tl.maximum(x, -125.0)
    y = x + 12582912.0
    f = x - (y - 12582912.0)
    p = tl.fma(tl.fma(tl.fma(0.05517132207751274, f, 0.24261054396629333), f, 0.6932609677314758), f,
               0.9999281167984009)
    # y's low mantissa bits hold j; shifted by 23 they land on the exponent (the constant's bits shift out)
    return (p.to(tl.int32, bitcast=True) + (y.to(tl.int32, bitcast=True) << 23)).to(tl.float32, bitcast=True)


@triton.jit
def _colsum_rows_tile(q_ptr, lse_ptr, valid_ptr, k, offs_n, key_ok, m0, b, h, sqb, sqh, sqt, slb, slh, svb, T,
                      scale_log2, HAS_VALID: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                      MASKED: tl.constexpr, POLY: tl.constexpr):
    """The column sums of one [BLOCK_N keys, BLOCK_M queries] tile, exp(k.q * scale - lse[q]) summed over the
    queries (axis 1, which the MMA layout keeps within a warp): `[BLOCK_N]` float32. POLY: every other query's
    exponential on the FMA units (`exp2_fma`), the rest on the special-function units, so that both work."""
    q, lse, offs_m, query_ok = _query_tile(q_ptr, lse_ptr, valid_ptr, m0, b, h, sqb, sqh, sqt, slb, slh, svb, T,
                                           HAS_VALID, HEAD_DIM, BLOCK_D, BLOCK_M, UPCAST, MASKED)
    if IEEE or UPCAST:
        s = tl.dot(k, tl.trans(q), input_precision="ieee")
    else:
        s = tl.dot(k, tl.trans(q))
    x = s * scale_log2 - lse[None, :] * 1.4426950408889634
    if MASKED:
        seen = (offs_m[None, :] >= offs_n[:, None]) & query_ok[None, :] & key_ok[:, None]
        x = tl.where(seen, x, -float("inf"))
    if POLY:
        xa, xb = tl.split(tl.reshape(x, [BLOCK_N, BLOCK_M // 2, 2]))
        pb = exp2_fma(xb)
        if MASKED:  # exp2_fma clamps -inf to 2**-125: unseen entries must give exactly 0
            sa, sb = tl.split(tl.reshape(seen, [BLOCK_N, BLOCK_M // 2, 2]))
            pb = tl.where(sb, pb, 0.0)
        return tl.sum(tl.exp2(xa), 1) + tl.sum(pb, 1)
    return tl.sum(tl.exp2(x), 1)


@triton.jit
def _colsum_step(q_ptr, lse_ptr, valid_ptr, k, offs_n, key_ok, m0, b, h, sqb, sqh, sqt, slb, slh, svb, T, scale_log2,
                 HAS_VALID: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, MASKED: tl.constexpr,
                 ROWS: tl.constexpr, POLY: tl.constexpr):
    """One query block's contribution to the accumulator: `_colsum_rows_tile`'s `[BLOCK_N]` sums (ROWS) or
    `_colsum_tile`'s `[BLOCK_M, BLOCK_N]` tile."""
    if ROWS:
        return _colsum_rows_tile(q_ptr, lse_ptr, valid_ptr, k, offs_n, key_ok, m0, b, h, sqb, sqh, sqt, slb, slh,
                                 svb, T, scale_log2, HAS_VALID, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, IEEE, UPCAST,
                                 MASKED, POLY)
    else:
        return _colsum_tile(q_ptr, lse_ptr, valid_ptr, k, offs_n, key_ok, m0, b, h, sqb, sqh, sqt, slb, slh, svb, T,
                            scale_log2, HAS_VALID, HEAD_DIM, BLOCK_D, BLOCK_M, IEEE, UPCAST, MASKED)


@triton.jit
def colsum_kernel(q_ptr, k_ptr, lse_ptr, valid_ptr, out_ptr,
                  sqb, sqh, sqt, skb, skh, skt, slb, slh, svb, sob, soh,
                  T, H, GROUP, scale_log2,
                  HAS_VALID: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
                  UPCAST: tl.constexpr, ROWS: tl.constexpr, POLY: tl.constexpr, HEAVY_FIRST: tl.constexpr,
                  PIPE: tl.constexpr):
    """Column sums of one (key block, batch x query head): the query blocks at and after the keys, in three runs
    (tiles that cross the diagonal, masked; whole tiles below it, unmasked; the sequence's last partial tile,
    masked). Default: the tiles accumulate elementwise into a [BLOCK_M, BLOCK_N] register tile, reduced over
    queries once at the end (a reduction per tile would cross warps every iteration). ROWS: the keys are the
    MMA's rows (`_colsum_rows_tile`), each tile summed over its queries within each warp into a `[BLOCK_N]`
    accumulator, so no register tile is kept and more programs fit on an SM (one's matrix products can then
    overlap another's exponentials); POLY (with ROWS) puts half the exponentials on the FMA units.
    HEAVY_FIRST: the grid is (batch x head, key block), so that the GPU starts every head's first key blocks (the
    longest runs: they see the most queries) before any lighter ones, rather than head after head, which leaves
    the last heads' long runs for the end. PIPE (without ROWS): the run of whole tiles is software-pipelined, the
    next tile's matrix product issued before this tile's exponentials, so that the two can overlap."""
    if HEAVY_FIRST:
        pid_n = tl.program_id(1)
        pid_bh = tl.program_id(0).to(tl.int64)
    else:
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
    if UPCAST:
        k = k.to(tl.float32)
    key_ok = n_in
    if HAS_VALID:
        key_ok = key_ok & (tl.load(valid_ptr + b * svb + offs_n, mask=n_in, other=0) != 0)
    if ROWS:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    start = (pid_n * BLOCK_N) // BLOCK_M * BLOCK_M  # the first query block that can see these keys
    if HAS_VALID:
        for m0 in range(start, T, BLOCK_M):
            acc += _colsum_step(q_ptr, lse_ptr, valid_ptr, k, offs_n, key_ok, m0, b, h, sqb, sqh, sqt, slb, slh,
                                svb, T, scale_log2, HAS_VALID, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, IEEE, UPCAST,
                                True, ROWS, POLY)
    else:
        diag_end = ((pid_n + 1) * BLOCK_N + BLOCK_M - 1) // BLOCK_M * BLOCK_M  # past the last diagonal tile
        full_end = T // BLOCK_M * BLOCK_M  # past the last whole tile
        for m0 in range(start, tl.minimum(diag_end, T), BLOCK_M):
            acc += _colsum_step(q_ptr, lse_ptr, valid_ptr, k, offs_n, key_ok, m0, b, h, sqb, sqh, sqt, slb, slh,
                                svb, T, scale_log2, HAS_VALID, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, IEEE, UPCAST,
                                True, ROWS, POLY)
        if PIPE and not ROWS:
            if diag_end < full_end:
                s, lse = _scores(q_ptr, lse_ptr, valid_ptr, k, diag_end, b, h, sqb, sqh, sqt, slb, slh, svb, T,
                                 scale_log2, HAS_VALID, HEAD_DIM, BLOCK_D, BLOCK_M, IEEE, UPCAST)
                for m0 in range(diag_end + BLOCK_M, full_end, BLOCK_M):
                    s_next, lse_next = _scores(q_ptr, lse_ptr, valid_ptr, k, m0, b, h, sqb, sqh, sqt, slb, slh,
                                               svb, T, scale_log2, HAS_VALID, HEAD_DIM, BLOCK_D, BLOCK_M, IEEE,
                                               UPCAST)
                    acc += tl.exp2(s - lse[:, None])
                    s = s_next
                    lse = lse_next
                acc += tl.exp2(s - lse[:, None])
        else:
            for m0 in range(diag_end, full_end, BLOCK_M):
                acc += _colsum_step(q_ptr, lse_ptr, valid_ptr, k, offs_n, key_ok, m0, b, h, sqb, sqh, sqt, slb,
                                    slh, svb, T, scale_log2, HAS_VALID, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, IEEE,
                                    UPCAST, False, ROWS, POLY)
        for m0 in range(tl.maximum(diag_end, full_end), T, BLOCK_M):
            acc += _colsum_step(q_ptr, lse_ptr, valid_ptr, k, offs_n, key_ok, m0, b, h, sqb, sqh, sqt, slb, slh,
                                svb, T, scale_log2, HAS_VALID, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, IEEE, UPCAST,
                                True, ROWS, POLY)
    if ROWS:
        total = acc
    else:
        total = tl.sum(acc, axis=0)
    tl.store(out_ptr + b * sob + h * soh + offs_n, total, mask=n_in)


@triton.jit
def exp2_fma_kernel(x_ptr, out_ptr, N, BLOCK: tl.constexpr):
    """`exp2_fma` over a vector, for its accuracy test."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    tl.store(out_ptr + offs, exp2_fma(tl.load(x_ptr + offs, mask=ok, other=0.0)), mask=ok)


@triton.jit
def _select_digit(hist, rank, BINS: tl.constexpr):
    """The digit at which the cumulative count of `hist` [BINS] first reaches `rank` (1-based), and the rank
    within that digit's bin."""
    cum = tl.cumsum(hist, 0)
    digit = tl.sum((cum < rank).to(tl.int32), 0)
    below = tl.sum(tl.where(tl.arange(0, BINS) < digit, hist, 0), 0)
    return digit, rank - below


@triton.jit
def _prefixes(hist_ptr, count_ptr, b, B, T_ALL, D, PASSES: tl.constexpr, HAS_VALID: tl.constexpr,
              BITS: tl.constexpr):
    """The two middle ranks' bit prefixes after PASSES radix passes of BITS bits, from the histograms written so
    far."""
    BINS: tl.constexpr = 1 << BITS
    if HAS_VALID:
        n = tl.load(count_ptr + b).to(tl.int64) * D
    else:
        n = T_ALL * D
    r_lo = ((n + 1) // 2).to(tl.int32)
    r_hi = (n // 2 + 1).to(tl.int32)
    p_lo = r_lo * 0
    p_hi = r_lo * 0
    bins = tl.arange(0, BINS)
    for q in tl.static_range(PASSES):
        d_lo, r_lo = _select_digit(tl.load(hist_ptr + ((q * B + b) * 2) * BINS + bins), r_lo, BINS)
        d_hi, r_hi = _select_digit(tl.load(hist_ptr + ((q * B + b) * 2 + 1) * BINS + bins), r_hi, BINS)
        p_lo = (p_lo << BITS) | d_lo
        p_hi = (p_hi << BITS) | d_hi
    return p_lo, p_hi, n


@triton.jit
def _count_digits(digit, ok, BINS: tl.constexpr, ONEHOT: tl.constexpr, SPREAD: tl.constexpr = 0,
                  BLOCK: tl.constexpr = 0):
    """How many of `digit` (where `ok`) fall in each of BINS bins: Triton's histogram, or (ONEHOT) a comparison
    with every bin summed over the block, whose cost does not depend on how the digits are spread, or (SPREAD > 0)
    Triton's histogram over 2**SPREAD copies of every bin, each entry counted in the copy that a multiplicative
    hash of its position in the block picks, then the copies summed: the same counts. What each costs depends on
    how the installed Triton lowers `tl.histogram` (`python -m sinkscope.bench.sass` shows it): Triton 3.6 (the
    H200 machine's) counts with warp ballots and popcounts, the same work whatever the data and growing with the
    bins, so SPREAD only adds work there (8-bit digits, second pass: 7,290 SASS instructions and 49 spilled
    registers at SPREAD=2 against 2,996 and none); Triton 3.9 adds one shared-memory atomic per entry, and
    hidden-state magnitudes crowd into a few digits (the first pass's digit is mostly the exponent), so lanes of a
    warp adding to one bin wait on each other, which the copies spread out."""
    if ONEHOT:
        hit = (digit[:, None] == tl.arange(0, BINS)[None, :]) & ok[:, None]
        return tl.sum(hit.to(tl.int32), 0)
    elif SPREAD > 0:
        COPIES: tl.constexpr = 1 << SPREAD
        pos = tl.arange(0, BLOCK).to(tl.uint32)
        # Knuth's multiplicative hash, its top SPREAD bits (masked too, whatever width the product is typed at)
        copy = ((pos * 2654435761) >> (32 - SPREAD)).to(tl.int32) & (COPIES - 1)
        counts = tl.histogram(digit * COPIES + copy, BINS * COPIES, mask=ok)
        return tl.sum(tl.reshape(counts, (BINS, COPIES)), 1)
    else:
        return tl.histogram(digit, BINS, mask=ok)


@triton.jit
def _digits(h_ptr, valid_ptr, b, shb, svb, start, N, D, PREFIX_SHIFT: tl.constexpr, SHIFT: tl.constexpr,
            FMT: tl.constexpr, HAS_VALID: tl.constexpr, BLOCK: tl.constexpr, PBINS: tl.constexpr):
    """One block of row b for a radix pass: each entry's digit (PBINS bins, from bit SHIFT of the |h| pattern), the
    bits above its digit (from bit PREFIX_SHIFT), and whether it is a real entry."""
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    ok = offs < N
    if HAS_VALID:  # a token's D features share its validity
        ok = ok & (tl.load(valid_ptr + b * svb + offs // D, mask=ok, other=0) != 0)
    if FMT == 0:
        x = tl.abs(tl.load(h_ptr + b * shb + offs, mask=ok, other=0.0).to(tl.float32))
        bits = x.to(tl.int32, bitcast=True)
    else:
        bits = tl.load(h_ptr + b * shb + offs, mask=ok, other=0).to(tl.int32) & 0x7FFF
    return (bits >> SHIFT) & (PBINS - 1), bits >> PREFIX_SHIFT, ok


@triton.jit
def radix_pass_kernel(h_ptr, valid_ptr, count_ptr, hist_ptr, N, T_ALL, D, shb, svb, B,
                      PASS: tl.constexpr, FMT: tl.constexpr, HAS_VALID: tl.constexpr, BLOCK: tl.constexpr,
                      BITS: tl.constexpr, ONEHOT: tl.constexpr, SPREAD: tl.constexpr = 0,
                      LEAN: tl.constexpr = True):
    """Radix pass PASS of the median's selection, for both middle ranks at once: count the BITS-bit digit of the
    |h| bit pattern below the PASS digits already fixed, over the entries of row b whose higher bits match each
    rank's prefix. FMT 0: h read as float32 (any float dtype, upcast exactly), 31 bits; FMT 1 (bf16) and 2
    (fp16): h read as its raw 16 bits (the host passes an int16 view), sign cleared, 15 bits; ceil(bits / BITS)
    passes. The first pass's digit holds what is left over (7 bits of bf16's 15 at BITS=8), and is counted in
    only as many bins as it can take: Triton 3.6's histogram costs ballots and popcounts in proportion to its bins
    (`python -m sinkscope.bench.sass`). Each program strides over many blocks and adds its histograms once (few
    atomics). When both ranks share their prefix (always in the first pass, and almost always later: the two
    middle values are neighbours) one count serves both, in a loop of its own (a loop with both counts needs
    twice the registers: it spilled at BITS=8); otherwise each rank gets its own. ONEHOT, SPREAD: how a block's
    digits are counted (`_count_digits`). LEAN=False: the kernel as it was before session 22 (BINS bins in every
    pass, one loop for both cases), which `bench.gpu --radix` times against."""
    BINS: tl.constexpr = 1 << BITS
    NBITS: tl.constexpr = 31 if FMT == 0 else 15
    NPASS: tl.constexpr = (NBITS + BITS - 1) // BITS
    SHIFT: tl.constexpr = BITS * (NPASS - 1 - PASS)
    WIDTH: tl.constexpr = NBITS - SHIFT if NBITS - SHIFT < BITS else BITS  # this pass's digit width
    PBINS: tl.constexpr = max(1 << WIDTH, min(BINS, 32)) if LEAN else BINS  # bins the digit can take (>= 32)
    PREFIX_SHIFT: tl.constexpr = SHIFT + BITS if PASS > 0 else 0  # the first pass has no prefix (and SHIFT + BITS
    # may be the pattern's whole width there, a shift that is undefined)
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    b = tl.program_id(1).to(tl.int64)  # 64-bit offsets: rows of T * D entries at large B
    p_lo, p_hi, n = _prefixes(hist_ptr, count_ptr, b, B, T_ALL, D, PASS, HAS_VALID, BITS)
    bins = tl.arange(0, PBINS)
    lo_ptr = hist_ptr + ((PASS * B + b) * 2) * BINS + bins  # the first PBINS of each rank's BINS (the rest stay 0)
    hi_ptr = lo_ptr + BINS
    if LEAN and (PASS == 0 or p_lo == p_hi):
        h_one = tl.zeros([PBINS], dtype=tl.int32)
        for start in range(pid * BLOCK, N, nprog * BLOCK):
            digit, high, ok = _digits(h_ptr, valid_ptr, b, shb, svb, start, N, D, PREFIX_SHIFT, SHIFT, FMT, HAS_VALID,
                                      BLOCK, PBINS)
            if PASS > 0:  # no prefix in the first pass
                ok = ok & (high == p_lo)
            h_one += _count_digits(digit, ok, PBINS, ONEHOT, SPREAD, BLOCK)
        tl.atomic_add(lo_ptr, h_one)
        tl.atomic_add(hi_ptr, h_one)
    else:
        h_lo = tl.zeros([PBINS], dtype=tl.int32)
        h_hi = tl.zeros([PBINS], dtype=tl.int32)
        for start in range(pid * BLOCK, N, nprog * BLOCK):
            digit, high, ok = _digits(h_ptr, valid_ptr, b, shb, svb, start, N, D, PREFIX_SHIFT, SHIFT, FMT, HAS_VALID,
                                      BLOCK, PBINS)
            if PASS > 0:
                h_lo += _count_digits(digit, ok & (high == p_lo), PBINS, ONEHOT, SPREAD, BLOCK)
            else:
                h_lo += _count_digits(digit, ok, PBINS, ONEHOT, SPREAD, BLOCK)
            if p_lo != p_hi:  # always, except before session 22 (LEAN=False)
                h_hi += _count_digits(digit, ok & (high == p_hi), PBINS, ONEHOT, SPREAD, BLOCK)
        tl.atomic_add(lo_ptr, h_lo)
        tl.atomic_add(hi_ptr, tl.where(p_lo == p_hi, h_lo, h_hi))


@triton.jit
def _bits_to_float(p, FMT: tl.constexpr):
    """The value of an |h| bit pattern (int32) in the format FMT (see radix_pass_kernel), as float32."""
    if FMT == 0:
        v = p.to(tl.float32, bitcast=True)
    elif FMT == 1:
        v = (p << 16).to(tl.float32, bitcast=True)  # bf16 is the upper half of a float32
    else:
        v = p.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return v


@triton.jit
def radix_final_kernel(hist_ptr, count_ptr, out_ptr, thr_ptr, abs_threshold, rel_threshold, T_ALL, D, B,
                       FMT: tl.constexpr, HAS_VALID: tl.constexpr, BITS: tl.constexpr):
    """The median of row b from the passes (the middle value, or the mean of the two middle values), and the
    massive-activation threshold max(abs_threshold, rel_threshold * median)."""
    b = tl.program_id(0).to(tl.int64)
    NBITS: tl.constexpr = 31 if FMT == 0 else 15
    p_lo, p_hi, n = _prefixes(hist_ptr, count_ptr, b, B, T_ALL, D, (NBITS + BITS - 1) // BITS, HAS_VALID, BITS)
    lo = _bits_to_float(p_lo, FMT)
    hi = _bits_to_float(p_hi, FMT)
    med = tl.where(n % 2 == 1, lo, 0.5 * (lo + hi))
    tl.store(out_ptr + b, med)
    tl.store(thr_ptr + b, tl.maximum(med * rel_threshold, abs_threshold))


@triton.jit
def _abs_bits(x, FMT: tl.constexpr):
    """The bit pattern of |x| (x float32, upcast from the input format FMT: see radix_pass_kernel), as int64 (FMT 0:
    float32's 31 bits) or int32 (bf16 and fp16: their own 15 bits, exact since x came from that format)."""
    if FMT == 0:
        return tl.abs(x).to(tl.int32, bitcast=True).to(tl.int64)
    elif FMT == 1:
        return tl.abs(x).to(tl.int32, bitcast=True) >> 16  # bf16 is the upper half of a float32
    else:
        return tl.abs(x).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)


@triton.jit
def _decode_key(key, BLOCK_D: tl.constexpr, FMT: tl.constexpr):
    """(feature index, signed value) of a `_top_k_rows` key."""
    if FMT == 0:
        j = BLOCK_D - 1 - ((key & 0xFFFFFFFF) >> 1).to(tl.int32)
        v = (key >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    else:
        j = BLOCK_D - 1 - ((key & 0xFFFF) >> 1)
        v = _bits_to_float(key >> 16, FMT)
    return j, tl.where((key & 1) == 1, -v, v)


@triton.jit
def _top_k_rows(x, dm, offs, out_i_ptr, out_v_ptr, rows_ok, K: tl.constexpr, BLOCK_D: tl.constexpr,
                FMT: tl.constexpr):
    """The K largest |x| of each row of x `[ROWS, BLOCK_D]` in descending order: their feature indices (the smallest
    index among exact ties) and the signed values of x there, stored at `out_i_ptr[r] + i` and `out_v_ptr[r] + i`
    (pointers `[ROWS]`); returns each row's largest |x|. One reduction per rank: each entry is one integer key (the
    bits of |x|, which order like the value; then BLOCK_D - 1 - index, so that the smaller index wins a tie; then
    the sign), so a single max finds the value, its index and its sign together. The key is int64 for float32
    input and int32 for bf16 and fp16 (15 bits of |x|, then 15 of index and the sign: BLOCK_D <= 32768), whose
    comparisons cost half as much."""
    if FMT == 0:
        key = (_abs_bits(x, FMT) << 32) | ((BLOCK_D - 1 - offs).to(tl.int64) << 1)[None, :] | (x < 0).to(tl.int64)
    else:
        key = (_abs_bits(x, FMT) << 16) | ((BLOCK_D - 1 - offs) << 1)[None, :] | (x < 0).to(tl.int32)
    key = tl.where(dm[None, :], key, -1)
    kmax = tl.max(key, 1)
    if FMT == 0:
        top = ((kmax >> 32).to(tl.int32)).to(tl.float32, bitcast=True)
    else:
        top = _bits_to_float(kmax >> 16, FMT)
    for i in tl.static_range(K):
        j, v = _decode_key(kmax, BLOCK_D, FMT)
        tl.store(out_i_ptr + i, j, mask=rows_ok)
        tl.store(out_v_ptr + i, v, mask=rows_ok)
        if i + 1 < K:
            key = tl.where(key == kmax[:, None], -1, key)
            kmax = tl.max(key, 1)
    return top


@triton.jit
def token_stats_kernel(h_ptr, a_ptr, m_ptr, first_ptr, thr_ptr, valid_ptr, out_ptr, out_i_ptr,
                       count_ptr, ent_i_ptr, ent_v_ptr, hist_ptr, real_ptr, med_ptr, abs_threshold, rel_threshold,
                       T, D, N, B, shb, sht, sab, sat, smb, smt, svb, layer, cap,
                       K: tl.constexpr, BLOCK_D: tl.constexpr, HAS_VALID: tl.constexpr, ROWS: tl.constexpr,
                       FMT: tl.constexpr, MLP_FMT: tl.constexpr, FROM_HIST: tl.constexpr,
                       RADIX_FMT: tl.constexpr, RADIX_BITS: tl.constexpr):
    """Everything the recorder keeps per token of one block output, in one pass over ROWS rows of h (and of the
    block's mlp_out) of one sample: cos to the sample's first real token (row `first[b]` of h), max |h|, the top-K
    features of |h| and |mlp_out| with their signed values, and the massive entries (|h| >= the sample's
    threshold), appended to a forward-wide buffer at slots reserved by one atomic per program that has any (rows
    are sorted on the host afterwards). The per-token fields go to one float32 buffer (`out_ptr`, and
    `out_i_ptr`, the same memory read as int32, for the feature indices), laid out as
    `kernels.unpack_token_stats` reads it, N = B * T rows. FMT, MLP_FMT: the formats of h and mlp_out (0: keys
    over float32 bits; 1: bf16, 2: fp16, narrower keys: see `_top_k_rows`). FROM_HIST: the radix median's final
    step is done here instead of in `radix_final_kernel` (one launch a layer fewer): every program derives the
    median and the massive threshold from the radix passes' histograms (`hist_ptr`; `real_ptr` the real tokens
    per sample, RADIX_FMT and RADIX_BITS those of the passes), the first program of each sample writes both (to
    `med_ptr` and `thr_ptr`); otherwise the threshold is read from `thr_ptr`."""
    b = tl.program_id(1).to(tl.int64)
    t = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    t_ok = t < T
    row = b * T + t  # [ROWS]
    offs = tl.arange(0, BLOCK_D)
    dm = offs < D
    mask = t_ok[:, None] & dm[None, :]
    x = tl.load(h_ptr + b * shb + t[:, None] * sht + offs[None, :], mask=mask, other=0.0).to(tl.float32)
    y = tl.load(m_ptr + b * smb + t[:, None] * smt + offs[None, :], mask=mask, other=0.0).to(tl.float32)
    first = tl.load(first_ptr + b)
    h0 = tl.load(h_ptr + b * shb + first * sht + offs, mask=dm, other=0.0).to(tl.float32)
    dot = tl.sum(x * h0[None, :], 1)
    nn = tl.sum(x * x, 1) * tl.sum(h0 * h0, 0)
    tl.store(out_ptr + row, dot / tl.sqrt(tl.maximum(nn, 1e-24)), mask=t_ok)  # F.cosine_similarity, eps=1e-12
    top = _top_k_rows(x, dm, offs, out_i_ptr + 2 * N + row * K, out_ptr + (2 + K) * N + row * K, t_ok, K, BLOCK_D,
                      FMT)
    tl.store(out_ptr + N + row, top, mask=t_ok)
    _top_k_rows(y, dm, offs, out_i_ptr + (2 + 2 * K) * N + row * K, out_ptr + (2 + 3 * K) * N + row * K, t_ok, K,
                BLOCK_D, MLP_FMT)
    if FROM_HIST:
        NBITS: tl.constexpr = 31 if RADIX_FMT == 0 else 15
        p_lo, p_hi, n = _prefixes(hist_ptr, real_ptr, b, B, T, D, (NBITS + RADIX_BITS - 1) // RADIX_BITS, HAS_VALID,
                                  RADIX_BITS)
        lo = _bits_to_float(p_lo, RADIX_FMT)
        hi = _bits_to_float(p_hi, RADIX_FMT)
        med = tl.where(n % 2 == 1, lo, 0.5 * (lo + hi))  # as radix_final_kernel
        thr = tl.maximum(med * rel_threshold, abs_threshold)
        if tl.program_id(0) == 0:
            tl.store(med_ptr + b, med)
            tl.store(thr_ptr + b, thr)
    else:
        thr = tl.load(thr_ptr + b)
    row_hit = t_ok & (top >= thr)
    if HAS_VALID:
        row_hit = row_hit & (tl.load(valid_ptr + b * svb + t, mask=t_ok, other=0) != 0)
    if tl.max(row_hit.to(tl.int32), 0) > 0:
        hit = row_hit[:, None] & dm[None, :] & (tl.abs(x) >= thr)
        flat = tl.reshape(hit.to(tl.int32), [ROWS * BLOCK_D])
        base = tl.atomic_add(count_ptr, tl.sum(flat, 0))
        slot = tl.reshape(base + tl.cumsum(flat, 0) - 1, [ROWS, BLOCK_D])
        keep = hit & (slot < cap)
        a = tl.load(a_ptr + b * sab + t[:, None] * sat + offs[None, :], mask=hit, other=0.0).to(tl.float32)
        zero = tl.zeros([ROWS, BLOCK_D], dtype=tl.int32)
        tl.store(ent_i_ptr + slot * 4, zero + layer, mask=keep)
        tl.store(ent_i_ptr + slot * 4 + 1, zero + b.to(tl.int32), mask=keep)
        tl.store(ent_i_ptr + slot * 4 + 2, zero + t.to(tl.int32)[:, None], mask=keep)
        tl.store(ent_i_ptr + slot * 4 + 3, zero + offs[None, :], mask=keep)
        tl.store(ent_v_ptr + slot * 3, x, mask=keep)
        tl.store(ent_v_ptr + slot * 3 + 1, a, mask=keep)
        tl.store(ent_v_ptr + slot * 3 + 2, y, mask=keep)


@triton.jit
def colmax_kernel(h_ptr, m_ptr, valid_ptr, out_ptr, T, D, B, shb, sht, smb, smt, svb, ROWS,
                  HAS_VALID: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per-feature max over (real) tokens of |h| and of |mlp_out|, for one (feature block, sample, run of ROWS
    tokens): a running max over [BLOCK_T, BLOCK_D] tiles, then one atomic max per feature into `out_ptr` (int32
    view of a zeroed [2, B, D] float32 block). On the bit patterns of |x|, which order like the values, so the
    result is exact and independent of the programs' order, and a NaN (whose bits exceed inf's) propagates as in
    torch's max."""
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    t_start = tl.program_id(2) * ROWS
    t_end = tl.minimum(T, t_start + ROWS)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = offs_d < D
    acc_h = tl.zeros([BLOCK_D], dtype=tl.int32)
    acc_m = tl.zeros([BLOCK_D], dtype=tl.int32)
    for t0 in range(t_start, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        ok = offs_t < t_end
        if HAS_VALID:
            ok = ok & (tl.load(valid_ptr + b * svb + offs_t, mask=ok, other=0) != 0)
        mask = ok[:, None] & dm[None, :]
        x = tl.load(h_ptr + b * shb + offs_t[:, None] * sht + offs_d[None, :], mask=mask, other=0.0)
        y = tl.load(m_ptr + b * smb + offs_t[:, None] * smt + offs_d[None, :], mask=mask, other=0.0)
        acc_h = tl.maximum(acc_h, tl.max(tl.abs(x.to(tl.float32)).to(tl.int32, bitcast=True), 0))
        acc_m = tl.maximum(acc_m, tl.max(tl.abs(y.to(tl.float32)).to(tl.int32, bitcast=True), 0))
    tl.atomic_max(out_ptr + b * D + offs_d, acc_h, mask=dm)
    tl.atomic_max(out_ptr + (B + b) * D + offs_d, acc_m, mask=dm)
