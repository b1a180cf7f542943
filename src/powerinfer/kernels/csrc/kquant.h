/* K-quants read as they are in the file (ggml's block_q4_K / block_q5_K / block_q6_K, 256-value super-blocks).
 *
 * Layouts (ggml-common.h):
 *   Q4_K, 144 B: f16 d, f16 dmin, 12 B of packed 6-bit (scale, min) for eight 32-value sub-blocks, 128 B of
 *         nibbles: 32-byte group g holds sub-block 2g in its low nibbles and 2g+1 in its high ones;
 *         value = d*sc[s]*q - dmin*m[s].
 *   Q5_K, 176 B: as Q4_K with qh[32] between the scales and the nibbles; value l of sub-block s gets
 *         16 * bit s of qh[l] added to its nibble.
 *   Q6_K, 210 B: ql[128] (low 4 bits), qh[64] (high 2 bits), int8 scales[16] (one per 16 values), f16 d; per
 *         128-value half: values 0-31 = ql[l] low nibble | qh[l] bits 0-1, 32-63 = ql[32+l] low | bits 2-3,
 *         64-95 = ql[l] high | bits 4-5, 96-127 = ql[32+l] high | bits 6-7; value = d*sc[i/16]*(q - 32).
 *
 * Kernels dot these rows against the same q8 activations (32-value blocks, f16-rounded d) as the 4- and 8-bit
 * formats, so one decode step quantizes each input once whatever the weights' types. Per 32-value activation
 * block b (sub-block s of a Q4_K/Q5_K super-block, or the two 16-value chunks of a Q6_K one) the terms are
 *   Q4_K/Q5_K:  (d*sc[s]) * dx[b] * sum(q*xq)  -  (dmin*m[s]) * (dx[b] * sum(xq))
 *   Q6_K:       (d*sc[k]) * dx[b] * sum over the chunk of (q-32)*xq
 * The integer dots are exact, and d*sc, dmin*m and dx*sum(xq) are exact in f32 (11 x 8 and 11 x 12 bits), so
 * only the f32 products and sums after them round (kernels/reference.py states the same terms in float64).
 * ggml's own dots use q8_K activations (one f32 scale per 256 values); ours are finer-grained, not identical.
 */
#ifndef PI_KQUANT_H
#define PI_KQUANT_H

#include "pi.h"

typedef struct { uint16_t d, dmin; uint8_t scales[12]; uint8_t qs[128]; } pi_blk_q4_K;
typedef struct { uint16_t d, dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; } pi_blk_q5_K;
typedef struct { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; uint16_t d; } pi_blk_q6_K;

/* The eight 6-bit scales and mins of a Q4_K/Q5_K super-block (ggml's get_scale_min_k4 for j = 0..7). */
static inline void pi_kq_scale_min(const uint8_t *q, uint8_t sc[8], uint8_t mn[8]) {
    for (int j = 0; j < 4; j++) {
        sc[j] = q[j] & 63;
        mn[j] = q[j + 4] & 63;
        sc[j + 4] = (q[j + 8] & 0xF) | ((q[j] >> 6) << 4);
        mn[j + 4] = (q[j + 8] >> 4) | ((q[j + 4] >> 6) << 4);
    }
}

/* Rows per pass of the one-token x86 row kernels (their accumulators for one super-block step). */
#define PI_KQ_ROWS 4
/* The rows a later pass reads are prefetched while this one runs, in step with its progress (each super-block
 * step prefetches the same super-block of those rows): a row list (sparse gate/up) gives the hardware prefetcher
 * nothing to follow, a dense range of short rows is PI_KQ_ROWS streams at once, and one read in place from the
 * file's 4 KiB pages stops it at every page (pi.h: PI_PF_DIST). Dense ranges look ahead at least PI_KQ_PF_BYTES,
 * rows of a list one pass ahead. AVX2, 2 threads, cold 72 MiB Q4_K [32768, 4096] (EPYC): 14.5 GB/s without
 * prefetches (the AVX-512 kernel with them: 51). */
#define PI_KQ_PF_BYTES 16384
static inline __attribute__((always_inline)) int pi_kq_pf_ahead(const pi_mat *m, const int32_t *idx) {
    if (idx) return PI_KQ_ROWS;
    const size_t pass = (size_t)PI_KQ_ROWS * m->row_bytes;
    return PI_KQ_ROWS * (int)((PI_KQ_PF_BYTES + pass - 1) / pass);
}
/* Prefetch bytes [off, off + len) of the PI_KQ_ROWS rows from j on (rows below n only). Always inlined: GCC -O2
 * called it cold in rows_q6_k, and a call to a function with no side effects (prefetches only) is dropped. */
static inline __attribute__((always_inline)) void pi_kq_prefetch_row(const pi_mat *m, const int32_t *idx, int p,
                                                                     size_t off, size_t len) {
    const char *q = (const char *)m->raw + (size_t)PI_ROW(idx, p) * m->row_bytes + off;
    for (size_t o = 0; o < len; o += 64) __builtin_prefetch(q + o, 0, 3);
}
static inline __attribute__((always_inline)) void pi_kq_prefetch_rows(const pi_mat *m, const int32_t *idx, int n,
                                                                      int j, size_t off, size_t len) {
    for (int k = 0; k < PI_KQ_ROWS && j + k < n; k++) pi_kq_prefetch_row(m, idx, j + k, off, len);
}
/* The multi-token kernels' look-ahead: rows one at a time, at least PI_KQ_PF_BYTES ahead (one row at the least). */
static inline int pi_kq_pf_rows(const pi_mat *m) {
    const int k = (int)(PI_KQ_PF_BYTES / m->row_bytes);
    return k > 0 ? k : 1;
}

size_t pi_kq_block_bytes(int qtype); /* 144, 176, 210; 0 for other types */
int pi_kq_dequantize(int qtype, const void *src, size_t n, float *dst); /* n % 256 == 0 */
pi_rows_fn pi_kq_rows(int qtype);  /* the selected ISA's row-dot kernel */
/* Several tokens through the same rows (prefill): y[t*ldy + p] = W[row p]·x_t for p in [r0, r1), t < n_tok. Each
 * super-block is unpacked once per PI_KQ_NT tokens; every token's f32 terms are formed and summed in the order of
 * the selected one-token kernel, so each token's result equals pi_kq_rows' bit for bit. Rows are walked in tiles
 * of PI_KQ_TILE_BYTES that stay in L2 while all token groups read them. 7B Q4_K_M, 2 threads, AVX-512 (EPYC):
 * prompt of 16 tokens 17.3-19.2 -> 24.0-24.7 tok/s (0.61-0.65x -> 0.81-0.84x llama.cpp), of 512 19.9 -> 25.6. */
typedef int (*pi_kq_multi_fn)(const pi_mat *m, const int32_t *idx, int r0, int r1, const pi_act *a, int n_tok,
                              float *y, int ldy); /* -1: no memory for its scratch, nothing written */
void pi_kq_rows_tokens(const pi_mat *m, const int32_t *idx, int r0, int r1, const pi_act *a, int n_tok, float *y,
                       int ldy);
/* Tokens per unpacked super-block. 8 measured slower than 4 on AVX-512 (4096x4096 Q4_K, 16 tokens, 2 threads:
 * 0.117-0.138 vs 0.090-0.094 ms per token; 12 more accumulators than registers) */
#define PI_KQ_NT 4
/* Super-blocks per chunk: a token group's activations for one chunk (4 tokens x 8 x 256 values plus their
 * scales, 10-17 KiB) stay in L1 while the tile's rows go by; each row's sums are kept between chunks, in order. */
#define PI_KQ_KC 8
/* The walk of the x86 multi-token kernels: row tiles, token groups of PI_KQ_NT (the tail as its own constant
 * count), super-block chunks; CALL(nt) sees rt, re (the tile), t0, s0, s1. */
#define KQ_GROUPS(CALL)                                                                                      \
    do {                                                                                                     \
        const int nsb_ = m->cols / PI_QK_K;                                                                  \
        for (int rt = r0; rt < r1; rt += tile) {                                                             \
            const int re = rt + tile < r1 ? rt + tile : r1;                                                  \
            for (int t0 = 0; t0 < n_tok; t0 += PI_KQ_NT)                                                     \
                for (int s0 = 0; s0 < nsb_; s0 += PI_KQ_KC) {                                                \
                    const int s1 = s0 + PI_KQ_KC < nsb_ ? s0 + PI_KQ_KC : nsb_;                              \
                    switch (n_tok - t0) {                                                                    \
                    case 1: CALL(1); break;                                                                  \
                    case 2: CALL(2); break;                                                                  \
                    case 3: CALL(3); break;                                                                  \
                    default: CALL(PI_KQ_NT); break;                                                          \
                    }                                                                                        \
                }                                                                                            \
        }                                                                                                    \
    } while (0)
/* Row tile of the multi-token path: 128 KiB, an eighth of this EPYC core's 1 MiB L2. */
#define PI_KQ_TILE_BYTES ((size_t)128 << 10)
static inline int pi_kq_tile_rows(const pi_mat *m) { return (int)(PI_KQ_TILE_BYTES / m->row_bytes + 4) & ~3; }
/* Neuron-major axpy on K-quant rows (y[c] += sum_j h[j] W[idx[j]][c], c0/c1 multiples of 256): each super-block is
 * dequantized to f32 once per row, then added. Not on the decode path: the sparse FFN's down_t and column-major
 * gate/up copies are re-blocked to Q8_0 when transposed (formats.quants.transposed_qtype). */
void pi_kq_axpy(const pi_mat *m, const int32_t *idx, const float *h, int n, int c0, int c1, float *y);

#if defined(PI_X86)
pi_rows_fn pi_kq_rows_avx512(int qtype);
pi_rows_fn pi_kq_rows_avx2(int qtype);
pi_kq_multi_fn pi_kq_multi_avx512(int qtype);
pi_kq_multi_fn pi_kq_multi_avx2(int qtype);
#endif

#endif
