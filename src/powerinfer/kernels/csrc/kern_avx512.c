/* AVX-512 (F/BW/VL/DQ + VNNI) kernels. Compiled for that target per file and reached only through the
 * dispatch table after __builtin_cpu_supports says yes, so one build runs on any x86-64.
 *
 * Packed kernels put one weight row in each of the 16 zmm lanes (see pi_mat): per 32-value block and
 * 16 rows, 4 (Q4) or 8 (Q8_0) 64-byte loads, 8 vpdpbusd against broadcast activation dwords, one
 * scale vector, no horizontal sums. That is ~5x fewer instructions per weight than the row-wise ggml
 * form, which is compute-bound on this core (kernel_bench, SmolLM2 gate 1536x576 in cache: Q4_1 rows
 * 15 GB/s vs packed 90-105 GB/s), so decode is bound by DRAM bandwidth instead. The stream is software-
 * prefetched ahead (pi_pf_distance in pi.h). Tokens are register-blocked 4 at a time for prefill (weights
 * unpacked once per 4 tokens). The GGUF-row kernels below serve matvec on unpacked weights. */
#include "pi.h"

#if defined(PI_X86)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,bmi2")
#include <immintrin.h>

#define AI static inline __attribute__((always_inline))

AI void pf_lines(const uint8_t *p, const uint8_t *end, size_t n) {
    for (size_t k = 0; k < n && p + k < end; k += 64) _mm_prefetch((const char *)p + k, _MM_HINT_T0);
}

AI float h2f(uint16_t h) { return _cvtsh_ss(h); }
AI int32_t ld32(const void *p) { int32_t v; memcpy(&v, p, 4); return v; }
AI __m512i bc(const int8_t *p) { return _mm512_set1_epi32(ld32(p)); }

AI float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* ---- activation quantization (same arithmetic as the portable one; cvtps2dq rounds half to even) ---- */
static void quant_q8(const float *x, int nblocks, int8_t *qs, float *d, float *s, int32_t *sum) {
    const __m512 sign = _mm512_set1_ps(-0.0f);
    for (int b = 0; b < nblocks; b++, x += PI_QK, qs += PI_QK) {
        const __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, x0), _mm512_andnot_ps(sign, x1)));
        if (!(amax <= 3.4e38f) || _mm512_cmp_ps_mask(x0, x1, _CMP_UNORD_Q)) { /* inf, or a NaN max_ps may skip */
            pi_q8_nonfinite(qs, d + b, s + b, sum + b);
            continue;
        }
        const float dd = amax / 127.0f;
        const __m512 id = _mm512_set1_ps(amax != 0.0f ? 127.0f / amax : 0.0f);
        const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, id));
        const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, id));
        _mm_storeu_si128((__m128i *)qs, _mm512_cvtepi32_epi8(q0));
        _mm_storeu_si128((__m128i *)(qs + 16), _mm512_cvtepi32_epi8(q1));
        const int isum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
        d[b] = h2f(_cvtss_sh(dd, 0));
        s[b] = h2f(_cvtss_sh(dd * (float)isum, 0));
        sum[b] = isum;
    }
}

/* Rows arrive in index order, each a short stream (SmolLM2: 612 B of Q8_0), so the hardware prefetcher has
 * nothing to run ahead on: while a pass reads its 4 rows, the rows PF_ROWS positions later are prefetched,
 * spread over the pass in step with its own reads (PF_ROWS = 8: two passes ahead, ~100 ns at SmolLM2 sizes). */
#define PF_ROWS 8
/* Rows per pass of the block-format kernels: 8 streams in flight (vs 4, 7B s=0.9 from DRAM: row-sparse dot
 * Q8_0/Q4_0 22 -> 24.5 GB/s). */
#define PAIR_ROWS 8
AI void row_prefetch_ptrs(const pi_mat *m, const int32_t *idx, int n, int j, const uint8_t *pf[4]) {
    for (int k = 0; k < 4; k++) pf[k] = j + k < n ? m->raw + (size_t)PI_ROW(idx, j + k) * m->row_bytes : NULL;
}
AI void row_prefetch(const uint8_t *const pf[4], size_t off) {
    for (int k = 0; k < 4; k++)
        if (pf[k]) _mm_prefetch((const char *)pf[k] + off, _MM_HINT_T0);
}
/* Prefetch each 64-byte line of the rows ahead once: at offset 0, and whenever a step of `step` bytes starting
 * at `off` ends in a new line. Redundant prefetches cost: one per Q4_0 block (3.5 per line) held the row-sparse
 * dot at 17 GB/s, one per line 24 GB/s (7B, s=0.9, from DRAM). */
AI void row_prefetch_lines(const uint8_t *const pf[4], size_t off, size_t step) {
    if (off == 0) row_prefetch(pf, 0);
    if ((off >> 6) != ((off + step) >> 6)) row_prefetch(pf, off + step);
}

/* ---- raw layout: 4 rows per pass, one 32-value block per ymm (ggml's form, with VNNI) ---- */
AI __m256i unpack_q4(const uint8_t *qs) { /* 16 bytes -> 32 nibbles in element order */
    const __m128i v = _mm_loadu_si128((const __m128i *)qs);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), _mm256_set1_epi8(0x0F));
}
AI __m256i lane0(int v) { return _mm256_zextsi128_si256(_mm_cvtsi32_si128(v)); }

#define ROWS4(NAME, BLK, BODY)                                                                          \
    static void NAME(const pi_mat *m, const int32_t *idx, int r0, int r1, const pi_act *a, float *y) {                       \
        const int nb = m->cols / PI_QK;                                                                  \
        int r = r0;                                                                                      \
        for (; r + 4 <= r1; r += 4) {                                                                    \
            const BLK *w[4];                                                                             \
            __m256 acc[4];                                                                               \
            float accm[4] = {0, 0, 0, 0};                                                                \
            _Pragma("GCC unroll 16") for (int j = 0; j < 4; j++) {                                                                \
                w[j] = (const BLK *)(m->raw + (size_t)PI_ROW(idx, r + j) * m->row_bytes);                           \
                acc[j] = _mm256_setzero_ps();                                                            \
            }                                                                                            \
            const uint8_t *pf[4];                                                                        \
            row_prefetch_ptrs(m, idx, r1, r + PF_ROWS, pf);                                              \
            for (int b = 0; b < nb; b++) {                                                               \
                if (idx) row_prefetch_lines(pf, (size_t)b * sizeof(BLK), sizeof(BLK));                   \
                const __m256i x = _mm256_loadu_si256((const __m256i *)(a->qs + b * PI_QK));              \
                const float dx = a->d[b];                                                                \
                _Pragma("GCC unroll 16") for (int j = 0; j < 4; j++) { const BLK *wb = w[j] + b; BODY }                           \
            }                                                                                            \
            _Pragma("GCC unroll 16") for (int j = 0; j < 4; j++) y[r + j] = hsum256(acc[j]) + accm[j];                            \
        }                                                                                                \
        for (; r < r1; r++) {                                                                            \
            const BLK *w0 = (const BLK *)(m->raw + (size_t)PI_ROW(idx, r) * m->row_bytes);                            \
            __m256 acc[1] = {_mm256_setzero_ps()};                                                       \
            float accm[1] = {0};                                                                         \
            for (int b = 0; b < nb; b++) {                                                               \
                const __m256i x = _mm256_loadu_si256((const __m256i *)(a->qs + b * PI_QK));              \
                const float dx = a->d[b];                                                                \
                const int j = 0;                                                                         \
                const BLK *wb = w0 + b;                                                                  \
                BODY                                                                                     \
            }                                                                                            \
            y[r] = hsum256(acc[0]) + accm[0];                                                            \
        }                                                                                                \
    }

ROWS4(rows_q4_0_1, pi_blk_q4_0,
      {
          __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), unpack_q4(wb->qs), x);
          p = _mm256_sub_epi32(p, lane0(8 * a->sum[b]));
          acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(h2f(wb->d) * dx), acc[j]);
      })

ROWS4(rows_q4_1_1, pi_blk_q4_1,
      {
          const __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), unpack_q4(wb->qs), x);
          acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(h2f(wb->d) * dx), acc[j]);
          accm[j] += h2f(wb->m) * a->s[b];
      })

ROWS4(rows_q8_0_1, pi_blk_q8_0,
      {
          const __m256i wq = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)wb->qs), _mm256_set1_epi8((char)0x80));
          __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), wq, x);
          p = _mm256_sub_epi32(p, lane0(128 * a->sum[b]));
          acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(h2f(wb->d) * dx), acc[j]);
      })

/* ---- raw layout, zmm: two 32-value blocks per instruction, PAIR_ROWS rows per pass ----
 * The 64 activation bytes of blocks b, b+1 are contiguous, so one zmm of weights covers both blocks: Q8_0 as two
 * 32-byte loads, Q4 as [lo(b), hi(b), lo(b+1), hi(b+1)] nibble lanes (a 64-bit permute and a per-lane shift).
 * vpdpbusd's lanes 0-7 then hold block b's partial dots and 8-15 block b+1's, so one conversion and one fma with
 * the per-lane scale [d_b dx_b x8, d_b+1 dx_b+1 x8] finish both; the x offset terms (Q4_0: -8 sum x, Q8_0 stored
 * +128: -128 sum x) start the accumulator. About half the instructions of the one-block ymm form, which makes the
 * row-sparse dot DRAM-bound instead of compute-bound (sparse_kernel_bench). Used when the block count is even. */
#define PI_MAX_PAIRS 256

AI __m512i q4_pair(const uint8_t *qs0, const uint8_t *qs1) {
    const __m256i two = _mm256_set_m128i(_mm_loadu_si128((const __m128i *)qs1), _mm_loadu_si128((const __m128i *)qs0));
    const __m512i z = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 1, 0, 1, 2, 3, 2, 3), _mm512_castsi256_si512(two));
    const long long s4 = 0x0004000400040004LL;
    return _mm512_and_si512(_mm512_srlv_epi16(z, _mm512_setr_epi64(0, 0, s4, s4, 0, 0, s4, s4)),
                            _mm512_set1_epi8(0x0F));
}

AI __m512 pair_scale(uint16_t d0, uint16_t d1) {
    return _mm512_cvtph_ps(_mm256_set_m128i(_mm_set1_epi16((short)d1), _mm_set1_epi16((short)d0)));
}

/* QT: 0 = Q4_0, 1 = Q4_1, 2 = Q8_0 */
AI void rows_pairs(const pi_mat *m, const int32_t *idx, int r0, int r1, const pi_act *a, float *y, const int QT) {
    const int nb = m->cols / PI_QK, np = nb / 2;
    __m512i init[PI_MAX_PAIRS];
    __m512 dxv[PI_MAX_PAIRS];
    for (int p = 0; p < np; p++) {
        const int k = QT == 0 ? -8 : QT == 2 ? -128 : 0;
        init[p] = _mm512_setr_epi32(k * a->sum[2 * p], 0, 0, 0, 0, 0, 0, 0, k * a->sum[2 * p + 1], 0, 0, 0, 0, 0, 0, 0);
        dxv[p] = _mm512_insertf32x8(_mm512_set1_ps(a->d[2 * p]), _mm256_set1_ps(a->d[2 * p + 1]), 1);
    }
    const size_t bs = QT == 2 ? sizeof(pi_blk_q8_0) : QT == 1 ? sizeof(pi_blk_q4_1) : sizeof(pi_blk_q4_0);
    for (int r = r0; r < r1; r += PAIR_ROWS) {
        const int nr = r1 - r < PAIR_ROWS ? r1 - r : PAIR_ROWS;
        const uint8_t *w[PAIR_ROWS];
        __m512 acc[PAIR_ROWS];
        float accm[PAIR_ROWS] = {0};
        _Pragma("GCC unroll 8") for (int j = 0; j < PAIR_ROWS; j++) {
            w[j] = m->raw + (size_t)PI_ROW(idx, r + (j < nr ? j : 0)) * m->row_bytes;
            acc[j] = _mm512_setzero_ps();
        }
        const uint8_t *pf[4], *pg[4];
        row_prefetch_ptrs(m, idx, r1, r + PF_ROWS, pf);
        row_prefetch_ptrs(m, idx, r1, r + PF_ROWS + 4, pg);
        for (int p = 0; p < np; p++) {
            if (idx) {
                row_prefetch_lines(pf, (size_t)(2 * p) * bs, bs);
                row_prefetch_lines(pf, (size_t)(2 * p + 1) * bs, bs);
                if (PAIR_ROWS > 4) {
                    row_prefetch_lines(pg, (size_t)(2 * p) * bs, bs);
                    row_prefetch_lines(pg, (size_t)(2 * p + 1) * bs, bs);
                }
            }
            const __m512i x = _mm512_loadu_si512(a->qs + (size_t)p * 64);
            _Pragma("GCC unroll 8") for (int j = 0; j < PAIR_ROWS; j++) {
                const uint8_t *b0 = w[j] + (size_t)(2 * p) * bs, *b1 = b0 + bs;
                __m512i wq;
                uint16_t d0, d1;
                memcpy(&d0, b0, 2);
                memcpy(&d1, b1, 2);
                if (QT == 2) {
                    wq = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(b0 + 2))),
                                            _mm256_loadu_si256((const __m256i *)(b1 + 2)), 1);
                    wq = _mm512_xor_si512(wq, _mm512_set1_epi8((char)0x80));
                } else {
                    const int off = QT == 1 ? 4 : 2;
                    wq = q4_pair(b0 + off, b1 + off);
                    if (QT == 1) {
                        uint16_t m0, m1;
                        memcpy(&m0, b0 + 2, 2);
                        memcpy(&m1, b1 + 2, 2);
                        accm[j] += h2f(m0) * a->s[2 * p] + h2f(m1) * a->s[2 * p + 1];
                    }
                }
                const __m512i isum = _mm512_dpbusd_epi32(init[p], wq, x);
                acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(pair_scale(d0, d1), dxv[p]), acc[j]);
            }
        }
        for (int j = 0; j < nr; j++) y[r + j] = _mm512_reduce_add_ps(acc[j]) + accm[j];
    }
}

#define ROWS_DISPATCH(NAME, QT)                                                                          \
    static void NAME(const pi_mat *m, const int32_t *idx, int r0, int r1, const pi_act *a, float *y) {  \
        const int nb = m->cols / PI_QK;                                                                  \
        if (nb % 2 == 0 && nb / 2 <= PI_MAX_PAIRS) rows_pairs(m, idx, r0, r1, a, y, QT);               \
        else NAME##_1(m, idx, r0, r1, a, y);                                                             \
    }
ROWS_DISPATCH(rows_q4_0, 0)
ROWS_DISPATCH(rows_q4_1, 1)
ROWS_DISPATCH(rows_q8_0, 2)

/* ---- raw layout, float formats: 4 rows x 16 columns per step, masked tail ---- */
AI __m512 ld_f16(const uint16_t *p, __mmask16 k) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p)); }
AI __m512 ld_bf16(const uint16_t *p, __mmask16 k) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)), 16));
}
AI __m512 ld_f32(const float *p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }

#define ROWSF(NAME, T, XP, LD)                                                                           \
    static void NAME(const pi_mat *m, const int32_t *idx, int r0, int r1, const pi_act *a, float *y) {                       \
        const int n = m->cols;                                                                           \
        const T *xv = XP;                                                                                \
        int r = r0;                                                                                      \
        for (; r < r1; r += 4) {                                                                         \
            const int nr = r1 - r < 4 ? r1 - r : 4;                                                      \
            const T *w[4];                                                                               \
            __m512 acc[4];                                                                               \
            _Pragma("GCC unroll 16") for (int j = 0; j < 4; j++) {                                                                \
                w[j] = (const T *)(m->raw + (size_t)PI_ROW(idx, r + (j < nr ? j : 0)) * m->row_bytes);              \
                acc[j] = _mm512_setzero_ps();                                                            \
            }                                                                                            \
            const uint8_t *pf[4];                                                                        \
            row_prefetch_ptrs(m, idx, r1, r + PF_ROWS, pf);                                              \
            for (int c = 0; c < n; c += 16) {                                                            \
                const __mmask16 k = n - c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - c)) - 1); \
                if (idx) row_prefetch_lines(pf, (size_t)c * sizeof(T), 16 * sizeof(T));                  \
                const __m512 x = LD(xv + c, k);                                                          \
                _Pragma("GCC unroll 16") for (int j = 0; j < 4; j++) acc[j] = _mm512_fmadd_ps(LD(w[j] + c, k), x, acc[j]);       \
            }                                                                                            \
            for (int j = 0; j < nr; j++) y[r + j] = _mm512_reduce_add_ps(acc[j]);                        \
        }                                                                                                \
    }

ROWSF(rows_f16, uint16_t, a->h, ld_f16)
ROWSF(rows_bf16, uint16_t, a->bh, ld_bf16)
ROWSF(rows_f32_4, float, a->f, ld_f32)

/* The line `ahead` bytes into each of a pass's 4 row streams (`span` bytes long), or past their end the same
 * distance into the next pass's rows `nx` (NULL: none). */
AI void prefetch_ahead4(const char *const w[4], const char *const nx[4], size_t ahead, size_t span) {
    if (ahead < span) {
        for (int k = 0; k < 4; k++) _mm_prefetch(w[k] + ahead, _MM_HINT_T0);
    } else {
        for (int k = 0; k < 4; k++)
            if (nx[k]) _mm_prefetch(nx[k] + (ahead - span), _MM_HINT_T0);
    }
}

/* F32 rows of 2 KiB and more (7B: 16 KiB), 4 per pass, each line prefetched ROW_PF_BYTES ahead in the same rows,
 * running on into the next pass's rows near the end, instead of the same columns two passes later (7B s=0.9 from
 * DRAM: 1 thread 27.4 -> 32.5 GB/s, 2 threads 54 -> 63.5 GB/s when the host gives 80; one row at a time with 6
 * KiB ahead reached 29.8 and 58; 4 KiB ahead 30.6). F16/BF16 rows stay as they are: converting the rows binds
 * them (F16 26.9 GB/s this way vs 29 GB/s). */
#define ROW_PF_BYTES 2048
static void rows_f32(const pi_mat *m, const int32_t *idx, int r0, int r1, const pi_act *a, float *y) {
    const int n = m->cols;
    const size_t rb = (size_t)n * sizeof(float);
    if (!idx || n % 16 || rb < ROW_PF_BYTES) {
        rows_f32_4(m, idx, r0, r1, a, y);
        return;
    }
    const float *xv = a->f;
    const __mmask16 all = 0xFFFF;
    for (int r = r0; r < r1; r += 4) {
        const int nr = r1 - r < 4 ? r1 - r : 4;
        const float *w[4];
        const char *nx[4];
        __m512 acc[4];
        for (int k = 0; k < 4; k++) {
            w[k] = (const float *)(m->raw + (size_t)PI_ROW(idx, r + (k < nr ? k : 0)) * m->row_bytes);
            nx[k] = r + 4 + k < r1 ? (const char *)(m->raw + (size_t)PI_ROW(idx, r + 4 + k) * m->row_bytes) : NULL;
            acc[k] = _mm512_setzero_ps();
        }
        for (int c = 0; c < n; c += 16) {
            const size_t ahead = (size_t)c * sizeof(float) + ROW_PF_BYTES;
            if (((ahead - 1) >> 6) != ((ahead + 16 * sizeof(float) - 1) >> 6))
                prefetch_ahead4((const char *const *)w, nx, ahead, rb);
            const __m512 x = ld_f32(xv + c, all);
            for (int k = 0; k < 4; k++) acc[k] = _mm512_fmadd_ps(ld_f32(w[k] + c, all), x, acc[k]);
        }
        for (int k = 0; k < nr; k++) y[r + k] = _mm512_reduce_add_ps(acc[k]);
    }
}

/* ---- neuron-major axpy (down_t, gate_t/up_t): y[c0..c1) += sum_j h[j] W[idx[j]][c0..c1) ----
 * 4 rows per pass (4 independent streams in flight), the y range reloaded per pass from L1. Block formats:
 * 8 rows per pass; per 32-value block, y += (h_j d_j) q_j, with Q4_0's -8 in the nibble table and Q4_1's
 * h_j m_j summed into one per-block offset added once per pass. Rows past n repeat row 0 with h = 0. */
AI __mmask16 tail16(int left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1); }

#define AXPY_SETUP(T)                                                                                    \
    const int nr = n - j < 4 ? n - j : 4;                                                                \
    const T *w[4];                                                                                       \
    float hs[4];                                                                                         \
    _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) {                                                \
        w[k] = (const T *)(m->raw + (size_t)idx[j + (k < nr ? k : 0)] * m->row_bytes);                  \
        hs[k] = k < nr ? h[j + k] : 0.0f;                                                                \
    }                                                                                                    \
    const uint8_t *pf[4];                                                                                \
    row_prefetch_ptrs(m, idx, n, j + PF_ROWS, pf);

#define AXPYF(NAME, T, LD)                                                                               \
    static void NAME(const pi_mat *m, const int32_t *idx, const float *h, int n, int c0, int c1, float *y) { \
        for (int j = 0; j < n; j += 4) {                                                                 \
            AXPY_SETUP(T)                                                                                \
            const __m512 h0 = _mm512_set1_ps(hs[0]), h1 = _mm512_set1_ps(hs[1]);                        \
            const __m512 h2 = _mm512_set1_ps(hs[2]), h3 = _mm512_set1_ps(hs[3]);                        \
            for (int c = c0; c < c1; c += 16) {                                                          \
                const __mmask16 km = tail16(c1 - c);                                                     \
                row_prefetch_lines(pf, (size_t)c * sizeof(T), 16 * sizeof(T));                          \
                __m512 acc = _mm512_maskz_loadu_ps(km, y + c);                                           \
                acc = _mm512_fmadd_ps(LD(w[0] + c, km), h0, acc);                                        \
                acc = _mm512_fmadd_ps(LD(w[1] + c, km), h1, acc);                                        \
                acc = _mm512_fmadd_ps(LD(w[2] + c, km), h2, acc);                                        \
                acc = _mm512_fmadd_ps(LD(w[3] + c, km), h3, acc);                                        \
                _mm512_mask_storeu_ps(y + c, km, acc);                                                   \
            }                                                                                            \
        }                                                                                                \
    }
AXPYF(axpy_rows_f32_4, float, ld_f32)
AXPYF(axpy_rows_f16_4, uint16_t, ld_f16)
AXPYF(axpy_rows_bf16_4, uint16_t, ld_bf16)

/* Float column ranges of 2 KiB and more: the 4 rows' lines prefetched AXPY_PF_BYTES ahead, running on into the
 * next pass's rows near the end, instead of the same columns two passes later (7B s=0.9 from DRAM, 1 thread:
 * F32 28 -> 35.5 GB/s, 1, 2, 3 and 6 KiB ahead gave 33.5, 35.6, 35.3 and 33.0; F16 and BF16 28 -> 32). */
#define AXPY_PF_BYTES 2048
#define AXPY_LONG(NAME, T, LD, SHORT)                                                                    \
    static void NAME(const pi_mat *m, const int32_t *idx, const float *h, int n, int c0, int c1, float *y) { \
        const size_t span = (size_t)(c1 - c0) * sizeof(T);                                               \
        if ((c1 - c0) % 16 || span < AXPY_PF_BYTES) {                                                    \
            SHORT(m, idx, h, n, c0, c1, y);                                                              \
            return;                                                                                      \
        }                                                                                                \
        const __mmask16 all = 0xFFFF;                                                                    \
        for (int j = 0; j < n; j += 4) {                                                                 \
            const int nr = n - j < 4 ? n - j : 4;                                                        \
            const T *w[4];                                                                               \
            const char *nx[4];                                                                           \
            float hs[4];                                                                                 \
            for (int k = 0; k < 4; k++) {                                                                \
                w[k] = (const T *)(m->raw + (size_t)idx[j + (k < nr ? k : 0)] * m->row_bytes) + c0;      \
                hs[k] = k < nr ? h[j + k] : 0.0f;                                                        \
                nx[k] = j + 4 + k < n ? (const char *)(m->raw + (size_t)idx[j + 4 + k] * m->row_bytes) + \
                                            (size_t)c0 * sizeof(T)                                       \
                                      : NULL;                                                            \
            }                                                                                            \
            const __m512 h0 = _mm512_set1_ps(hs[0]), h1 = _mm512_set1_ps(hs[1]);                        \
            const __m512 h2 = _mm512_set1_ps(hs[2]), h3 = _mm512_set1_ps(hs[3]);                        \
            float *yc = y + c0;                                                                          \
            for (int c = 0; c < c1 - c0; c += 16) {                                                      \
                const size_t ahead = (size_t)c * sizeof(T) + AXPY_PF_BYTES;                              \
                if (((ahead - 1) >> 6) != ((ahead + 16 * sizeof(T) - 1) >> 6)) /* a new line */         \
                    prefetch_ahead4((const char *const *)w, nx, ahead, span);                            \
                __m512 acc = _mm512_loadu_ps(yc + c);                                                    \
                acc = _mm512_fmadd_ps(LD(w[0] + c, all), h0, acc);                                       \
                acc = _mm512_fmadd_ps(LD(w[1] + c, all), h1, acc);                                       \
                acc = _mm512_fmadd_ps(LD(w[2] + c, all), h2, acc);                                       \
                acc = _mm512_fmadd_ps(LD(w[3] + c, all), h3, acc);                                       \
                _mm512_storeu_ps(yc + c, acc);                                                           \
            }                                                                                            \
        }                                                                                                \
    }
AXPY_LONG(axpy_rows_f32, float, ld_f32, axpy_rows_f32_4)
AXPY_LONG(axpy_rows_f16, uint16_t, ld_f16, axpy_rows_f16_4)
AXPY_LONG(axpy_rows_bf16, uint16_t, ld_bf16, axpy_rows_bf16_4)

AI __m512 cvt_i8(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)); }

/* QT: 0 = Q4_0, 1 = Q4_1, 2 = Q8_0 */
AI void axpy_blocks(const pi_mat *m, const int32_t *idx, const float *h, int n, int c0, int c1, float *y,
                    const int QT) {
    const int b0 = c0 / PI_QK, b1 = (c1 + PI_QK - 1) / PI_QK;
    /* nibble values; Q4_0's -8 is in the table, Q4_1's m goes into the per-block offset */
    const float z = QT == 0 ? -8.0f : 0.0f;
    const __m512 nib = _mm512_add_ps(_mm512_set1_ps(z),
                                     _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    for (int j = 0; j < n; j += PAIR_ROWS) {
        const int nr = n - j < PAIR_ROWS ? n - j : PAIR_ROWS;
        const uint8_t *w[PAIR_ROWS];
        float hs[PAIR_ROWS];
        _Pragma("GCC unroll 8") for (int k = 0; k < PAIR_ROWS; k++) {
            w[k] = m->raw + (size_t)idx[j + (k < nr ? k : 0)] * m->row_bytes;
            hs[k] = k < nr ? h[j + k] : 0.0f;
        }
        const uint8_t *pf[4], *pg[4];
        row_prefetch_ptrs(m, idx, n, j + PF_ROWS, pf);
        row_prefetch_ptrs(m, idx, n, j + PF_ROWS + 4, pg);
        const size_t bb = QT == 2 ? sizeof(pi_blk_q8_0) : QT == 1 ? sizeof(pi_blk_q4_1) : sizeof(pi_blk_q4_0);
        /* per row, its nibble table times h: the lookup yields h (q - 8) (Q4_0) or h q (Q4_1), one multiply
         * fewer per row and block (7B s=0.9 from L2, 1 thread: Q4_0 27.1 -> 28.0 GB/s, Q4_1 24.7 -> 26.0) */
        __m512 tab[PAIR_ROWS];
        _Pragma("GCC unroll 8") for (int k = 0; k < PAIR_ROWS; k++) tab[k] = _mm512_mul_ps(nib, _mm512_set1_ps(hs[k]));
        for (int b = b0; b < b1; b++) {
            float *yb = y + (size_t)b * PI_QK;
            row_prefetch_lines(pf, (size_t)b * bb, bb);
            row_prefetch_lines(pg, (size_t)b * bb, bb);
            __m512 y0 = _mm512_loadu_ps(yb), y1 = _mm512_loadu_ps(yb + 16);
            float off = 0.0f;
            _Pragma("GCC unroll 8") for (int k = 0; k < PAIR_ROWS; k++) {
                if (QT == 2) {
                    const pi_blk_q8_0 *blk = (const pi_blk_q8_0 *)w[k] + b;
                    const __m512 s = _mm512_set1_ps(hs[k] * h2f(blk->d));
                    y0 = _mm512_fmadd_ps(cvt_i8(_mm_loadu_si128((const __m128i *)blk->qs)), s, y0);
                    y1 = _mm512_fmadd_ps(cvt_i8(_mm_loadu_si128((const __m128i *)(blk->qs + 16))), s, y1);
                } else {
                    const uint8_t *qs;
                    float d;
                    if (QT == 0) {
                        const pi_blk_q4_0 *blk = (const pi_blk_q4_0 *)w[k] + b;
                        qs = blk->qs; d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_loadu_si32(blk)));
                    } else {
                        const pi_blk_q4_1 *blk = (const pi_blk_q4_1 *)w[k] + b;
                        const __m128 dm = _mm_cvtph_ps(_mm_loadu_si32(blk)); /* d, m */
                        qs = blk->qs; d = _mm_cvtss_f32(dm);
                        off += hs[k] * _mm_cvtss_f32(_mm_movehdup_ps(dm));
                    }
                    /* nibble -> h * value by table lookup: vpermps reads only the low 4 bits of each index
                     * lane, so the widened bytes index the table directly (low nibble), and after a shift (high) */
                    const __m512i t = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)qs));
                    /* the scale goes through memory so the FMAs broadcast it from a load: a register
                     * broadcast is one more shuffle per row and block, and the shuffle units bind here
                     * (7B s=0.9 Q4_0 from L2, 1 thread: 19.4 -> 21.7 GB/s; Q8_0 is faster without it) */
                    volatile float dv = d;
                    const __m512 s = _mm512_broadcastss_ps(_mm_load_ss((const float *)&dv));
                    y0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(t, tab[k]), s, y0);
                    y1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(t, 4), tab[k]), s, y1);
                }
            }
            if (QT == 1) {
                const __m512 o = _mm512_set1_ps(off);
                y0 = _mm512_add_ps(y0, o);
                y1 = _mm512_add_ps(y1, o);
            }
            _mm512_storeu_ps(yb, y0);
            _mm512_storeu_ps(yb + 16, y1);
        }
    }
}

static void axpy_rows_q4_0(const pi_mat *m, const int32_t *idx, const float *h, int n, int c0, int c1, float *y) {
    axpy_blocks(m, idx, h, n, c0, c1, y, 0);
}
static void axpy_rows_q4_1(const pi_mat *m, const int32_t *idx, const float *h, int n, int c0, int c1, float *y) {
    axpy_blocks(m, idx, h, n, c0, c1, y, 1);
}
static void axpy_rows_q8_0(const pi_mat *m, const int32_t *idx, const float *h, int n, int c0, int c1, float *y) {
    axpy_blocks(m, idx, h, n, c0, c1, y, 2);
}

/* ---- packed layout ---- */
/* One group (16 rows) for NT tokens starting at token t0. QT: 0 = Q4_0, 1 = Q4_1. */
AI void q4_group(const uint8_t *q, int nb, const pi_act *a, int t0, const int NT, const int QT, float *y,
                 int ldy, __mmask16 km, const uint8_t *pf, const uint8_t *pf_end, size_t pstep) {
    const uint16_t *sd = (const uint16_t *)(q + (size_t)nb * 256);
    const uint16_t *sm = sd + (size_t)nb * PI_G;
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const size_t n = (size_t)a->n;
    __m512 accd[4], accm[4];
    _Pragma("GCC unroll 16") for (int i = 0; i < NT; i++) { accd[i] = _mm512_setzero_ps(); accm[i] = _mm512_setzero_ps(); }
    for (int b = 0; b < nb; b++, q += 256) {
        if (pf) pf_lines(pf + b * pstep, pf_end, pstep);
        const __m512i w0 = _mm512_load_si512(q), w1 = _mm512_load_si512(q + 64);
        const __m512i w2 = _mm512_load_si512(q + 128), w3 = _mm512_load_si512(q + 192);
        const __m512i l0 = _mm512_and_si512(w0, m4), h0 = _mm512_and_si512(_mm512_srli_epi16(w0, 4), m4);
        const __m512i l1 = _mm512_and_si512(w1, m4), h1 = _mm512_and_si512(_mm512_srli_epi16(w1, 4), m4);
        const __m512i l2 = _mm512_and_si512(w2, m4), h2 = _mm512_and_si512(_mm512_srli_epi16(w2, 4), m4);
        const __m512i l3 = _mm512_and_si512(w3, m4), h3 = _mm512_and_si512(_mm512_srli_epi16(w3, 4), m4);
        const __m512 d = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(sd + b * PI_G)));
        __m512 mm = _mm512_setzero_ps();
        if (QT == 1) mm = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(sm + b * PI_G)));
        _Pragma("GCC unroll 16") for (int i = 0; i < NT; i++) {
            const size_t tb = (size_t)(t0 + i) * (n / PI_QK) + b;
            const int8_t *x = a->qs + (size_t)(t0 + i) * n + b * PI_QK;
            __m512i s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), l0, bc(x));
            __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), h0, bc(x + 16));
            s0 = _mm512_dpbusd_epi32(s0, l1, bc(x + 4));
            s1 = _mm512_dpbusd_epi32(s1, h1, bc(x + 20));
            s0 = _mm512_dpbusd_epi32(s0, l2, bc(x + 8));
            s1 = _mm512_dpbusd_epi32(s1, h2, bc(x + 24));
            s0 = _mm512_dpbusd_epi32(s0, l3, bc(x + 12));
            s1 = _mm512_dpbusd_epi32(s1, h3, bc(x + 28));
            __m512i s = _mm512_add_epi32(s0, s1);
            if (QT == 0) s = _mm512_sub_epi32(s, _mm512_set1_epi32(8 * a->sum[tb]));
            accd[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(d, _mm512_set1_ps(a->d[tb])), accd[i]);
            if (QT == 1) accm[i] = _mm512_fmadd_ps(mm, _mm512_set1_ps(a->s[tb]), accm[i]);
        }
    }
    _Pragma("GCC unroll 16") for (int i = 0; i < NT; i++)
        _mm512_mask_storeu_ps(y + (size_t)(t0 + i) * ldy, km, _mm512_add_ps(accd[i], accm[i]));
}

AI void q8_group(const uint8_t *q, int nb, const pi_act *a, int t0, const int NT, float *y, int ldy,
                 __mmask16 km, const uint8_t *pf, const uint8_t *pf_end, size_t pstep) {
    const uint16_t *sd = (const uint16_t *)(q + (size_t)nb * 512);
    const size_t n = (size_t)a->n;
    __m512 acc[4];
    _Pragma("GCC unroll 16") for (int i = 0; i < NT; i++) acc[i] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++, q += 512) {
        if (pf) pf_lines(pf + b * pstep, pf_end, pstep);
        __m512i w[8];
        _Pragma("GCC unroll 16") for (int k = 0; k < 8; k++) w[k] = _mm512_load_si512(q + 64 * k);
        const __m512 d = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(sd + b * PI_G)));
        _Pragma("GCC unroll 16") for (int i = 0; i < NT; i++) {
            const size_t tb = (size_t)(t0 + i) * (n / PI_QK) + b;
            const int8_t *x = a->qs + (size_t)(t0 + i) * n + b * PI_QK;
            __m512i s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], bc(x));
            __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[1], bc(x + 4));
            _Pragma("GCC unroll 16") for (int k = 2; k < 8; k += 2) {
                s0 = _mm512_dpbusd_epi32(s0, w[k], bc(x + 4 * k));
                s1 = _mm512_dpbusd_epi32(s1, w[k + 1], bc(x + 4 * k + 4));
            }
            /* quants are stored xor 0x80 = w + 128: subtract 128 * sum(x) (exact) */
            const __m512i s = _mm512_sub_epi32(_mm512_add_epi32(s0, s1), _mm512_set1_epi32(128 * a->sum[tb]));
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(d, _mm512_set1_ps(a->d[tb])), acc[i]);
        }
    }
    _Pragma("GCC unroll 16") for (int i = 0; i < NT; i++) _mm512_mask_storeu_ps(y + (size_t)(t0 + i) * ldy, km, acc[i]);
}

AI __mmask16 group_mask(const pi_mat *m, int g) {
    const int left = m->rows - g * PI_G;
    return left >= PI_G ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
}

/* The segment's groups stream through memory in order; the first token tile of each group prefetches
 * pi_pf_distance ahead, up to s->pf_end (past the segment when the same thread reads on from there). */
#define PACKED(NAME, CALL)                                                                               \
    static void NAME(const pi_mat *m, const pi_seg *s, const pi_act *a, int n_tok, float *y, int ldy) {  \
        const int nb = m->cols / PI_QK;                                                                  \
        const uint8_t *end = s->pf_end;                                                                  \
        const size_t pstep = ((m->gstride + nb - 1) / nb + 63) & ~(size_t)63;                            \
        const size_t dist = pi_pf_distance(m, s);                                                        \
        pf_lines(s->p, end, dist);                                                                       \
        for (int g = s->u0; g < s->u1; g++) {                                                            \
            const uint8_t *q = s->p + (size_t)(g - s->u0) * m->gstride;                                  \
            const __mmask16 km = group_mask(m, g);                                                       \
            float *yg = y + (size_t)g * PI_G;                                                            \
            const uint8_t *pf = q + dist;                                                                \
            int t = 0;                                                                                   \
            for (; t + 4 <= n_tok; t += 4, pf = NULL) CALL(4);                                           \
            switch (n_tok - t) {                                                                         \
            case 3: CALL(3); break;                                                                      \
            case 2: CALL(2); break;                                                                      \
            case 1: CALL(1); break;                                                                      \
            default: break;                                                                              \
            }                                                                                            \
        }                                                                                                \
    }

#define CALL_Q40(NT) q4_group(q, nb, a, t, NT, 0, yg, ldy, km, pf, end, pstep)
#define CALL_Q41(NT) q4_group(q, nb, a, t, NT, 1, yg, ldy, km, pf, end, pstep)
#define CALL_Q80(NT) q8_group(q, nb, a, t, NT, yg, ldy, km, pf, end, pstep)
PACKED(packed_q4_0, CALL_Q40)
PACKED(packed_q4_1, CALL_Q41)
PACKED(packed_q8_0, CALL_Q80)

/* ---- attention helpers (head_dim values; masked tail) ---- */
static float dot_f16(const float *q, const uint16_t *k, int n) {
    __m512 acc = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16) {
        const __mmask16 km = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(km, q + i), ld_f16(k + i, km), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

static void axpy_f16(float *y, const uint16_t *v, float a, int n) {
    const __m512 av = _mm512_set1_ps(a);
    for (int i = 0; i < n; i += 16) {
        const __mmask16 km = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(y + i, km, _mm512_fmadd_ps(av, ld_f16(v + i, km), _mm512_maskz_loadu_ps(km, y + i)));
    }
}

/* Bandwidth probe: 4 independent zmm accumulators over the buffer (as f32 bit patterns; the value is unused). */
static double read_sum(const uint8_t *p, size_t n, int iters) {
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (int it = 0; it < iters; it++)
        for (size_t i = 0; i + 256 <= n; i += 256) {
            s0 = _mm512_add_ps(s0, _mm512_loadu_ps((const float *)(p + i)));
            s1 = _mm512_add_ps(s1, _mm512_loadu_ps((const float *)(p + i + 64)));
            s2 = _mm512_add_ps(s2, _mm512_loadu_ps((const float *)(p + i + 128)));
            s3 = _mm512_add_ps(s3, _mm512_loadu_ps((const float *)(p + i + 192)));
        }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
}

const pi_kernels pi_kernels_avx512 = {
    "avx512",
    rows_q4_0, rows_q4_1, rows_q8_0, rows_f16, rows_bf16, rows_f32,
    axpy_rows_q4_0, axpy_rows_q4_1, axpy_rows_q8_0, axpy_rows_f16, axpy_rows_bf16, axpy_rows_f32,
    packed_q4_0, packed_q4_1, packed_q8_0,
    quant_q8, dot_f16, axpy_f16, pi_to_f16_avx512, read_sum,
};

#pragma GCC pop_options
#endif
