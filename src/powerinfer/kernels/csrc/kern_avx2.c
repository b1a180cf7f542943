/* AVX2 + FMA + F16C kernels (x86 without AVX-512 VNNI). Integer dots use ggml's pmaddubsw + pmaddwd form;
 * signed x signed products (Q8_0) use the abs/sign trick, exact for |w| <= 128, |x| <= 127.
 * Packed kernels treat a 16-row group as two 8-lane halves. */
#include "pi.h"

#include <math.h>
#define PI_MAX_HD_AVX2 256

#if defined(PI_X86)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi2")
#include <immintrin.h>

#define AI static inline __attribute__((always_inline))

AI float h2f(uint16_t h) { return _cvtsh_ss(h); }
AI int32_t ld32(const void *p) { int32_t v; memcpy(&v, p, 4); return v; }
AI __m256i bc(const int8_t *p) { return _mm256_set1_epi32(ld32(p)); }
AI float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
AI int hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}
/* u8 x s8 dot in 32-bit lanes (4 products per lane) */
AI __m256i dot_us(__m256i u, __m256i s) { return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)); }
AI __m256i dot_ss(__m256i a, __m256i b) { return dot_us(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a)); }

static void quant_q8(const float *x, int nblocks, int8_t *qs, float *d, float *s, int32_t *sum) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int b = 0; b < nblocks; b++, x += PI_QK, qs += PI_QK) {
        __m256 v[4], mx = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) { v[i] = _mm256_loadu_ps(x + 8 * i); mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[i])); }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float amax = _mm_cvtss_f32(m4), dd = amax / 127.0f;
        int nan = 0;
        for (int i = 0; i < 4; i++) nan |= _mm256_movemask_ps(_mm256_cmp_ps(v[i], v[i], _CMP_UNORD_Q));
        if (!(amax <= 3.4e38f) || nan) { /* inf, or a NaN that max_ps may skip */
            pi_q8_nonfinite(qs, d + b, s + b, sum + b);
            continue;
        }
        const __m256 id = _mm256_set1_ps(amax != 0.0f ? 127.0f / amax : 0.0f);
        __m256i acc = _mm256_setzero_si256();
        for (int i = 0; i < 4; i++) {
            const __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], id));
            acc = _mm256_add_epi32(acc, q);
            int32_t tmp[8];
            _mm256_storeu_si256((__m256i *)tmp, q);
            for (int j = 0; j < 8; j++) qs[8 * i + j] = (int8_t)tmp[j];
        }
        const int isum = hsum_i32(acc);
        d[b] = h2f(_cvtss_sh(dd, 0));
        s[b] = h2f(_cvtss_sh(dd * (float)isum, 0));
        sum[b] = isum;
    }
}

AI __m256i unpack_q4(const uint8_t *qs) {
    const __m128i v = _mm_loadu_si128((const __m128i *)qs);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), _mm256_set1_epi8(0x0F));
}
AI __m256i lane0(int v) { return _mm256_zextsi128_si256(_mm_cvtsi32_si128(v)); }

#define ROWS(NAME, BLK, BODY)                                                                            \
    static void NAME(const pi_mat *m, const int32_t *idx, int r0, int r1, const pi_act *a, float *y) {                       \
        const int nb = m->cols / PI_QK;                                                                  \
        for (int r = r0; r < r1; r += 4) {                                                               \
            const int nr = r1 - r < 4 ? r1 - r : 4;                                                      \
            const BLK *w[4];                                                                             \
            __m256 acc[4];                                                                               \
            float accm[4] = {0, 0, 0, 0};                                                                \
            for (int j = 0; j < 4; j++) {                                                                \
                w[j] = (const BLK *)(m->raw + (size_t)PI_ROW(idx, r + (j < nr ? j : 0)) * m->row_bytes);            \
                acc[j] = _mm256_setzero_ps();                                                            \
            }                                                                                            \
            for (int b = 0; b < nb; b++) {                                                               \
                const __m256i x = _mm256_loadu_si256((const __m256i *)(a->qs + b * PI_QK));              \
                const float dx = a->d[b];                                                                \
                for (int j = 0; j < 4; j++) { const BLK *wb = w[j] + b; BODY }                           \
            }                                                                                            \
            for (int j = 0; j < nr; j++) y[r + j] = hsum(acc[j]) + accm[j];                              \
        }                                                                                                \
    }

ROWS(rows_q4_0, pi_blk_q4_0, {
    const __m256i p = _mm256_sub_epi32(dot_us(unpack_q4(wb->qs), x), lane0(8 * a->sum[b]));
    acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(h2f(wb->d) * dx), acc[j]);
})
ROWS(rows_q4_1, pi_blk_q4_1, {
    const __m256i p = dot_us(unpack_q4(wb->qs), x);
    acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(h2f(wb->d) * dx), acc[j]);
    accm[j] += h2f(wb->m) * a->s[b];
})
ROWS(rows_q8_0, pi_blk_q8_0, {
    const __m256i p = dot_ss(_mm256_loadu_si256((const __m256i *)wb->qs), x);
    acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(h2f(wb->d) * dx), acc[j]);
})

/* float formats: 4 rows x 8 columns, scalar tail */
AI __m256 ld_f16(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
AI __m256 ld_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
AI __m256 ld_f32(const float *p) { return _mm256_loadu_ps(p); }
AI float s_f16(uint16_t h) { return h2f(h); }
AI float s_bf16(uint16_t h) { return pi_bf16_to_fp32(h); }
AI float s_f32(float f) { return f; }

#define ROWSF(NAME, T, XP, LD, S)                                                                        \
    static void NAME(const pi_mat *m, const int32_t *idx, int r0, int r1, const pi_act *a, float *y) {                       \
        const int n = m->cols, n8 = n & ~7;                                                              \
        const T *xv = XP;                                                                                \
        for (int r = r0; r < r1; r += 4) {                                                               \
            const int nr = r1 - r < 4 ? r1 - r : 4;                                                      \
            const T *w[4];                                                                               \
            __m256 acc[4];                                                                               \
            for (int j = 0; j < 4; j++) {                                                                \
                w[j] = (const T *)(m->raw + (size_t)PI_ROW(idx, r + (j < nr ? j : 0)) * m->row_bytes);              \
                acc[j] = _mm256_setzero_ps();                                                            \
            }                                                                                            \
            for (int c = 0; c < n8; c += 8) {                                                            \
                const __m256 x = LD(xv + c);                                                             \
                for (int j = 0; j < 4; j++) acc[j] = _mm256_fmadd_ps(LD(w[j] + c), x, acc[j]);          \
            }                                                                                            \
            for (int j = 0; j < nr; j++) {                                                               \
                float t = hsum(acc[j]);                                                                  \
                for (int c = n8; c < n; c++) t += S(w[j][c]) * S(xv[c]);                                 \
                y[r + j] = t;                                                                            \
            }                                                                                            \
        }                                                                                                \
    }
ROWSF(rows_f16, uint16_t, a->h, ld_f16, s_f16)
ROWSF(rows_bf16, uint16_t, a->bh, ld_bf16, s_bf16)
ROWSF(rows_f32, float, a->f, ld_f32, s_f32)

/* ---- neuron-major axpy (see kern_avx512.c): 4 rows per pass, 8 columns per step ---- */
#define AXPY_SETUP(T)                                                                                    \
    const int nr = n - j < 4 ? n - j : 4;                                                                \
    const T *w[4];                                                                                       \
    float hs[4];                                                                                         \
    for (int k = 0; k < 4; k++) {                                                                        \
        w[k] = (const T *)(m->raw + (size_t)idx[j + (k < nr ? k : 0)] * m->row_bytes);                  \
        hs[k] = k < nr ? h[j + k] : 0.0f;                                                                \
    }

#define AXPYF(NAME, T, LD, S)                                                                            \
    static void NAME(const pi_mat *m, const int32_t *idx, const float *h, int n, int c0, int c1, float *y) { \
        for (int j = 0; j < n; j += 4) {                                                                 \
            AXPY_SETUP(T)                                                                                \
            int c = c0;                                                                                  \
            for (; c + 8 <= c1; c += 8) {                                                                \
                __m256 acc = _mm256_loadu_ps(y + c);                                                     \
                for (int k = 0; k < 4; k++) acc = _mm256_fmadd_ps(LD(w[k] + c), _mm256_set1_ps(hs[k]), acc); \
                _mm256_storeu_ps(y + c, acc);                                                            \
            }                                                                                            \
            for (; c < c1; c++)                                                                          \
                for (int k = 0; k < 4; k++) y[c] += hs[k] * S(w[k][c]);                                  \
        }                                                                                                \
    }
AXPYF(axpy_rows_f32, float, ld_f32, s_f32)
AXPYF(axpy_rows_f16, uint16_t, ld_f16, s_f16)
AXPYF(axpy_rows_bf16, uint16_t, ld_bf16, s_bf16)

AI __m256 cvt8_u8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }
AI __m256 cvt8_i8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }

/* QT: 0 = Q4_0, 1 = Q4_1, 2 = Q8_0 */
AI void axpy_blocks(const pi_mat *m, const int32_t *idx, const float *h, int n, int c0, int c1, float *y,
                    const int QT) {
    const int b0 = c0 / PI_QK, b1 = (c1 + PI_QK - 1) / PI_QK;
    const __m128i m4 = _mm_set1_epi8(0x0F);
    for (int j = 0; j < n; j += 4) {
        AXPY_SETUP(uint8_t)
        for (int b = b0; b < b1; b++) {
            float *yb = y + (size_t)b * PI_QK;
            __m256 yv[4];
            for (int i = 0; i < 4; i++) yv[i] = _mm256_loadu_ps(yb + 8 * i);
            float off = 0.0f;
            for (int k = 0; k < 4; k++) {
                __m128i lo, hi;
                float sd;
                if (QT == 2) {
                    const pi_blk_q8_0 *blk = (const pi_blk_q8_0 *)w[k] + b;
                    sd = hs[k] * h2f(blk->d);
                    lo = _mm_loadu_si128((const __m128i *)blk->qs);
                    hi = _mm_loadu_si128((const __m128i *)(blk->qs + 16));
                } else {
                    const uint8_t *qs;
                    if (QT == 0) {
                        const pi_blk_q4_0 *blk = (const pi_blk_q4_0 *)w[k] + b;
                        qs = blk->qs; sd = hs[k] * h2f(blk->d); off -= 8.0f * sd;
                    } else {
                        const pi_blk_q4_1 *blk = (const pi_blk_q4_1 *)w[k] + b;
                        qs = blk->qs; sd = hs[k] * h2f(blk->d); off += hs[k] * h2f(blk->m);
                    }
                    const __m128i v = _mm_loadu_si128((const __m128i *)qs);
                    lo = _mm_and_si128(v, m4);
                    hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);
                }
                const __m256 s = _mm256_set1_ps(sd);
                if (QT == 2) {
                    yv[0] = _mm256_fmadd_ps(cvt8_i8(lo), s, yv[0]);
                    yv[1] = _mm256_fmadd_ps(cvt8_i8(_mm_srli_si128(lo, 8)), s, yv[1]);
                    yv[2] = _mm256_fmadd_ps(cvt8_i8(hi), s, yv[2]);
                    yv[3] = _mm256_fmadd_ps(cvt8_i8(_mm_srli_si128(hi, 8)), s, yv[3]);
                } else {
                    yv[0] = _mm256_fmadd_ps(cvt8_u8(lo), s, yv[0]);
                    yv[1] = _mm256_fmadd_ps(cvt8_u8(_mm_srli_si128(lo, 8)), s, yv[1]);
                    yv[2] = _mm256_fmadd_ps(cvt8_u8(hi), s, yv[2]);
                    yv[3] = _mm256_fmadd_ps(cvt8_u8(_mm_srli_si128(hi, 8)), s, yv[3]);
                }
            }
            const __m256 o = _mm256_set1_ps(off);
            for (int i = 0; i < 4; i++) _mm256_storeu_ps(yb + 8 * i, QT == 2 ? yv[i] : _mm256_add_ps(yv[i], o));
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

/* ---- packed: half `hf` (rows 8*hf .. 8*hf+7) of a group; QT 0 = Q4_0, 1 = Q4_1, 2 = Q8_0 ---- */
AI void half_group(const uint8_t *q0, int nb, int qt, int hf, const pi_act *a, int t, float *y,
                   const uint8_t *pf, const uint8_t *pf_end, size_t pstep) {
    const int qb = qt == 2 ? 512 : 256;
    const uint16_t *sd = (const uint16_t *)(q0 + (size_t)nb * qb);
    const uint16_t *sm = sd + (size_t)nb * PI_G;
    const size_t n = (size_t)a->n, tb0 = (size_t)t * (n / PI_QK);
    const __m256i m4 = _mm256_set1_epi8(0x0F), x80 = _mm256_set1_epi8((char)0x80);
    __m256 acc = _mm256_setzero_ps(), accm = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        if (pf)
            for (size_t k = 0; k < pstep && pf + b * pstep + k < pf_end; k += 64)
                _mm_prefetch((const char *)pf + b * pstep + k, _MM_HINT_T0);
        const uint8_t *q = q0 + (size_t)b * qb + 32 * hf;
        const int8_t *x = a->qs + (size_t)t * n + b * PI_QK;
        __m256i s;
        if (qt == 2) {
            s = _mm256_setzero_si256();
            _Pragma("GCC unroll 8") for (int k = 0; k < 8; k++)
                s = _mm256_add_epi32(s, dot_ss(_mm256_xor_si256(_mm256_load_si256((const __m256i *)(q + 64 * k)), x80), bc(x + 4 * k)));
        } else {
            __m256i s16 = _mm256_setzero_si256(); /* <= 8 * 2 * 15 * 127 fits int16 */
            _Pragma("GCC unroll 8") for (int k = 0; k < 4; k++) {
                const __m256i w = _mm256_load_si256((const __m256i *)(q + 64 * k));
                s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(_mm256_and_si256(w, m4), bc(x + 4 * k)));
                s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(w, 4), m4), bc(x + 16 + 4 * k)));
            }
            s = _mm256_madd_epi16(s16, _mm256_set1_epi16(1));
            if (qt == 0) s = _mm256_sub_epi32(s, _mm256_set1_epi32(8 * a->sum[tb0 + b]));
        }
        const __m256 d = _mm256_cvtph_ps(_mm_load_si128((const __m128i *)(sd + b * PI_G + 8 * hf)));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(d, _mm256_set1_ps(a->d[tb0 + b])), acc);
        if (qt == 1)
            accm = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_load_si128((const __m128i *)(sm + b * PI_G + 8 * hf))),
                                   _mm256_set1_ps(a->s[tb0 + b]), accm);
    }
    _mm256_storeu_ps(y, _mm256_add_ps(acc, accm));
}

AI void packed_qt(const pi_mat *m, const pi_seg *sg, const pi_act *a, int n_tok, float *y, int ldy, int qt) {
    const int nb = m->cols / PI_QK;
    const size_t pstep = ((m->gstride + nb - 1) / nb + 63) & ~(size_t)63;
    const size_t dist = pi_pf_distance(m, sg);
    for (size_t k = 0; k < dist && sg->p + k < sg->pf_end; k += 64) _mm_prefetch((const char *)sg->p + k, _MM_HINT_T0);
    for (int g = sg->u0; g < sg->u1; g++) {
        const uint8_t *q = sg->p + (size_t)(g - sg->u0) * m->gstride;
        const int left = m->rows - g * PI_G;
        for (int t = 0; t < n_tok; t++) {
            float tmp[PI_G], *yt = y + (size_t)t * ldy + (size_t)g * PI_G;
            float *dst = left >= PI_G ? yt : tmp;
            half_group(q, nb, qt, 0, a, t, dst, t == 0 ? q + dist : NULL, sg->pf_end, pstep);
            half_group(q, nb, qt, 1, a, t, dst + 8, NULL, NULL, 0);
            if (dst == tmp) for (int r = 0; r < left; r++) yt[r] = tmp[r];
        }
    }
}
static void packed_q4_0(const pi_mat *m, const pi_seg *s, const pi_act *a, int T, float *y, int ldy) { packed_qt(m, s, a, T, y, ldy, 0); }
static void packed_q4_1(const pi_mat *m, const pi_seg *s, const pi_act *a, int T, float *y, int ldy) { packed_qt(m, s, a, T, y, ldy, 1); }
static void packed_q8_0(const pi_mat *m, const pi_seg *s, const pi_act *a, int T, float *y, int ldy) { packed_qt(m, s, a, T, y, ldy, 2); }

static float dot_f16(const float *q, const uint16_t *k, int n) {
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), ld_f16(k + i), acc);
    float s = hsum(acc);
    for (; i < n; i++) s += q[i] * h2f(k[i]);
    return s;
}

static void axpy_f16(float *y, const uint16_t *v, float a, int n) {
    const __m256 av = _mm256_set1_ps(a);
    int i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, ld_f16(v + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * h2f(v[i]);
}

static void to_f16(const float *x, uint16_t *y, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(y + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) y[i] = _cvtss_sh(x[i], 0);
}

static double read_sum(const uint8_t *p, size_t n, int iters) {
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (int it = 0; it < iters; it++)
        for (size_t i = 0; i + 128 <= n; i += 128) {
            s0 = _mm256_add_ps(s0, _mm256_loadu_ps((const float *)(p + i)));
            s1 = _mm256_add_ps(s1, _mm256_loadu_ps((const float *)(p + i + 32)));
            s2 = _mm256_add_ps(s2, _mm256_loadu_ps((const float *)(p + i + 64)));
            s3 = _mm256_add_ps(s3, _mm256_loadu_ps((const float *)(p + i + 96)));
        }
    return hsum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
}

const pi_kernels pi_kernels_avx2 = {
    "avx2",
    rows_q4_0, rows_q4_1, rows_q8_0, rows_f16, rows_bf16, rows_f32,
    axpy_rows_q4_0, axpy_rows_q4_1, axpy_rows_q8_0, axpy_rows_f16, axpy_rows_bf16, axpy_rows_f32,
    packed_q4_0, packed_q4_1, packed_q8_0,
    quant_q8, dot_f16, axpy_f16, to_f16, read_sum,
};

#pragma GCC pop_options
#endif
