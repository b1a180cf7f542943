/* AVX-512 VNNI row dots of K-quant rows against q8 activations (the terms of kquant.h).
 *
 * A pass reads KQ_ROWS rows; per 256-value super-block the activation vectors are loaded and arranged once for
 * the pass. Q4_K/Q5_K: the 128 nibble bytes are two zmm loads; the low nibbles of bytes [32g, 32g+64) are
 * sub-blocks 2g and 2g+2, the high ones 2g+1 and 2g+3, so the activations are arranged as [b0|b2], [b1|b3],
 * [b4|b6], [b5|b7] (one 64-bit-lane shuffle each) and one vpdpbusd covers two sub-blocks: lanes 0-7 the first,
 * 8-15 the second. The eight sub-block scales become one f32 vector d*sc[s]*dx[b] and a permute puts each in
 * its 8 lanes. Q6_K: 64 values per vpdpbusd in element order (ql low / high nibbles with qh's 2-bit fields
 * merged by one ternary-logic op), the -32 offset started in the accumulator as -32 * the 4-value sums of x, the
 * 16 chunk scales d*sc[k]*dx[k/2] permuted to their 4 lanes each. */
#include "kquant.h"

#if defined(PI_X86)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,bmi2")
#include <immintrin.h>

#define AI static inline __attribute__((always_inline))
#define KQ_ROWS 4
/* The rows a later pass reads are prefetched while this one runs, in step with its progress (each super-block
 * step prefetches the same super-block of those rows): a row list (sparse gate/up) gives the hardware prefetcher
 * nothing to follow, and a dense range is file-backed memory without huge pages, where it stops at every 4 KiB
 * page (pi.h: PI_PF_DIST). Dense ranges look ahead at least KQ_PF_BYTES; rows of a list one pass ahead. */
#define KQ_PF_BYTES 16384
AI int pf_ahead(const pi_mat *m, const int32_t *idx) {
    if (idx) return KQ_ROWS;
    const size_t pass = (size_t)KQ_ROWS * m->row_bytes;
    return KQ_ROWS * (int)((KQ_PF_BYTES + pass - 1) / pass);
}

AI float h2f(uint16_t h) { return _cvtsh_ss(h); }
AI float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* sc[0..7] in bytes 0-7, mn[0..7] in bytes 8-15 (ggml's kmask form of get_scale_min_k4) */
AI __m128i scales_mins(const uint8_t *q) {
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

AI void prefetch_rows(const pi_mat *m, const int32_t *idx, int n, int j, size_t off, size_t len) {
    for (int k = 0; k < KQ_ROWS && j + k < n; k++) {
        const char *p = (const char *)m->raw + (size_t)PI_ROW(idx, j + k) * m->row_bytes + off;
        for (size_t o = 0; o < len; o += 64) _mm_prefetch(p + o, _MM_HINT_T0);
    }
}

AI void rows_q45(const pi_mat *m, const int32_t *idx, int r0, int r1, const pi_act *a, float *y, const int Q5) {
    const int nsb = m->cols / PI_QK_K;
    const size_t bb = Q5 ? sizeof(pi_blk_q5_K) : sizeof(pi_blk_q4_K), qoff = Q5 ? 48 : 16;
    const __m512i m4 = _mm512_set1_epi8(0x0F), v16 = _mm512_set1_epi8(16);
    /* lanes of the scale vector each weight vector uses: [sc 2g x8 | sc 2g+2 x8] etc. */
    const __m512i pl0 = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2);
    const __m512i ph0 = _mm512_add_epi32(pl0, _mm512_set1_epi32(1));
    const __m512i pl1 = _mm512_add_epi32(pl0, _mm512_set1_epi32(4));
    const __m512i ph1 = _mm512_add_epi32(pl0, _mm512_set1_epi32(5));
    /* Q5_K: the qh bit of sub-block s is bit s of qh[l]; per weight vector [bit 2g | bit 2g+2] etc. */
    const __m512i bl0 = _mm512_inserti64x4(_mm512_set1_epi8(0x01), _mm256_set1_epi8(0x04), 1);
    const __m512i bh0 = _mm512_add_epi8(bl0, bl0), bl1 = _mm512_slli_epi16(bl0, 4), bh1 = _mm512_slli_epi16(bh0, 4);
    const int ahead = pf_ahead(m, idx);
    for (int r = r0; r < r1; r += KQ_ROWS) {
        const int nr = r1 - r < KQ_ROWS ? r1 - r : KQ_ROWS;
        const uint8_t *w[KQ_ROWS];
        __m512 acc[KQ_ROWS];
        __m256 accm[KQ_ROWS];
        _Pragma("GCC unroll 8") for (int j = 0; j < KQ_ROWS; j++) {
            w[j] = m->raw + (size_t)PI_ROW(idx, r + (j < nr ? j : 0)) * m->row_bytes;
            acc[j] = _mm512_setzero_ps();
            accm[j] = _mm256_setzero_ps();
        }
        for (int sb = 0; sb < nsb; sb++) {
            prefetch_rows(m, idx, r1, r + ahead, (size_t)sb * bb, bb);
            const int8_t *xq = a->qs + (size_t)sb * PI_QK_K;
            const __m512i x01 = _mm512_loadu_si512(xq), x23 = _mm512_loadu_si512(xq + 64);
            const __m512i x45 = _mm512_loadu_si512(xq + 128), x67 = _mm512_loadu_si512(xq + 192);
            const __m512i xl0 = _mm512_shuffle_i64x2(x01, x23, _MM_SHUFFLE(1, 0, 1, 0));
            const __m512i xh0 = _mm512_shuffle_i64x2(x01, x23, _MM_SHUFFLE(3, 2, 3, 2));
            const __m512i xl1 = _mm512_shuffle_i64x2(x45, x67, _MM_SHUFFLE(1, 0, 1, 0));
            const __m512i xh1 = _mm512_shuffle_i64x2(x45, x67, _MM_SHUFFLE(3, 2, 3, 2));
            const __m256 dx = _mm256_loadu_ps(a->d + 8 * sb);
            const __m256 xs = _mm256_mul_ps(dx, _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)(a->sum + 8 * sb))));
            _Pragma("GCC unroll 8") for (int j = 0; j < KQ_ROWS; j++) {
                const uint8_t *b = w[j] + (size_t)sb * bb;
                uint16_t dh[2];
                memcpy(dh, b, 4);
                const __m128 dd = _mm_cvtph_ps(_mm_cvtsi32_si128((int)((uint32_t)dh[0] | (uint32_t)dh[1] << 16)));
                const __m128i sm = scales_mins(b + 4);
                const __m256 scf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(sm));
                const __m256 mnf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(sm, 8)));
                const __m256 S = _mm256_mul_ps(_mm256_mul_ps(scf, _mm256_broadcastss_ps(dd)), dx);
                accm[j] = _mm256_fmadd_ps(_mm256_mul_ps(mnf, _mm256_broadcastss_ps(_mm_movehdup_ps(dd))), xs, accm[j]);
                const __m512 Sz = _mm512_castps256_ps512(S);
                const __m512i q0 = _mm512_loadu_si512(b + qoff), q1 = _mm512_loadu_si512(b + qoff + 64);
                __m512i wl0 = _mm512_and_si512(q0, m4), wh0 = _mm512_and_si512(_mm512_srli_epi16(q0, 4), m4);
                __m512i wl1 = _mm512_and_si512(q1, m4), wh1 = _mm512_and_si512(_mm512_srli_epi16(q1, 4), m4);
                if (Q5) {
                    const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(b + 16)));
                    wl0 = _mm512_mask_add_epi8(wl0, _mm512_test_epi8_mask(qh, bl0), wl0, v16);
                    wh0 = _mm512_mask_add_epi8(wh0, _mm512_test_epi8_mask(qh, bh0), wh0, v16);
                    wl1 = _mm512_mask_add_epi8(wl1, _mm512_test_epi8_mask(qh, bl1), wl1, v16);
                    wh1 = _mm512_mask_add_epi8(wh1, _mm512_test_epi8_mask(qh, bh1), wh1, v16);
                }
                const __m512i z = _mm512_setzero_si512();
                __m512 t = acc[j];
                t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(z, wl0, xl0)), _mm512_permutexvar_ps(pl0, Sz), t);
                t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(z, wh0, xh0)), _mm512_permutexvar_ps(ph0, Sz), t);
                t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(z, wl1, xl1)), _mm512_permutexvar_ps(pl1, Sz), t);
                t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(z, wh1, xh1)), _mm512_permutexvar_ps(ph1, Sz), t);
                acc[j] = t;
            }
        }
        for (int j = 0; j < nr; j++) y[r + j] = _mm512_reduce_add_ps(acc[j]) - hsum256(accm[j]);
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
    const size_t bb = sizeof(pi_blk_q6_K);
    const __m512i m4 = _mm512_set1_epi8(0x0F), m30 = _mm512_set1_epi8(0x30), c32 = _mm512_set1_epi8(32);
    /* qh's field for values [0,32) / [32,64) of a 64-value vector: bits 0-1 / 2-3 moved to 4-5 (shift left 4 / 2),
     * for [64,96) / [96,128): bits 4-5 / 6-7 (shift right 0 / 2) */
    const __m512i sa = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1);
    const __m512i sbv = _mm512_inserti64x4(_mm512_set1_epi16(0), _mm256_set1_epi16(2), 1);
    const __m512i dxi = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    __m512i pk[4];
    for (int k = 0; k < 4; k++)
        pk[k] = _mm512_add_epi32(_mm512_set1_epi32(4 * k), _mm512_srli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), 2));
    const int ahead = pf_ahead(m, idx);
    for (int r = r0; r < r1; r += KQ_ROWS) {
        const int nr = r1 - r < KQ_ROWS ? r1 - r : KQ_ROWS;
        const pi_blk_q6_K *w[KQ_ROWS];
        __m512 acc[KQ_ROWS];
        _Pragma("GCC unroll 8") for (int j = 0; j < KQ_ROWS; j++) {
            w[j] = (const pi_blk_q6_K *)(m->raw + (size_t)PI_ROW(idx, r + (j < nr ? j : 0)) * m->row_bytes);
            acc[j] = _mm512_setzero_ps();
        }
        for (int sb = 0; sb < nsb; sb++) {
            prefetch_rows(m, idx, r1, r + ahead, (size_t)sb * bb, bb);
            const int8_t *xq = a->qs + (size_t)sb * PI_QK_K;
            __m512i x[4], neg[4];
            _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) {
                x[k] = _mm512_loadu_si512(xq + 64 * k);
                neg[k] = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), c32, x[k]));
            }
            const __m512 dx16 = _mm512_permutexvar_ps(dxi, _mm512_castps256_ps512(_mm256_loadu_ps(a->d + 8 * sb)));
            _Pragma("GCC unroll 8") for (int j = 0; j < KQ_ROWS; j++) {
                const pi_blk_q6_K *b = w[j] + sb;
                const __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)b->scales)));
                const __m512 S = _mm512_mul_ps(_mm512_mul_ps(sc, _mm512_set1_ps(h2f(b->d))), dx16);
                __m512 t = acc[j];
                _Pragma("GCC unroll 2") for (int h = 0; h < 2; h++) {
                    const __m512i ql = _mm512_loadu_si512(b->ql + 64 * h);
                    const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(b->qh + 32 * h)));
                    const __m512i ha = _mm512_and_si512(_mm512_sllv_epi16(qh, sa), m30);
                    const __m512i hb = _mm512_and_si512(_mm512_srlv_epi16(qh, sbv), m30);
                    const __m512i wa = _mm512_ternarylogic_epi32(ql, ha, m4, 0xE4); /* m4 ? ql : ha */
                    const __m512i wb = _mm512_ternarylogic_epi32(_mm512_srli_epi16(ql, 4), hb, m4, 0xE4);
                    t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(neg[2 * h], wa, x[2 * h])),
                                        _mm512_permutexvar_ps(pk[2 * h], S), t);
                    t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(neg[2 * h + 1], wb, x[2 * h + 1])),
                                        _mm512_permutexvar_ps(pk[2 * h + 1], S), t);
                }
                acc[j] = t;
            }
        }
        for (int j = 0; j < nr; j++) y[r + j] = _mm512_reduce_add_ps(acc[j]);
    }
}

pi_rows_fn pi_kq_rows_avx512(int qtype) {
    switch (qtype) {
    case PI_Q4_K: return rows_q4_k;
    case PI_Q5_K: return rows_q5_k;
    case PI_Q6_K: return rows_q6_k;
    default: return NULL;
    }
}

#pragma GCC pop_options
#endif
