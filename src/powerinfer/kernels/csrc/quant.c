/* Formats: f16 table, dequantization, activation buffers, weight packing and the per-matrix dispatch. */
#define _GNU_SOURCE
#include <math.h>
#include <stdlib.h>
#include <sys/mman.h>

#include "pi.h"
#include "panels.h"
#include "kquant.h"

float pi_f16_table[65536];

void pi_init_tables(void) {
    for (uint32_t i = 0; i < 65536; i++) pi_f16_table[i] = pi_fp16_to_fp32_calc((uint16_t)i);
}

void *pi_aligned_alloc(size_t bytes) {
    void *p = NULL;
    if (bytes == 0) bytes = 64;
    bytes = (bytes + 63) & ~(size_t)63;
    if (posix_memalign(&p, 64, bytes) != 0) return NULL;
    memset(p, 0, bytes);
    return p;
}

/* Packed weights live in 2 MiB-aligned chunks advised as transparent huge pages, bump-allocated in the
 * order the decoder binds (and reads) them. Measured: THP adds 5-10% to the prefetched cold stream
 * (37 -> 41 GB/s Q4_1) by sparing a TLB miss every 4 KiB. */
#define PI_HUGE (2u << 20)
#define PI_CHUNK (32u << 20)

void *pi_arena_alloc(pi_arena *a, size_t bytes) {
    bytes = (bytes + 63) & ~(size_t)63;
    if (bytes > a->left) {
        if (a->n == a->cap) {
            int cap = a->cap ? 2 * a->cap : 8;
            void **c = realloc(a->chunks, (size_t)cap * sizeof *c);
            if (!c) return NULL;
            a->chunks = c;
            size_t *z = realloc(a->sizes, (size_t)cap * sizeof *z);
            if (!z) return NULL;
            a->sizes = z; a->cap = cap;
        }
        size_t sz = bytes > PI_CHUNK ? (bytes + PI_HUGE - 1) & ~(size_t)(PI_HUGE - 1) : PI_CHUNK;
        void *p = NULL;
        if (posix_memalign(&p, PI_HUGE, sz) != 0) return NULL;
#ifdef MADV_HUGEPAGE
        madvise(p, sz, MADV_HUGEPAGE);
#endif
        a->chunks[a->n] = p;
        a->sizes[a->n++] = sz;
        a->cur = p; a->left = sz;
    }
    void *r = a->cur;
    a->cur += bytes; a->left -= bytes;
    return r;
}

const uint8_t *pi_arena_end(const pi_arena *a, const void *p) {
    for (int i = 0; i < a->n; i++) {
        const uint8_t *c = a->chunks[i];
        if ((const uint8_t *)p >= c && (const uint8_t *)p < c + a->sizes[i]) return c + a->sizes[i];
    }
    return p;
}

void pi_arena_free(pi_arena *a) {
    for (int i = 0; i < a->n; i++) free(a->chunks[i]);
    free(a->chunks);
    free(a->sizes);
    memset(a, 0, sizeof *a);
}

void pi_aligned_free(void *p) { free(p); }

size_t pi_row_bytes(int qtype, int cols) {
    switch (qtype) {
    case PI_F32: return (size_t)cols * 4;
    case PI_F16: case PI_BF16: return (size_t)cols * 2;
    case PI_Q4_0: return (size_t)(cols / PI_QK) * sizeof(pi_blk_q4_0);
    case PI_Q4_1: return (size_t)(cols / PI_QK) * sizeof(pi_blk_q4_1);
    case PI_Q8_0: return (size_t)(cols / PI_QK) * sizeof(pi_blk_q8_0);
    case PI_Q4_K: case PI_Q5_K: case PI_Q6_K: return (size_t)(cols / PI_QK_K) * pi_kq_block_bytes(qtype);
    case PI_Q4_0_PANELS: case PI_Q4_1_PANELS: case PI_Q8_0_PANELS: return pi_row_bytes(pi_panel_base(qtype), cols);
    default: return 0;
    }
}

int pi_is_packable(int qtype) { return qtype == PI_Q4_0 || qtype == PI_Q4_1 || qtype == PI_Q8_0; }
int pi_qb(int qtype) { return qtype == PI_Q8_0 ? 512 : 256; }

/* ---- dequantization (used for embedding rows and by tests) ---- */
int pi_dequantize(int qtype, const void *src, size_t n, float *dst) {
    size_t nb = n / PI_QK;
    switch (qtype) {
    case PI_F32: memcpy(dst, src, n * 4); return 0;
    case PI_F16: { const uint16_t *h = src; for (size_t i = 0; i < n; i++) dst[i] = pi_fp16_to_fp32(h[i]); return 0; }
    case PI_BF16: { const uint16_t *h = src; for (size_t i = 0; i < n; i++) dst[i] = pi_bf16_to_fp32(h[i]); return 0; }
    case PI_Q4_0: {
        if (n % PI_QK) return -1;
        const pi_blk_q4_0 *b = src;
        for (size_t i = 0; i < nb; i++, dst += PI_QK) {
            const float d = pi_fp16_to_fp32(b[i].d);
            for (int j = 0; j < 16; j++) {
                dst[j] = ((b[i].qs[j] & 15) - 8) * d;
                dst[j + 16] = ((b[i].qs[j] >> 4) - 8) * d;
            }
        }
        return 0;
    }
    case PI_Q4_1: {
        if (n % PI_QK) return -1;
        const pi_blk_q4_1 *b = src;
        for (size_t i = 0; i < nb; i++, dst += PI_QK) {
            const float d = pi_fp16_to_fp32(b[i].d), m = pi_fp16_to_fp32(b[i].m);
            for (int j = 0; j < 16; j++) {
                dst[j] = (b[i].qs[j] & 15) * d + m;
                dst[j + 16] = (b[i].qs[j] >> 4) * d + m;
            }
        }
        return 0;
    }
    case PI_Q8_0: {
        if (n % PI_QK) return -1;
        const pi_blk_q8_0 *b = src;
        for (size_t i = 0; i < nb; i++, dst += PI_QK) {
            const float d = pi_fp16_to_fp32(b[i].d);
            for (int j = 0; j < 32; j++) dst[j] = b[i].qs[j] * d;
        }
        return 0;
    }
    case PI_Q4_K: case PI_Q5_K: case PI_Q6_K: return pi_kq_dequantize(qtype, src, n, dst);
    default: return -1;
    }
}

/* ---- activations ---- */
static size_t al64(size_t x) { return (x + 63) & ~(size_t)63; }

size_t pi_act_bytes(int n, int n_tok, int need) {
    size_t T = (size_t)n_tok, nb = (size_t)(n / PI_QK), sz = 0;
    if (need & PI_NEED_Q8) sz += al64(T * n) + 3 * al64(T * nb * 4);
    if (need & PI_NEED_F16) sz += al64(T * n * 2);
    if (need & PI_NEED_BF16) sz += al64(T * n * 2);
    return sz + 64;
}

void pi_act_bind(pi_act *a, void *mem, int n, int n_tok, int need) {
    size_t T = (size_t)n_tok, nb = (size_t)(n / PI_QK);
    uint8_t *p = mem;
    memset(a, 0, sizeof *a);
    a->n = n;
    if (need & PI_NEED_Q8) {
        a->qs = (int8_t *)p; p += al64(T * n);
        a->d = (float *)p; p += al64(T * nb * 4);
        a->s = (float *)p; p += al64(T * nb * 4);
        a->sum = (int32_t *)p; p += al64(T * nb * 4);
    }
    if (need & PI_NEED_F16) { a->h = (uint16_t *)p; p += al64(T * n * 2); }
    if (need & PI_NEED_BF16) { a->bh = (uint16_t *)p; p += al64(T * n * 2); }
}

void pi_act_fill(pi_act *a, const float *x, int t, int i0, int i1, int need) {
    const size_t n = (size_t)a->n, nb = n / PI_QK;
    if (need & PI_NEED_Q8) {
        const int b0 = i0 / PI_QK, b1 = i1 / PI_QK;
        const size_t o = (size_t)t * nb + b0;
        pi_k->quant_q8(x + i0, b1 - b0, a->qs + t * n + i0, a->d + o, a->s + o, a->sum + o);
    }
    if (need & PI_NEED_F16) {
        uint16_t *h = a->h + t * n;
        for (int i = i0; i < i1; i++) h[i] = pi_fp32_to_fp16(x[i]);
    }
    if (need & PI_NEED_BF16) {
        uint16_t *h = a->bh + t * n;
        for (int i = i0; i < i1; i++) h[i] = pi_fp32_to_bf16(x[i]);
    }
    if (need & PI_NEED_F32) a->f = x - (size_t)t * n; /* callers pass token rows of one [T][n] array */
}

/* ---- packing ---- */
size_t pi_packed_gstride(int qtype, int cols) {
    const size_t nb = (size_t)cols / PI_QK;
    size_t sz = nb * pi_qb(qtype) + nb * PI_G * 2 * (qtype == PI_Q4_1 ? 2 : 1);
    return al64(sz);
}

void pi_pack_groups(int qtype, const uint8_t *raw, size_t row_bytes, int rows, int cols, int g0, int g1,
                    uint8_t *dst, size_t gstride) {
    const int nb = cols / PI_QK, qb = pi_qb(qtype);
    for (int g = g0; g < g1; g++) {
        uint8_t *q = dst + (size_t)(g - g0) * gstride;
        uint16_t *sd = (uint16_t *)(q + (size_t)nb * qb);
        uint16_t *sm = sd + (size_t)nb * PI_G;
        memset(q, 0, gstride);
        for (int r = 0; r < PI_G; r++) {
            const int row = g * PI_G + r;
            for (int b = 0; b < nb; b++) {
                uint8_t *qd = q + (size_t)b * qb + 4 * r;
                if (row >= rows) { /* zero padding: scale 0; Q8_0's stored 0x80 means weight 0 */
                    if (qtype == PI_Q8_0)
                        for (int k = 0; k < 8; k++) memset(qd + 64 * k, 0x80, 4);
                    continue;
                }
                const uint8_t *rp = raw + (size_t)row * row_bytes;
                if (qtype == PI_Q8_0) {
                    const pi_blk_q8_0 *blk = (const pi_blk_q8_0 *)rp + b;
                    for (int k = 0; k < 8; k++)
                        for (int j = 0; j < 4; j++) qd[64 * k + j] = (uint8_t)blk->qs[4 * k + j] ^ 0x80;
                    sd[b * PI_G + r] = blk->d;
                } else if (qtype == PI_Q4_1) {
                    const pi_blk_q4_1 *blk = (const pi_blk_q4_1 *)rp + b;
                    for (int k = 0; k < 4; k++) memcpy(qd + 64 * k, blk->qs + 4 * k, 4);
                    sd[b * PI_G + r] = blk->d;
                    sm[b * PI_G + r] = blk->m;
                } else {
                    const pi_blk_q4_0 *blk = (const pi_blk_q4_0 *)rp + b;
                    for (int k = 0; k < 4; k++) memcpy(qd + 64 * k, blk->qs + 4 * k, 4);
                    sd[b * PI_G + r] = blk->d;
                }
            }
        }
    }
}

int pi_mat_init(pi_mat *m, int qtype, const void *raw, int rows, int cols, int pack) {
    memset(m, 0, sizeof *m);
    if (rows <= 0 || cols <= 0 || pi_row_bytes(qtype, cols) == 0) return -1;
    if (pi_need_of(qtype) == PI_NEED_Q8 && cols % PI_QK) return -1;
    if (pi_is_kquant(qtype) && cols % PI_QK_K) return -1;
    m->qtype = qtype; m->rows = rows; m->cols = cols;
    m->raw = raw;
    m->row_bytes = pi_row_bytes(qtype, cols);
    if (pi_is_packable(qtype)) {
        m->n_groups = (rows + PI_G - 1) / PI_G;
        m->gstride = pi_packed_gstride(qtype, cols);
    }
    if (pack && pi_is_packable(qtype)) {
        m->packed = pi_aligned_alloc(m->gstride * m->n_groups);
        if (!m->packed) return -1;
        pi_pack_groups(qtype, raw, m->row_bytes, rows, cols, 0, m->n_groups, m->packed, m->gstride);
    }
    return 0;
}

void pi_mat_free(pi_mat *m) {
    if (m->packed) pi_aligned_free(m->packed);
    m->packed = NULL;
}

int pi_mat_unit(const pi_mat *m) { return pi_is_packable(m->qtype) ? PI_G : 4; }
int pi_mat_units(const pi_mat *m) { const int u = pi_mat_unit(m); return (m->rows + u - 1) / u; }

pi_act pi_act_token(const pi_act *a, int t) {
    pi_act v = *a;
    const size_t n = (size_t)a->n, nb = n / PI_QK;
    if (v.qs) { v.qs += t * n; v.d += t * nb; v.s += t * nb; v.sum += t * nb; }
    if (v.h) v.h += t * n;
    if (v.bh) v.bh += t * n;
    if (v.f) v.f += t * n;
    return v;
}

static pi_rows_fn rows_fn(int qtype) {
    switch (qtype) {
    case PI_Q4_0: return pi_k->rows_q4_0;
    case PI_Q4_1: return pi_k->rows_q4_1;
    case PI_Q8_0: return pi_k->rows_q8_0;
    case PI_F16: return pi_k->rows_f16;
    case PI_BF16: return pi_k->rows_bf16;
    case PI_Q4_K: case PI_Q5_K: case PI_Q6_K: return pi_kq_rows(qtype);
    default: return pi_k->rows_f32;
    }
}

void pi_mat_run_seg(const pi_mat *m, const pi_seg *s, const pi_act *a, int n_tok, float *y, int ldy) {
    if (s->u1 <= s->u0) return;
    if (pi_is_packable(m->qtype)) {
        pi_packed_fn f = m->qtype == PI_Q4_1 ? pi_k->packed_q4_1 : m->qtype == PI_Q4_0 ? pi_k->packed_q4_0
                                                                                        : pi_k->packed_q8_0;
        f(m, s, a, n_tok, y, ldy);
        return;
    }
    const pi_rows_fn f = rows_fn(m->qtype);
    int r0 = s->u0 * 4, r1 = s->u1 * 4 < m->rows ? s->u1 * 4 : m->rows;
    pi_mat copy;
    if (s->p) { /* K-quant rows copied to an arena (decoder_setup.c: make_seg): a matrix of those rows alone */
        copy = *m;
        copy.raw = s->p;
        copy.rows = r1 - r0;
        m = &copy;
        y += r0;
        r1 -= r0;
        r0 = 0;
    }
    /* K-quant rows (no packed layout) for several tokens: each super-block unpacked once per PI_KQ_NT tokens, in
     * row tiles that stay in L2 while every token group reads them, so prefill streams the weights from DRAM once
     * per batch (kquant.h; the same floats per token as decode) */
    if (pi_is_kquant(m->qtype) && n_tok > 1) {
        pi_kq_rows_tokens(m, NULL, r0, r1, a, n_tok, y, ldy);
        return;
    }
    for (int t = 0; t < n_tok; t++) {
        pi_act at = pi_act_token(a, t);
        f(m, NULL, r0, r1, &at, y + (size_t)t * ldy);
    }
}

void pi_mat_rows(const pi_mat *m, int r0, int r1, const pi_act *a, float *y) {
    if (r1 > r0) rows_fn(m->qtype)(m, NULL, r0, r1, a, y);
}

void pi_mat_gather(const pi_mat *m, const int32_t *idx, int n, const pi_act *a, float *y) {
    if (n > 0) rows_fn(m->qtype)(m, idx, 0, n, a, y);
}

void pi_mat_axpy(const pi_mat *m, const int32_t *idx, const float *h, int n, int c0, int c1, float *y) {
    if (n <= 0 || c1 <= c0) return;
    pi_axpy_rows_fn f;
    switch (m->qtype) {
    case PI_Q4_0: f = pi_k->axpy_rows_q4_0; break;
    case PI_Q4_1: f = pi_k->axpy_rows_q4_1; break;
    case PI_Q8_0: f = pi_k->axpy_rows_q8_0; break;
    case PI_F16: f = pi_k->axpy_rows_f16; break;
    case PI_BF16: f = pi_k->axpy_rows_bf16; break;
    case PI_Q4_K: case PI_Q5_K: case PI_Q6_K: f = pi_kq_axpy; break;
    case PI_Q4_0_PANELS: case PI_Q4_1_PANELS: case PI_Q8_0_PANELS: f = pi_axpy_panels; break;
    default: f = pi_k->axpy_rows_f32; break;
    }
    f(m, idx, h, n, c0, c1, y);
}

/* Block formats without a packed copy (matvec(packed=False)) run the GGUF-row kernels. */
static void run_raw_blocks(const pi_mat *m, int u0, int u1, const pi_act *a, int n_tok, float *y, int ldy) {
    const pi_rows_fn f = rows_fn(m->qtype);
    const int r0 = u0 * PI_G, r1 = u1 * PI_G < m->rows ? u1 * PI_G : m->rows;
    for (int t = 0; t < n_tok; t++) {
        pi_act at = pi_act_token(a, t);
        f(m, NULL, r0, r1, &at, y + (size_t)t * ldy);
    }
}

void pi_mat_run_units(const pi_mat *m, int u0, int u1, const pi_act *a, int n_tok, float *y, int ldy) {
    if (u1 <= u0) return;
    if (pi_is_packable(m->qtype) && !m->packed) { run_raw_blocks(m, u0, u1, a, n_tok, y, ldy); return; }
    pi_seg s = {u0, u1, NULL, NULL};
    if (m->packed) {
        s.p = m->packed + (size_t)u0 * m->gstride;
        s.pf_end = m->packed + (size_t)u1 * m->gstride;
    }
    pi_mat_run_seg(m, &s, a, n_tok, y, ldy);
}
