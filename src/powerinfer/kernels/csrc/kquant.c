/* K-quants (kquant.h): dequantization, the portable row dots (the scalar statement of the terms every ISA
 * computes), the generic axpy, and the per-ISA dispatch. */
#include "kquant.h"

size_t pi_kq_block_bytes(int qtype) {
    switch (qtype) {
    case PI_Q4_K: return sizeof(pi_blk_q4_K);
    case PI_Q5_K: return sizeof(pi_blk_q5_K);
    case PI_Q6_K: return sizeof(pi_blk_q6_K);
    default: return 0;
    }
}

/* One super-block to 256 floats, in ggml's order of operations (dequantize_row_q4_K/q5_K/q6_K: (d*sc)*q - dmin*m),
 * which gguf-py's numpy dequantizers also follow, so tests compare them bit for bit. */
static void dequant_block(int qtype, const uint8_t *blk, float *y) {
    if (qtype == PI_Q6_K) {
        const pi_blk_q6_K *b = (const pi_blk_q6_K *)blk;
        const float d = pi_fp16_to_fp32(b->d);
        for (int h = 0; h < 2; h++) {
            const uint8_t *ql = b->ql + 64 * h, *qh = b->qh + 32 * h;
            const int8_t *sc = b->scales + 8 * h;
            float *yy = y + 128 * h;
            for (int l = 0; l < 32; l++) {
                const int is = l / 16;
                const int q1 = (int)((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                const int q2 = (int)((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                const int q3 = (int)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                const int q4 = (int)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                yy[l] = d * (float)sc[is] * (float)q1;
                yy[l + 32] = d * (float)sc[is + 2] * (float)q2;
                yy[l + 64] = d * (float)sc[is + 4] * (float)q3;
                yy[l + 96] = d * (float)sc[is + 6] * (float)q4;
            }
        }
        return;
    }
    /* Q4_K / Q5_K share the header; Q5_K has qh[32] before the nibbles */
    const pi_blk_q4_K *b = (const pi_blk_q4_K *)blk;
    const uint8_t *qh = qtype == PI_Q5_K ? ((const pi_blk_q5_K *)blk)->qh : NULL;
    const uint8_t *qs = qtype == PI_Q5_K ? ((const pi_blk_q5_K *)blk)->qs : b->qs;
    const float d = pi_fp16_to_fp32(b->d), dmin = pi_fp16_to_fp32(b->dmin);
    uint8_t sc[8], mn[8];
    pi_kq_scale_min(b->scales, sc, mn);
    for (int s = 0; s < 8; s++) {
        const float ds = d * (float)sc[s], ms = dmin * (float)mn[s];
        const uint8_t *q = qs + 32 * (s / 2);
        for (int l = 0; l < 32; l++) {
            int v = s & 1 ? q[l] >> 4 : q[l] & 0xF;
            if (qh) v += ((qh[l] >> s) & 1) << 4;
            y[32 * s + l] = ds * (float)v - ms;
        }
    }
}

int pi_kq_dequantize(int qtype, const void *src, size_t n, float *dst) {
    const size_t bb = pi_kq_block_bytes(qtype);
    if (!bb || n % PI_QK_K) return -1;
    for (size_t i = 0; i < n / PI_QK_K; i++) dequant_block(qtype, (const uint8_t *)src + i * bb, dst + i * PI_QK_K);
    return 0;
}

/* ---- portable row dots: the terms of kquant.h, one row at a time ---- */
static void rows_q45_k(const pi_mat *m, const int32_t *idx, int r0, int r1, const pi_act *a, float *y) {
    const int nsb = m->cols / PI_QK_K, q5 = m->qtype == PI_Q5_K;
    const size_t bb = pi_kq_block_bytes(m->qtype);
    for (int r = r0; r < r1; r++) {
        const uint8_t *row = m->raw + (size_t)PI_ROW(idx, r) * m->row_bytes;
        float acc = 0.0f, accm = 0.0f;
        for (int sb = 0; sb < nsb; sb++) {
            const pi_blk_q4_K *b = (const pi_blk_q4_K *)(row + sb * bb);
            const uint8_t *qh = q5 ? ((const pi_blk_q5_K *)b)->qh : NULL;
            const uint8_t *qs = q5 ? ((const pi_blk_q5_K *)b)->qs : b->qs;
            const float d = pi_fp16_to_fp32(b->d), dmin = pi_fp16_to_fp32(b->dmin);
            uint8_t sc[8], mn[8];
            pi_kq_scale_min(b->scales, sc, mn);
            for (int s = 0; s < 8; s++) {
                const int blk = sb * 8 + s;
                const int8_t *x = a->qs + (size_t)blk * PI_QK;
                const uint8_t *q = qs + 32 * (s / 2);
                int isum = 0;
                for (int l = 0; l < 32; l++) {
                    int v = s & 1 ? q[l] >> 4 : q[l] & 0xF;
                    if (qh) v += ((qh[l] >> s) & 1) << 4;
                    isum += v * x[l];
                }
                acc += d * (float)sc[s] * a->d[blk] * (float)isum;
                accm += dmin * (float)mn[s] * (a->d[blk] * (float)a->sum[blk]);
            }
        }
        y[r] = acc - accm;
    }
}

static void rows_q6_k(const pi_mat *m, const int32_t *idx, int r0, int r1, const pi_act *a, float *y) {
    const int nsb = m->cols / PI_QK_K;
    for (int r = r0; r < r1; r++) {
        const pi_blk_q6_K *row = (const pi_blk_q6_K *)(m->raw + (size_t)PI_ROW(idx, r) * m->row_bytes);
        float acc = 0.0f;
        for (int sb = 0; sb < nsb; sb++) {
            const pi_blk_q6_K *b = row + sb;
            const float d = pi_fp16_to_fp32(b->d);
            for (int k = 0; k < 16; k++) { /* 16-value chunk k: half k/8, quarter (k%8)/2 */
                const int h = k / 8, quarter = (k % 8) / 2, l0 = 16 * (k % 2);
                const uint8_t *ql = b->ql + 64 * h + (quarter & 1) * 32, *qh = b->qh + 32 * h;
                const int blk = sb * 8 + k / 2;
                const int8_t *x = a->qs + (size_t)sb * PI_QK_K + 16 * k;
                int isum = 0;
                for (int l = l0; l < l0 + 16; l++) {
                    const int lo = quarter < 2 ? ql[l] & 0xF : ql[l] >> 4;
                    const int q = (lo | (((qh[l] >> (2 * quarter)) & 3) << 4)) - 32;
                    isum += q * x[l - l0];
                }
                acc += d * (float)b->scales[k] * a->d[blk] * (float)isum;
            }
        }
        y[r] = acc;
    }
}

/* ---- portable multi-token dots: each super-block unpacked to integers once, then the terms of rows_q45_k /
 * rows_q6_k for every token, in the same expressions and order ---- */
static void multi_q45_k(const pi_mat *m, const int32_t *idx, int r0, int r1, const pi_act *a, int n_tok, float *y,
                        int ldy) {
    const int nsb = m->cols / PI_QK_K, nb = m->cols / PI_QK, q5 = m->qtype == PI_Q5_K;
    const size_t bb = pi_kq_block_bytes(m->qtype);
    for (int r = r0; r < r1; r++) {
        const uint8_t *row = m->raw + (size_t)PI_ROW(idx, r) * m->row_bytes;
        for (int t0 = 0; t0 < n_tok; t0 += PI_KQ_NT) {
            const int nt = n_tok - t0 < PI_KQ_NT ? n_tok - t0 : PI_KQ_NT;
            float acc[PI_KQ_NT] = {0}, accm[PI_KQ_NT] = {0};
            for (int sb = 0; sb < nsb; sb++) {
                const pi_blk_q4_K *b = (const pi_blk_q4_K *)(row + sb * bb);
                const uint8_t *qh = q5 ? ((const pi_blk_q5_K *)b)->qh : NULL;
                const uint8_t *qs = q5 ? ((const pi_blk_q5_K *)b)->qs : b->qs;
                const float d = pi_fp16_to_fp32(b->d), dmin = pi_fp16_to_fp32(b->dmin);
                uint8_t sc[8], mn[8], v[PI_QK_K];
                pi_kq_scale_min(b->scales, sc, mn);
                for (int s = 0; s < 8; s++)
                    for (int l = 0; l < 32; l++) {
                        const uint8_t *q = qs + 32 * (s / 2);
                        v[32 * s + l] = (uint8_t)((s & 1 ? q[l] >> 4 : q[l] & 0xF) + (qh ? ((qh[l] >> s) & 1) << 4 : 0));
                    }
                for (int j = 0; j < nt; j++) {
                    const int t = t0 + j;
                    const int8_t *xt = a->qs + (size_t)t * m->cols;
                    const float *dt = a->d + (size_t)t * nb;
                    const int32_t *st = a->sum + (size_t)t * nb;
                    for (int s = 0; s < 8; s++) {
                        const int blk = sb * 8 + s;
                        const int8_t *x = xt + (size_t)blk * PI_QK;
                        int isum = 0;
                        for (int l = 0; l < 32; l++) isum += v[32 * s + l] * x[l];
                        acc[j] += d * (float)sc[s] * dt[blk] * (float)isum;
                        accm[j] += dmin * (float)mn[s] * (dt[blk] * (float)st[blk]);
                    }
                }
            }
            for (int j = 0; j < nt; j++) y[(size_t)(t0 + j) * ldy + r] = acc[j] - accm[j];
        }
    }
}

static void multi_q6_k(const pi_mat *m, const int32_t *idx, int r0, int r1, const pi_act *a, int n_tok, float *y,
                       int ldy) {
    const int nsb = m->cols / PI_QK_K, nb = m->cols / PI_QK;
    for (int r = r0; r < r1; r++) {
        const pi_blk_q6_K *row = (const pi_blk_q6_K *)(m->raw + (size_t)PI_ROW(idx, r) * m->row_bytes);
        for (int t0 = 0; t0 < n_tok; t0 += PI_KQ_NT) {
            const int nt = n_tok - t0 < PI_KQ_NT ? n_tok - t0 : PI_KQ_NT;
            float acc[PI_KQ_NT] = {0};
            for (int sb = 0; sb < nsb; sb++) {
                const pi_blk_q6_K *b = row + sb;
                const float d = pi_fp16_to_fp32(b->d);
                int8_t v[PI_QK_K]; /* value 16k + i of the super-block, q - 32 */
                for (int k = 0; k < 16; k++) {
                    const int h = k / 8, quarter = (k % 8) / 2, l0 = 16 * (k % 2);
                    const uint8_t *ql = b->ql + 64 * h + (quarter & 1) * 32, *qh = b->qh + 32 * h;
                    for (int l = l0; l < l0 + 16; l++) {
                        const int lo = quarter < 2 ? ql[l] & 0xF : ql[l] >> 4;
                        v[16 * k + l - l0] = (int8_t)((lo | (((qh[l] >> (2 * quarter)) & 3) << 4)) - 32);
                    }
                }
                for (int j = 0; j < nt; j++) {
                    const int t = t0 + j;
                    const float *dt = a->d + (size_t)t * nb;
                    for (int k = 0; k < 16; k++) {
                        const int8_t *x = a->qs + (size_t)t * m->cols + (size_t)sb * PI_QK_K + 16 * k;
                        int isum = 0;
                        for (int l = 0; l < 16; l++) isum += v[16 * k + l] * x[l];
                        acc[j] += d * (float)b->scales[k] * dt[sb * 8 + k / 2] * (float)isum;
                    }
                }
            }
            for (int j = 0; j < nt; j++) y[(size_t)(t0 + j) * ldy + r] = acc[j];
        }
    }
}

void pi_kq_rows_tokens(const pi_mat *m, const int32_t *idx, int r0, int r1, const pi_act *a, int n_tok, float *y,
                       int ldy) {
    if (r1 <= r0 || n_tok <= 0) return;
    pi_kq_multi_fn f = NULL;
#if defined(PI_X86)
    if (pi_k == &pi_kernels_avx512) f = pi_kq_multi_avx512(m->qtype);
    else if (pi_k == &pi_kernels_avx2) f = pi_kq_multi_avx2(m->qtype);
#endif
    /* the x86 kernels arrange the activations once per call, then walk the tiles themselves; without memory for
     * their scratch, the one-token kernel per token gives the same results */
    if (f) {
        if (f(m, idx, r0, r1, a, n_tok, y, ldy) == 0) return;
        const pi_rows_fn one = pi_kq_rows(m->qtype);
        for (int t = 0; t < n_tok; t++) {
            const pi_act at = pi_act_token(a, t);
            one(m, idx, r0, r1, &at, y + (size_t)t * ldy);
        }
        return;
    }
    void (*tile_fn)(const pi_mat *, const int32_t *, int, int, const pi_act *, int, float *, int) =
        m->qtype == PI_Q6_K ? multi_q6_k : multi_q45_k;
    const int tile = pi_kq_tile_rows(m);
    for (int rt = r0; rt < r1; rt += tile) tile_fn(m, idx, rt, rt + tile < r1 ? rt + tile : r1, a, n_tok, y, ldy);
}

void pi_kq_axpy(const pi_mat *m, const int32_t *idx, const float *h, int n, int c0, int c1, float *y) {
    const size_t bb = pi_kq_block_bytes(m->qtype);
    float tmp[PI_QK_K];
    for (int j = 0; j < n; j++) {
        const uint8_t *row = m->raw + (size_t)idx[j] * m->row_bytes;
        for (int sb = c0 / PI_QK_K; sb < (c1 + PI_QK_K - 1) / PI_QK_K; sb++) {
            dequant_block(m->qtype, row + sb * bb, tmp);
            float *yy = y + (size_t)sb * PI_QK_K;
            for (int i = 0; i < PI_QK_K; i++) yy[i] += h[j] * tmp[i];
        }
    }
}

pi_rows_fn pi_kq_rows(int qtype) {
#if defined(PI_X86)
    pi_rows_fn f = NULL;
    if (pi_k == &pi_kernels_avx512) f = pi_kq_rows_avx512(qtype);
    else if (pi_k == &pi_kernels_avx2) f = pi_kq_rows_avx2(qtype);
    if (f) return f;
#endif
    return qtype == PI_Q6_K ? rows_q6_k : rows_q45_k;
}
