/* Construction of the CPU decoder (decoder.h): the per-thread packed layout of the weights (each thread's rows
 * of every matrix in the order a step reads them), thread buffers, and binding layers, KV cache, output head,
 * predictors and per-head norms. decoder.c runs the steps. */
#include "decoder.h"
#include "disk.h"
#include <math.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>

/* Pack units [u0, u1) of m into arena a (block formats), or copy their rows as they are (K-quants), and describe
 * them as a segment. The K-quant copy changes no byte; it moves the rows from the file's 4 KiB page-cache pages to
 * the arena's huge pages, and the file's pages are given back after each layer as for the packed formats (one
 * copy of the model). 7B Q4_K_M, 2 threads, AVX-512 (EPYC), three engines interleaved in one process, 9 rounds:
 * decode against our Q4_0 0.897x read in place, 0.978x copied (every round 0.07-0.10 higher). */
static int make_seg(pi_arena *a, const pi_mat *m, int u0, int u1, pi_seg *s) {
    s->u0 = u0; s->u1 = u1; s->p = s->pf_end = NULL;
    if (!m->raw || u1 <= u0) return 0;
    uint8_t *p;
    if (pi_is_kquant(m->qtype)) {
        const int r0 = u0 * 4, r1 = u1 * 4 < m->rows ? u1 * 4 : m->rows;
        if (!(p = pi_arena_alloc(a, (size_t)(r1 - r0) * m->row_bytes))) return -1;
        memcpy(p, m->raw + (size_t)r0 * m->row_bytes, (size_t)(r1 - r0) * m->row_bytes);
    } else if (pi_is_packable(m->qtype)) {
        if (!(p = pi_arena_alloc(a, (size_t)(u1 - u0) * m->gstride))) return -1;
        pi_pack_groups(m->qtype, m->raw, m->row_bytes, m->rows, m->cols, u0, u1, p, m->gstride);
    } else {
        return 0;
    }
    s->p = p;
    s->pf_end = pi_arena_end(a, p);
    return 0;
}

/* Each thread packs its own rows into its own arena: the copies run side by side, and the pages are first
 * touched by the thread that streams them in decode. 7B Q4_0, 2 threads: binding all 32 layers 7.4 -> 3.9 s
 * (medians of 4 alternating runs; most of it is the kernel zeroing fresh pages). */
typedef struct { pi_decoder *D; int il; int failed[PI_MAX_THREADS]; } layout_args;

static void layout_job(void *arg, int ith, int nth) {
    layout_args *a = arg;
    pi_layer *L = &a->D->L[a->il];
    int u0[M_N], u1[M_N];
    if (a->D->ffn_only) { /* nothing packed: an FFN-only decoder reads raw rows by gathers */
        for (int j = 0; j < M_N; j++) L->seg[j][ith] = (pi_seg){0};
        return;
    }
    pi_layer_ranges(L, a->D->n_ff, ith, nth, u0, u1);
    for (int j = 0; j < M_N && !a->failed[ith]; j++) {
        if (j >= MGATE && !(a->D->pack_ffn & (1 << (j - MGATE)))) { /* read by the disk tier's gathers instead */
            L->seg[j][ith] = (pi_seg){.u0 = u0[j], .u1 = u1[j]};
            continue;
        }
        a->failed[ith] = make_seg(&a->D->arena[ith], pi_layer_mat(L, j), u0[j], u1[j], &L->seg[j][ith]);
    }
}

static int layout_layer(pi_decoder *D, int il) {
    layout_args a = {.D = D, .il = il};
    pi_pool_run(D->pool, layout_job, &a);
    for (int t = 0; t < D->nth; t++)
        if (a.failed[t]) return -1;
    return 0;
}

static int layout_head(pi_decoder *D) {
    for (int t = 0; t < D->nth; t++) {
        int u0, u1;
        pi_split(pi_mat_units(&D->head), t, D->nth, &u0, &u1);
        if (make_seg(&D->arena[t], &D->head, u0, u1, &D->head_seg[t])) return -1;
    }
    return 0;
}

static int relayout(pi_decoder *D);
int pi_decoder_repack(pi_decoder *D) {
    if (relayout(D)) { D->broken = 1; return -1; }
    return 0;
}

static int relayout(pi_decoder *D) {
    for (int t = 0; t < PI_MAX_THREADS; t++) pi_arena_free(&D->arena[t]);
    D->layout_nth = D->nth;
    for (int il = 0; il < D->n_layer; il++)
        if (D->L[il].bound && layout_layer(D, il)) return -1;
    if (D->head_bound && layout_head(D)) return -1;
    return 0;
}

/* This thread's rows of matrix j: y = W a (+ bias), optionally x[r] += y[r]. */

/* ---- construction ---- */
static int alloc_act(pi_act *a, void **mem, int n, int n_tok, int need) {
    *mem = pi_aligned_alloc(pi_act_bytes(n, n_tok, need));
    if (!*mem) return -1;
    pi_act_bind(a, *mem, n, n_tok, need);
    return 0;
}

static void free_tws(pi_tws *tw, int nth) {
    if (!tw) return;
    for (int i = 0; i < nth; i++) {
        pi_aligned_free(tw[i].xn);
        pi_aligned_free(tw[i].act_mem);
        void *bufs[] = {tw[i].idx, tw[i].hv, tw[i].uv, tw[i].yp, tw[i].xi, tw[i].xv,
                        tw[i].kept_h, tw[i].kept_x, tw[i].kept_u, tw[i].kept_g, tw[i].act_z_mem};
        for (size_t j = 0; j < sizeof bufs / sizeof *bufs; j++) pi_aligned_free(bufs[j]);
    }
    free(tw);
}

static void free_threads(pi_decoder *D) {
    free_tws(D->tw, D->nth);
    D->tw = NULL;
}

static const int NEED_ALL = PI_NEED_Q8 | PI_NEED_F16 | PI_NEED_BF16 | PI_NEED_F32;

/* Quantized forms of the predictor's hidden layer (r_max values, rounded up to whole q8 blocks) for nth threads. */
static int alloc_act_z(const pi_decoder *D, pi_tws *tw, int nth) {
    const int n = (D->r_max + PI_QK - 1) / PI_QK * PI_QK;
    for (int i = 0; tw && i < nth && n > 0; i++) {
        pi_aligned_free(tw[i].act_z_mem);
        tw[i].act_z_mem = NULL;
        if (alloc_act(&tw[i].act_z, &tw[i].act_z_mem, n, 1, NEED_ALL)) return -1;
    }
    return 0;
}

/* Per-thread decode buffers for nth threads, or NULL (nothing left allocated) when memory runs out. */
static pi_tws *alloc_tws(const pi_decoder *D, int nth) {
    pi_tws *tw = calloc((size_t)nth, sizeof(pi_tws));
    if (!tw) return NULL;
    for (int i = 0; i < nth; i++) {
        pi_tws *w = &tw[i];
        w->xn = pi_aligned_alloc((size_t)D->d * 4);
        w->idx = pi_aligned_alloc((size_t)D->n_ff * 4);
        w->hv = pi_aligned_alloc((size_t)D->n_ff * 4);
        w->uv = pi_aligned_alloc((size_t)D->n_ff * 4);
        w->yp = pi_aligned_alloc((size_t)D->d * 4);
        w->xi = pi_aligned_alloc((size_t)D->d * 4);
        w->xv = pi_aligned_alloc((size_t)D->d * 4);
        w->kept_h = pi_aligned_alloc((size_t)D->n_layer * sizeof(int));
        w->kept_x = pi_aligned_alloc((size_t)D->n_layer * sizeof(int));
        w->kept_u = pi_aligned_alloc((size_t)D->n_layer * sizeof(int));
        w->kept_g = pi_aligned_alloc((size_t)D->n_layer * sizeof(int));
        if (!w->kept_u || !w->kept_g || !w->xn || !w->idx || !w->hv || !w->uv || !w->yp || !w->xi || !w->xv || !w->kept_h ||
            !w->kept_x || alloc_act(&w->act, &w->act_mem, D->d, 1, NEED_ALL)) {
            free_tws(tw, nth);
            return NULL;
        }
    }
    if (alloc_act_z(D, tw, nth)) {
        free_tws(tw, nth);
        return NULL;
    }
    return tw;
}

/* The new pool and buffers are made before the old ones are freed, so a refused thread or allocation leaves the
 * decoder exactly as it was (a decoder left without a pool crashed on its next step). Only a failed relayout (out
 * of memory while repacking the weights for the new split) leaves it unusable, and then it says so (D->broken). */
int pi_decoder_set_threads(pi_decoder *D, int nth) {
    if (nth < 1) nth = 1;
    if (nth > PI_MAX_THREADS) nth = PI_MAX_THREADS;
    if (D->pool && D->nth == nth) return 0;
    pi_pool *pool = pi_pool_new(nth);
    pi_tws *tw = pool ? alloc_tws(D, nth) : NULL;
    if (!tw) {
        if (pool) pi_pool_free(pool);
        return -1;
    }
    if (D->pool) pi_pool_free(D->pool);
    free_threads(D);
    pi_prefill_free(&D->pf); /* per-thread scratch: reallocated by the next prefill */
    D->pool = pool;
    D->tw = tw;
    D->nth = nth;
    if (D->layout_nth == nth) return 0;
    if (relayout(D)) {
        D->broken = 1;
        return -2;
    }
    return 0;
}

pi_decoder *pi_decoder_new(int n_layer, int d, int n_head, int n_head_kv, int hd, int n_ff, int n_vocab,
                           float eps, int rope_dim, int rope_style, int act, int ffn_kind, int n_ctx, int nth) {
    if (n_layer <= 0 || d <= 0 || n_head <= 0 || n_head_kv <= 0 || n_head % n_head_kv || hd <= 0 || hd > PI_MAX_HEAD_DIM || n_ff <= 0 ||
        n_vocab <= 0 || n_ctx <= 0 || rope_dim < 0 || rope_dim > hd || rope_dim % 2)
        return NULL;
    pi_decoder *D = calloc(1, sizeof *D);
    if (!D) return NULL;
    D->n_layer = n_layer; D->d = d; D->n_head = n_head; D->n_head_kv = n_head_kv; D->hd = hd; D->n_ff = n_ff;
    D->n_vocab = n_vocab; D->eps = eps; D->rope_dim = rope_dim; D->rope_style = rope_style; D->act = act;
    D->ffn_kind = ffn_kind; D->n_ctx = n_ctx;
    D->kv_type = PI_KV_TYPE(PI_F16, PI_F16);
    D->pack_ffn = PI_PACK_ALL;
    D->embed_scale = 1.0f;
    D->L = calloc((size_t)n_layer, sizeof(pi_layer));
    const int qd = n_head * hd, kvd = n_head_kv * hd, mx = d > n_ff ? d : n_ff;
    D->q = pi_aligned_alloc((size_t)qd * 4);
    D->k = pi_aligned_alloc((size_t)kvd * 4);
    D->v = pi_aligned_alloc((size_t)kvd * 4);
    D->att = pi_aligned_alloc((size_t)qd * 4);
    D->y = pi_aligned_alloc((size_t)(mx > qd ? mx : qd) * 4);
    D->g = pi_aligned_alloc((size_t)n_ff * 4);
    D->u = pi_aligned_alloc((size_t)n_ff * 4);
    if (!D->L || !D->q || !D->k || !D->v || !D->att || !D->y || !D->g || !D->u ||
        alloc_act(&D->act_att, &D->mem_att, qd, 1, NEED_ALL) || alloc_act(&D->act_h, &D->mem_h, n_ff, 1, NEED_ALL) ||
        pi_attn_ws_init(&D->aw, n_ctx, n_head, hd, PI_MAX_THREADS) ||
        pi_decoder_set_threads(D, nth)) {
        pi_decoder_free(D);
        return NULL;
    }
    D->act_att.f = D->att;
    D->act_h.f = D->g;
    return D;
}

void pi_prefill_free(pi_prefill_ws *p) {
    for (int t = 0; t < PI_MAX_THREADS; t++) {
        pi_aligned_free(p->tile_scratch[t]);
        pi_aligned_free(p->yp[t]);
        pi_aligned_free(p->uv[t]);
        pi_aligned_free(p->kept[t]);
    }
    float *bufs[] = {p->xn, p->q, p->k, p->v, p->att, p->y, p->g, p->u, p->xpar};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) pi_aligned_free(bufs[i]);
    pi_aligned_free(p->mem_x); pi_aligned_free(p->mem_att); pi_aligned_free(p->mem_h);
    memset(p, 0, sizeof *p);
}

void pi_decoder_free(pi_decoder *D) {
    if (!D) return;
    pi_disk_free(D->disk);
    if (D->pool) pi_pool_free(D->pool);
    free_threads(D);
    if (D->L) {
        for (int i = 0; i < D->n_layer; i++) {
            pi_layer *L = &D->L[i];
            pi_mat *ms[] = {&L->q, &L->k, &L->v, &L->o, &L->gate, &L->up, &L->down};
            for (size_t j = 0; j < sizeof ms / sizeof *ms; j++) pi_mat_free(ms[j]);
        }
        free(D->L);
    }
    pi_mat_free(&D->head);
    for (int t = 0; t < PI_MAX_THREADS; t++) pi_arena_free(&D->arena[t]);
    float *bufs[] = {D->q, D->k, D->v, D->att, D->y, D->g, D->u, D->z, D->xpar};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) pi_aligned_free(bufs[i]);
    pi_aligned_free(D->mem_att); pi_aligned_free(D->mem_h);
    pi_prefill_free(&D->pf);
    pi_attn_ws_free(&D->aw);
    free(D);
}

int pi_decoder_set_layer(pi_decoder *D, int il, const float *attn_norm, const pi_mat *q, const pi_mat *k,
                         const pi_mat *v, const pi_mat *o, const float *ffn_norm, const pi_mat *gate,
                         const pi_mat *up, const pi_mat *down, const float *bq, const float *bk, const float *bv) {
    pi_layer *L = &D->L[il];
    const int qd = D->n_head * D->hd, kvd = D->n_head_kv * D->hd;
    /* shapes: q [qd, d], k/v [kvd, d], o [d, qd], gate/up [n_ff, d], down [d, n_ff]; an FFN-only decoder binds no
     * attention (q/k/v/o NULL) */
    const int attn = q || k || v || o;
    if (attn && (D->ffn_only || !q || !k || !v || !o)) return -1;
    if (!attn && !D->ffn_only) return -1;
    if ((attn && (q->rows != qd || q->cols != D->d || k->rows != kvd || k->cols != D->d || v->rows != kvd ||
                  v->cols != D->d || o->rows != D->d || o->cols != qd)) ||
        up->rows != D->n_ff || up->cols != D->d ||
        down->rows != D->d || down->cols != D->n_ff || (gate && (gate->rows != D->n_ff || gate->cols != D->d)))
        return -1;
    if ((gate != NULL) != (D->ffn_kind != FFN_MLP)) return -1;
    pi_mat *dst[] = {&L->q, &L->k, &L->v, &L->o, &L->gate, &L->up, &L->down};
    const pi_mat *src[] = {q, k, v, o, gate, up, down};
    for (size_t j = 0; j < sizeof dst / sizeof *dst; j++) pi_mat_free(dst[j]);
    void *kc = L->kc, *vc = L->vc; /* set_kv may come first */
    memset(L, 0, sizeof *L); /* also turns the sparse FFN off: set_sparse again after rebinding */
    L->kc = kc; L->vc = vc;
    for (size_t j = 0; j < sizeof dst / sizeof *dst; j++) {
        if (!src[j]) continue;
        if (pi_mat_init(dst[j], src[j]->qtype, src[j]->raw, src[j]->rows, src[j]->cols, 0)) return -1;
    }
    L->attn_norm = attn_norm; L->ffn_norm = ffn_norm;
    L->bq = bq; L->bk = bk; L->bv = bv;
    L->need_attn = attn ? pi_need_of(q->qtype) | pi_need_of(k->qtype) | pi_need_of(v->qtype) : 0;
    L->need_ffn = pi_need_of(up->qtype) | (gate ? pi_need_of(gate->qtype) : 0);
    L->bound = 1;
    if (D->layout_nth != D->nth) return relayout(D);
    return layout_layer(D, il);
}

int pi_decoder_set_output(pi_decoder *D, const float *norm, const void *head, int qtype) {
    pi_mat_free(&D->head);
    if (pi_mat_init(&D->head, qtype, head, D->n_vocab, D->d, 0)) return -1;
    D->out_norm = norm;
    D->head_bound = 1;
    if (D->layout_nth != D->nth) return relayout(D);
    return layout_head(D);
}

int pi_decoder_set_sparse(pi_decoder *D, int il, const pi_mat *down_t, const pi_mat *gate_t, const pi_mat *up_t,
                          float t_h, float t_x) {
    pi_layer *L = &D->L[il];
    memset(&L->down_t, 0, sizeof L->down_t);
    memset(&L->gate_t, 0, sizeof L->gate_t);
    memset(&L->up_t, 0, sizeof L->up_t);
    L->t_h = L->t_x = 0.0f;
    if (!down_t) return 0;
    if (!L->bound || !(t_h >= 0.0f) || !(t_x >= 0.0f)) return -1;
    if (down_t->rows != D->n_ff || down_t->cols != D->d) return -1;
    if (t_x > 0.0f) {
        if (!up_t || up_t->rows != D->d || up_t->cols != D->n_ff) return -1;
        if (L->gate.raw && (!gate_t || gate_t->rows != D->d || gate_t->cols != D->n_ff)) return -1;
        if (pi_need_of(up_t->qtype) == PI_NEED_Q8 && D->n_ff % PI_QK) return -1;
        L->up_t = *up_t;
        if (L->gate.raw) L->gate_t = *gate_t;
    }
    L->down_t = *down_t;
    L->t_h = t_h;
    L->t_x = t_x;
    return 0;
}

int pi_decoder_set_form(pi_decoder *D, int norm_kind, int parallel, const float *out_norm_b, const float *pos_embd,
                        int n_pos) {
    if ((norm_kind != NORM_RMS && norm_kind != NORM_LAYER) || (pos_embd && n_pos < D->n_ctx)) return -1;
    if (parallel && !D->xpar && !(D->xpar = pi_aligned_alloc((size_t)D->d * sizeof(float)))) return -1;
    D->norm_kind = norm_kind;
    D->parallel = parallel != 0;
    D->out_norm_b = out_norm_b;
    D->pos_embd = pos_embd;
    D->n_pos = pos_embd ? n_pos : 0;
    return 0;
}

int pi_decoder_set_biases(pi_decoder *D, int il, const float *attn_norm_b, const float *ffn_norm_b, const float *bo,
                          const float *bu, const float *bd) {
    if (il < 0 || il >= D->n_layer || !D->L[il].bound) return -1;
    pi_layer *L = &D->L[il];
    L->attn_norm_b = attn_norm_b; L->ffn_norm_b = ffn_norm_b;
    L->bo = bo; L->bu = bu; L->bd = bd;
    return 0;
}

int pi_decoder_set_qk_norm(pi_decoder *D, int il, const float *q_norm, const float *k_norm) {
    if (il < 0 || il >= D->n_layer || !D->L[il].bound || (q_norm == NULL) != (k_norm == NULL)) return -1;
    D->L[il].q_norm = q_norm;
    D->L[il].k_norm = k_norm;
    return 0;
}

int pi_decoder_set_scales(pi_decoder *D, float embed_scale, float attn_scale, float attn_softcap, float final_softcap,
                          const float *cos_local, const float *sin_local) {
    if (!(embed_scale > 0.0f) || !(attn_scale >= 0.0f) || !(attn_softcap >= 0.0f) || !(final_softcap >= 0.0f) ||
        (cos_local == NULL) != (sin_local == NULL))
        return -1;
    D->embed_scale = embed_scale; D->attn_scale = attn_scale;
    D->attn_softcap = attn_softcap; D->final_softcap = final_softcap;
    D->cos_local = cos_local; D->sin_local = sin_local;
    return 0;
}

int pi_decoder_set_layer_attn(pi_decoder *D, int il, const float *attn_post_norm, const float *ffn_post_norm,
                              int window, int rope_local) {
    if (il < 0 || il >= D->n_layer || !D->L[il].bound || (attn_post_norm == NULL) != (ffn_post_norm == NULL) ||
        window < 0 || (rope_local && !D->cos_local))
        return -1;
    pi_layer *L = &D->L[il];
    L->attn_post_norm = attn_post_norm; L->ffn_post_norm = ffn_post_norm;
    L->window = window; L->rope_local = rope_local != 0;
    return 0;
}

int pi_decoder_set_predictor(pi_decoder *D, int il, const pi_mat *fc1, const pi_mat *fc2, float threshold) {
    pi_layer *L = &D->L[il];
    memset(&L->fc1, 0, sizeof L->fc1);
    memset(&L->fc2, 0, sizeof L->fc2);
    L->t_pred = 0.0f;
    if (!fc1) return 0;
    if (!fc2 || fc1->cols != D->d || fc2->rows != D->n_ff || fc2->cols != fc1->rows || fc1->rows <= 0) return -1;
    if (pi_need_of(fc2->qtype) == PI_NEED_Q8 && fc2->cols % PI_QK) return -1;
    if (fc1->rows > D->r_max) { /* grow the hidden-layer buffers */
        const int r = fc1->rows;
        float *z = pi_aligned_alloc((size_t)r * 4);
        if (!z) return -1;
        D->r_max = r;
        if (alloc_act_z(D, D->tw, D->nth)) { /* the old buffers are gone too: keep no predictor anywhere */
            pi_aligned_free(z);
            for (int i = 0; i < D->n_layer; i++) { memset(&D->L[i].fc1, 0, sizeof D->L[i].fc1); memset(&D->L[i].fc2, 0, sizeof D->L[i].fc2); }
            D->r_max = 0;
            return -1;
        }
        pi_aligned_free(D->z);
        D->z = z;
    }
    L->fc1 = *fc1;
    L->fc2 = *fc2;
    L->t_pred = threshold;
    return 0;
}
