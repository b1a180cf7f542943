/* Shared definitions of the powerinfer C kernels: GGML block layouts, scalar f16/bf16 conversion,
 * quantized activations (pi_act), the packed weight layout (pi_mat) and the per-ISA kernel table.
 *
 * Numerics follow ggml's CPU backend (ggml-cpu/arch/x86/quants.c) so greedy tokens agree with llama.cpp:
 * activations feeding Q4_0/Q8_0 weights are quantized to q8_0 (d = max|x|/127 stored as f16,
 * q = round-half-even(x * 127/max)), Q4_1 weights see q8_1 (also s = f16(d * sum q)), F16 weights see
 * x rounded to f16, BF16 weights see x rounded to bf16 (ggml's vec_dot_type for BF16), F32 is plain.
 */
#ifndef PI_H
#define PI_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* GGML type ids (gguf.GGMLQuantizationType). */
enum { PI_F32 = 0, PI_F16 = 1, PI_Q4_0 = 2, PI_Q4_1 = 3, PI_Q8_0 = 8, PI_Q4_K = 12, PI_Q5_K = 13, PI_Q6_K = 14,
       PI_BF16 = 30 };

#define PI_QK 32 /* values per quantization block */
#define PI_G 16  /* rows per packed group: one zmm lane per row (see pi_mat) */

typedef struct { uint16_t d; uint8_t qs[16]; } pi_blk_q4_0;        /* value = (nibble - 8) * d */
typedef struct { uint16_t d, m; uint8_t qs[16]; } pi_blk_q4_1;     /* value = nibble * d + m */
typedef struct { uint16_t d; int8_t qs[32]; } pi_blk_q8_0;         /* value = q * d */
/* K-quants: 256-value super-blocks (kquant.h has the layouts and their kernels). */
#define PI_QK_K 256
static inline int pi_is_kquant(int qtype) { return qtype == 12 || qtype == 13 || qtype == 14; }

/* ---- scalar conversions (bit-exact, round-to-nearest-even; after Maratyszcza's FP16 library) ---- */
static inline float pi_bits_f32(uint32_t w) { float f; memcpy(&f, &w, 4); return f; }
static inline uint32_t pi_f32_bits(float f) { uint32_t w; memcpy(&w, &f, 4); return w; }

/* A q8 activation block whose inputs hold inf or NaN: converting those to integers is undefined (x86 gives INT_MIN,
 * whose block sums then overflowed 8 * sum in the Q4_0 kernels), so the block is written as zeros with a NaN scale:
 * every product with it is NaN, and the runner reports NaN logits instead of computing with garbage. */
static inline void pi_q8_nonfinite(int8_t *qs, float *d, float *s, int32_t *sum) {
    memset(qs, 0, PI_QK);
    *d = *s = pi_bits_f32(0x7fc00000u);
    *sum = 0;
}

static inline float pi_fp16_to_fp32_calc(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = pi_bits_f32((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = pi_bits_f32((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t r = sign | (two_w < (1u << 27) ? pi_f32_bits(denormalized) : pi_f32_bits(normalized));
    return pi_bits_f32(r);
}

static inline uint16_t pi_fp32_to_fp16(float f) {
    float base = ((f < 0 ? -f : f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = pi_f32_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = pi_bits_f32((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = pi_f32_bits(base);
    const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
    const uint32_t mantissa_bits = bits & 0x00000FFFu;
    const uint32_t nonsign = exp_bits + mantissa_bits;
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

extern float pi_f16_table[65536]; /* filled by pi_init_tables(); like ggml's table, one load per value */
static inline float pi_fp16_to_fp32(uint16_t h) { return pi_f16_table[h]; }
static inline float pi_round_fp16(float f) { return pi_fp16_to_fp32(pi_fp32_to_fp16(f)); }

static inline float pi_bf16_to_fp32(uint16_t h) { return pi_bits_f32((uint32_t)h << 16); }
static inline uint16_t pi_fp32_to_bf16(float f) { /* ggml_compute_fp32_to_bf16 */
    uint32_t u = pi_f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 64);
    return (uint16_t)((u + (0x7fffu + ((u >> 16) & 1))) >> 16);
}

/* ---- quantized activations: what the weights of one qtype consume, for n_tok tokens ---- */
enum { PI_NEED_Q8 = 1, PI_NEED_F16 = 2, PI_NEED_BF16 = 4, PI_NEED_F32 = 8 };

typedef struct {
    int n;          /* values per token (a multiple of 32 when q8 is used) */
    int8_t *qs;     /* [T][n]   q8 values, ggml block order */
    float *d;       /* [T][n/32] f16-rounded block scale */
    float *s;       /* [T][n/32] f16(d * sum q) (q8_1's s; the m term of Q4_1) */
    int32_t *sum;   /* [T][n/32] exact sum q (offset corrections of Q4_0 and packed Q8_0) */
    uint16_t *h;    /* [T][n]   f16 (F16 weights) */
    uint16_t *bh;   /* [T][n]   bf16 (BF16 weights) */
    const float *f; /* [T][n]   f32 input itself (F32 weights) */
} pi_act;

static inline int pi_need_of(int qtype) {
    switch (qtype) {
    case PI_Q4_0: case PI_Q4_1: case PI_Q8_0: case PI_Q4_K: case PI_Q5_K: case PI_Q6_K: return PI_NEED_Q8;
    case PI_F16: return PI_NEED_F16;
    case PI_BF16: return PI_NEED_BF16;
    default: return PI_NEED_F32;
    }
}

/* Bytes of workspace pi_act_bind needs for n_tok tokens of n values. */
size_t pi_act_bytes(int n, int n_tok, int need);
/* Carve the arrays of `a` out of `mem` (64-byte aligned, pi_act_bytes long). */
void pi_act_bind(pi_act *a, void *mem, int n, int n_tok, int need);
/* The view of token t of a multi-token pi_act as a one-token one. */
pi_act pi_act_token(const pi_act *a, int t);
/* Quantize values [i0, i1) of token t (i0, i1 multiples of 32 unless need has no Q8) from x (token row). */
void pi_act_fill(pi_act *a, const float *x, int t, int i0, int i1, int need);

/* ---- a bound weight matrix: raw GGUF rows plus, for block formats, the packed copy ----
 * Packed layout (Q4_0/Q4_1/Q8_0): rows in groups of 16 (zero-padded), group g holds for each block b
 * 16 rows' quants interleaved 4 bytes at a time (for k: for r in 0..15: qs[r][4k..4k+3]), so one zmm
 * load gives 4 consecutive weights of 16 rows and vpdpbusd with a broadcast of 4 activation bytes
 * yields the 16 rows' partial dots in 16 lanes (no per-row horizontal sums, one scale vector per
 * block). Q8_0 quants are stored xor 0x80 (unsigned for vpdpbusd; the -128*sum x term is exact).
 * Group = [quants: nb * QB bytes][scales: nb * 16 f16 (d), Q4_1 then nb * 16 f16 (m)], 64-aligned. */
typedef struct {
    int qtype, rows, cols;
    const uint8_t *raw;  /* GGUF layout, rows * row_bytes */
    size_t row_bytes;
    uint8_t *packed;     /* own contiguous packed copy, or NULL (raw, or packed elsewhere in segments) */
    size_t gstride;      /* bytes per packed group (block formats) */
    int n_groups;
} pi_mat;

/* A contiguous run of units [u0, u1) of one matrix (16-row groups when packed, else 4-row units); p is
 * group u0's packed data, or for K-quants the copy of row 4*u0 and the rows after it (NULL: read the matrix's raw
 * rows), and the kernel may prefetch up to pf_end (the end of the memory p lives in: it streams on into whatever
 * the same thread reads next). */
typedef struct { int u0, u1; const uint8_t *p, *pf_end; } pi_seg;

/* How far ahead the packed kernels prefetch their segment's stream. Measured on a cold 56 MB Q4_1 matrix, one
 * core: none 17 GB/s (hardware prefetch alone stops at page boundaries), 4 KiB 28, 8 KiB 32, 16 KiB 37-41,
 * 32 KiB 30-33 GB/s; raw streaming reads reach 43-50 GB/s. A segment of 1 MiB or more (7B matrices: 4.7-12 MB
 * per thread; SmolLM2's output head) runs 64 KiB ahead instead. Decode tok/s, 2 threads, alternating process
 * pairs, median ratio against 16 KiB everywhere: 7B Q4_0 with 64 KiB everywhere 1.15x, with this rule 1.10x
 * (AVX2 kernels 1.08x); SmolLM2, whose layer segments are 100-280 KB, with 64 KiB everywhere 0.90x, 32 KiB
 * 0.99x, this rule 0.99x (AVX2 1.00x). On 7B, 64 vs 32 KiB: 1.02x. A stream's start issues the whole
 * distance at once, which short segments pay for without the long run that hides it. */
#define PI_PF_DIST ((size_t)16384)
#define PI_PF_DIST_LONG ((size_t)65536)
#define PI_PF_LONG_SEGMENT ((size_t)1 << 20)
static inline size_t pi_pf_distance(const pi_mat *m, const pi_seg *s) {
    return (size_t)(s->u1 - s->u0) * m->gstride >= PI_PF_LONG_SEGMENT ? PI_PF_DIST_LONG : PI_PF_DIST;
}

typedef struct { void **chunks; size_t *sizes; int n, cap; uint8_t *cur; size_t left; } pi_arena;
void *pi_arena_alloc(pi_arena *a, size_t bytes); /* 64-aligned, huge-page backed; NULL if out of memory */
const uint8_t *pi_arena_end(const pi_arena *a, const void *p); /* end of the chunk holding p */
void pi_arena_free(pi_arena *a);

size_t pi_row_bytes(int qtype, int cols);
int pi_is_packable(int qtype);
int pi_qb(int qtype); /* packed quant bytes per group-block: 256 (Q4) or 512 (Q8_0) */
/* Fill m; with pack, block formats get their own packed copy in m->packed. 0, or -1 (bad args / no memory). */
int pi_mat_init(pi_mat *m, int qtype, const void *raw, int rows, int cols, int pack);
void pi_mat_free(pi_mat *m);
/* Pack groups [g0, g1) of a raw matrix into dst (gstride per group). */
void pi_pack_groups(int qtype, const uint8_t *raw, size_t row_bytes, int rows, int cols, int g0, int g1,
                    uint8_t *dst, size_t gstride);
size_t pi_packed_gstride(int qtype, int cols);

/* Row of position p in a row list: idx[p], or p itself when idx is NULL (a contiguous range). */
#define PI_ROW(idx, p) ((idx) ? (idx)[p] : (p))

/* ---- per-ISA kernel table ----
 * rows:    raw layout, y[p] = W[row p]·x for positions p in [r0, r1), token 0 of a; row p = PI_ROW(idx, p),
 *          so idx = NULL is a dense row range and a neuron list is the row-sparse dot of gate/up.
 * axpy_rows: raw layout of a neuron-major matrix (down_t [n_ff, d], or a column-major gate_t/up_t for input
 *          sparsity): y[c] += sum_j h[j] * W[idx[j]][c] for c in [c0, c1) (multiples of 32 for block formats,
 *          or c1 = cols). 4 rows per pass; the y range stays in L1 (reference/kernels.md section 3).
 *          h[j] is f32 (not quantized), so the only rounding is the weights' own.
 * packed:  packed layout, y[t*ldy + r] for the groups of segment s (rows >= m->rows not stored), tokens [0, n_tok).
 * quant:   q8 quantization of n values (one token) into qs/d/s/sum at block offset. */
typedef void (*pi_rows_fn)(const pi_mat *m, const int32_t *idx, int r0, int r1, const pi_act *a, float *y);
typedef void (*pi_axpy_rows_fn)(const pi_mat *m, const int32_t *idx, const float *h, int n, int c0, int c1,
                                float *y);
typedef void (*pi_packed_fn)(const pi_mat *m, const pi_seg *s, const pi_act *a, int n_tok, float *y, int ldy);
typedef void (*pi_quant_fn)(const float *x, int nblocks, int8_t *qs, float *d, float *s, int32_t *sum);
typedef float (*pi_dot_f16_fn)(const float *q, const uint16_t *k, int n);
typedef void (*pi_axpy_f16_fn)(float *y, const uint16_t *v, float a, int n);
typedef void (*pi_to_f16_fn)(const float *x, uint16_t *y, int n);
typedef struct {
    const char *name;
    pi_rows_fn rows_q4_0, rows_q4_1, rows_q8_0, rows_f16, rows_bf16, rows_f32;
    pi_axpy_rows_fn axpy_rows_q4_0, axpy_rows_q4_1, axpy_rows_q8_0, axpy_rows_f16, axpy_rows_bf16, axpy_rows_f32;
    pi_packed_fn packed_q4_0, packed_q4_1, packed_q8_0;
    pi_quant_fn quant_q8;
    pi_dot_f16_fn dot_f16;   /* attention q·K (q already f16-rounded) */
    pi_axpy_f16_fn axpy_f16; /* attention y += p * V */
    pi_to_f16_fn to_f16;     /* f32 -> f16 (round to nearest even) */
    double (*read_sum)(const uint8_t *p, size_t n, int iters); /* bandwidth probe: sum of n bytes (as f32) */
} pi_kernels;

extern const pi_kernels pi_kernels_portable;
/* x86 kernels are compiled with per-function targets on any x86 build; PI_FORCE_PORTABLE leaves them out
 * (how the non-x86 build is exercised on x86). */
#if (defined(__x86_64__) || defined(__i386__)) && !defined(PI_FORCE_PORTABLE)
#define PI_X86 1
extern const pi_kernels pi_kernels_avx2;
extern const pi_kernels pi_kernels_avx512;
void pi_to_f16_avx512(const float *x, uint16_t *y, int n);
#endif
extern const pi_kernels *pi_k; /* the selected table */

void pi_init_tables(void);
static inline double pi_read_sum(const uint8_t *p, size_t n, int iters) { return pi_k->read_sum(p, n, iters); }
int pi_dequantize(int qtype, const void *src, size_t n, float *dst); /* 0 ok, -1 bad type/length */
int pi_select_isa(const char *name); /* "avx512" | "avx2" | "portable" | "auto"; 0 ok, -1 unsupported */
int pi_cpu_feature(const char *name); /* __builtin_cpu_supports on x86, else 0 */

/* Work is split in units: 16-row groups for block formats (packed), 4 rows for raw ones. */
int pi_mat_unit(const pi_mat *m);
int pi_mat_units(const pi_mat *m);
/* Y[t][r] = W X[t] for the rows of segment s (packed if s->p, else the raw-row kernel). */
void pi_mat_run_seg(const pi_mat *m, const pi_seg *s, const pi_act *a, int n_tok, float *y, int ldy);
/* Dense rows [r0, r1) of the raw layout: y[r] = W[r]·x (token 0 of a). */
void pi_mat_rows(const pi_mat *m, int r0, int r1, const pi_act *a, float *y);
/* Row-sparse dot on the raw rows: y[j] = W[idx[j]]·x, j < n (token 0 of a). */
void pi_mat_gather(const pi_mat *m, const int32_t *idx, int n, const pi_act *a, float *y);
/* Neuron-major axpy on the raw rows (see axpy_rows). */
void pi_mat_axpy(const pi_mat *m, const int32_t *idx, const float *h, int n, int c0, int c1, float *y);
/* Same on units [u0, u1) of m's own packed copy (or raw rows). */
void pi_mat_run_units(const pi_mat *m, int u0, int u1, const pi_act *a, int n_tok, float *y, int ldy);

void *pi_aligned_alloc(size_t bytes); /* 64-byte aligned, zeroed */
void pi_aligned_free(void *p);

#endif
