/* The CPU recorder's per-layer reductions: one pass over a sample's block output and one over its MLP output.
 *
 * sinkscope/record/fused_cpu.py compiles this file with the system's C compiler at the first CPU recording, loads
 * it with ctypes and documents what each pass computes; tests/test_fused_cpu.py checks every field against the
 * torch reductions of sinkscope/record/reduce.py. Arrays are C-contiguous: h and m [T, D] float32, valid [T] bytes,
 * top indices int32 and top values float32 [T, K], cos and max_abs [T], feature maxima [D], band float32, candidate
 * tokens int64.
 *
 * Built with reassociation (so that the sums vectorise) but without -ffinite-math-only: a NaN or an infinity still
 * shows in a row's sum of squares, and the pass stops and reports it instead of mis-ranking the row. Built for a
 * CPU with AVX-512, the top-k and the median's band take routes through register compression first (same
 * results; the portable code decides whenever a route declines a row).
 */
#include <math.h>
#include <stdint.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define GROUP 32          /* runs of the top-k scan (faster than 16, 64 and 96 on SmolLM2's activations) */
#define ABS_MASK 0x7FFFFFFF /* the low 31 bits of a float32 order like |x| as an integer (NaN excluded) */
#define MAX_K 256         /* the largest top-k the passes take (fused_cpu.MAX_K) */

static inline int32_t abs_bits(const int32_t *bits, int64_t j) { return bits[j] & ABS_MASK; }

/* Insert key a at index j into the top list (key descending, index ascending) of length k; the last entry drops. */
static inline void insert(int32_t *tv, int64_t *ti, int32_t a, int64_t j, int k) {
    int p = k - 1;
    while (p > 0 && (tv[p - 1] < a || (tv[p - 1] == a && ti[p - 1] > j))) {
        tv[p] = tv[p - 1];
        ti[p] = ti[p - 1];
        p--;
    }
    tv[p] = a;
    ti[p] = j;
}

/* Offer key a at index j to the top list, whose last entry is (kv, kj): it enters if it beats that entry (ties: the
 * lower index). kv and kj are the caller's locals, so that they stay in registers once this is inlined. */
static inline void offer(int32_t *tv, int64_t *ti, int k, int32_t a, int64_t j, int32_t *kv, int64_t *kj) {
    if (a > *kv || (a == *kv && j < *kj)) {
        insert(tv, ti, a, j, k);
        *kv = tv[k - 1];
        *kj = ti[k - 1];
    }
}

/* The top list's indices and signed values into out_i and out_v; returns its largest key. */
static inline int32_t emit(const int32_t *tv, const int64_t *ti, int k, const float *row, int32_t *out_i,
                           float *out_v) {
    for (int q = 0; q < k; q++) {
        out_i[q] = (int32_t)ti[q];
        out_v[q] = row[ti[q]];
    }
    return tv[0];
}

/* The k largest |row| entries (value descending, index ascending) into out_i and out_v (signed values); returns
 * max |row| as float32 bits. The row is read as runs of s entries: each column's max over the runs (and the run it
 * is in) first, the k largest column maxima start the list, and only the columns whose max reaches its k-th key
 * are scanned for more. */
static int32_t row_topk_scan(const float *row, const int32_t *bits, int64_t d, int k, int32_t *tv, int64_t *ti,
                             int32_t *out_i, float *out_v) {
    const int64_t s = d < GROUP ? d : GROUP;
    const int64_t r_n = d / s;
    int32_t gm[GROUP], gr[GROUP];
    for (int64_t c = 0; c < s; c++) {
        gm[c] = abs_bits(bits, c);
        gr[c] = 0;
    }
    for (int64_t r = 1; r < r_n; r++) {
        const int32_t *seg = bits + r * s;
        for (int64_t c = 0; c < s; c++) {
            int32_t v = seg[c] & ABS_MASK;
            int g = v > gm[c];
            gm[c] = g ? v : gm[c];
            gr[c] = g ? (int32_t)r : gr[c];
        }
    }
    for (int q = 0; q < k; q++) {
        tv[q] = -1;
        ti[q] = d;
    }
    int32_t kv = -1;
    int64_t kj = d;
    for (int64_t c = 0; c < s; c++) /* the k largest column maxima (ties: lower index first) */
        offer(tv, ti, k, gm[c], (int64_t)gr[c] * s + c, &kv, &kj);
    for (int64_t c = 0; c < s; c++) { /* columns that may hold more of the k largest (their max is listed) */
        if (gm[c] < kv) continue;
        for (int64_t r = 0; r < r_n; r++) {
            if (r == gr[c]) continue;
            offer(tv, ti, k, abs_bits(bits, r * s + c), r * s + c, &kv, &kj);
        }
    }
    for (int64_t j = r_n * s; j < d; j++) offer(tv, ti, k, abs_bits(bits, j), j, &kv, &kj); /* the tail */
    return emit(tv, ti, k, row, out_i, out_v);
}

#ifdef __AVX512F__
#define CAND 64 /* candidates row_topk_avx512 sorts; a row with more at its threshold (ties) takes the scan */

/* row_topk_scan's result through a threshold, for 32 <= d and k <= 16 (returns 0, and the scan decides, otherwise).
 * The maxima of 8 (k <= 8) or 16 disjoint groups of columns are distinct entries, so the smallest of them, tau,
 * is reached by at least k entries and every one of the row's k largest reaches it. One pass compresses the
 * indices of the entries reaching tau into a list (in index order; usually a few more than k), whose k largest
 * are then sorted as in the scan. */
static int row_topk_avx512(const float *row, const int32_t *bits, int64_t d, int k, int32_t *tv, int64_t *ti,
                           int32_t *out_i, float *out_v, int32_t *top) {
    if (d < GROUP || k > 16) return 0;
    const int64_t r_n = d / GROUP;
    const __m512i absm = _mm512_set1_epi32(ABS_MASK);
    __m512i g0 = _mm512_and_si512(_mm512_loadu_si512(bits), absm);
    __m512i g1 = _mm512_and_si512(_mm512_loadu_si512(bits + 16), absm);
    for (int64_t r = 1; r < r_n; r++) {
        g0 = _mm512_max_epi32(g0, _mm512_and_si512(_mm512_loadu_si512(bits + r * GROUP), absm));
        g1 = _mm512_max_epi32(g1, _mm512_and_si512(_mm512_loadu_si512(bits + r * GROUP + 16), absm));
    }
    __m512i g = _mm512_max_epi32(g0, g1); /* 16 groups: columns c and c + 16 */
    int32_t tau;
    if (k <= 8) /* 8 groups: columns c, c + 8, c + 16, c + 24 */
        tau = _mm512_mask_reduce_min_epi32(0x00FF, _mm512_max_epi32(g, _mm512_shuffle_i32x4(g, g, 0x4E)));
    else
        tau = _mm512_reduce_min_epi32(g);
    const __m512i vt = _mm512_set1_epi32(tau), step = _mm512_set1_epi32(16);
    __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    int32_t cand[CAND + 16];
    int n = 0;
    int64_t j = 0;
    for (; j + 16 <= d; j += 16) { /* branch-free: every chunk stores, the count moves by its hits */
        if (n > CAND) return 0;
        __mmask16 hit = _mm512_cmpge_epi32_mask(_mm512_and_si512(_mm512_loadu_si512(bits + j), absm), vt);
        _mm512_storeu_si512(cand + n, _mm512_maskz_compress_epi32(hit, idx));
        n += __builtin_popcount((unsigned)hit);
        idx = _mm512_add_epi32(idx, step);
    }
    for (; j < d; j++) {
        if (n > CAND) return 0;
        cand[n] = (int32_t)j;
        n += abs_bits(bits, j) >= tau;
    }
    if (n > CAND) return 0;
    for (int q = 0; q < k; q++) {
        tv[q] = -1;
        ti[q] = d;
    }
    int32_t kv = -1;
    int64_t kj = d;
    for (int q = 0; q < n; q++) offer(tv, ti, k, abs_bits(bits, cand[q]), cand[q], &kv, &kj);
    *top = emit(tv, ti, k, row, out_i, out_v);
    return 1;
}
#endif

/* The k largest |row| entries (value descending, index ascending) into out_i and out_v; returns max |row| as
 * float32 bits. */
static int32_t row_topk(const float *row, const int32_t *bits, int64_t d, int k, int32_t *tv, int64_t *ti,
                        int32_t *out_i, float *out_v) {
#ifdef __AVX512F__
    int32_t top;
    if (row_topk_avx512(row, bits, d, k, tv, ti, out_i, out_v, &top)) return top;
#endif
    return row_topk_scan(row, bits, d, k, tv, ti, out_i, out_v);
}

/* A row's sum of squares in float64 (and its dot product with h0 when h0 is given). */
static inline double sums(const float *row, const float *h0, int64_t d, double *dot) {
    double sq = 0.0, dt = 0.0;
    if (h0) {
        for (int64_t j = 0; j < d; j++) {
            double x = (double)row[j];
            dt += x * (double)h0[j];
            sq += x * x;
        }
    } else {
        for (int64_t j = 0; j < d; j++) {
            double x = (double)row[j];
            sq += x * x;
        }
    }
    *dot = dt;
    return sq;
}

/* One sample's block output h [T, D]. Fills top_i/top_v [T, K], max_abs and cos [T], feat_max [D] (max over real
 * tokens; the caller zeroes it), band (the |h| of real tokens in [lo, hi], while it has room for a whole row) and
 * cand (real tokens whose max |h| reaches cand_min). res: entries below lo, entries in the band, candidates,
 * whether the band overflowed. Returns 0 when a row holds a NaN or an infinity (res then incomplete), else 1. */
int h_pass(const float *restrict h, const uint8_t *restrict valid, int64_t t_len, int64_t d, int k,
           const float *restrict h0, float lo, float hi, float cand_min, float *restrict band, int64_t cap,
           int32_t *restrict top_i, float *restrict top_v, float *restrict max_abs, float *restrict cos_out,
           float *restrict feat_max, int64_t *restrict cand, int64_t *restrict res) {
    if (k < 1 || k > MAX_K || k > d) return 0;
    const int32_t *bits = (const int32_t *)h;
    double n0 = 0.0;
    for (int64_t j = 0; j < d; j++) n0 += (double)h0[j] * (double)h0[j];
    n0 = fmax(sqrt(n0), 1e-12);
    int32_t tv[MAX_K];
    int64_t ti[MAX_K];
    int32_t cand_bits;
    __builtin_memcpy(&cand_bits, &cand_min, 4);
    int64_t below = 0, nb = 0, nc = 0, overflow = 0;
    for (int64_t t = 0; t < t_len; t++) {
        const float *row = h + t * d;
        double dot;
        double sq = sums(row, h0, d, &dot);
        if (!isfinite(sq)) return 0;
        cos_out[t] = (float)(dot / (fmax(sqrt(sq), 1e-12) * n0));
        int32_t top = row_topk(row, bits + t * d, d, k, tv, ti, top_i + t * k, top_v + t * k);
        max_abs[t] = fabsf(row[ti[0]]);
        if (!valid[t]) continue;
        int64_t c = 0;
        for (int64_t j = 0; j < d; j++) {
            float a = fabsf(row[j]);
            feat_max[j] = a > feat_max[j] ? a : feat_max[j];
            c += a < lo;
        }
        below += c;
        if (nb + d < cap) { /* branch-free store: every entry is written, the count moves for those inside */
            int64_t j = 0;
#ifdef __AVX512F__
            const __m512 vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi);
            for (; j + 16 <= d; j += 16) { /* compressed in a register, then stored whole (room: nb + d < cap) */
                __m512 a = _mm512_abs_ps(_mm512_loadu_ps(row + j));
                __mmask16 in = _mm512_cmp_ps_mask(a, vlo, _CMP_GE_OQ) & _mm512_cmp_ps_mask(a, vhi, _CMP_LE_OQ);
                _mm512_storeu_ps(band + nb, _mm512_maskz_compress_ps(in, a));
                nb += __builtin_popcount((unsigned)in);
            }
#endif
            for (; j < d; j++) {
                float a = fabsf(row[j]);
                band[nb] = a;
                nb += (a >= lo) & (a <= hi);
            }
        } else {
            overflow = 1;
            for (int64_t j = 0; j < d; j++) {
                float a = fabsf(row[j]);
                nb += (a >= lo) & (a <= hi);
            }
        }
        if (top >= cand_bits) cand[nc++] = t;
    }
    res[0] = below;
    res[1] = nb;
    res[2] = nc;
    res[3] = overflow;
    return 1;
}

/* One sample's MLP output m [T, D]: top_i/top_v [T, K] and feat_max [D] (over real tokens; the caller zeroes it).
 * Returns 0 when a row holds a NaN or an infinity, else 1. */
int m_pass(const float *restrict m, const uint8_t *restrict valid, int64_t t_len, int64_t d, int k,
           int32_t *restrict top_i, float *restrict top_v, float *restrict feat_max) {
    if (k < 1 || k > MAX_K || k > d) return 0;
    const int32_t *bits = (const int32_t *)m;
    int32_t tv[MAX_K];
    int64_t ti[MAX_K];
    for (int64_t t = 0; t < t_len; t++) {
        const float *row = m + t * d;
        double dot;
        if (!isfinite(sums(row, 0, d, &dot))) return 0;
        row_topk(row, bits + t * d, d, k, tv, ti, top_i + t * k, top_v + t * k);
        if (!valid[t]) continue;
        for (int64_t j = 0; j < d; j++) {
            float a = fabsf(row[j]);
            feat_max[j] = a > feat_max[j] ? a : feat_max[j];
        }
    }
    return 1;
}
