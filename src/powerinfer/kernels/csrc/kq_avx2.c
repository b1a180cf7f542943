/* AVX2 row dots of K-quant rows against q8 activations (the terms of kquant.h), one 32-value activation block
 * per ymm: Q4_K/Q5_K sub-blocks are whole blocks (pmaddubsw + pmaddwd, one f32 scale d*sc*dx each); a Q6_K block
 * holds two 16-value chunks, so pmaddwd multiplies its 16-bit pair sums by the chunks' integer scales
 * ([sc_a x8 | sc_b x8]) before the block's one f32 scale d*dx. */
#include <stdlib.h>

#include "kquant.h"

#if defined(PI_X86)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi2")
#include <immintrin.h>

#define AI static inline __attribute__((always_inline))

AI float h2f(uint16_t h) { return _cvtsh_ss(h); }
AI float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
AI __m256i dot_us(__m256i u, __m256i s) { return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)); }

AI __m128i scales_mins(const uint8_t *q) { /* sc in bytes 0-7, mins in 8-15 (as kq_avx512.c) */
    uint32_t u[4];
    memcpy(u, q, 12);
    const uint32_t k1 = 0x3f3f3f3f, k2 = 0x0f0f0f0f, k3 = 0x03030303;
    u[3] = ((u[2] >> 4) & k2) | (((u[1] >> 6) & k3) << 4);
    const uint32_t mins_lo = u[1] & k1;
    u[1] = (u[2] & k2) | (((u[0] >> 6) & k3) << 4);
    u[2] = mins_lo;
    u[0] &= k1;
    /* from registers: a 16-byte load of the four 4-byte stores just made would miss store forwarding */
    return _mm_set_epi32((int)u[3], (int)u[2], (int)u[1], (int)u[0]);
}

/* Sub-blocks 2g (lo) and 2g+1 (hi) of a Q4_K/Q5_K super-block b (qh: Q5_K's high bits, loaded once) */
AI void q45_pair(const uint8_t *b, __m256i qh, int g, const int Q5, __m256i *lo, __m256i *hi) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), v16 = _mm256_set1_epi8(16);
    const __m256i q = _mm256_loadu_si256((const __m256i *)(b + (Q5 ? 48 : 16) + 32 * g));
    *lo = _mm256_and_si256(q, m4);
    *hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
    if (Q5) {
        const __m256i bl = _mm256_set1_epi8((char)(1 << (2 * g))), bh = _mm256_set1_epi8((char)(2 << (2 * g)));
        *lo = _mm256_or_si256(*lo, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, bl), bl), v16));
        *hi = _mm256_or_si256(*hi, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, bh), bh), v16));
    }
}

/* 32-value block k of a Q6_K super-block (half k/4, quarter k%4), q not yet offset by -32 */
AI __m256i q6_block(const pi_blk_q6_K *b, int k) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), m30 = _mm256_set1_epi8(0x30);
    const int h = k / 4, qt = k % 4;
    const __m256i ql = _mm256_loadu_si256((const __m256i *)(b->ql + 64 * h + 32 * (qt & 1)));
    const __m256i qh = _mm256_loadu_si256((const __m256i *)(b->qh + 32 * h));
    const __m256i lo = qt < 2 ? _mm256_and_si256(ql, m4) : _mm256_and_si256(_mm256_srli_epi16(ql, 4), m4);
    __m256i hb;
    switch (qt) {
    case 0: hb = _mm256_slli_epi16(qh, 4); break;
    case 1: hb = _mm256_slli_epi16(qh, 2); break;
    case 2: hb = qh; break;
    default: hb = _mm256_srli_epi16(qh, 2); break;
    }
    return _mm256_or_si256(lo, _mm256_and_si256(hb, m30));
}

/* The 16-bit scales of Q6_K block k ([sc[2k] x8 | sc[2k+1] x8]) from the 16 int8 scales loaded once per super-block:
 * one byte shuffle and one sign extension, where two scalar loads, two broadcasts and an insert were. With the
 * row prefetches (kquant.h), AVX2 Q6_K, 2 threads (EPYC): [4096, 11008] 21.7 -> 31.4 GB/s, cold [32768, 4096] 10.0
 * -> 29.3 GB/s. */
AI __m256i q6_scales(__m128i sc8, int k) {
    const __m128i pick = _mm_or_si128(_mm_set1_epi8((char)(2 * k)), _mm_set_epi32(0x01010101, 0x01010101, 0, 0));
    return _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc8, pick));
}

AI void rows_q45(const pi_mat *m, const int32_t *idx, int r0, int r1, const pi_act *a, float *y, const int Q5) {
    const int nsb = m->cols / PI_QK_K;
    const size_t bb = Q5 ? sizeof(pi_blk_q5_K) : sizeof(pi_blk_q4_K);
    const int ahead = pi_kq_pf_ahead(m, idx);
    for (int r = r0; r < r1; r += PI_KQ_ROWS) {
        const int nr = r1 - r < PI_KQ_ROWS ? r1 - r : PI_KQ_ROWS;
        const uint8_t *w[PI_KQ_ROWS];
        __m256 acc[PI_KQ_ROWS], accm[PI_KQ_ROWS];
        for (int j = 0; j < PI_KQ_ROWS; j++) {
            w[j] = m->raw + (size_t)PI_ROW(idx, r + (j < nr ? j : 0)) * m->row_bytes;
            acc[j] = accm[j] = _mm256_setzero_ps();
        }
        for (int sb = 0; sb < nsb; sb++) {
            pi_kq_prefetch_rows(m, idx, r1, r + ahead, (size_t)sb * bb, bb);
            const int8_t *xq = a->qs + (size_t)sb * PI_QK_K;
            const __m256 dx = _mm256_loadu_ps(a->d + 8 * sb);
            const __m256 xs = _mm256_mul_ps(dx, _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)(a->sum + 8 * sb))));
            for (int j = 0; j < PI_KQ_ROWS; j++) {
                const uint8_t *b = w[j] + (size_t)sb * bb;
                uint16_t dh[2];
                memcpy(dh, b, 4);
                const __m128i sm = scales_mins(b + 4);
                const __m256 scf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(sm));
                const __m256 mnf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(sm, 8)));
                float S[8];
                _mm256_storeu_ps(S, _mm256_mul_ps(_mm256_mul_ps(scf, _mm256_set1_ps(h2f(dh[0]))), dx));
                accm[j] = _mm256_fmadd_ps(_mm256_mul_ps(mnf, _mm256_set1_ps(h2f(dh[1]))), xs, accm[j]);
                const __m256i qh = Q5 ? _mm256_loadu_si256((const __m256i *)(b + 16)) : _mm256_setzero_si256();
                __m256 t = acc[j];
                for (int g = 0; g < 4; g++) {
                    __m256i lo, hi;
                    q45_pair(b, qh, g, Q5, &lo, &hi);
                    const __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + 64 * g));
                    const __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + 64 * g + 32));
                    t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_us(lo, x0)), _mm256_set1_ps(S[2 * g]), t);
                    t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_us(hi, x1)), _mm256_set1_ps(S[2 * g + 1]), t);
                }
                acc[j] = t;
            }
        }
        for (int j = 0; j < nr; j++) y[r + j] = hsum(acc[j]) - hsum(accm[j]);
    }
}

static void rows_q4_k(const pi_mat *m, const int32_t *idx, int r0, int r1, const pi_act *a, float *y) {
    rows_q45(m, idx, r0, r1, a, y, 0);
}
static void rows_q5_k(const pi_mat *m, const int32_t *idx, int r0, int r1, const pi_act *a, float *y) {
    rows_q45(m, idx, r0, r1, a, y, 1);
}

static void rows_q6_k(const pi_mat *m, const int32_t *idx, int r0, int r1, const pi_act *a, float *y) {
    const int nsb = m->cols / PI_QK_K;
    const __m256i c32 = _mm256_set1_epi8(32);
    const size_t bb = sizeof(pi_blk_q6_K);
    const int ahead = pi_kq_pf_ahead(m, idx);
    for (int r = r0; r < r1; r += PI_KQ_ROWS) {
        const int nr = r1 - r < PI_KQ_ROWS ? r1 - r : PI_KQ_ROWS;
        const pi_blk_q6_K *w[PI_KQ_ROWS];
        __m256 acc[PI_KQ_ROWS];
        for (int j = 0; j < PI_KQ_ROWS; j++) {
            w[j] = (const pi_blk_q6_K *)(m->raw + (size_t)PI_ROW(idx, r + (j < nr ? j : 0)) * m->row_bytes);
            acc[j] = _mm256_setzero_ps();
        }
        for (int sb = 0; sb < nsb; sb++) {
            pi_kq_prefetch_rows(m, idx, r1, r + ahead, (size_t)sb * bb, bb);
            const int8_t *xq = a->qs + (size_t)sb * PI_QK_K;
            __m256i x[8], x32[8]; /* the blocks and 32 * their pair sums (the -32 offset) */
            for (int k = 0; k < 8; k++) {
                x[k] = _mm256_loadu_si256((const __m256i *)(xq + 32 * k));
                x32[k] = _mm256_maddubs_epi16(c32, x[k]);
            }
            for (int j = 0; j < PI_KQ_ROWS; j++) {
                const pi_blk_q6_K *b = w[j] + sb;
                const float d = h2f(b->d);
                const __m128i sc8 = _mm_loadu_si128((const __m128i *)b->scales);
                __m256 t = acc[j];
                for (int k = 0; k < 8; k++) {
                    const __m256i wq = q6_block(b, k);
                    const __m256i p16 = _mm256_sub_epi16(_mm256_maddubs_epi16(wq, x[k]), x32[k]);
                    const __m256i sc = q6_scales(sc8, k);
                    const __m256i p = _mm256_madd_epi16(p16, sc);
                    t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * a->d[8 * sb + k]), t);
                }
                acc[j] = t;
            }
        }
        for (int j = 0; j < nr; j++) y[r + j] = hsum(acc[j]);
    }
}

/* ---- several tokens (kquant.h: pi_kq_rows_tokens) ----
 * One row at a time against PI_KQ_NT tokens: per super-block the scales, mins and d*sc, dmin*m once, then per
 * 64-value group the nibbles (and qh bits) unpacked once and dotted with each token's blocks, each token's
 * accumulator taking the terms of rows_q45 / rows_q6_k in their order (bit for bit the one-token result). */
AI void q45_group(const pi_mat *m, const int32_t *idx, int r0, int r1, const pi_act *a, int t0, const int NT,
                  float *y, int ldy, const int Q5, int sb0, int sb1, float *part) {
    const int nsb = m->cols / PI_QK_K, nb = m->cols / PI_QK;
    const size_t bb = Q5 ? sizeof(pi_blk_q5_K) : sizeof(pi_blk_q4_K);
    for (int r = r0; r < r1; r++) {
        const uint8_t *w = m->raw + (size_t)PI_ROW(idx, r) * m->row_bytes;
        __m256 acc[PI_KQ_NT], accm[PI_KQ_NT];
        float *pp = part + (size_t)(r - r0) * PI_KQ_NT * 16;
        for (int j = 0; j < NT; j++) {
            acc[j] = sb0 ? _mm256_loadu_ps(pp + 16 * j) : _mm256_setzero_ps();
            accm[j] = sb0 ? _mm256_loadu_ps(pp + 16 * j + 8) : _mm256_setzero_ps();
        }
        for (int sb = sb0; sb < sb1; sb++) {
            const uint8_t *b = w + (size_t)sb * bb;
            uint16_t dh[2];
            memcpy(dh, b, 4);
            const __m128i sm = scales_mins(b + 4);
            const __m256 scf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(sm));
            const __m256 mnf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(sm, 8)));
            const __m256 sd = _mm256_mul_ps(scf, _mm256_set1_ps(h2f(dh[0])));
            const __m256 md = _mm256_mul_ps(mnf, _mm256_set1_ps(h2f(dh[1])));
            float S[PI_KQ_NT][8];
            for (int j = 0; j < NT; j++) {
                const size_t bo = (size_t)(t0 + j) * nb + 8 * sb;
                const __m256 dx = _mm256_loadu_ps(a->d + bo);
                const __m256 xs = _mm256_mul_ps(dx, _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)(a->sum + bo))));
                _mm256_storeu_ps(S[j], _mm256_mul_ps(sd, dx));
                accm[j] = _mm256_fmadd_ps(md, xs, accm[j]);
            }
            const __m256i qh = Q5 ? _mm256_loadu_si256((const __m256i *)(b + 16)) : _mm256_setzero_si256();
            for (int g = 0; g < 4; g++) {
                __m256i lo, hi;
                q45_pair(b, qh, g, Q5, &lo, &hi);
                for (int j = 0; j < NT; j++) {
                    const int8_t *xq = a->qs + (size_t)(t0 + j) * m->cols + (size_t)sb * PI_QK_K + 64 * g;
                    const __m256i x0 = _mm256_loadu_si256((const __m256i *)xq);
                    const __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + 32));
                    __m256 t = acc[j];
                    t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_us(lo, x0)), _mm256_set1_ps(S[j][2 * g]), t);
                    t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_us(hi, x1)), _mm256_set1_ps(S[j][2 * g + 1]), t);
                    acc[j] = t;
                }
            }
        }
        if (sb1 < nsb) { /* this token group's next super-blocks continue the same sums */
            for (int j = 0; j < NT; j++) {
                _mm256_storeu_ps(pp + 16 * j, acc[j]);
                _mm256_storeu_ps(pp + 16 * j + 8, accm[j]);
            }
            continue;
        }
        for (int j = 0; j < NT; j++) y[(size_t)(t0 + j) * ldy + r] = hsum(acc[j]) - hsum(accm[j]);
    }
}

AI void q6_group(const pi_mat *m, const int32_t *idx, int r0, int r1, const pi_act *a, int t0, const int NT,
                 float *y, int ldy, int sb0, int sb1, float *part) {
    const int nsb = m->cols / PI_QK_K, nb = m->cols / PI_QK;
    const __m256i c32 = _mm256_set1_epi8(32);
    for (int r = r0; r < r1; r++) {
        const pi_blk_q6_K *w = (const pi_blk_q6_K *)(m->raw + (size_t)PI_ROW(idx, r) * m->row_bytes);
        __m256 acc[PI_KQ_NT];
        float *pp = part + (size_t)(r - r0) * PI_KQ_NT * 16;
        for (int j = 0; j < NT; j++) acc[j] = sb0 ? _mm256_loadu_ps(pp + 16 * j) : _mm256_setzero_ps();
        for (int sb = sb0; sb < sb1; sb++) {
            const pi_blk_q6_K *b = w + sb;
            const float d = h2f(b->d);
            const __m128i sc8 = _mm_loadu_si128((const __m128i *)b->scales);
            for (int k = 0; k < 8; k++) {
                const __m256i wq = q6_block(b, k);
                const __m256i sc = q6_scales(sc8, k);
                for (int j = 0; j < NT; j++) {
                    const __m256i x = _mm256_loadu_si256((const __m256i *)(a->qs + (size_t)(t0 + j) * m->cols + (size_t)sb * PI_QK_K + 32 * k));
                    const __m256i p16 = _mm256_sub_epi16(_mm256_maddubs_epi16(wq, x), _mm256_maddubs_epi16(c32, x));
                    const __m256i p = _mm256_madd_epi16(p16, sc);
                    acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * a->d[(size_t)(t0 + j) * nb + 8 * sb + k]), acc[j]);
                }
            }
        }
        if (sb1 < nsb) {
            for (int j = 0; j < NT; j++) _mm256_storeu_ps(pp + 16 * j, acc[j]);
            continue;
        }
        for (int j = 0; j < NT; j++) y[(size_t)(t0 + j) * ldy + r] = hsum(acc[j]);
    }
}

/* The row tile's partial sums between super-block chunks (kquant.h: KQ_GROUPS), or NULL when a row is one chunk */
AI int kq_part(const pi_mat *m, int tile, float **part) {
    *part = NULL;
    if (m->cols / PI_QK_K <= PI_KQ_KC) return 0;
    *part = aligned_alloc(64, (size_t)tile * PI_KQ_NT * 16 * sizeof(float));
    return *part ? 0 : -1;
}

#define KQ_MULTI(name, CALL)                                                                                \
    static int name(const pi_mat *m, const int32_t *idx, int r0, int r1, const pi_act *a, int n_tok, float *y,  \
                    int ldy) {                                                                               \
        const int tile = pi_kq_tile_rows(m);                                                                 \
        float *part;                                                                                         \
        if (kq_part(m, tile, &part)) return -1;                                                              \
        KQ_GROUPS(CALL);                                                                                     \
        free(part);                                                                                          \
        return 0;                                                                                            \
    }
#define CALL_Q4(nt) q45_group(m, idx, rt, re, a, t0, nt, y, ldy, 0, s0, s1, part)
#define CALL_Q5(nt) q45_group(m, idx, rt, re, a, t0, nt, y, ldy, 1, s0, s1, part)
#define CALL_Q6(nt) q6_group(m, idx, rt, re, a, t0, nt, y, ldy, s0, s1, part)
KQ_MULTI(multi_q4_k, CALL_Q4)
KQ_MULTI(multi_q5_k, CALL_Q5)
KQ_MULTI(multi_q6_k, CALL_Q6)

pi_kq_multi_fn pi_kq_multi_avx2(int qtype) {
    switch (qtype) {
    case PI_Q4_K: return multi_q4_k;
    case PI_Q5_K: return multi_q5_k;
    case PI_Q6_K: return multi_q6_k;
    default: return NULL;
    }
}

pi_rows_fn pi_kq_rows_avx2(int qtype) {
    switch (qtype) {
    case PI_Q4_K: return rows_q4_k;
    case PI_Q5_K: return rows_q5_k;
    case PI_Q6_K: return rows_q6_k;
    default: return NULL;
    }
}

#pragma GCC pop_options
#endif
