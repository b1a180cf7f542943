/* Attention over the KV cache, for decode (one query position) and prefill (a chunk of query positions).
 *
 * The cache formats are parameters: a layer's K and V caches are rows of n_head_kv*head_dim values, one row per
 * position, K in one format and V in another (llama.cpp's -ctk / -ctv: PI_F32, PI_F16 (the default) or PI_Q8_0,
 * 32-value blocks with an f16 scale); kv_type carries both (PI_KV_TYPE). Each ISA's kernels (pi_attn_ops) take
 * the formats as compile-time constants and the drivers here only see rows through pi_kv_head.
 * Numerics per format, as ggml's: q meets K in K's vec_dot_type (f32: as is; f16: rounded to f16; q8_0: quantized
 * to q8_0 blocks, ggml_vec_dot_q8_0_q8_0; the kernels multiply the dequantized values, exact in f32, so the
 * score differs from the integer dot only by the f32 sum's rounding); the probabilities meet V rounded to f16
 * for an f16 V (flash_attn off: kq converted to V's vec_dot_type), unrounded f32 for an f32 V, and unrounded
 * against the dequantized rows for a q8_0 V (llama.cpp takes a quantized V only with flash attention, whose CPU
 * kernel converts each V row to f32 and accumulates in f32: ggml_compute_forward_flash_attn_ext_f16).
 *
 * Decode (split-K, "flash-decoding"): past PI_ATTN_CHUNK positions the sequence is cut into chunks of that many
 * positions, dealt to the threads in contiguous runs; each thread streams its chunks' K rows once (pass 1:
 * scores, the chunk's max and sum of exp per head), then after a barrier its chunks' V rows once (pass 2: the
 * chunk's partial output), and after another barrier each thread adds up the chunks' partial outputs for its
 * heads. The probabilities are normalized globally before the V product (the chunk states merge in pass 2,
 * from every chunk's max and sum), so each is rounded to f16 exactly where llama.cpp rounds it (flash_attn
 * off: softmax in f32, kq converted to f16 for the V matmul) and the chunks' outputs simply add. Chunk
 * boundaries depend only on the position, never on the thread count, so results do not either.
 * Up to PI_ATTN_CHUNK positions, threads split the query heads instead (no extra barriers).
 *
 * Prefill: tiles of up to tile_q consecutive queries (the vector lanes) of one query head; the keys are walked in
 * blocks (each block's K rows converted to f32 once and broadcast into the 16 queries' fma chains), only the
 * diagonal block is masked and rows past the tile's last query are never read; the scores of the tile (tile_q
 * x positions, never n x n) stay in the tile scratch so the probabilities are normalized before they are
 * rounded to f16, the same values a decode step computes. An online softmax (the FlashAttention recurrence,
 * arXiv 2205.14135) was measured against this on SmolLM2's shape (the last 512 queries of a 16k prompt, one Zen 5
 * core): 1.8-2.0 vs 1.6-1.8 ns per query-key-head (within noise of each other at 8k; the fma pipes are the limit
 * either way), and it rounds the probabilities against the running max instead, which moved prefill off the
 * decode path by more than the kernels' tolerance on the tiny test models. */
#ifndef PI_ATTN_H
#define PI_ATTN_H

#include "pi.h"

/* Positions per decode chunk, the unit the threads split: one partial state (max, sum, head_dim outputs) per chunk
 * and head, so the merge reads hd/256 floats per head and position (SmolLM2 at 16k: 150 KB a layer against
 * 12.6 MB of K and V). */
#define PI_ATTN_CHUNK 256
/* Query heads one decode kernel call takes (the driver splits larger layers). */
#define PI_ATTN_CALL_HEADS 16
/* Largest head_dim of the vector prefill tiles (the portable tile takes any). */
#define PI_ATTN_TILE_HD 256
#define PI_MAX_HEAD_DIM 512 /* as decoder.h */

/* K and V cache formats in one code (decoder.h kv_type): K in the low byte, V in the next. */
#define PI_KV_TYPE(kt, vt) ((kt) | (vt) << 8)
static inline int pi_kv_ktype(int kv_type) { return kv_type & 0xff; }
static inline int pi_kv_vtype(int kv_type) { return kv_type >> 8 & 0xff; }
/* Bytes of n values (n % 32 == 0 for q8_0) in a cache format. */
static inline size_t pi_kv_bytes(int type, int n) {
    return type == PI_F32 ? (size_t)n * 4 : type == PI_F16 ? (size_t)n * 2 : (size_t)n / PI_QK * sizeof(pi_blk_q8_0);
}
/* 1 if a cache format is one the kernels read (f32, f16, q8_0; q8_0 needs head_dim % 32 == 0). */
int pi_kv_format_ok(int type, int hd);

/* One KV head's rows: position t's K values at k + t*kstride bytes, V at v + t*vstride. KV head g of the same
 * cache is pi_row_bytes(type, g*hd) bytes further (a cache row holds every KV head of its position). */
typedef struct {
    int ktype, vtype;
    const uint8_t *k, *v;
    size_t kstride, vstride;
} pi_kv_head;

/* The kernels of one ISA (every cache format: kv->ktype, kv->vtype). q is f32, roped; it is rounded to K's
 * vec_dot_type before q.K (pi_kv_round_q); scores are scale * q.K. The decode kernels take query heads [h0, h1) of a layer
 * (head h reads KV head h / rep; kv is KV head 0) and index every per-head array by the head number itself:
 * q + h*hd, e + h*ld, m[h], l[h], f[h], out + h*hd. They walk the rows in blocks through every KV head in range,
 * so the cache streams by whole rows.
 * scores: rows [t0, t0+n): e[h*ld + i] = exp(s_hi - m[h]) with m[h] = max_i s_hi, l[h] = sum_i e[h*ld + i].
 * values: out[h*hd ..] = sum_i p_hi V[t0+i] with p_hi = e[h*ld + i] * f[h], rounded to f16 for an f16 V (e is
 *         overwritten with p).
 * tile:   causal attention of queries at positions pos0 .. pos0+nq-1 (nq <= tile_q; query j's heads at
 *         q + j*q_stride, n_rep of them, hd apart, all reading kv) over rows 0 .. pos0+nq-1; out likewise
 *         (out_stride). The same numbers as `scores` + `values` with f = 1/l per query. scratch:
 *         pi_attn_tile_floats(hd, n_ctx) floats, 64-byte aligned.
 * softcap > 0: every score s becomes softcap * tanh(s / softcap) before the softmax (Gemma 2's attention logit
 * soft-capping, llama.cpp's attn_soft_cap); m[h] is then the capped max. window > 0 (tile): query position p sees
 * rows p - window < t <= p only (llama.cpp's LLAMA_SWA_TYPE_STANDARD, HF's sliding_window_overlay); the decode
 * driver passes a window as the first row instead. */
typedef struct pi_attn_ops {
    void (*scores)(const float *q, int h0, int h1, int rep, int hd, const pi_kv_head *kv, int t0, int n, float scale,
                   float softcap, float *e, size_t ld, float *m, float *l);
    void (*values)(float *e, size_t ld, const float *f, int h0, int h1, int rep, int hd, const pi_kv_head *kv, int t0,
                   int n, float *out);
    void (*tile)(const float *q, size_t q_stride, int nq, int n_rep, int hd, const pi_kv_head *kv, int pos0,
                 float scale, float softcap, int window, float *scratch, float *out, size_t out_stride);
    int tile_q;
} pi_attn_ops;

extern const pi_attn_ops pi_attn_portable;
#if defined(PI_X86)
extern const pi_attn_ops pi_attn_avx2;
extern const pi_attn_ops pi_attn_avx512;
#endif

/* The selected ISA's ops for the cache formats kv_type (PI_KV_TYPE), or NULL if a format has none. */
const pi_attn_ops *pi_attn_ops_for(int kv_type);
/* Head g's rows of a layer cache whose rows start at k/v, kv_dim values a row (head_dim hd). */
pi_kv_head pi_kv_head_of(int kv_type, const void *k, const void *v, int kv_dim, int g, int hd);
/* Store K and V of KV heads [g0, g1) at position pos (f32 [n_head_kv*hd], all heads) in the caches' formats. */
void pi_kv_write(int kv_type, void *kc, void *vc, int kv_dim, int pos, int g0, int g1, int hd, const float *k,
                 const float *v);
/* q as K's vec_dot_type sees it, back in f32: as is (f32), rounded to f16 (f16), quantized to q8_0 blocks and
 * dequantized (q8_0; n % 32 == 0). out may be q. */
void pi_kv_round_q(int ktype, const float *q, float *out, int n);
size_t pi_attn_tile_floats(int hd, int n_ctx); /* n_ctx: positions the tile may see */

/* Decode workspace, sized for n_ctx positions, n_head heads and up to nth threads. */
typedef struct {
    int n_ctx, n_head, hd, nth;
    float *e;      /* [n_head][n_ctx] exp-scores, then probabilities */
    float *m, *l;  /* [n_chunk][n_head] chunk max and sum */
    float *o;      /* [n_chunk][n_head*hd] chunk partial outputs */
    float *st;     /* [nth][3*n_head] each thread's global max, 1/sum and chunk factor per head */
} pi_attn_ws;

int pi_attn_ws_init(pi_attn_ws *w, int n_ctx, int n_head, int hd, int nth); /* 0 ok, -1 out of memory */
void pi_attn_ws_free(pi_attn_ws *w);

typedef void (*pi_attn_barrier_fn)(void *ctx, int ith);

/* One decode position: q [n_head*hd] (roped) against rows 0 .. n_kv-1 of a layer cache (rows n_kv - window ..
 * n_kv-1 when window > 0); run by all nth threads. scale 0 is 1/sqrt(hd); softcap as in pi_attn_ops.
 * When it returns, this thread's heads (pi_split(n_head, ith, nth)) of out are final; the others are after the
 * caller's next barrier. */
typedef struct {
    const pi_attn_ops *ops;
    int n_head, n_head_kv, hd, n_kv, kv_type;
    const void *k, *v;
    int kv_dim; /* values per cache row */
    const float *q;
    float *out;
    pi_attn_ws *ws;
    pi_attn_barrier_fn barrier;
    void *ctx;
    float scale, softcap;
    int window;
} pi_attn_decode_args;
void pi_attn_decode(const pi_attn_decode_args *a, int ith, int nth);

/* Prefill: queries t < n at positions pos0+t (row t at q + t*q_stride, every head) against rows 0 .. pos0+n-1
 * (the last `window` of them per query when window > 0); scale 0 is 1/sqrt(hd); this thread's share of the
 * (tile, KV head) work items, dealt round-robin (later tiles cost more). */
void pi_attn_prefill(const pi_attn_ops *ops, const float *q, size_t q_stride, int n, int pos0, int n_head,
                     int n_head_kv, int hd, int kv_type, const void *k, const void *v, int kv_dim, float scale,
                     float softcap, int window, float *scratch, float *out, size_t out_stride, int ith, int nth);

#endif
