/* AVX-512 VNNI row dots of K-quant rows against q8 activations (the terms of kquant.h).
 *
 * A pass reads PI_KQ_ROWS rows; per 256-value super-block the activation vectors are loaded and arranged once for
 * the pass. Q4_K/Q5_K: the 128 nibble bytes are two zmm loads; the low nibbles of bytes [32g, 32g+64) are
 * sub-blocks 2g and 2g+2, the high ones 2g+1 and 2g+3, so the activations are arranged as [b0|b2], [b1|b3],
 * [b4|b6], [b5|b7] (one 64-bit-lane shuffle each) and one vpdpbusd covers two sub-blocks: lanes 0-7 the first,
 * 8-15 the second. The eight sub-block scales become one f32 vector d*sc[s]*dx[b] and a permute puts each in
 * its 8 lanes. Q6_K: 64 values per vpdpbusd in element order (ql low / high nibbles with qh's 2-bit fields
 * merged by one ternary-logic op), the -32 offset started in the accumulator as -32 * the 4-value sums of x, the
 * 16 chunk scales d*sc[k]*dx[k/2] permuted to their 4 lanes each. */
#include <stdlib.h>

#include "kquant.h"

#if defined(PI_X86)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,bmi2")
#include <immintrin.h>

#define AI static inline __attribute__((always_inline))
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

/* Lanes of the scale vector each Q4_K/Q5_K weight vector uses: [sc 2g x8 | sc 2g+2 x8] etc. */
AI void q45_lanes(__m512i p[4]) {
    const __m512i pl0 = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2);
    for (int k = 0; k < 4; k++) p[k] = _mm512_add_epi32(pl0, _mm512_set1_epi32((k & 1) + 4 * (k >> 1)));
}

/* Q6_K: 16-value chunk 4k + i/4 scales lane i of weight vector k */
AI void q6_lanes(__m512i pk[4]) {
    const __m512i l4 = _mm512_srli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), 2);
    for (int k = 0; k < 4; k++) pk[k] = _mm512_add_epi32(_mm512_set1_epi32(4 * k), l4);
}

/* A Q6_K super-block's 256 quants (q, not yet q - 32) as four 64-value vectors in element order: ql's low / high
 * nibbles with qh's 2-bit fields merged by one ternary-logic op. qh's field for values [0,32) / [32,64) of a
 * vector: bits 0-1 / 2-3 moved to 4-5 (shift left 4 / 2); for [64,96) / [96,128): bits 4-5 / 6-7 (right 0 / 2). */
AI void q6_weights(const pi_blk_q6_K *b, __m512i wq[4]) {
    const __m512i m4 = _mm512_set1_epi8(0x0F), m30 = _mm512_set1_epi8(0x30);
    const __m512i sa = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1);
    const __m512i sbv = _mm512_inserti64x4(_mm512_set1_epi16(0), _mm256_set1_epi16(2), 1);
    for (int h = 0; h < 2; h++) {
        const __m512i ql = _mm512_loadu_si512(b->ql + 64 * h);
        const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(b->qh + 32 * h)));
        const __m512i ha = _mm512_and_si512(_mm512_sllv_epi16(qh, sa), m30);
        const __m512i hb = _mm512_and_si512(_mm512_srlv_epi16(qh, sbv), m30);
        wq[2 * h] = _mm512_ternarylogic_epi32(ql, ha, m4, 0xE4); /* m4 ? ql : ha */
        wq[2 * h + 1] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(ql, 4), hb, m4, 0xE4);
    }
}

/* A Q4_K/Q5_K super-block's d*sc[s] and dmin*m[s] (s = 0..7) */
AI void q45_scales(const uint8_t *b, __m256 *sd, __m256 *md) {
    uint16_t dh[2];
    memcpy(dh, b, 4);
    const __m128 dd = _mm_cvtph_ps(_mm_cvtsi32_si128((int)((uint32_t)dh[0] | (uint32_t)dh[1] << 16)));
    const __m128i sm = scales_mins(b + 4);
    const __m256 scf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(sm));
    const __m256 mnf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(sm, 8)));
    *sd = _mm256_mul_ps(scf, _mm256_broadcastss_ps(dd));
    *md = _mm256_mul_ps(mnf, _mm256_broadcastss_ps(_mm_movehdup_ps(dd)));
}

/* Its 256 quants as four vectors of sub-blocks [0|2], [1|3], [4|6], [5|7] (Q5_K: qh's bit s adds 16 to sub-block s) */
AI void q45_weights(const uint8_t *b, const int Q5, __m512i w[4]) {
    const size_t qoff = Q5 ? 48 : 16;
    const __m512i m4 = _mm512_set1_epi8(0x0F), v16 = _mm512_set1_epi8(16);
    const __m512i q0 = _mm512_loadu_si512(b + qoff), q1 = _mm512_loadu_si512(b + qoff + 64);
    w[0] = _mm512_and_si512(q0, m4);
    w[1] = _mm512_and_si512(_mm512_srli_epi16(q0, 4), m4);
    w[2] = _mm512_and_si512(q1, m4);
    w[3] = _mm512_and_si512(_mm512_srli_epi16(q1, 4), m4);
    if (Q5) { /* the qh bit of sub-block s is bit s of qh[l]; per weight vector [bit 2g | bit 2g+2] etc. */
        const __m512i bl0 = _mm512_inserti64x4(_mm512_set1_epi8(0x01), _mm256_set1_epi8(0x04), 1);
        const __m512i bh0 = _mm512_add_epi8(bl0, bl0);
        const __m512i bit[4] = {bl0, bh0, _mm512_slli_epi16(bl0, 4), _mm512_slli_epi16(bh0, 4)};
        const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(b + 16)));
        for (int k = 0; k < 4; k++) w[k] = _mm512_mask_add_epi8(w[k], _mm512_test_epi8_mask(qh, bit[k]), w[k], v16);
    }
}

AI void rows_q45(const pi_mat *m, const int32_t *idx, int r0, int r1, const pi_act *a, float *y, const int Q5) {
    const int nsb = m->cols / PI_QK_K;
    const size_t bb = Q5 ? sizeof(pi_blk_q5_K) : sizeof(pi_blk_q4_K);
    __m512i pl[4];
    q45_lanes(pl);
    const int ahead = pi_kq_pf_ahead(m, idx);
    for (int r = r0; r < r1; r += PI_KQ_ROWS) {
        const int nr = r1 - r < PI_KQ_ROWS ? r1 - r : PI_KQ_ROWS;
        const uint8_t *w[PI_KQ_ROWS];
        __m512 acc[PI_KQ_ROWS];
        __m256 accm[PI_KQ_ROWS];
        _Pragma("GCC unroll 8") for (int j = 0; j < PI_KQ_ROWS; j++) {
            w[j] = m->raw + (size_t)PI_ROW(idx, r + (j < nr ? j : 0)) * m->row_bytes;
            acc[j] = _mm512_setzero_ps();
            accm[j] = _mm256_setzero_ps();
        }
        for (int sb = 0; sb < nsb; sb++) {
            pi_kq_prefetch_rows(m, idx, r1, r + ahead, (size_t)sb * bb, bb);
            const int8_t *xq = a->qs + (size_t)sb * PI_QK_K;
            const __m512i x01 = _mm512_loadu_si512(xq), x23 = _mm512_loadu_si512(xq + 64);
            const __m512i x45 = _mm512_loadu_si512(xq + 128), x67 = _mm512_loadu_si512(xq + 192);
            const __m512i xl0 = _mm512_shuffle_i64x2(x01, x23, _MM_SHUFFLE(1, 0, 1, 0));
            const __m512i xh0 = _mm512_shuffle_i64x2(x01, x23, _MM_SHUFFLE(3, 2, 3, 2));
            const __m512i xl1 = _mm512_shuffle_i64x2(x45, x67, _MM_SHUFFLE(1, 0, 1, 0));
            const __m512i xh1 = _mm512_shuffle_i64x2(x45, x67, _MM_SHUFFLE(3, 2, 3, 2));
            const __m256 dx = _mm256_loadu_ps(a->d + 8 * sb);
            const __m256 xs = _mm256_mul_ps(dx, _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)(a->sum + 8 * sb))));
            _Pragma("GCC unroll 8") for (int j = 0; j < PI_KQ_ROWS; j++) {
                const uint8_t *b = w[j] + (size_t)sb * bb;
                __m256 sd, md;
                __m512i wq[4];
                q45_scales(b, &sd, &md);
                const __m256 S = _mm256_mul_ps(sd, dx);
                accm[j] = _mm256_fmadd_ps(md, xs, accm[j]);
                const __m512 Sz = _mm512_castps256_ps512(S);
                q45_weights(b, Q5, wq);
                const __m512i z = _mm512_setzero_si512();
                __m512 t = acc[j];
                t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(z, wq[0], xl0)), _mm512_permutexvar_ps(pl[0], Sz), t);
                t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(z, wq[1], xh0)), _mm512_permutexvar_ps(pl[1], Sz), t);
                t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(z, wq[2], xl1)), _mm512_permutexvar_ps(pl[2], Sz), t);
                t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(z, wq[3], xh1)), _mm512_permutexvar_ps(pl[3], Sz), t);
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
    const __m512i c32 = _mm512_set1_epi8(32);
    const __m512i dxi = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    __m512i pk[4];
    q6_lanes(pk);
    const int ahead = pi_kq_pf_ahead(m, idx);
    for (int r = r0; r < r1; r += PI_KQ_ROWS) {
        const int nr = r1 - r < PI_KQ_ROWS ? r1 - r : PI_KQ_ROWS;
        const pi_blk_q6_K *w[PI_KQ_ROWS];
        __m512 acc[PI_KQ_ROWS];
        _Pragma("GCC unroll 8") for (int j = 0; j < PI_KQ_ROWS; j++) {
            w[j] = (const pi_blk_q6_K *)(m->raw + (size_t)PI_ROW(idx, r + (j < nr ? j : 0)) * m->row_bytes);
            acc[j] = _mm512_setzero_ps();
        }
        for (int sb = 0; sb < nsb; sb++) {
            pi_kq_prefetch_rows(m, idx, r1, r + ahead, (size_t)sb * bb, bb);
            const int8_t *xq = a->qs + (size_t)sb * PI_QK_K;
            __m512i x[4], neg[4];
            _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) {
                x[k] = _mm512_loadu_si512(xq + 64 * k);
                neg[k] = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), c32, x[k]));
            }
            const __m512 dx16 = _mm512_permutexvar_ps(dxi, _mm512_castps256_ps512(_mm256_loadu_ps(a->d + 8 * sb)));
            _Pragma("GCC unroll 8") for (int j = 0; j < PI_KQ_ROWS; j++) {
                const pi_blk_q6_K *b = w[j] + sb;
                const __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)b->scales)));
                const __m512 S = _mm512_mul_ps(_mm512_mul_ps(sc, _mm512_set1_ps(h2f(b->d))), dx16);
                __m512 t = acc[j];
                __m512i wq[4];
                q6_weights(b, wq);
                _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++)
                    t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(neg[k], wq[k], x[k])), _mm512_permutexvar_ps(pk[k], S), t);
                acc[j] = t;
            }
        }
        for (int j = 0; j < nr; j++) y[r + j] = _mm512_reduce_add_ps(acc[j]);
    }
}

/* ---- several tokens (kquant.h: pi_kq_rows_tokens) ----
 * One row at a time against PI_KQ_NT tokens: the row's super-block is unpacked (nibbles, qh bits, scales and
 * mins, d*sc and dmin*m) once, then each token runs the terms of rows_q45 / rows_q6_k above, in their order: the
 * same lanes, products and sums, so a token's result is the one-token kernel's bit for bit. The activations are
 * arranged once per call (the [b0|b2].. shuffles of rows_q45, dx*sum(xq), and Q6_K's -32 * 4-value sums), so the
 * per-token work is the dot products and their scaling only. */
static void *kq_scratch(size_t bytes) { return aligned_alloc(64, (bytes + 63) & ~(size_t)63); }

/* The partial sums of a row tile between super-block chunks (24 floats per row and token: acc, accm) */
static size_t kq_part_bytes(const pi_mat *m, int tile) {
    return m->cols / PI_QK_K > PI_KQ_KC ? (size_t)tile * PI_KQ_NT * 24 * sizeof(float) : 0;
}

static void arrange_q45(const pi_act *a, int cols, int n_tok, int8_t *xa, float *xs, float *dxp) {
    const int nsb = cols / PI_QK_K, nb = cols / PI_QK;
    __m512i pl[4];
    q45_lanes(pl);
    for (int t = 0; t < n_tok; t++)
        for (int sb = 0; sb < nsb; sb++) {
            const int8_t *xq = a->qs + (size_t)t * cols + (size_t)sb * PI_QK_K;
            int8_t *o = xa + (size_t)t * cols + (size_t)sb * PI_QK_K;
            const __m512i x01 = _mm512_loadu_si512(xq), x23 = _mm512_loadu_si512(xq + 64);
            const __m512i x45 = _mm512_loadu_si512(xq + 128), x67 = _mm512_loadu_si512(xq + 192);
            _mm512_storeu_si512(o, _mm512_shuffle_i64x2(x01, x23, _MM_SHUFFLE(1, 0, 1, 0)));
            _mm512_storeu_si512(o + 64, _mm512_shuffle_i64x2(x01, x23, _MM_SHUFFLE(3, 2, 3, 2)));
            _mm512_storeu_si512(o + 128, _mm512_shuffle_i64x2(x45, x67, _MM_SHUFFLE(1, 0, 1, 0)));
            _mm512_storeu_si512(o + 192, _mm512_shuffle_i64x2(x45, x67, _MM_SHUFFLE(3, 2, 3, 2)));
            const size_t bo = (size_t)t * nb + 8 * sb;
            const __m256 dx = _mm256_loadu_ps(a->d + bo);
            _mm256_storeu_ps(xs + bo, _mm256_mul_ps(dx, _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)(a->sum + bo)))));
            float *dp = dxp + ((size_t)t * nsb + sb) * 64;
            const __m512 dz = _mm512_castps256_ps512(dx);
            for (int k = 0; k < 4; k++) _mm512_storeu_ps(dp + 16 * k, _mm512_permutexvar_ps(pl[k], dz));
        }
}

/* rows [r0, r1) for tokens [t0, t0 + NT); pf: prefetch the rows pi_kq_pf_rows ahead (below rlim) as the first group runs */
AI void q45_group(const pi_mat *m, const int32_t *idx, int r0, int r1, int rlim, const int8_t *xa,
                  const float *xs, const float *dxp, int t0, const int NT, float *y, int ldy, const int Q5, int pf, int sb0, int sb1,
                  float *part) {
    const int nsb = m->cols / PI_QK_K, nb = m->cols / PI_QK, ahead = pi_kq_pf_rows(m);
    const size_t bb = Q5 ? sizeof(pi_blk_q5_K) : sizeof(pi_blk_q4_K);
    __m512i pl[4];
    q45_lanes(pl);
    for (int r = r0; r < r1; r++) {
        const uint8_t *w = m->raw + (size_t)PI_ROW(idx, r) * m->row_bytes;
        const int pr = pf && r + ahead < rlim ? r + ahead : -1;
        __m512 acc[PI_KQ_NT];
        __m256 accm[PI_KQ_NT];
        float *pp = part + (size_t)(r - r0) * PI_KQ_NT * 24;
        _Pragma("GCC unroll 4") for (int j = 0; j < NT; j++) {
            acc[j] = sb0 ? _mm512_loadu_ps(pp + 24 * j) : _mm512_setzero_ps();
            accm[j] = sb0 ? _mm256_loadu_ps(pp + 24 * j + 16) : _mm256_setzero_ps();
        }
        for (int sb = sb0; sb < sb1; sb++) {
            if (pr >= 0) pi_kq_prefetch_row(m, idx, pr, (size_t)sb * bb, bb);
            const uint8_t *b = w + (size_t)sb * bb;
            __m256 sd, md;
            __m512i wq[4];
            q45_scales(b, &sd, &md);
            q45_weights(b, Q5, wq);
            /* rows_q45 permutes S = sd * dx; permuting sd here and dx once per token (dxp) gives the same products */
            const __m512 sdz = _mm512_castps256_ps512(sd);
            const __m512 sl0 = _mm512_permutexvar_ps(pl[0], sdz), sh0 = _mm512_permutexvar_ps(pl[1], sdz);
            const __m512 sl1 = _mm512_permutexvar_ps(pl[2], sdz), sh1 = _mm512_permutexvar_ps(pl[3], sdz);
            _Pragma("GCC unroll 4") for (int j = 0; j < NT; j++) {
                const size_t bo = (size_t)(t0 + j) * nb + 8 * sb;
                const int8_t *x = xa + (size_t)(t0 + j) * m->cols + (size_t)sb * PI_QK_K;
                const float *dp = dxp + ((size_t)(t0 + j) * nsb + sb) * 64;
                accm[j] = _mm256_fmadd_ps(md, _mm256_loadu_ps(xs + bo), accm[j]);
                const __m512i z = _mm512_setzero_si512();
                __m512 t = acc[j];
                t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(z, wq[0], _mm512_loadu_si512(x))), _mm512_mul_ps(sl0, _mm512_loadu_ps(dp)), t);
                t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(z, wq[1], _mm512_loadu_si512(x + 64))), _mm512_mul_ps(sh0, _mm512_loadu_ps(dp + 16)), t);
                t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(z, wq[2], _mm512_loadu_si512(x + 128))), _mm512_mul_ps(sl1, _mm512_loadu_ps(dp + 32)), t);
                t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(z, wq[3], _mm512_loadu_si512(x + 192))), _mm512_mul_ps(sh1, _mm512_loadu_ps(dp + 48)), t);
                acc[j] = t;
            }
        }
        if (sb1 < nsb) { /* this token group's next super-blocks continue the same sums */
            for (int j = 0; j < NT; j++) {
                _mm512_storeu_ps(pp + 24 * j, acc[j]);
                _mm256_storeu_ps(pp + 24 * j + 16, accm[j]);
            }
            continue;
        }
        for (int j = 0; j < NT; j++) y[(size_t)(t0 + j) * ldy + r] = _mm512_reduce_add_ps(acc[j]) - hsum256(accm[j]);
    }
}

AI int multi_q45(const pi_mat *m, const int32_t *idx, int r0, int r1, const pi_act *a, int n_tok, float *y, int ldy,
                 const int Q5) {
    const int tile = pi_kq_tile_rows(m), nb = m->cols / PI_QK;
    const size_t xbytes = ((size_t)n_tok * m->cols + 63) & ~(size_t)63, sbytes = ((size_t)n_tok * nb * 4 + 63) & ~(size_t)63;
    int8_t *xa = kq_scratch(xbytes + sbytes + (size_t)n_tok * m->cols + kq_part_bytes(m, tile));
    if (!xa) return -1;
    float *xs = (float *)(xa + xbytes), *dxp = (float *)(xa + xbytes + sbytes);
    float *part = (float *)(xa + xbytes + sbytes + (size_t)n_tok * m->cols);
    arrange_q45(a, m->cols, n_tok, xa, xs, dxp);
#define CALL(nt) q45_group(m, idx, rt, re, r1, xa, xs, dxp, t0, nt, y, ldy, Q5, t0 == 0, s0, s1, part)
    KQ_GROUPS(CALL);
#undef CALL
    free(xa);
    return 0;
}

static int multi_q4_k(const pi_mat *m, const int32_t *idx, int r0, int r1, const pi_act *a, int n_tok, float *y,
                      int ldy) {
    return multi_q45(m, idx, r0, r1, a, n_tok, y, ldy, 0);
}
static int multi_q5_k(const pi_mat *m, const int32_t *idx, int r0, int r1, const pi_act *a, int n_tok, float *y,
                      int ldy) {
    return multi_q45(m, idx, r0, r1, a, n_tok, y, ldy, 1);
}

/* Q6_K: the -32 offset's starting accumulators of rows_q6_k, -32 * each 4-value sum of xq (16 int32 per 64 values) */
static void arrange_q6(const pi_act *a, int cols, int n_tok, int32_t *neg, float *dxp) {
    const __m512i c32 = _mm512_set1_epi8(32);
    const __m512i dxi = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    __m512i pk[4];
    q6_lanes(pk);
    for (int t = 0; t < n_tok; t++) /* rows_q6_k's dx16 and its four permutes by pk[k] */
        for (int sb = 0; sb < cols / PI_QK_K; sb++) {
            const __m512 dx16 = _mm512_permutexvar_ps(dxi, _mm512_castps256_ps512(_mm256_loadu_ps(a->d + (size_t)t * (cols / PI_QK) + 8 * sb)));
            for (int k = 0; k < 4; k++)
                _mm512_storeu_ps(dxp + ((size_t)t * (cols / PI_QK_K) + sb) * 64 + 16 * k,
                                 _mm512_permutexvar_ps(pk[k], dx16));
        }
    for (int t = 0; t < n_tok; t++)
        for (int k = 0; k < cols / 64; k++) {
            const __m512i x = _mm512_loadu_si512(a->qs + (size_t)t * cols + 64 * k);
            _mm512_storeu_si512(neg + (size_t)t * (cols / 4) + 16 * k,
                                _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), c32, x)));
        }
}

AI void q6_group(const pi_mat *m, const int32_t *idx, int r0, int r1, int rlim, const pi_act *a, const int32_t *neg,
                 const float *dxp, int t0, const int NT, float *y, int ldy, int pf, int sb0, int sb1, float *part) {
    const int nsb = m->cols / PI_QK_K, ahead = pi_kq_pf_rows(m);
    const size_t bb = sizeof(pi_blk_q6_K);
    __m512i pk[4];
    q6_lanes(pk);
    for (int r = r0; r < r1; r++) {
        const pi_blk_q6_K *w = (const pi_blk_q6_K *)(m->raw + (size_t)PI_ROW(idx, r) * m->row_bytes);
        const int pr = pf && r + ahead < rlim ? r + ahead : -1;
        __m512 acc[PI_KQ_NT];
        float *pp = part + (size_t)(r - r0) * PI_KQ_NT * 24;
        _Pragma("GCC unroll 4") for (int j = 0; j < NT; j++) acc[j] = sb0 ? _mm512_loadu_ps(pp + 24 * j) : _mm512_setzero_ps();
        for (int sb = sb0; sb < sb1; sb++) {
            if (pr >= 0) pi_kq_prefetch_row(m, idx, pr, (size_t)sb * bb, bb);
            const pi_blk_q6_K *b = w + sb;
            const __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)b->scales)));
            const __m512 sd = _mm512_mul_ps(sc, _mm512_set1_ps(h2f(b->d)));
            __m512 sp[4]; /* rows_q6_k permutes S = sd * dx16; sd permuted here, dx16 once per token (dxp) */
            _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) sp[k] = _mm512_permutexvar_ps(pk[k], sd);
            __m512i wq[4];
            q6_weights(b, wq);
            _Pragma("GCC unroll 4") for (int j = 0; j < NT; j++) {
                const int8_t *x = a->qs + (size_t)(t0 + j) * m->cols + (size_t)sb * PI_QK_K;
                const int32_t *ng = neg + (size_t)(t0 + j) * (m->cols / 4) + (size_t)sb * 64;
                const float *dp = dxp + ((size_t)(t0 + j) * nsb + sb) * 64;
                __m512 t = acc[j];
                _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++)
                    t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_loadu_si512(ng + 16 * k), wq[k], _mm512_loadu_si512(x + 64 * k))),
                                        _mm512_mul_ps(sp[k], _mm512_loadu_ps(dp + 16 * k)), t);
                acc[j] = t;
            }
        }
        if (sb1 < nsb) {
            for (int j = 0; j < NT; j++) _mm512_storeu_ps(pp + 24 * j, acc[j]);
            continue;
        }
        for (int j = 0; j < NT; j++) y[(size_t)(t0 + j) * ldy + r] = _mm512_reduce_add_ps(acc[j]);
    }
}

static int multi_q6_k(const pi_mat *m, const int32_t *idx, int r0, int r1, const pi_act *a, int n_tok, float *y,
                      int ldy) {
    const int tile = pi_kq_tile_rows(m);
    const size_t nbytes = ((size_t)n_tok * m->cols + 63) & ~(size_t)63;
    int32_t *neg = kq_scratch(2 * nbytes + kq_part_bytes(m, tile));
    if (!neg) return -1;
    float *dxp = (float *)((uint8_t *)neg + nbytes), *part = (float *)((uint8_t *)neg + 2 * nbytes);
    arrange_q6(a, m->cols, n_tok, neg, dxp);
#define CALL(nt) q6_group(m, idx, rt, re, r1, a, neg, dxp, t0, nt, y, ldy, t0 == 0, s0, s1, part)
    KQ_GROUPS(CALL);
#undef CALL
    free(neg);
    return 0;
}

pi_kq_multi_fn pi_kq_multi_avx512(int qtype) {
    switch (qtype) {
    case PI_Q4_K: return multi_q4_k;
    case PI_Q5_K: return multi_q5_k;
    case PI_Q6_K: return multi_q6_k;
    default: return NULL;
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
