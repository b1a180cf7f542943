/* The CPU decoder: every layer's weights and buffers bound once, one call per decode step (all layers and
 * the LM head) or per prompt chunk, run SPMD on the thread pool with barriers between phases. */
#ifndef PI_DECODER_H
#define PI_DECODER_H

#include "attn.h"
#include "pi.h"
#include "pool.h"

#define PI_MAX_HEAD_DIM 512
#define PI_MAX_THREADS 64
/* Prompts of at most this many tokens run the neuron-sparse FFN over the union of their active neurons when it
 * is on; longer ones use the dense batched FFN (its weights are read once per 4 tokens). */
#define PI_SPARSE_BATCH 8
/* a layer's matrices in the order one thread streams them */
enum { MQ, MK, MV, MO, MGATE, MUP, MDOWN, M_N };
enum { ROPE_NORM = 0, ROPE_NEOX = 1 };
/* GELU comes in two forms that differ by up to ~1e-3: tanh (ggml_gelu, HF "gelu_pytorch_tanh") and erf (HF "gelu") */
enum { ACT_SILU = 0, ACT_RELU = 1, ACT_GELU_TANH = 2, ACT_GELU_ERF = 3 };
enum { FFN_GLU = 0, FFN_DGLU = 1, FFN_MLP = 2 };
/* RMSNorm (llama family) or LayerNorm with bias (falcon, opt) */
enum { NORM_RMS = 0, NORM_LAYER = 1 };
enum { PI_PACK_GATE = 1, PI_PACK_UP = 2, PI_PACK_DOWN = 4, PI_PACK_ALL = 7 };
enum { PH_ATTN_PROJ, PH_ATTN_CORE, PH_O_PROJ, PH_FFN, PH_HEAD, PH_BARRIER, PH_N };

typedef struct {
    int bound;
    const float *attn_norm, *ffn_norm;
    pi_mat q, k, v, o, gate, up, down; /* raw descriptions; gate.raw == NULL for act(up) MLPs */
    pi_seg seg[M_N][PI_MAX_THREADS];   /* thread t's rows of each matrix (packed into arena[t]) */
    const float *bq, *bk, *bv;
    const float *q_norm, *k_norm;      /* [hd]: RMSNorm of every q / k head before RoPE (qwen3), or NULL */
    const float *attn_norm_b, *ffn_norm_b; /* [d]: LayerNorm biases (NORM_LAYER), or NULL */
    const float *bo, *bu, *bd;         /* biases of o_proj [d], up [n_ff], down [d] (falcon, opt), or NULL */
    /* Gemma: RMSNorms of the attention and FFN outputs before they join the residual ([d] each, or NULL); the
     * attention window (the last `window` positions, 0: all) and which RoPE tables the layer reads (1: local) */
    const float *attn_post_norm, *ffn_post_norm;
    int window, rope_local;
    void *kc, *vc;                     /* [n_ctx] rows of n_head_kv*head_dim values (kv_type), owned by Python */
    int need_attn, need_ffn;           /* activation forms the layer's inputs need (PI_NEED_*) */
    /* Neuron-sparse FFN (decode only; prefill stays dense): on when down_t.raw is set. Per 32-neuron chunk of a
     * thread: gate (dense rows, or input-major gate_t over the kept input channels when t_x > 0); for ReLU
     * gates only the neurons with gate > 0 read their up row (exact); h = act(gate)*up; neurons with h == 0 or
     * |h| < t_h are skipped; down is an axpy over the kept neurons' rows of down_t into a per-thread sum. */
    pi_mat down_t, gate_t, up_t;       /* raw neuron-major [n_ff, d] / input-major [d, n_ff]; owned by Python */
    float t_h, t_x;
    /* Activation predictor (PowerInfer): logits = fc2 relu(fc1 x_res), x_res the residual before the FFN norm;
     * only neurons with logit >= t_pred read their gate and up rows (then, as always, h == 0 is skipped). */
    pi_mat fc1, fc2;                   /* [r, d], [n_ff, r]; fc1.raw NULL = no predictor */
    float t_pred;
} pi_layer;

typedef struct {
    float *xn;      /* [d] normalized input */
    int32_t *idx;   /* [n_ff] kept neurons of this thread's chunk (sparse FFN) */
    float *hv;      /* [n_ff] their h values */
    float *uv;      /* [n_ff] up values of gathered rows */
    float *yp;      /* [d] this thread's down sum */
    int32_t *xi;    /* [d] kept input channels (t_x) */
    float *xv;      /* [d] their values */
    int *kept_h, *kept_x, *kept_u, *kept_g; /* [n_layer] neurons / input channels / up rows / gathered gate rows this
                                             * thread read in the last step */
    pi_act act_z;   /* predictor hidden layer, quantized for fc2 (n = D->r_max) */
    void *act_z_mem;
    pi_act act;     /* its quantized forms (all needs) */
    void *act_mem;
} pi_tws;

typedef struct {
    int n_tok_cap;
    float *tile_scratch[PI_MAX_THREADS]; /* attention tiles (pi_attn_tile_floats(hd, n_ctx) each) */
    float *xn, *q, *k, *v, *att, *y, *g, *u;
    float *xpar; /* [n_tok][d] the layers' inputs, for the FFN of a parallel residual */
    float *yp[PI_MAX_THREADS]; /* sparse FFN of small batches: each thread's down sums [n_tok][d] */
    float *uv[PI_MAX_THREADS]; /* and its gathered up values [n_tok][n_ff] */
    int32_t *kept[PI_MAX_THREADS]; /* and one token's kept neurons [n_ff] */
    pi_act act_x, act_att, act_h;
    void *mem_x, *mem_att, *mem_h;
} pi_prefill_ws;

typedef struct pi_decoder {
    int n_layer, d, n_head, n_head_kv, hd, n_ff, n_vocab, rope_dim, rope_style, act, ffn_kind, n_ctx;
    float eps;
    pi_layer *L;
    const float *cos, *sin; /* [n_ctx][rope_dim/2] */
    const float *out_norm, *out_norm_b;
    int norm_kind;  /* NORM_RMS | NORM_LAYER, every norm of the model */
    /* parallel residual (falcon): x += attn(norm(x)) + ffn(norm'(x)), the FFN reading the layer input, kept in
     * xpar [d] while attention's o_proj adds into x */
    int parallel;
    float *xpar;
    /* learned positions (opt): row p of pos_embd [n_pos][d] is added to the input at position p (rope_dim 0) */
    const float *pos_embd;
    int n_pos;
    /* Gemma: input embeddings times embed_scale (sqrt(d), 1 otherwise); q times attn_scale after RoPE, the kernels'
     * scale then 1 (0: 1/sqrt(hd), as llama.cpp's f_attention_scale with kq_scale 1); attention scores and logits
     * soft-capped to c*tanh(s/c) (0: off); the local layers' RoPE tables [n_ctx][rope_dim/2] (NULL: the global) */
    float embed_scale, attn_scale, attn_softcap, final_softcap;
    const float *cos_local, *sin_local;
    pi_mat head;
    int head_bound;
    pi_seg head_seg[PI_MAX_THREADS];
    /* Packed weights, one arena per thread: thread t's rows of every matrix in the order it reads them
     * (layer 0 q k v o gate up down, layer 1 ..., head), so each thread streams one contiguous range per token
     * and its prefetch runs on across matrix boundaries. Rebuilt when the thread count changes. */
    pi_arena arena[PI_MAX_THREADS];
    int layout_nth;
    /* An FFN-only decoder is the CPU tier of a placement (runtime/hybrid_runner.py): its layers bind norms and FFN
     * matrices only, nothing is packed (every read is a row gather over raw rows), and the FFN runs one layer at a
     * time through pi_decoder_ffn with a mask of the neurons this tier may compute. */
    int ffn_only;
    /* Which FFN matrices layout packs (bits PI_PACK_*): the disk tier keeps only the resident gate (exact ReLU)
     * or none (predictors) in RAM; its up/down rows come from neuron bundles (disk.h). */
    int pack_ffn;
    struct pi_disk *disk; /* the disk tier, or NULL (disk.h) */
    pi_pool *pool;
    int nth;
    int broken; /* repacking for a new thread count ran out of memory: the packed weights are gone (refuse to run) */
    /* decode buffers shared by the threads */
    float *q, *k, *v, *att, *y, *g, *u;
    float *z;       /* [r_max] predictor hidden layer */
    int r_max;      /* largest predictor rank bound (0: none) */
    pi_act act_att, act_h;
    void *mem_att, *mem_h;
    pi_tws *tw;
    pi_prefill_ws pf;
    int kv_type;    /* K and V cache formats of every layer, PI_KV_TYPE(k, v) (attn.h; default f16, f16) */
    pi_attn_ws aw;  /* decode attention: scores and per-chunk softmax states (attn.h) */
    /* profiling (thread 0's view) */
    int prof;
    uint64_t ns[PH_N], t_last, steps, tokens;
    int cur;
} pi_decoder;

pi_decoder *pi_decoder_new(int n_layer, int d, int n_head, int n_head_kv, int hd, int n_ff, int n_vocab,
                           float eps, int rope_dim, int rope_style, int act, int ffn_kind, int n_ctx, int nth);
void pi_decoder_free(pi_decoder *D);
/* 0 ok; -1: threads or buffers refused, the decoder keeps its old ones; -2: out of memory repacking (D->broken). */
int pi_decoder_set_threads(pi_decoder *D, int nth);
/* Repack every bound layer and the head (after pack_ffn changed): 0 ok, -1 out of memory (D->broken). */
int pi_decoder_repack(pi_decoder *D);
/* Packs the block-format matrices (rows * cols bytes of work); 0 ok, -1 on error. */
int pi_decoder_set_layer(pi_decoder *D, int il, const float *attn_norm, const pi_mat *q, const pi_mat *k,
                         const pi_mat *v, const pi_mat *o, const float *ffn_norm, const pi_mat *gate,
                         const pi_mat *up, const pi_mat *down, const float *bq, const float *bk, const float *bv);

void pi_prefill_free(pi_prefill_ws *p); /* frees every buffer and zeroes p */
int pi_decoder_set_output(pi_decoder *D, const float *norm, const void *head, int qtype);
/* Turn the neuron-sparse FFN of layer il on (down_t given) or off (NULL). gate_t/up_t (input-major) are needed
 * only when t_x > 0. 0 ok, -1 bad shapes. */
int pi_decoder_set_sparse(pi_decoder *D, int il, const pi_mat *down_t, const pi_mat *gate_t, const pi_mat *up_t,
                          float t_h, float t_x);
/* Predictor of layer il (fc1 [r, d], fc2 [n_ff, r]; NULL fc1 removes it); used by the sparse FFN. 0 ok, -1 bad. */
int pi_decoder_set_predictor(pi_decoder *D, int il, const pi_mat *fc1, const pi_mat *fc2, float threshold);
/* The model's form: norm kind, parallel residual, the final norm's bias, learned positions (pos_embd [n_pos][d],
 * NULL for none). 0 ok, -1 bad (or out of memory for the parallel residual's buffer). */
int pi_decoder_set_form(pi_decoder *D, int norm_kind, int parallel, const float *out_norm_b, const float *pos_embd,
                        int n_pos);
/* Layer il's LayerNorm biases ([d] each) and projection biases (o [d], up [n_ff], down [d]), any NULL; set_layer
 * clears them */
int pi_decoder_set_biases(pi_decoder *D, int il, const float *attn_norm_b, const float *ffn_norm_b, const float *bo,
                          const float *bu, const float *bd);
/* PowerInfer's predictor over thread ith's chunk [n0, n1) of a layer's neurons (every thread calls it: the hidden
 * layer fc1 is split over the threads, then a barrier): the chunk's logits fc2 relu(fc1 x) go to u[n0..n1), the
 * neurons with logit >= t_pred (and cand[i] when cand is given) to idx; returns their count */
/* x += the sum of the threads' partial FFN outputs (tw[t].yp) and the bias, each thread over its slice of x,
 * between two barriers (every thread calls it) */
void pi_reduce_partials(pi_decoder *D, float *xout, const float *bias, int ith, int nth);
int pi_predict_chunk(pi_decoder *D, const pi_layer *L, pi_tws *w, const float *x, int n0, int n1, float *u,
                     const uint8_t *cand, int32_t *idx, int ith, int nth);
/* qwen3's per-head q/k RMSNorm weights ([hd] each, both or neither); set_layer clears them */
int pi_decoder_set_qk_norm(pi_decoder *D, int il, const float *q_norm, const float *k_norm);
/* Gemma's model-wide scales, soft-caps and local RoPE tables (see pi_decoder; cos_local/sin_local both or neither).
 * 0 ok, -1 bad values. */
int pi_decoder_set_scales(pi_decoder *D, float embed_scale, float attn_scale, float attn_softcap, float final_softcap,
                          const float *cos_local, const float *sin_local);
/* Gemma's layer il: post-attention and post-FFN norms ([d] each, both or neither), attention window (0: none) and
 * local RoPE (needs set_scales' local tables). 0 ok, -1 bad. set_layer clears them. */
int pi_decoder_set_layer_attn(pi_decoder *D, int il, const float *attn_post_norm, const float *ffn_post_norm,
                              int window, int rope_local);
const pi_mat *pi_layer_mat(const pi_layer *L, int j); /* MQ .. MDOWN */
void pi_layer_ranges(const pi_layer *L, int n_ff, int ith, int nth, int u0[M_N], int u1[M_N]);

/* Run layers [l0, l1) for one token at pos, then the head if logits != NULL. */
void pi_decoder_step(pi_decoder *D, float *x, int pos, int l0, int l1, float *logits);
/* FFN of layer il alone, for one token: xout += FFN(norm(xin)) over the neurons with cand[i] != 0 (uint8 [n_ff];
 * the layer's sparse FFN must be on). The predictor, if bound, further limits the candidates. 0 ok, -1 unbound. */
int pi_decoder_ffn(pi_decoder *D, int il, const float *xin, float *xout, const uint8_t *cand);
/* Prefill n_tok tokens (x: [n_tok][d], updated in place) at positions pos0.., logits of the last token. */
int pi_decoder_prefill(pi_decoder *D, float *x, int n_tok, int pos0, float *logits);

/* shared helpers (decoder.c) */
void pi_rmsnorm(const float *x, const float *w, int n, float eps, float *out);
/* the decoder's norm (D->norm_kind) of x [d] with weight w and bias b (LayerNorm only; may be NULL) */
void pi_norm(const pi_decoder *D, const float *x, const float *w, const float *b, float *out);
/* the input embeddings of n tokens: x[t][r] *= embed_scale, then += pos_embd[pos0 + t][r] for learned positions */
void pi_add_positions(const pi_decoder *D, float *x, int n, int pos0);
void pi_rope(float *v, int n_heads, int hd, int rope_dim, int style, const float *cs, const float *sn);
void pi_post_norm_add(const pi_decoder *D, const float *y, const float *w, float *x, int ith, int nth);
void pi_head_softcap(const pi_decoder *D, float *logits, int ith);
void pi_ffn_act(const pi_decoder *D, float *g, const float *u, int n); /* g <- ffn(g, u) */
void pi_split(int total, int ith, int nth, int *a, int *b);
void pi_prof_phase(pi_decoder *D, int ith, int ph);
void pi_dec_barrier(pi_decoder *D, int ith);

#endif
