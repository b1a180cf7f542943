/* Attention drivers (decode split-K, prefill tiles; see attn.h), the cache formats' row conversions, and the
 * portable kernels, which are also what the vector kernels fall back to for head sizes they do not cover. */
#include "attn.h"

#include <math.h>
#include <stdlib.h>

void pi_split(int total, int ith, int nth, int *a, int *b); /* decoder.c */

/* ---- formats ---- */
int pi_kv_format_ok(int type, int hd) {
    return type == PI_F32 || type == PI_F16 || (type == PI_Q8_0 && hd % PI_QK == 0);
}

/* n values of a cache row in f32 (n a multiple of 32 for q8_0) */
static void row_f32(int type, const uint8_t *r, float *out, int n) {
    if (type == PI_F32) {
        memcpy(out, r, (size_t)n * sizeof(float));
    } else if (type == PI_F16) {
        for (int i = 0; i < n; i++) out[i] = pi_fp16_to_fp32(((const uint16_t *)r)[i]);
    } else {
        const pi_blk_q8_0 *b = (const pi_blk_q8_0 *)r;
        for (int j = 0; j < n / PI_QK; j++) {
            const float d = pi_fp16_to_fp32(b[j].d);
            for (int i = 0; i < PI_QK; i++) out[j * PI_QK + i] = (float)b[j].qs[i] * d;
        }
    }
}

/* n values of x stored as a cache row of `type` (ggml's from_float: f16 round-to-nearest-even, q8_0 blocks as the
 * q8 activations are quantized, pi.h) */
static void row_store(int type, const float *x, uint8_t *r, int n) {
    if (type == PI_F32) {
        memcpy(r, x, (size_t)n * sizeof(float));
    } else if (type == PI_F16) {
        pi_k->to_f16(x, (uint16_t *)r, n);
    } else {
        pi_blk_q8_0 *b = (pi_blk_q8_0 *)r;
        for (int j = 0; j < n / PI_QK; j++) {
            float d, s;
            int32_t sum;
            pi_k->quant_q8(x + j * PI_QK, 1, b[j].qs, &d, &s, &sum);
            b[j].d = pi_fp32_to_fp16(d); /* d is already f16-rounded: exact */
        }
    }
}

void pi_kv_round_q(int ktype, const float *q, float *out, int n) {
    if (ktype == PI_F32) {
        if (out != q) memcpy(out, q, (size_t)n * sizeof(float));
    } else if (ktype == PI_F16) {
        for (int i = 0; i < n; i++) out[i] = pi_round_fp16(q[i]);
    } else {
        for (int j = 0; j < n / PI_QK; j++) {
            int8_t qs[PI_QK];
            float d, s;
            int32_t sum;
            pi_k->quant_q8(q + j * PI_QK, 1, qs, &d, &s, &sum);
            for (int i = 0; i < PI_QK; i++) out[j * PI_QK + i] = (float)qs[i] * d;
        }
    }
}

/* ---- portable kernels (plain C, any format; the ISA versions follow the same arithmetic) ---- */
static void scores_portable(const float *q, int h0, int h1, int rep, int hd, const pi_kv_head *kv, int t0, int n,
                            float scale, float softcap, float *e, size_t ld, float *m, float *l) {
    float qh[PI_MAX_HEAD_DIM], kr[PI_MAX_HEAD_DIM];
    for (int h = h0; h < h1; h++) {
        const uint8_t *kb = kv->k + pi_kv_bytes(kv->ktype, h / rep * hd);
        float *er = e + (size_t)h * ld, mx = -INFINITY;
        pi_kv_round_q(kv->ktype, q + (size_t)h * hd, qh, hd);
        for (int i = 0; i < n; i++) {
            row_f32(kv->ktype, kb + (size_t)(t0 + i) * kv->kstride, kr, hd);
            float acc = 0.0f;
            for (int j = 0; j < hd; j++) acc += qh[j] * kr[j];
            er[i] = acc * scale;
            if (softcap > 0.0f) er[i] = softcap * tanhf(er[i] / softcap);
            mx = er[i] > mx ? er[i] : mx;
        }
        double sum = 0.0;
        for (int i = 0; i < n; i++) {
            er[i] = expf(er[i] - mx);
            sum += er[i];
        }
        m[h] = mx;
        l[h] = (float)sum;
    }
}

static void values_portable(float *e, size_t ld, const float *f, int h0, int h1, int rep, int hd, const pi_kv_head *kv,
                            int t0, int n, float *out) {
    float vr[PI_MAX_HEAD_DIM];
    for (int h = h0; h < h1; h++) {
        const uint8_t *vb = kv->v + pi_kv_bytes(kv->vtype, h / rep * hd);
        float *er = e + (size_t)h * ld, *o = out + (size_t)h * hd;
        memset(o, 0, (size_t)hd * sizeof(float));
        for (int i = 0; i < n; i++) {
            const float p = er[i] = kv->vtype == PI_F16 ? pi_round_fp16(er[i] * f[h]) : er[i] * f[h];
            row_f32(kv->vtype, vb + (size_t)(t0 + i) * kv->vstride, vr, hd);
            for (int j = 0; j < hd; j++) o[j] += p * vr[j];
        }
    }
}

/* One query at a time: the decode kernels over its visible rows (scores in scratch). */
static void tile_portable(const float *q, size_t q_stride, int nq, int n_rep, int hd, const pi_kv_head *kv, int pos0,
                          float scale, float softcap, int window, float *scratch, float *out, size_t out_stride) {
    for (int j = 0; j < nq; j++) {
        const int end = pos0 + j + 1, lo = window > 0 && end > window ? end - window : 0;
        for (int r = 0; r < n_rep; r++) { /* head index 0 of a one-head "layer": q, e, m, l, f, out at offset 0 */
            float m, l, f;
            scores_portable(q + (size_t)j * q_stride + (size_t)r * hd, 0, 1, 1, hd, kv, lo, end - lo, scale, softcap,
                            scratch, 0, &m, &l);
            f = 1.0f / l;
            values_portable(scratch, 0, &f, 0, 1, 1, hd, kv, lo, end - lo, out + (size_t)j * out_stride + (size_t)r * hd);
        }
    }
}

const pi_attn_ops pi_attn_portable = {scores_portable, values_portable, tile_portable, 1};

const pi_attn_ops *pi_attn_ops_for(int kv_type) {
    const int kt = pi_kv_ktype(kv_type), vt = pi_kv_vtype(kv_type);
    if (!pi_kv_format_ok(kt, PI_QK) || !pi_kv_format_ok(vt, PI_QK)) return NULL;
#if defined(PI_X86)
    if (pi_k == &pi_kernels_avx512) return &pi_attn_avx512;
    if (pi_k == &pi_kernels_avx2) return &pi_attn_avx2;
#endif
    return &pi_attn_portable;
}

pi_kv_head pi_kv_head_of(int kv_type, const void *k, const void *v, int kv_dim, int g, int hd) {
    const int kt = pi_kv_ktype(kv_type), vt = pi_kv_vtype(kv_type);
    return (pi_kv_head){kt, vt, (const uint8_t *)k + pi_kv_bytes(kt, g * hd), (const uint8_t *)v + pi_kv_bytes(vt, g * hd),
                        pi_kv_bytes(kt, kv_dim), pi_kv_bytes(vt, kv_dim)};
}

void pi_kv_write(int kv_type, void *kc, void *vc, int kv_dim, int pos, int g0, int g1, int hd, const float *k,
                 const float *v) {
    const int kt = pi_kv_ktype(kv_type), vt = pi_kv_vtype(kv_type), n = (g1 - g0) * hd;
    row_store(kt, k + (size_t)g0 * hd, (uint8_t *)kc + (size_t)pos * pi_kv_bytes(kt, kv_dim) + pi_kv_bytes(kt, g0 * hd), n);
    row_store(vt, v + (size_t)g0 * hd, (uint8_t *)vc + (size_t)pos * pi_kv_bytes(vt, kv_dim) + pi_kv_bytes(vt, g0 * hd), n);
}

/* Tile scratch, the largest of the layouts: AVX-512's transposed q of 16 queries and a K block of 8 rows, or
 * AVX2's q, K/V block and transposed output of 8 queries (head_dim up to PI_ATTN_TILE_HD), then the tile's
 * scores, up to 16 lanes per position (n_ctx + 16 positions); the portable tile's n_ctx scores fit. */
size_t pi_attn_tile_floats(int hd, int n_ctx) {
    (void)hd;
    return (size_t)32 * PI_ATTN_TILE_HD + 16 * ((size_t)n_ctx + 16) + 16;
}

/* ---- decode ---- */
int pi_attn_ws_init(pi_attn_ws *w, int n_ctx, int n_head, int hd, int nth) {
    pi_attn_ws_free(w);
    const size_t n_chunk = (size_t)(n_ctx + PI_ATTN_CHUNK - 1) / PI_ATTN_CHUNK;
    w->n_ctx = n_ctx; w->n_head = n_head; w->hd = hd; w->nth = nth;
    w->e = pi_aligned_alloc((size_t)n_head * n_ctx * 4);
    w->m = pi_aligned_alloc(n_chunk * n_head * 4);
    w->l = pi_aligned_alloc(n_chunk * n_head * 4);
    w->o = pi_aligned_alloc(n_chunk * n_head * hd * 4);
    w->st = pi_aligned_alloc((size_t)nth * 3 * n_head * 4);
    if (!w->e || !w->m || !w->l || !w->o || !w->st) {
        pi_attn_ws_free(w);
        return -1;
    }
    return 0;
}

void pi_attn_ws_free(pi_attn_ws *w) {
    pi_aligned_free(w->e); pi_aligned_free(w->m); pi_aligned_free(w->l);
    pi_aligned_free(w->o); pi_aligned_free(w->st);
    memset(w, 0, sizeof *w);
}

void pi_attn_decode(const pi_attn_decode_args *a, int ith, int nth) {
    const int nh = a->n_head, hd = a->hd, rep = nh / a->n_head_kv;
    /* a sliding window reads rows t_lo .. n_kv-1 only; chunks and e are indexed from t_lo */
    const int t_lo = a->window > 0 && a->n_kv > a->window ? a->n_kv - a->window : 0, n_kv = a->n_kv - t_lo;
    const float scale = a->scale > 0.0f ? a->scale : 1.0f / sqrtf((float)hd), cap = a->softcap;
    pi_attn_ws *w = a->ws;
    const size_t ld = (size_t)w->n_ctx;
    const pi_kv_head kv = pi_kv_head_of(a->kv_type, a->k, a->v, a->kv_dim, 0, hd);
    float *hm = w->st + (size_t)ith * 3 * nh, *hl = hm + nh, *f = hl + nh; /* this thread's per-head scratch */
    int h0, h1;
    pi_split(nh, ith, nth, &h0, &h1);
    if (n_kv <= PI_ATTN_CHUNK) { /* one chunk: the threads split the query heads */
        for (int ha = h0; ha < h1; ha += PI_ATTN_CALL_HEADS) {
            const int hb = h1 - ha < PI_ATTN_CALL_HEADS ? h1 : ha + PI_ATTN_CALL_HEADS;
            a->ops->scores(a->q, ha, hb, rep, hd, &kv, t_lo, n_kv, scale, cap, w->e, ld, hm, hl);
            for (int h = ha; h < hb; h++) f[h] = 1.0f / hl[h];
            a->ops->values(w->e, ld, f, ha, hb, rep, hd, &kv, t_lo, n_kv, a->out);
        }
        return;
    }
    /* pass 1: this thread's chunks, every head: scores, chunk max and sum */
    const int n_chunk = (n_kv + PI_ATTN_CHUNK - 1) / PI_ATTN_CHUNK;
    int c0, c1;
    pi_split(n_chunk, ith, nth, &c0, &c1);
    for (int c = c0; c < c1; c++) {
        const int t0 = c * PI_ATTN_CHUNK, n = n_kv - t0 < PI_ATTN_CHUNK ? n_kv - t0 : PI_ATTN_CHUNK;
        for (int ha = 0; ha < nh; ha += PI_ATTN_CALL_HEADS) {
            const int hb = nh - ha < PI_ATTN_CALL_HEADS ? nh : ha + PI_ATTN_CALL_HEADS;
            a->ops->scores(a->q, ha, hb, rep, hd, &kv, t_lo + t0, n, scale, cap, w->e + t0, ld, w->m + (size_t)c * nh,
                           w->l + (size_t)c * nh);
        }
    }
    a->barrier(a->ctx, ith);
    /* pass 2: global max and sum per head from every chunk's state (the same order on every thread), then this
     * thread's chunks' V rows with the globally normalized probabilities */
    if (c1 > c0) {
        for (int h = 0; h < nh; h++) {
            float mx = -INFINITY;
            for (int c = 0; c < n_chunk; c++) mx = w->m[(size_t)c * nh + h] > mx ? w->m[(size_t)c * nh + h] : mx;
            double sum = 0.0;
            for (int c = 0; c < n_chunk; c++) sum += (double)w->l[(size_t)c * nh + h] * expf(w->m[(size_t)c * nh + h] - mx);
            hm[h] = mx;
            hl[h] = (float)(1.0 / sum);
        }
        for (int c = c0; c < c1; c++) {
            const int t0 = c * PI_ATTN_CHUNK, n = n_kv - t0 < PI_ATTN_CHUNK ? n_kv - t0 : PI_ATTN_CHUNK;
            for (int h = 0; h < nh; h++) f[h] = expf(w->m[(size_t)c * nh + h] - hm[h]) * hl[h];
            for (int ha = 0; ha < nh; ha += PI_ATTN_CALL_HEADS) {
                const int hb = nh - ha < PI_ATTN_CALL_HEADS ? nh : ha + PI_ATTN_CALL_HEADS;
                a->ops->values(w->e + t0, ld, f, ha, hb, rep, hd, &kv, t_lo + t0, n, w->o + (size_t)c * nh * hd);
            }
        }
    }
    a->barrier(a->ctx, ith);
    /* merge: this thread's heads, chunk partials added in chunk order */
    for (int h = h0; h < h1; h++) {
        float *dst = a->out + (size_t)h * hd;
        memcpy(dst, w->o + (size_t)h * hd, (size_t)hd * sizeof(float));
        for (int c = 1; c < n_chunk; c++) {
            const float *src = w->o + ((size_t)c * nh + h) * hd;
            for (int i = 0; i < hd; i++) dst[i] += src[i];
        }
    }
}

/* ---- prefill ---- */
void pi_attn_prefill(const pi_attn_ops *ops, const float *q, size_t q_stride, int n, int pos0, int n_head,
                     int n_head_kv, int hd, int kv_type, const void *k, const void *v, int kv_dim, float scale,
                     float softcap, int window, float *scratch, float *out, size_t out_stride, int ith, int nth) {
    const int rep = n_head / n_head_kv, tq = ops->tile_q;
    const int n_tiles = (n + tq - 1) / tq, n_items = n_tiles * n_head_kv;
    if (scale <= 0.0f) scale = 1.0f / sqrtf((float)hd);
    for (int it = ith; it < n_items; it += nth) {
        const int tile = it / n_head_kv, g = it % n_head_kv, ta = tile * tq, nq = n - ta < tq ? n - ta : tq;
        const pi_kv_head kv = pi_kv_head_of(kv_type, k, v, kv_dim, g, hd);
        const size_t h = (size_t)g * rep;
        ops->tile(q + (size_t)ta * q_stride + h * hd, q_stride, nq, rep, hd, &kv, pos0 + ta, scale, softcap, window,
                  scratch, out + (size_t)ta * out_stride + h * hd, out_stride);
    }
}
