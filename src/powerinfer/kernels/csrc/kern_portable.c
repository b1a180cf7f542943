/* Portable C kernels: the fallback on any CPU and the scalar statement of every kernel's arithmetic.
 * Per block: integer dot of the quants (exact), then acc_d += (dw * dx) * isum and, for Q4_1,
 * acc_m += m * s (ggml's vec_dot_q4_1_q8_1); the row result is acc_d + acc_m. */
#include <math.h>

#include "pi.h"

/* ---- activation quantization: ggml's x86 quantize_row_q8_1 (id = 127/max, round half to even) ---- */
static void quant_q8(const float *x, int nblocks, int8_t *qs, float *d, float *s, int32_t *sum) {
    for (int b = 0; b < nblocks; b++, x += PI_QK, qs += PI_QK) {
        float amax = 0.0f;
        int bad = 0;
        for (int j = 0; j < PI_QK; j++) { const float v = fabsf(x[j]); amax = v > amax ? v : amax; bad |= !(v <= 3.4e38f); }
        if (bad) { pi_q8_nonfinite(qs, d + b, s + b, sum + b); continue; }
        const float dd = amax / 127.0f;
        const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
        int isum = 0;
        for (int j = 0; j < PI_QK; j++) {
            const int q = (int)nearbyintf(x[j] * id);
            qs[j] = (int8_t)q;
            isum += q;
        }
        d[b] = pi_round_fp16(dd);
        s[b] = pi_round_fp16(dd * (float)isum);
        sum[b] = isum;
    }
}

/* ---- raw (GGUF) layout, one row at a time ---- */
static void rows_q4_0(const pi_mat *m, const int32_t *idx, int r0, int r1, const pi_act *a, float *y) {
    const int nb = m->cols / PI_QK;
    for (int r = r0; r < r1; r++) {
        const pi_blk_q4_0 *w = (const pi_blk_q4_0 *)(m->raw + (size_t)PI_ROW(idx, r) * m->row_bytes);
        float acc = 0.0f;
        for (int b = 0; b < nb; b++) {
            const int8_t *x = a->qs + b * PI_QK;
            int isum = 0;
            for (int j = 0; j < 16; j++)
                isum += ((w[b].qs[j] & 15) - 8) * x[j] + ((w[b].qs[j] >> 4) - 8) * x[j + 16];
            acc += pi_fp16_to_fp32(w[b].d) * a->d[b] * (float)isum;
        }
        y[r] = acc;
    }
}

static void rows_q4_1(const pi_mat *m, const int32_t *idx, int r0, int r1, const pi_act *a, float *y) {
    const int nb = m->cols / PI_QK;
    for (int r = r0; r < r1; r++) {
        const pi_blk_q4_1 *w = (const pi_blk_q4_1 *)(m->raw + (size_t)PI_ROW(idx, r) * m->row_bytes);
        float acc = 0.0f, accm = 0.0f;
        for (int b = 0; b < nb; b++) {
            const int8_t *x = a->qs + b * PI_QK;
            int isum = 0;
            for (int j = 0; j < 16; j++) isum += (w[b].qs[j] & 15) * x[j] + (w[b].qs[j] >> 4) * x[j + 16];
            acc += pi_fp16_to_fp32(w[b].d) * a->d[b] * (float)isum;
            accm += pi_fp16_to_fp32(w[b].m) * a->s[b];
        }
        y[r] = acc + accm;
    }
}

static void rows_q8_0(const pi_mat *m, const int32_t *idx, int r0, int r1, const pi_act *a, float *y) {
    const int nb = m->cols / PI_QK;
    for (int r = r0; r < r1; r++) {
        const pi_blk_q8_0 *w = (const pi_blk_q8_0 *)(m->raw + (size_t)PI_ROW(idx, r) * m->row_bytes);
        float acc = 0.0f;
        for (int b = 0; b < nb; b++) {
            const int8_t *x = a->qs + b * PI_QK;
            int isum = 0;
            for (int j = 0; j < PI_QK; j++) isum += w[b].qs[j] * x[j];
            acc += pi_fp16_to_fp32(w[b].d) * a->d[b] * (float)isum;
        }
        y[r] = acc;
    }
}

static void rows_f16(const pi_mat *m, const int32_t *idx, int r0, int r1, const pi_act *a, float *y) {
    for (int r = r0; r < r1; r++) {
        const uint16_t *w = (const uint16_t *)(m->raw + (size_t)PI_ROW(idx, r) * m->row_bytes);
        float acc = 0.0f;
        for (int c = 0; c < m->cols; c++) acc += pi_fp16_to_fp32(w[c]) * pi_fp16_to_fp32(a->h[c]);
        y[r] = acc;
    }
}

static void rows_bf16(const pi_mat *m, const int32_t *idx, int r0, int r1, const pi_act *a, float *y) {
    for (int r = r0; r < r1; r++) {
        const uint16_t *w = (const uint16_t *)(m->raw + (size_t)PI_ROW(idx, r) * m->row_bytes);
        float acc = 0.0f;
        for (int c = 0; c < m->cols; c++) acc += pi_bf16_to_fp32(w[c]) * pi_bf16_to_fp32(a->bh[c]);
        y[r] = acc;
    }
}

static void rows_f32(const pi_mat *m, const int32_t *idx, int r0, int r1, const pi_act *a, float *y) {
    for (int r = r0; r < r1; r++) {
        const float *w = (const float *)(m->raw + (size_t)PI_ROW(idx, r) * m->row_bytes);
        float acc = 0.0f;
        for (int c = 0; c < m->cols; c++) acc += w[c] * a->f[c];
        y[r] = acc;
    }
}

/* ---- neuron-major axpy: y[c0..c1) += sum_j h[j] W[idx[j]][c0..c1), one row at a time ---- */
static void axpy_rows_any(const pi_mat *m, const int32_t *idx, const float *h, int n, int c0, int c1, float *y) {
    for (int j = 0; j < n; j++) {
        const uint8_t *row = m->raw + (size_t)idx[j] * m->row_bytes;
        const float hj = h[j];
        switch (m->qtype) {
        case PI_F32:
            for (int c = c0; c < c1; c++) y[c] += hj * ((const float *)row)[c];
            break;
        case PI_F16:
            for (int c = c0; c < c1; c++) y[c] += hj * pi_fp16_to_fp32(((const uint16_t *)row)[c]);
            break;
        case PI_BF16:
            for (int c = c0; c < c1; c++) y[c] += hj * pi_bf16_to_fp32(((const uint16_t *)row)[c]);
            break;
        case PI_Q8_0:
            for (int b = c0 / PI_QK; b < c1 / PI_QK; b++) {
                const pi_blk_q8_0 *w = (const pi_blk_q8_0 *)row + b;
                const float s = hj * pi_fp16_to_fp32(w->d);
                for (int i = 0; i < PI_QK; i++) y[b * PI_QK + i] += s * (float)w->qs[i];
            }
            break;
        case PI_Q4_0:
            for (int b = c0 / PI_QK; b < c1 / PI_QK; b++) {
                const pi_blk_q4_0 *w = (const pi_blk_q4_0 *)row + b;
                const float s = hj * pi_fp16_to_fp32(w->d);
                for (int i = 0; i < 16; i++) {
                    y[b * PI_QK + i] += s * (float)((w->qs[i] & 15) - 8);
                    y[b * PI_QK + 16 + i] += s * (float)((w->qs[i] >> 4) - 8);
                }
            }
            break;
        case PI_Q4_1:
            for (int b = c0 / PI_QK; b < c1 / PI_QK; b++) {
                const pi_blk_q4_1 *w = (const pi_blk_q4_1 *)row + b;
                const float s = hj * pi_fp16_to_fp32(w->d), o = hj * pi_fp16_to_fp32(w->m);
                for (int i = 0; i < 16; i++) {
                    y[b * PI_QK + i] += s * (float)(w->qs[i] & 15) + o;
                    y[b * PI_QK + 16 + i] += s * (float)(w->qs[i] >> 4) + o;
                }
            }
            break;
        default:
            break;
        }
    }
}

/* ---- packed layout (see pi_mat in pi.h) ---- */
static void packed_any(const pi_mat *m, const pi_seg *sg, const pi_act *a, int n_tok, float *y, int ldy) {
    const int nb = m->cols / PI_QK, qb = pi_qb(m->qtype), n = a->n;
    for (int g = sg->u0; g < sg->u1; g++) {
        const uint8_t *q0 = sg->p + (size_t)(g - sg->u0) * m->gstride;
        const uint16_t *sd = (const uint16_t *)(q0 + (size_t)nb * qb);
        const uint16_t *sm = sd + (size_t)nb * PI_G;
        for (int t = 0; t < n_tok; t++) {
            float acc[PI_G] = {0}, accm[PI_G] = {0};
            for (int b = 0; b < nb; b++) {
                const uint8_t *q = q0 + (size_t)b * qb;
                const int8_t *x = a->qs + (size_t)t * n + b * PI_QK;
                const float dx = a->d[(size_t)t * nb + b];
                const int sx = a->sum[(size_t)t * nb + b];
                for (int r = 0; r < PI_G; r++) {
                    int isum = 0;
                    if (m->qtype == PI_Q8_0) {
                        for (int k = 0; k < 8; k++)
                            for (int j = 0; j < 4; j++) isum += q[64 * k + 4 * r + j] * x[4 * k + j];
                        isum -= 128 * sx;
                    } else {
                        for (int k = 0; k < 4; k++)
                            for (int j = 0; j < 4; j++) {
                                const uint8_t v = q[64 * k + 4 * r + j];
                                isum += (v & 15) * x[4 * k + j] + (v >> 4) * x[16 + 4 * k + j];
                            }
                        if (m->qtype == PI_Q4_0) isum -= 8 * sx;
                    }
                    acc[r] += pi_fp16_to_fp32(sd[b * PI_G + r]) * dx * (float)isum;
                    if (m->qtype == PI_Q4_1) accm[r] += pi_fp16_to_fp32(sm[b * PI_G + r]) * a->s[(size_t)t * nb + b];
                }
            }
            for (int r = 0; r < PI_G; r++) {
                const int row = g * PI_G + r;
                if (row < m->rows) y[(size_t)t * ldy + row] = acc[r] + accm[r];
            }
        }
    }
}

/* ---- attention helpers ---- */
static float dot_f16(const float *q, const uint16_t *k, int n) {
    float acc = 0.0f;
    for (int i = 0; i < n; i++) acc += q[i] * pi_fp16_to_fp32(k[i]);
    return acc;
}

static void axpy_f16(float *y, const uint16_t *v, float a, int n) {
    for (int i = 0; i < n; i++) y[i] += a * pi_fp16_to_fp32(v[i]);
}

static void to_f16(const float *x, uint16_t *y, int n) {
    for (int i = 0; i < n; i++) y[i] = pi_fp32_to_fp16(x[i]);
}

static double read_sum(const uint8_t *p, size_t n, int iters) {
    uint64_t s = 0;
    for (int it = 0; it < iters; it++)
        for (size_t i = 0; i + 8 <= n; i += 8) { uint64_t v; memcpy(&v, p + i, 8); s += v; }
    return (double)s;
}

const pi_kernels pi_kernels_portable = {
    "portable",
    rows_q4_0, rows_q4_1, rows_q8_0, rows_f16, rows_bf16, rows_f32,
    axpy_rows_any, axpy_rows_any, axpy_rows_any, axpy_rows_any, axpy_rows_any, axpy_rows_any,
    packed_any, packed_any, packed_any,
    quant_q8, dot_f16, axpy_f16, to_f16, read_sum,
};
