/* Decode step of the llama-family block, one SPMD job per token (see decoder.h).
 *
 * Per layer, with barriers (|) between phases:
 *   every thread: n = rmsnorm(x)*w, quantized (redundantly: cheaper than a barrier); its share of q/k/v rows |
 *   its kv heads: bias, RoPE, K/V[pos] as f16 into the cache |
 *   its q heads: bias, RoPE, attention over 0..pos, output quantized for o_proj |
 *   its o_proj rows, x += |  every thread: rmsnorm; its 32-neuron chunks of gate/up, act, quantized |
 *   its down rows, x += |
 * With the neuron-sparse FFN on (ffn_sparse, pi_layer.down_t), the FFN phase instead is: every thread, for its
 * 32-neuron chunks: gate (or the predictor), the selected neurons' up rows, h, and an axpy of the kept
 * neurons' down_t rows into its own sum | its slice of x += the threads' sums |
 * Numerics follow llama.cpp (flash_attn off, f16 cache): rmsnorm sums in double; q is rounded to f16 for the
 * q.K dot (ggml converts src1 to K's vec_dot_type); softmax in f32 with a double sum; the probabilities are
 * rounded to f16 before the V product (ggml converts kq to f16 for mul_mat with the f16 V). Measured top-1
 * agreement with llama.cpp on SmolLM2 (3 x 512 tokens of pydoc text): both roundings 97.66%, without the q
 * rounding 97.72% (noise), without the probability rounding 97.14%, without either 96.74%. */
#include "decoder.h"
#include "disk.h"

#include <math.h>
#include <stdlib.h>

/* ---- helpers ---- */
void pi_split(int total, int ith, int nth, int *a, int *b) {
    *a = (int)((long long)total * ith / nth);
    *b = (int)((long long)total * (ith + 1) / nth);
}

void pi_rmsnorm(const float *x, const float *w, int n, float eps, float *out) { /* ggml_compute_forward_rms_norm */
    double sum = 0.0;
    for (int i = 0; i < n; i++) sum += (double)(x[i] * x[i]);
    const float mean = (float)(sum / n);
    const float scale = 1.0f / sqrtf(mean + eps);
    for (int i = 0; i < n; i++) out[i] = (x[i] * scale) * w[i];
}

/* RMSNorm, or LayerNorm as ggml_compute_forward_norm_f32 (mean, then the variance of x - mean, both summed in
 * double) followed by llama.cpp's separate weight multiply and bias add. out may be x. */
void pi_norm(const pi_decoder *D, const float *x, const float *w, const float *b, float *out) {
    const int n = D->d;
    if (D->norm_kind != NORM_LAYER) { pi_rmsnorm(x, w, n, D->eps, out); return; }
    double sum = 0.0;
    for (int i = 0; i < n; i++) sum += (double)x[i];
    const float mean = (float)(sum / n);
    double sum2 = 0.0;
    for (int i = 0; i < n; i++) {
        const float v = x[i] - mean;
        out[i] = v;
        sum2 += (double)(v * v);
    }
    const float scale = 1.0f / sqrtf((float)(sum2 / n) + D->eps);
    for (int i = 0; i < n; i++) out[i] = (out[i] * scale) * w[i] + (b ? b[i] : 0.0f);
}

void pi_add_positions(const pi_decoder *D, float *x, int n, int pos0) {
    if (D->embed_scale != 1.0f) /* Gemma: ggml_scale(inpL, sqrtf(n_embd)), f32 like HF's normalizer */
        for (size_t i = 0; i < (size_t)n * D->d; i++) x[i] *= D->embed_scale;
    if (!D->pos_embd) return;
    for (int t = 0; t < n; t++) {
        const float *p = D->pos_embd + (size_t)(pos0 + t) * D->d;
        float *xt = x + (size_t)t * D->d;
        for (int r = 0; r < D->d; r++) xt[r] += p[r];
    }
}

void pi_rope(float *v, int n_heads, int hd, int rope_dim, int style, const float *cs, const float *sn) {
    const int half = rope_dim / 2;
    for (int h = 0; h < n_heads; h++, v += hd) {
        for (int i = 0; i < half; i++) {
            const int i0 = style == ROPE_NEOX ? i : 2 * i, i1 = style == ROPE_NEOX ? i + half : 2 * i + 1;
            const float x0 = v[i0], x1 = v[i1];
            v[i0] = x0 * cs[i] - x1 * sn[i];
            v[i1] = x0 * sn[i] + x1 * cs[i];
        }
    }
}

static inline float act1(int act, float x) {
    switch (act) {
    case ACT_RELU: return x > 0.0f ? x : 0.0f;
    case ACT_GELU_TANH: return 0.5f * x * (1.0f + tanhf(0.79788456080286535588f * x * (1.0f + 0.044715f * x * x)));
    case ACT_GELU_ERF: return 0.5f * x * (1.0f + erff(0.70710678118654752440f * x)); /* sqrt(1/2) */
    default: return x / (1.0f + expf(-x));
    }
}

void pi_ffn_act(const pi_decoder *D, float *g, const float *u, int n) {
    switch (D->ffn_kind) {
    case FFN_MLP: for (int i = 0; i < n; i++) g[i] = act1(D->act, u[i]); break;
    case FFN_DGLU: for (int i = 0; i < n; i++) g[i] = act1(D->act, g[i]) * act1(D->act, u[i]); break;
    default: for (int i = 0; i < n; i++) g[i] = act1(D->act, g[i]) * u[i]; break;
    }
}

/* x[r] += rmsnorm(y)[r] * w[r] over this thread's slice of x (Gemma's post-attention / post-FFN norm); every thread
 * sums y itself (cheaper than another barrier), y must be complete; the caller's barrier follows */
void pi_post_norm_add(const pi_decoder *D, const float *y, const float *w, float *x, int ith, int nth) {
    double sum = 0.0;
    for (int i = 0; i < D->d; i++) sum += (double)(y[i] * y[i]);
    const float scale = 1.0f / sqrtf((float)(sum / D->d) + D->eps);
    int r0, r1;
    pi_split(D->d, ith, nth, &r0, &r1);
    for (int r = r0; r < r1; r++) x[r] += (y[r] * scale) * w[r];
}

/* Gemma 2's final logit soft-capping over this thread's rows of the head */
void pi_head_softcap(const pi_decoder *D, float *logits, int ith) {
    if (D->final_softcap <= 0.0f) return;
    const pi_seg *s = &D->head_seg[ith];
    const int unit = pi_mat_unit(&D->head), r1 = s->u1 * unit < D->head.rows ? s->u1 * unit : D->head.rows;
    const float c = D->final_softcap;
    for (int r = s->u0 * unit; r < r1; r++) logits[r] = c * tanhf(logits[r] / c);
}

void pi_prof_phase(pi_decoder *D, int ith, int ph) {
    if (!D->prof || ith != 0) return;
    const uint64_t now = pi_now_ns();
    D->ns[D->cur] += now - D->t_last;
    D->t_last = now;
    D->cur = ph;
}

void pi_dec_barrier(pi_decoder *D, int ith) {
    if (D->nth == 1) return;
    if (!D->prof || ith != 0) { pi_barrier(D->pool, ith); return; }
    const int ph = D->cur;
    pi_prof_phase(D, ith, PH_BARRIER);
    pi_barrier(D->pool, ith);
    pi_prof_phase(D, ith, ph);
}

const pi_mat *pi_layer_mat(const pi_layer *L, int j) {
    const pi_mat *ms[M_N] = {&L->q, &L->k, &L->v, &L->o, &L->gate, &L->up, &L->down};
    return ms[j];
}

/* Units of each matrix that thread ith of nth computes. q/k/v: a balanced split of their concatenation;
 * o, down: balanced splits; gate/up: 32-neuron chunks so each thread can quantize its share of the hidden
 * state for down_proj. Layout (packing) and execution both use this, so they always agree. */
void pi_layer_ranges(const pi_layer *L, int n_ff, int ith, int nth, int u0[M_N], int u1[M_N]) {
    int total = 0, U0, U1;
    for (int j = MQ; j <= MV; j++) total += pi_mat_units(pi_layer_mat(L, j));
    pi_split(total, ith, nth, &U0, &U1);
    for (int j = MQ, base = 0; j <= MV; j++) {
        const int nu = pi_mat_units(pi_layer_mat(L, j));
        u0[j] = U0 > base ? U0 - base : 0;
        u1[j] = U1 - base < nu ? U1 - base : nu;
        if (u1[j] < u0[j]) u1[j] = u0[j];
        if (u0[j] > nu) u0[j] = u1[j] = nu;
        base += nu;
    }
    pi_split(pi_mat_units(&L->o), ith, nth, &u0[MO], &u1[MO]);
    pi_split(pi_mat_units(&L->down), ith, nth, &u0[MDOWN], &u1[MDOWN]);
    int c0, c1;
    pi_split((n_ff + PI_QK - 1) / PI_QK, ith, nth, &c0, &c1);
    const int n0 = c0 * PI_QK, n1 = c1 * PI_QK < n_ff ? c1 * PI_QK : n_ff;
    for (int j = MGATE; j <= MUP; j++) { /* gate and up rows are neurons */
        const int uu = pi_mat_unit(pi_layer_mat(L, j));
        u0[j] = n0 / uu;
        u1[j] = n1 > n0 ? (n1 + uu - 1) / uu : u0[j];
    }
    if (!L->gate.raw) u0[MGATE] = u1[MGATE] = 0;
}

static void run_rows(const pi_layer *L, int j, const pi_act *a, float *y, float *x, const float *bias, int ith) {
    const pi_mat *m = pi_layer_mat(L, j);
    const pi_seg *s = &L->seg[j][ith];
    pi_mat_run_seg(m, s, a, 1, y, 0);
    if (!x && !bias) return;
    const int unit = pi_mat_unit(m), r1 = s->u1 * unit < m->rows ? s->u1 * unit : m->rows;
    for (int r = s->u0 * unit; r < r1; r++) {
        if (bias) y[r] += bias[r];
        if (x) x[r] += y[r];
    }
}

/* ---- neuron-sparse FFN (see pi_layer) ---- */

void pi_reduce_partials(pi_decoder *D, float *xout, const float *bias, int ith, int nth) {
    pi_dec_barrier(D, ith);
    int r0, r1; /* this thread's slice of x */
    pi_split(D->d, ith, nth, &r0, &r1);
    for (int t = 0; t < nth; t++) {
        const float *yp = D->tw[t].yp;
        for (int r = r0; r < r1; r++) xout[r] += yp[r];
    }
    if (bias) for (int r = r0; r < r1; r++) xout[r] += bias[r];
    pi_dec_barrier(D, ith);
}

int pi_predict_chunk(pi_decoder *D, const pi_layer *L, pi_tws *w, const float *x, int n0, int n1, float *u,
                     const uint8_t *cand, int32_t *idx, int ith, int nth) {
    const int r = L->fc1.rows;
    int r0, r1, nc = 0;
    pi_act_fill(&w->act, x, 0, 0, D->d, pi_need_of(L->fc1.qtype));
    pi_split(r, ith, nth, &r0, &r1); /* the hidden layer is split over the threads */
    if (r1 > r0) {
        pi_mat_rows(&L->fc1, r0, r1, &w->act, D->z);
        for (int i = r0; i < r1; i++) D->z[i] = D->z[i] > 0.0f ? D->z[i] : 0.0f;
    }
    pi_dec_barrier(D, ith);
    if (n1 > n0) { /* then each thread predicts its chunk */
        pi_act_fill(&w->act_z, D->z, 0, 0, r, pi_need_of(L->fc2.qtype));
        pi_mat_rows(&L->fc2, n0, n1, &w->act_z, u);
        for (int i = n0; i < n1; i++)
            if (u[i] >= L->t_pred && (!cand || cand[i])) idx[nc++] = i;
    }
    return nc;
}
static inline int keep_h(float h, float t_h) { return h != 0.0f && fabsf(h) >= t_h; }

/* The nc candidates in w->idx (a predictor's or a tier's): gate rows gathered, and up rows for those that can fire
 * (for ReLU gates only gate > 0); h = act(gate)*up; neurons with h kept (keep_h) go through down_t into w->yp.
 * Returns the number kept. */
static int ffn_gather(pi_decoder *D, const pi_layer *L, pi_tws *w, int nc, int il) {
    const int relu_gate = D->act == ACT_RELU && D->ffn_kind != FFN_MLP;
    int nk = 0;
    w->kept_g[il] = L->gate.raw ? nc : 0;
    w->kept_u[il] = nc; /* lowered below when a ReLU gate rules neurons out */
    if (!nc) return 0;
    pi_act_fill(&w->act, w->xn, 0, 0, D->d, L->need_ffn);
    float *gv = w->hv; /* gate values of the candidates (hv is rewritten below, never ahead of j) */
    if (L->gate.raw) {
        pi_mat_gather(&L->gate, w->idx, nc, &w->act, gv);
        if (relu_gate) { /* only neurons with gate > 0 can fire: read just their up rows */
            int np = 0;
            for (int j = 0; j < nc; j++)
                if (gv[j] > 0.0f) { w->idx[np] = w->idx[j]; gv[np++] = gv[j]; }
            nc = np;
            w->kept_u[il] = nc;
        }
    }
    pi_mat_gather(&L->up, w->idx, nc, &w->act, w->uv);
    if (L->bu) for (int j = 0; j < nc; j++) w->uv[j] += L->bu[w->idx[j]];
    for (int j = 0; j < nc; j++) {
        float gj = L->gate.raw ? gv[j] : 0.0f, uj = w->uv[j];
        pi_ffn_act(D, &gj, &uj, 1);
        if (keep_h(gj, L->t_h)) { w->idx[nk] = w->idx[j]; w->hv[nk++] = gj; }
    }
    pi_mat_axpy(&L->down_t, w->idx, w->hv, nk, 0, D->d, w->yp);
    return nk;
}

/* xout += FFN(norm(xin)) (decode: xin == xout, the residual stream). cand, when given, names the neurons this call
 * may compute (a tier's share of the layer); they are read by row gathers, like a predictor's candidates. */
static void ffn_sparse(pi_decoder *D, int il, const float *x, float *xout, const uint8_t *cand, int ith, int nth) {
    const pi_layer *L = &D->L[il];
    pi_tws *w = &D->tw[ith];
    const int d = D->d, relu_gate = D->act == ACT_RELU && D->ffn_kind != FFN_MLP;
    float *xn = w->xn, *g = D->g, *u = D->u;
    pi_norm(D, x, L->ffn_norm, L->ffn_norm_b, xn);
    int nx = d;
    if (L->t_x > 0.0f) { /* input site: drop small channels (all threads compute the same list) */
        nx = 0;
        for (int c = 0; c < d; c++) {
            if (fabsf(xn[c]) >= L->t_x) { w->xi[nx] = c; w->xv[nx++] = xn[c]; }
            else xn[c] = 0.0f;
        }
    }
    int c0, c1;
    pi_split((D->n_ff + PI_QK - 1) / PI_QK, ith, nth, &c0, &c1);
    const int n0 = c0 * PI_QK, n1 = c1 * PI_QK < D->n_ff ? c1 * PI_QK : D->n_ff;
    int nk = 0;
    w->kept_u[il] = n1 - n0; /* up rows read: all of the chunk unless the ReLU gate selects them below */
    w->kept_g[il] = 0;       /* gate rows read by gathers (a dense gate is counted by the caller) */
    memset(w->yp, 0, (size_t)d * sizeof(float));
    if (L->fc1.raw) { /* predictor: the chunk's logits in u's slots, its candidates in w->idx */
        nk = ffn_gather(D, L, w, pi_predict_chunk(D, L, w, x, n0, n1, u, cand, w->idx, ith, nth), il);
    } else if (cand) { /* a tier's neurons: row gathers over its candidates in this thread's chunk */
        int nc = 0;
        for (int i = n0; i < n1; i++)
            if (cand[i]) w->idx[nc++] = i;
        nk = ffn_gather(D, L, w, nc, il);
    } else if (n1 > n0) {
        int have_up = 1;
        if (L->t_x > 0.0f) { /* gate/up as axpys over the kept channels' rows of the input-major copies */
            if (L->gate.raw) {
                memset(g + n0, 0, (size_t)(n1 - n0) * sizeof(float));
                pi_mat_axpy(&L->gate_t, w->xi, w->xv, nx, n0, n1, g);
            }
            memset(u + n0, 0, (size_t)(n1 - n0) * sizeof(float));
            pi_mat_axpy(&L->up_t, w->xi, w->xv, nx, n0, n1, u);
            if (L->bu) for (int i = n0; i < n1; i++) u[i] += L->bu[i];
        } else {
            pi_act_fill(&w->act, xn, 0, 0, d, L->need_ffn);
            if (L->gate.raw) run_rows(L, MGATE, &w->act, g, NULL, NULL, ith);
            have_up = !relu_gate;
            if (have_up) run_rows(L, MUP, &w->act, u, NULL, L->bu, ith);
        }
        if (!have_up) { /* ReLU gate: only neurons with gate > 0 can fire; read just their up rows */
            int nc = 0;
            for (int i = n0; i < n1; i++)
                if (g[i] > 0.0f) w->idx[nc++] = i;
            pi_mat_gather(&L->up, w->idx, nc, &w->act, w->uv);
            w->kept_u[il] = nc;
            for (int j = 0; j < nc; j++) {
                const int i = w->idx[j];
                const float uj = w->uv[j] + (L->bu ? L->bu[i] : 0.0f);
                const float hj = D->ffn_kind == FFN_DGLU ? g[i] * (uj > 0.0f ? uj : 0.0f) : g[i] * uj;
                if (keep_h(hj, L->t_h)) { w->idx[nk] = i; w->hv[nk++] = hj; }
            }
        } else {
            pi_ffn_act(D, g + n0, u + n0, n1 - n0); /* g = h */
            for (int i = n0; i < n1; i++)
                if (keep_h(g[i], L->t_h)) { w->idx[nk] = i; w->hv[nk++] = g[i]; }
        }
        pi_mat_axpy(&L->down_t, w->idx, w->hv, nk, 0, d, w->yp);
    }
    w->kept_h[il] = nk;
    w->kept_x[il] = ith == 0 ? nx : 0;
    if (L->ffn_post_norm) { /* the FFN output into y (this thread's slice zeroed, then summed), normed into x */
        int r0, r1;
        pi_split(d, ith, nth, &r0, &r1);
        memset(D->y + r0, 0, (size_t)(r1 - r0) * sizeof(float));
        pi_reduce_partials(D, D->y, L->bd, ith, nth);
        pi_post_norm_add(D, D->y, L->ffn_post_norm, xout, ith, nth);
        pi_dec_barrier(D, ith);
        return;
    }
    pi_reduce_partials(D, xout, L->bd, ith, nth);
}

/* ---- decode ---- */
static void attn_barrier(void *D, int ith) { pi_dec_barrier(D, ith); }

static void decode_layer(pi_decoder *D, int il, float *x, int pos, int ith, int nth) {
    const pi_layer *L = &D->L[il];
    pi_tws *w = &D->tw[ith];
    const int hd = D->hd, kvd = D->n_head_kv * hd, qd = D->n_head * hd, half = D->rope_dim / 2;

    pi_prof_phase(D, ith, PH_ATTN_PROJ);
    if (D->parallel) { /* the FFN's input: this layer's x, before o_proj adds into it (barriers in between) */
        int r0, r1;
        pi_split(D->d, ith, nth, &r0, &r1);
        memcpy(D->xpar + r0, x + r0, (size_t)(r1 - r0) * sizeof(float));
    }
    const float *xf = D->parallel ? D->xpar : x;
    pi_norm(D, x, L->attn_norm, L->attn_norm_b, w->xn);
    pi_act_fill(&w->act, w->xn, 0, 0, D->d, L->need_attn);
    run_rows(L, MQ, &w->act, D->q, NULL, NULL, ith);
    run_rows(L, MK, &w->act, D->k, NULL, NULL, ith);
    run_rows(L, MV, &w->act, D->v, NULL, NULL, ith);
    pi_dec_barrier(D, ith);

    pi_prof_phase(D, ith, PH_ATTN_CORE);
    const float *cs = (L->rope_local ? D->cos_local : D->cos) + (size_t)pos * half;
    const float *sn = (L->rope_local ? D->sin_local : D->sin) + (size_t)pos * half;
    int g0, g1, h0, h1;
    pi_split(D->n_head_kv, ith, nth, &g0, &g1);
    for (int g = g0; g < g1; g++) {
        float *kh = D->k + g * hd, *vh = D->v + g * hd;
        if (L->bk) for (int i = 0; i < hd; i++) kh[i] += L->bk[g * hd + i];
        if (L->bv) for (int i = 0; i < hd; i++) vh[i] += L->bv[g * hd + i];
        if (L->k_norm) pi_rmsnorm(kh, L->k_norm, hd, D->eps, kh);
        pi_rope(kh, 1, hd, D->rope_dim, D->rope_style, cs, sn);
    }
    if (g1 > g0) pi_kv_write(D->kv_type, L->kc, L->vc, kvd, pos, g0, g1, hd, D->k, D->v);
    pi_split(D->n_head, ith, nth, &h0, &h1);
    for (int h = h0; h < h1; h++) { /* before the barrier: past PI_ATTN_CHUNK positions every thread reads every head */
        float *qh = D->q + h * hd;
        if (L->bq) for (int i = 0; i < hd; i++) qh[i] += L->bq[h * hd + i];
        if (L->q_norm) pi_rmsnorm(qh, L->q_norm, hd, D->eps, qh);
        pi_rope(qh, 1, hd, D->rope_dim, D->rope_style, cs, sn);
        if (D->attn_scale > 0.0f) for (int i = 0; i < hd; i++) qh[i] *= D->attn_scale;
    }
    pi_dec_barrier(D, ith);
    const pi_attn_decode_args aa = {pi_attn_ops_for(D->kv_type), D->n_head, D->n_head_kv, hd, pos + 1, D->kv_type,
                                    L->kc, L->vc, kvd, D->q, D->att, &D->aw, attn_barrier, D,
                                    D->attn_scale > 0.0f ? 1.0f : 0.0f, D->attn_softcap, L->window};
    pi_attn_decode(&aa, ith, nth); /* this thread's heads h0..h1 of att are final */
    const int need_o = pi_need_of(L->o.qtype);
    if (hd % PI_QK == 0) {
        pi_act_fill(&D->act_att, D->att, 0, h0 * hd, h1 * hd, need_o);
        pi_dec_barrier(D, ith);
    } else { /* head outputs straddle q8 blocks: quantize after everyone is done */
        pi_dec_barrier(D, ith);
        if (ith == 0) pi_act_fill(&D->act_att, D->att, 0, 0, qd, need_o);
        pi_dec_barrier(D, ith);
    }

    pi_prof_phase(D, ith, PH_O_PROJ);
    run_rows(L, MO, &D->act_att, D->y, L->attn_post_norm ? NULL : x, L->bo, ith);
    pi_dec_barrier(D, ith);
    if (L->attn_post_norm) {
        pi_post_norm_add(D, D->y, L->attn_post_norm, x, ith, nth);
        pi_dec_barrier(D, ith);
    }

    pi_prof_phase(D, ith, PH_FFN);
    if (D->disk && D->disk->layers[il].where) {
        pi_ffn_disk(D, il, xf, x, ith, nth);
        return;
    }
    if (L->down_t.raw) {
        ffn_sparse(D, il, xf, x, NULL, ith, nth);
        return;
    }
    pi_norm(D, xf, L->ffn_norm, L->ffn_norm_b, w->xn);
    pi_act_fill(&w->act, w->xn, 0, 0, D->d, L->need_ffn);
    int c0, c1;
    const int nchunk = (D->n_ff + PI_QK - 1) / PI_QK;
    pi_split(nchunk, ith, nth, &c0, &c1);
    const int n0 = c0 * PI_QK, n1 = c1 * PI_QK < D->n_ff ? c1 * PI_QK : D->n_ff;
    if (n1 > n0) {
        if (L->gate.raw) run_rows(L, MGATE, &w->act, D->g, NULL, NULL, ith);
        run_rows(L, MUP, &w->act, D->u, NULL, L->bu, ith);
        pi_ffn_act(D, D->g + n0, D->u + n0, n1 - n0);
        pi_act_fill(&D->act_h, D->g, 0, n0, n1, pi_need_of(L->down.qtype));
    }
    pi_dec_barrier(D, ith);
    run_rows(L, MDOWN, &D->act_h, D->y, L->ffn_post_norm ? NULL : x, L->bd, ith);
    pi_dec_barrier(D, ith);
    if (L->ffn_post_norm) {
        pi_post_norm_add(D, D->y, L->ffn_post_norm, x, ith, nth);
        pi_dec_barrier(D, ith);
    }
}

static void decode_head(pi_decoder *D, float *x, float *logits, int ith, int nth) {
    pi_tws *w = &D->tw[ith];
    pi_prof_phase(D, ith, PH_HEAD);
    pi_norm(D, x, D->out_norm, D->out_norm_b, w->xn);
    pi_act_fill(&w->act, w->xn, 0, 0, D->d, pi_need_of(D->head.qtype));
    pi_mat_run_seg(&D->head, &D->head_seg[ith], &w->act, 1, logits, 0);
    pi_head_softcap(D, logits, ith);
    (void)nth;
}

typedef struct { pi_decoder *D; float *x; int pos, l0, l1; float *logits; } step_args;

static void step_job(void *varg, int ith, int nth) {
    step_args *s = varg;
    for (int il = s->l0; il < s->l1; il++) decode_layer(s->D, il, s->x, s->pos, ith, nth);
    if (s->logits) decode_head(s->D, s->x, s->logits, ith, nth);
    pi_prof_phase(s->D, ith, PH_HEAD); /* closes the last phase (adds nothing to PH_HEAD) */
}

typedef struct { pi_decoder *D; int il; const float *xin; float *xout; const uint8_t *cand; } ffn_args;

static void ffn_job(void *varg, int ith, int nth) {
    ffn_args *a = varg;
    ffn_sparse(a->D, a->il, a->xin, a->xout, a->cand, ith, nth);
}

int pi_decoder_ffn(pi_decoder *D, int il, const float *xin, float *xout, const uint8_t *cand) {
    if (il < 0 || il >= D->n_layer || !D->L[il].bound || !D->L[il].down_t.raw) return -1;
    ffn_args a = {D, il, xin, xout, cand};
    pi_pool_run(D->pool, ffn_job, &a);
    return 0;
}

void pi_decoder_step(pi_decoder *D, float *x, int pos, int l0, int l1, float *logits) {
    step_args s = {D, x, pos, l0, l1, logits};
    if (l0 == 0 && l1 > 0) pi_add_positions(D, x, 1, pos); /* x is the token's embedding */
    if (D->prof) { D->t_last = pi_now_ns(); D->cur = PH_ATTN_PROJ; }
    pi_pool_run(D->pool, step_job, &s);
    D->steps++;
    D->tokens++;
}

