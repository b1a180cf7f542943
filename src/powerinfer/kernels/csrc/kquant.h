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

size_t pi_kq_block_bytes(int qtype); /* 144, 176, 210; 0 for other types */
int pi_kq_dequantize(int qtype, const void *src, size_t n, float *dst); /* n % 256 == 0 */
pi_rows_fn pi_kq_rows(int qtype);  /* the selected ISA's row-dot kernel */
/* Neuron-major axpy on K-quant rows (y[c] += sum_j h[j] W[idx[j]][c], c0/c1 multiples of 256): each super-block is
 * dequantized to f32 once per row, then added. Not on the decode path: the sparse FFN's down_t and column-major
 * gate/up copies are re-blocked to Q8_0 when transposed (formats.quants.transposed_qtype). */
void pi_kq_axpy(const pi_mat *m, const int32_t *idx, const float *h, int n, int c0, int c1, float *y);

#if defined(PI_X86)
pi_rows_fn pi_kq_rows_avx512(int qtype);
pi_rows_fn pi_kq_rows_avx2(int qtype);
#endif

#endif
