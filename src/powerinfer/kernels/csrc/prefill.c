/* Prompt prefill: n tokens per layer through the register-blocked matmul kernels (each packed weight group
 * unpacked once per 4 tokens), same numerics as n decode steps. Phases per layer (| = barrier):
 *   tokens split: rmsnorm, quantize | rows split: q/k/v for all tokens | tokens split: bias, RoPE, K/V rows |
 *   (16-query tile, KV head) items dealt round-robin (causal cost grows with the tile): attention tiles (attn.h) |
 *   tokens split: quantize | rows split: o_proj, x += |
 *   tokens split: rmsnorm, quantize | 32-neuron chunks: gate/up, act, quantize | rows split: down, x += |
 * With the neuron-sparse FFN on and at most PI_SPARSE_BATCH tokens, the FFN runs over the union of the tokens'
 * active neurons instead (ffn_sparse_batch). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "decoder.h"

static const int NEED_ALL = PI_NEED_Q8 | PI_NEED_F16 | PI_NEED_BF16 | PI_NEED_F32;

static int ensure_prefill(pi_decoder *D, int n) {
    pi_prefill_ws *p = &D->pf;
    if (p->n_tok_cap >= n) return 0;
    pi_prefill_ws fresh = {0};
    const size_t T = (size_t)n, qd = (size_t)D->n_head * D->hd, kvd = (size_t)D->n_head_kv * D->hd;
    const size_t mx = (size_t)(D->d > D->n_ff ? D->d : D->n_ff);
    fresh.n_tok_cap = n;
    fresh.xn = pi_aligned_alloc(T * D->d * 4);
    fresh.xpar = pi_aligned_alloc(T * D->d * 4);
    fresh.q = pi_aligned_alloc(T * qd * 4);
    fresh.k = pi_aligned_alloc(T * kvd * 4);
    fresh.v = pi_aligned_alloc(T * kvd * 4);
    fresh.att = pi_aligned_alloc(T * qd * 4);
    fresh.y = pi_aligned_alloc(T * (mx > qd ? mx : qd) * 4);
    fresh.g = pi_aligned_alloc(T * D->n_ff * 4);
    fresh.u = pi_aligned_alloc(T * D->n_ff * 4);
    fresh.mem_x = pi_aligned_alloc(pi_act_bytes(D->d, n, NEED_ALL));
    fresh.mem_att = pi_aligned_alloc(pi_act_bytes((int)qd, n, NEED_ALL));
    fresh.mem_h = pi_aligned_alloc(pi_act_bytes(D->n_ff, n, NEED_ALL));
    int ok = fresh.xn && fresh.xpar && fresh.q && fresh.k && fresh.v && fresh.att && fresh.y && fresh.g && fresh.u &&
             fresh.mem_x && fresh.mem_att && fresh.mem_h;
    for (int t = 0; t < D->nth; t++)
        ok = ok && (fresh.tile_scratch[t] = pi_aligned_alloc(pi_attn_tile_floats(D->hd, D->n_ctx) * 4)) != NULL;
    const size_t ts = (size_t)(n < PI_SPARSE_BATCH ? n : PI_SPARSE_BATCH);
    for (int t = 0; t < D->nth; t++) {
        ok = ok && (fresh.yp[t] = pi_aligned_alloc(ts * D->d * 4)) != NULL;
        ok = ok && (fresh.uv[t] = pi_aligned_alloc(ts * D->n_ff * 4)) != NULL;
        ok = ok && (fresh.kept[t] = pi_aligned_alloc((size_t)D->n_ff * 4)) != NULL;
    }
    /* swap in (old buffers freed whether or not the new ones were allocated) */
    pi_prefill_ws old = *p;
    *p = fresh;
    pi_prefill_free(&old);
    if (!ok) {
        pi_prefill_free(p);
        return -1;
    }
    pi_act_bind(&p->act_x, p->mem_x, D->d, n, NEED_ALL);
    pi_act_bind(&p->act_att, p->mem_att, (int)qd, n, NEED_ALL);
    pi_act_bind(&p->act_h, p->mem_h, D->n_ff, n, NEED_ALL);
    p->act_x.f = p->xn; p->act_att.f = p->att; p->act_h.f = p->g;
    return 0;
}

typedef struct { pi_decoder *D; float *x; int n, pos0; float *logits; } prefill_args;

static void ffn_sparse_batch(pi_decoder *D, const pi_layer *L, float *x, int n, int n0, int n1, int ith, int nth);

/* This thread's rows of matrix j for all n tokens: Y[t][r] = W X[t] (+ bias[r]); optionally x[t][r] += Y[t][r] */
static void rows_all_tokens(const pi_layer *L, int j, const pi_act *a, int n, float *Y, int ldy, float *x, int ldx,
                            const float *bias, int ith) {
    const pi_mat *m = pi_layer_mat(L, j);
    const pi_seg *s = &L->seg[j][ith];
    pi_mat_run_seg(m, s, a, n, Y, ldy);
    if (!x && !bias) return;
    const int unit = pi_mat_unit(m), r1 = s->u1 * unit < m->rows ? s->u1 * unit : m->rows;
    for (int t = 0; t < n; t++)
        for (int r = s->u0 * unit; r < r1; r++) {
            if (bias) Y[(size_t)t * ldy + r] += bias[r];
            if (x) x[(size_t)t * ldx + r] += Y[(size_t)t * ldy + r];
        }
}

/* Gemma: x[t] += rmsnorm(y[t]) * w for this thread's tokens [t0, t1) (y = P->y, complete), then a barrier */
static void post_norm_tokens(pi_decoder *D, const float *w, float *x, int t0, int t1, int ith) {
    const int d = D->d;
    for (int t = t0; t < t1; t++) pi_post_norm_add(D, D->pf.y + (size_t)t * d, w, x + (size_t)t * d, 0, 1);
    pi_dec_barrier(D, ith);
}

static void prefill_layer(pi_decoder *D, int il, float *x, int n, int pos0, int ith, int nth) {
    const pi_layer *L = &D->L[il];
    pi_prefill_ws *P = &D->pf;
    const int d = D->d, hd = D->hd, qd = D->n_head * hd, kvd = D->n_head_kv * hd, half = D->rope_dim / 2;
    int t0, t1;
    pi_split(n, ith, nth, &t0, &t1);

    pi_prof_phase(D, ith, PH_ATTN_PROJ);
    if (D->parallel) /* the FFN's input: the layer's x, before o_proj adds into it */
        memcpy(P->xpar + (size_t)t0 * d, x + (size_t)t0 * d, (size_t)(t1 - t0) * d * sizeof(float));
    const float *xf = D->parallel ? P->xpar : x;
    for (int t = t0; t < t1; t++) {
        pi_norm(D, x + (size_t)t * d, L->attn_norm, L->attn_norm_b, P->xn + (size_t)t * d);
        pi_act_fill(&P->act_x, P->xn + (size_t)t * d, t, 0, d, L->need_attn & ~PI_NEED_F32);
    }
    pi_dec_barrier(D, ith);
    rows_all_tokens(L, MQ, &P->act_x, n, P->q, qd, NULL, 0, NULL, ith);
    rows_all_tokens(L, MK, &P->act_x, n, P->k, kvd, NULL, 0, NULL, ith);
    rows_all_tokens(L, MV, &P->act_x, n, P->v, kvd, NULL, 0, NULL, ith);
    pi_dec_barrier(D, ith);

    pi_prof_phase(D, ith, PH_ATTN_CORE);
    const float *cos_l = L->rope_local ? D->cos_local : D->cos, *sin_l = L->rope_local ? D->sin_local : D->sin;
    for (int t = t0; t < t1; t++) {
        const int pos = pos0 + t;
        const float *cs = cos_l + (size_t)pos * half, *sn = sin_l + (size_t)pos * half;
        float *q = P->q + (size_t)t * qd, *k = P->k + (size_t)t * kvd, *v = P->v + (size_t)t * kvd;
        if (L->bq) for (int i = 0; i < qd; i++) q[i] += L->bq[i];
        if (L->bk) for (int i = 0; i < kvd; i++) k[i] += L->bk[i];
        if (L->bv) for (int i = 0; i < kvd; i++) v[i] += L->bv[i];
        if (L->q_norm) {
            for (int h = 0; h < D->n_head; h++) pi_rmsnorm(q + h * hd, L->q_norm, hd, D->eps, q + h * hd);
            for (int h = 0; h < D->n_head_kv; h++) pi_rmsnorm(k + h * hd, L->k_norm, hd, D->eps, k + h * hd);
        }
        pi_rope(q, D->n_head, hd, D->rope_dim, D->rope_style, cs, sn);
        pi_rope(k, D->n_head_kv, hd, D->rope_dim, D->rope_style, cs, sn);
        if (D->attn_scale > 0.0f) for (int i = 0; i < qd; i++) q[i] *= D->attn_scale;
        pi_kv_write(D->kv_type, L->kc, L->vc, kvd, pos, 0, D->n_head_kv, hd, k, v);
    }
    pi_dec_barrier(D, ith);
    const int need_o = pi_need_of(L->o.qtype) & ~PI_NEED_F32;
    /* attention tiles (attn.h): (tile, KV head) items dealt round-robin, each runs the group's query heads */
    pi_attn_prefill(pi_attn_ops_for(D->kv_type), P->q, qd, n, pos0, D->n_head, D->n_head_kv, hd, D->kv_type, L->kc,
                    L->vc, kvd, D->attn_scale > 0.0f ? 1.0f : 0.0f, D->attn_softcap, L->window,
                    P->tile_scratch[ith], P->att, qd, ith, nth);
    pi_dec_barrier(D, ith);
    for (int t = t0; t < t1; t++) pi_act_fill(&P->act_att, P->att + (size_t)t * qd, t, 0, qd, need_o);
    pi_dec_barrier(D, ith);

    pi_prof_phase(D, ith, PH_O_PROJ);
    rows_all_tokens(L, MO, &P->act_att, n, P->y, d, L->attn_post_norm ? NULL : x, d, L->bo, ith);
    pi_dec_barrier(D, ith);
    if (L->attn_post_norm) post_norm_tokens(D, L->attn_post_norm, x, t0, t1, ith);

    pi_prof_phase(D, ith, PH_FFN);
    for (int t = t0; t < t1; t++) {
        pi_norm(D, xf + (size_t)t * d, L->ffn_norm, L->ffn_norm_b, P->xn + (size_t)t * d);
        pi_act_fill(&P->act_x, P->xn + (size_t)t * d, t, 0, d, L->need_ffn & ~PI_NEED_F32);
    }
    pi_dec_barrier(D, ith);
    int c0, c1;
    const int nff = D->n_ff, nchunk = (nff + PI_QK - 1) / PI_QK;
    pi_split(nchunk, ith, nth, &c0, &c1);
    const int n0 = c0 * PI_QK, n1 = c1 * PI_QK < nff ? c1 * PI_QK : nff;
    if (L->down_t.raw && !L->fc1.raw && L->t_x == 0.0f && n <= PI_SPARSE_BATCH) {
        ffn_sparse_batch(D, L, x, n, n0, n1, ith, nth);
        return;
    }
    if (n1 > n0) {
        if (L->gate.raw) rows_all_tokens(L, MGATE, &P->act_x, n, P->g, nff, NULL, 0, NULL, ith);
        rows_all_tokens(L, MUP, &P->act_x, n, P->u, nff, NULL, 0, L->bu, ith);
        const int need_d = pi_need_of(L->down.qtype) & ~PI_NEED_F32;
        for (int t = 0; t < n; t++) {
            float *g = P->g + (size_t)t * nff;
            pi_ffn_act(D, g + n0, P->u + (size_t)t * nff + n0, n1 - n0);
            pi_act_fill(&P->act_h, g, t, n0, n1, need_d);
        }
    }
    pi_dec_barrier(D, ith);
    rows_all_tokens(L, MDOWN, &P->act_h, n, P->y, d, L->ffn_post_norm ? NULL : x, d, L->bd, ith);
    pi_dec_barrier(D, ith);
    if (L->ffn_post_norm) post_norm_tokens(D, L->ffn_post_norm, x, t0, t1, ith);
}

/* The decoder's neuron-sparse FFN for a few tokens at once (decoder.c, ffn_sparse): gate for every token
 * (dense, batched); with a ReLU gate, the up rows of the union of the tokens' active neurons, read by each
 * token's row-sparse dot (the union is small and stays in cache after the first token); then per token, h,
 * its kept neurons, and an axpy of their down_t rows into this thread's sums | x += the threads' sums |.
 * Each token's own inactive neurons are skipped exactly, so a token sees what a decode step would. */
static void ffn_sparse_batch(pi_decoder *D, const pi_layer *L, float *x, int n, int n0, int n1, int ith, int nth) {
    pi_prefill_ws *P = &D->pf;
    pi_tws *w = &D->tw[ith];
    const int d = D->d, nff = D->n_ff, relu_gate = D->act == ACT_RELU && D->ffn_kind != FFN_MLP;
    float *yp = P->yp[ith], *uv = P->uv[ith];
    memset(yp, 0, (size_t)n * d * sizeof(float));
    if (n1 > n0) {
        if (L->gate.raw) rows_all_tokens(L, MGATE, &P->act_x, n, P->g, nff, NULL, 0, NULL, ith);
        int nu = 0;
        if (relu_gate) { /* union of the tokens' active neurons in this chunk */
            for (int i = n0; i < n1; i++)
                for (int t = 0; t < n; t++)
                    if (P->g[(size_t)t * nff + i] > 0.0f) { w->idx[nu++] = i; break; }
            for (int t = 0; t < n; t++) {
                const pi_act at = pi_act_token(&P->act_x, t);
                pi_mat_gather(&L->up, w->idx, nu, &at, uv + (size_t)t * nff);
                if (L->bu) for (int j = 0; j < nu; j++) uv[(size_t)t * nff + j] += L->bu[w->idx[j]];
            }
        } else {
            rows_all_tokens(L, MUP, &P->act_x, n, P->u, nff, NULL, 0, L->bu, ith);
        }
        int32_t *kept = P->kept[ith];
        for (int t = 0; t < n; t++) {
            float *g = P->g + (size_t)t * nff;
            int nk = 0;
            if (relu_gate) {
                const float *ut = uv + (size_t)t * nff;
                for (int j = 0; j < nu; j++) {
                    const int i = w->idx[j];
                    if (g[i] <= 0.0f) continue;
                    const float hj = D->ffn_kind == FFN_DGLU ? g[i] * (ut[j] > 0.0f ? ut[j] : 0.0f) : g[i] * ut[j];
                    if (hj != 0.0f && fabsf(hj) >= L->t_h) { w->hv[nk] = hj; kept[nk++] = i; }
                }
            } else {
                pi_ffn_act(D, g + n0, P->u + (size_t)t * nff + n0, n1 - n0);
                for (int i = n0; i < n1; i++)
                    if (g[i] != 0.0f && fabsf(g[i]) >= L->t_h) { w->hv[nk] = g[i]; kept[nk++] = i; }
            }
            pi_mat_axpy(&L->down_t, kept, w->hv, nk, 0, d, yp + (size_t)t * d);
        }
    }
    pi_dec_barrier(D, ith);
    int r0, r1;
    pi_split(d, ith, nth, &r0, &r1);
    float *dst = L->ffn_post_norm ? P->y : x; /* Gemma: the FFN output is normed before it joins x */
    if (L->ffn_post_norm)
        for (int t = 0; t < n; t++) memset(dst + (size_t)t * d + r0, 0, (size_t)(r1 - r0) * sizeof(float));
    for (int th = 0; th < nth; th++)
        for (int t = 0; t < n; t++) {
            const float *src = P->yp[th] + (size_t)t * d;
            float *xt = dst + (size_t)t * d;
            for (int r = r0; r < r1; r++) xt[r] += src[r];
        }
    if (L->bd)
        for (int t = 0; t < n; t++)
            for (int r = r0; r < r1; r++) dst[(size_t)t * d + r] += L->bd[r];
    pi_dec_barrier(D, ith);
    if (L->ffn_post_norm) {
        int t0, t1;
        pi_split(n, ith, nth, &t0, &t1);
        post_norm_tokens(D, L->ffn_post_norm, x, t0, t1, ith);
    }
}

static void prefill_job(void *varg, int ith, int nth) {
    prefill_args *s = varg;
    pi_decoder *D = s->D;
    for (int il = 0; il < D->n_layer; il++) prefill_layer(D, il, s->x, s->n, s->pos0, ith, nth);
    if (s->logits) {
        pi_tws *w = &D->tw[ith];
        const float *xl = s->x + (size_t)(s->n - 1) * D->d;
        pi_prof_phase(D, ith, PH_HEAD);
        pi_norm(D, xl, D->out_norm, D->out_norm_b, w->xn);
        pi_act_fill(&w->act, w->xn, 0, 0, D->d, pi_need_of(D->head.qtype));
        pi_mat_run_seg(&D->head, &D->head_seg[ith], &w->act, 1, s->logits, 0);
        pi_head_softcap(D, s->logits, ith);
    }
    pi_prof_phase(D, ith, PH_HEAD);
}

int pi_decoder_prefill(pi_decoder *D, float *x, int n_tok, int pos0, float *logits) {
    if (ensure_prefill(D, n_tok)) return -1;
    prefill_args s = {D, x, n_tok, pos0, logits};
    pi_add_positions(D, x, n_tok, pos0); /* x holds the tokens' embeddings */
    if (D->prof) { D->t_last = pi_now_ns(); D->cur = PH_ATTN_PROJ; }
    pi_pool_run(D->pool, prefill_job, &s);
    D->tokens += n_tok;
    return 0;
}
