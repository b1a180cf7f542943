/* Neuron panels: the neuron-major copy a sparse FFN reads (down_t [n_ff, d]) made from a row-major block-quantized
 * down [d, n_ff] without requantizing it.
 *
 * A Q4_0/Q4_1/Q8_0 row of down holds 32 neurons per block with one scale (and Q4_1's min) per (output row, block).
 * Re-blocking it along the other axis rounds every weight again (a Q8_0 down_t: +0.005 relative error and 1.9x the
 * bytes of a Q4_0 down, formats/quants.py), so instead the blocks are regrouped: panel p holds neurons
 * 32p .. 32p+31 as
 *     [d f16 scales: block (r, p)'s d for every output r] [Q4_1: d f16 mins] [32 neurons' quants, neuron-major]
 * where neuron k's quants for outputs 32c .. 32c+31 are 16 bytes laid out like a Q4_0 block (low nibbles the first
 * 16 outputs, high nibbles the next 16; Q8_0: 32 int8). Same bytes as the source (18 d per panel for Q4_0), and
 * the same weights bit for bit, so a sparse FFN computes with exactly the dense model's weights.
 *
 * The axpy walks a sorted neuron list (each thread's active neurons, in order) panel by panel: the group of
 * active neurons of one panel sums h_j * q_j per output first, and the panel's scales are applied once:
 *     y[r] += d[r] * (sum_j h_j q_j[r] - 8 sum_j h_j)         (Q4_0; Q4_1: d[r] sum h_j q_j[r] + m[r] sum h_j)
 * Per active neuron that reads d/2 bytes of nibbles, plus 2d bytes of scales once per active panel. */
#include "panels.h"

#include <stdlib.h>

int pi_panel_base(int qtype) {
    switch (qtype) {
    case PI_Q4_0_PANELS: return PI_Q4_0;
    case PI_Q4_1_PANELS: return PI_Q4_1;
    case PI_Q8_0_PANELS: return PI_Q8_0;
    default: return -1;
    }
}

int pi_panels_of(int qtype) {
    switch (qtype) {
    case PI_Q4_0: return PI_Q4_0_PANELS;
    case PI_Q4_1: return PI_Q4_1_PANELS;
    case PI_Q8_0: return PI_Q8_0_PANELS;
    default: return -1;
    }
}

/* Bytes before the quants in a panel of d outputs, and quant bytes per neuron. */
static size_t scale_bytes(int base, int d) { return (size_t)d * (base == PI_Q4_1 ? 4 : 2); }
static size_t quant_bytes(int base, int d) { return base == PI_Q8_0 ? (size_t)d : (size_t)d / 2; }

int pi_make_panels(int qtype, const uint8_t *src, int d, int n_ff, uint8_t *dst) {
    if (pi_panels_of(qtype) < 0 || d % PI_QK || n_ff % PI_QK) return -1;
    const size_t row_bytes = pi_row_bytes(qtype, n_ff), pb = 32 * pi_row_bytes(qtype, d);
    const size_t sb = scale_bytes(qtype, d), qn = quant_bytes(qtype, d);
    for (int p = 0; p < n_ff / PI_QK; p++) {
        uint8_t *panel = dst + (size_t)p * pb;
        uint16_t *sd = (uint16_t *)panel, *sm = sd + d;
        uint8_t *q = panel + sb;
        memset(q, 0, 32 * qn);
        for (int r = 0; r < d; r++) {
            const uint8_t *row = src + (size_t)r * row_bytes;
            const int c = r / PI_QK, i = r % PI_QK; /* output r's 32-chunk and place in it */
            if (qtype == PI_Q8_0) {
                const pi_blk_q8_0 *b = (const pi_blk_q8_0 *)row + p;
                sd[r] = b->d;
                for (int k = 0; k < 32; k++) q[k * qn + r] = (uint8_t)b->qs[k];
                continue;
            }
            const uint8_t *qs;
            if (qtype == PI_Q4_0) {
                const pi_blk_q4_0 *b = (const pi_blk_q4_0 *)row + p;
                sd[r] = b->d; qs = b->qs;
            } else {
                const pi_blk_q4_1 *b = (const pi_blk_q4_1 *)row + p;
                sd[r] = b->d; sm[r] = b->m; qs = b->qs;
            }
            for (int k = 0; k < 32; k++) {
                const uint8_t nib = k < 16 ? qs[k] & 0x0F : qs[k - 16] >> 4;
                uint8_t *o = q + k * qn + (size_t)c * 16 + (i & 15);
                *o |= (uint8_t)(i < 16 ? nib : nib << 4);
            }
        }
    }
    return 0;
}

/* The slow twin: y[c] += sum_j h[j] W[idx[j]][c] one weight at a time, with the panel scales applied per group as
 * in the vector kernels (so the three agree to float rounding). */
static void axpy_panels_portable(const pi_mat *m, const int32_t *idx, const float *h, int n, int c0, int c1,
                                 float *y) {
    const int base = pi_panel_base(m->qtype), d = m->cols;
    const size_t pb = 32 * m->row_bytes, sb = scale_bytes(base, d), qn = quant_bytes(base, d);
    float acc[PI_QK];
    for (int j = 0; j < n;) {
        const int p = idx[j] / PI_QK;
        int k = j;
        float hs = 0.0f;
        while (k < n && idx[k] / PI_QK == p) hs += h[k++];
        const uint8_t *panel = m->raw + (size_t)p * pb;
        const uint16_t *sd = (const uint16_t *)panel, *sm = sd + d;
        for (int c = c0; c < c1; c += PI_QK) {
            const int nc = c1 - c < PI_QK ? c1 - c : PI_QK;
            memset(acc, 0, sizeof acc);
            for (int jj = j; jj < k; jj++) {
                const uint8_t *q = panel + sb + (size_t)(idx[jj] % PI_QK) * qn;
                for (int i = 0; i < nc; i++) {
                    float v;
                    if (base == PI_Q8_0) v = (float)(int8_t)q[c + i];
                    else {
                        const uint8_t byte = q[(size_t)(c / PI_QK) * 16 + (i & 15)];
                        v = (float)(i < 16 ? byte & 0x0F : byte >> 4);
                    }
                    acc[i] += h[jj] * v;
                }
            }
            for (int i = 0; i < nc; i++) {
                const float s = pi_fp16_to_fp32(sd[c + i]);
                if (base == PI_Q4_0) y[c + i] += s * (acc[i] - 8.0f * hs);
                else if (base == PI_Q4_1) y[c + i] += s * acc[i] + pi_fp16_to_fp32(sm[c + i]) * hs;
                else y[c + i] += s * acc[i];
            }
        }
        j = k;
    }
}

/* A run of adjacent entries of the neuron list in one panel: entries [j0, j1) of panel p, sum of their h. */
typedef struct { int p, j0, j1; float hs; } pi_group;

/* Up to cap groups from entry j on; returns how many, and where the next call starts in *next. */
static int group_list(const int32_t *idx, const float *h, int n, int j, pi_group *g, int cap, int *next) {
    int ng = 0;
    while (j < n && ng < cap) {
        const int p = idx[j] / PI_QK;
        pi_group *G = &g[ng++];
        G->p = p; G->j0 = j; G->hs = 0.0f;
        while (j < n && idx[j] / PI_QK == p) G->hs += h[j++];
        G->j1 = j;
    }
    *next = j;
    return ng;
}

#if defined(PI_X86)
#include <immintrin.h>

/* Prefetch distances in bytes ahead of a neuron's (Q4, Q8_0) and the scales' stream: 4 chunks (tuned on a 7B
 * down, 10% active, one thread). Reading past a row's end is harmless (a prefetch never faults). */
#ifndef PF_Q4
#define PF_Q4 256
#define PF_Q8 512
#define PF_SC 1024
#endif

/* Panel groups sharing one pass over the outputs, and groups listed per call to group_list (their descriptors stay
 * in L1). */
#define PI_GSTEP 4
#define PI_GROUPS 256

/* The vector kernels walk the groups PI_GSTEP at a time and, for each such step, the outputs in chunks of 8 vectors
 * (128 outputs with AVX-512, 64 with AVX2) held in registers: per panel, 8 accumulators gather its active neurons'
 * h * q (one cache line of nibbles per neuron and chunk with AVX-512), then one fma per vector applies the panel's
 * scales; y is read and written once per step and chunk. Each neuron's row and the panel's scales are read front
 * to back, prefetched a few chunks ahead. Measured on one 7B Q4_0 down (11008 x 4096, one thread, AVX-512, a busy
 * host): against the Q8_0 row axpy, 1.4-1.9x the time at 10% of the neurons active, about even at 30%, faster
 * when all are; sweeping all panels per chunk instead (y read once) was 2-4x slower: it revisits every row's page
 * once per chunk. A pass over the whole of y per panel (32 KB at d = 4096) cost 2x. */
#define AI512 static inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#define AI2 static inline __attribute__((always_inline, target("avx2,fma,f16c")))

/* One chunk of NV 16-lane vectors of outputs from c (NV a constant at every call: the arrays live in registers). */
AI512 void chunk512(const pi_mat *m, const int32_t *idx, const float *h, const pi_group *g, int ng, int c, int last,
                    float *y, const int NV, const int base) {
    const int d = m->cols;
    const size_t pb = 32 * m->row_bytes, sb = scale_bytes(base, d), qn = quant_bytes(base, d);
    const __m512i m4 = _mm512_set1_epi32(0x0F);
    __m512 yv[8];
    _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++) yv[v] = _mm512_loadu_ps(y + c + 16 * v);
    for (int gi = 0; gi < ng; gi++) {
        const pi_group *G = &g[gi];
        const uint8_t *panel = m->raw + (size_t)G->p * pb;
        const uint16_t *sd = (const uint16_t *)panel;
        __m512 acc[8];
        _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++) acc[v] = _mm512_setzero_ps();
        for (int jj = G->j0; jj < G->j1; jj++) {
            const uint8_t *q = panel + sb + (size_t)(idx[jj] % PI_QK) * qn;
            const __m512 hv = _mm512_set1_ps(h[jj]);
            if (base == PI_Q8_0) {
                const int8_t *qc = (const int8_t *)q + c;
                _mm_prefetch((const char *)qc + PF_Q8, _MM_HINT_T0);
                _mm_prefetch((const char *)qc + PF_Q8 + 64, _MM_HINT_T0);
                _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++)
                    acc[v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                                 _mm_loadu_si128((const __m128i *)(qc + 16 * v)))), hv, acc[v]);
            } else {
                const uint8_t *qc = q + c / 2;
                _mm_prefetch((const char *)qc + PF_Q4, _MM_HINT_T0);
                _Pragma("GCC unroll 4") for (int v = 0; v < NV; v += 2) {
                    const __m512i t = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qc + 8 * v)));
                    acc[v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(t, m4)), hv, acc[v]);
                    acc[v + 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(t, 4)), hv, acc[v + 1]);
                }
            }
        }
        for (int k = 0; k < 256; k += 64) _mm_prefetch((const char *)(sd + c) + PF_SC + k, _MM_HINT_T0);
        if (base == PI_Q4_1)
            for (int k = 0; k < 256; k += 64) _mm_prefetch((const char *)(sd + d + c) + PF_SC + k, _MM_HINT_T0);
        const __m512 off = _mm512_set1_ps(base == PI_Q4_0 ? -8.0f * G->hs : G->hs);
        _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++) {
            const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sd + c + 16 * v)));
            if (base == PI_Q4_0) yv[v] = _mm512_fmadd_ps(s, _mm512_add_ps(acc[v], off), yv[v]);
            else {
                yv[v] = _mm512_fmadd_ps(s, acc[v], yv[v]);
                if (base == PI_Q4_1)
                    yv[v] = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sd + d + c + 16 * v))),
                                            off, yv[v]);
            }
        }
    }
    _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++) _mm512_storeu_ps(y + c + 16 * v, yv[v]);
}

AI512 void sweep512(const pi_mat *m, const int32_t *idx, const float *h, int n, int c0, int c1, float *y,
                    const int base) {
    pi_group g[PI_GROUPS];
    for (int j = 0; j < n;) {
        const int ng = group_list(idx, h, n, j, g, PI_GROUPS, &j);
        for (int gi = 0; gi < ng; gi += PI_GSTEP) {
            const int gn = ng - gi < PI_GSTEP ? ng - gi : PI_GSTEP;
            int c = c0;
            for (; c + 128 <= c1; c += 128) chunk512(m, idx, h, g + gi, gn, c, c + 128 >= c1, y, 8, base);
            switch ((c1 - c) / 16) { /* c1 - c is a multiple of 32 */
            case 2: chunk512(m, idx, h, g + gi, gn, c, 1, y, 2, base); break;
            case 4: chunk512(m, idx, h, g + gi, gn, c, 1, y, 4, base); break;
            case 6: chunk512(m, idx, h, g + gi, gn, c, 1, y, 6, base); break;
            default: break;
            }
        }
    }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
static void axpy_panels_avx512(const pi_mat *m, const int32_t *idx, const float *h, int n, int c0, int c1,
                               float *y) {
    switch (pi_panel_base(m->qtype)) {
    case PI_Q4_0: sweep512(m, idx, h, n, c0, c1, y, PI_Q4_0); break;
    case PI_Q4_1: sweep512(m, idx, h, n, c0, c1, y, PI_Q4_1); break;
    default: sweep512(m, idx, h, n, c0, c1, y, PI_Q8_0); break;
    }
}

AI2 void chunk2(const pi_mat *m, const int32_t *idx, const float *h, const pi_group *g, int ng, int c, int last,
                float *y, const int NV, const int base) {
    const int d = m->cols;
    const size_t pb = 32 * m->row_bytes, sb = scale_bytes(base, d), qn = quant_bytes(base, d);
    const __m128i m4 = _mm_set1_epi8(0x0F);
    __m256 yv[8];
    _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++) yv[v] = _mm256_loadu_ps(y + c + 8 * v);
    for (int gi = 0; gi < ng; gi++) {
        const pi_group *G = &g[gi];
        const uint8_t *panel = m->raw + (size_t)G->p * pb;
        const uint16_t *sd = (const uint16_t *)panel;
        __m256 acc[8];
        _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++) acc[v] = _mm256_setzero_ps();
        for (int jj = G->j0; jj < G->j1; jj++) {
            const uint8_t *q = panel + sb + (size_t)(idx[jj] % PI_QK) * qn;
            const __m256 hv = _mm256_set1_ps(h[jj]);
            if (base == PI_Q8_0) {
                const int8_t *qc = (const int8_t *)q + c;
                if (!last) _mm_prefetch((const char *)qc + 64, _MM_HINT_T0);
                _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++)
                    acc[v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                                 _mm_loadl_epi64((const __m128i *)(qc + 8 * v)))), hv, acc[v]);
            } else {
                const uint8_t *qc = q + c / 2;
                if (!last && (c & 127) == 0) _mm_prefetch((const char *)qc + 64, _MM_HINT_T0);
                _Pragma("GCC unroll 2") for (int v = 0; v < NV; v += 4) { /* one 16-byte run: 32 outputs */
                    const __m128i x = _mm_loadu_si128((const __m128i *)(qc + 4 * v));
                    const __m128i lo = _mm_and_si128(x, m4), hi = _mm_and_si128(_mm_srli_epi16(x, 4), m4);
                    acc[v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), hv, acc[v]);
                    acc[v + 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), hv,
                                                 acc[v + 1]);
                    acc[v + 2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), hv, acc[v + 2]);
                    acc[v + 3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), hv,
                                                 acc[v + 3]);
                }
            }
        }
        if (!last) {
            _mm_prefetch((const char *)(sd + c + 64), _MM_HINT_T0);
            _mm_prefetch((const char *)(sd + c + 64) + 64, _MM_HINT_T0);
        }
        const __m256 off = _mm256_set1_ps(base == PI_Q4_0 ? -8.0f * G->hs : G->hs);
        _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++) {
            const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sd + c + 8 * v)));
            if (base == PI_Q4_0) yv[v] = _mm256_fmadd_ps(s, _mm256_add_ps(acc[v], off), yv[v]);
            else {
                yv[v] = _mm256_fmadd_ps(s, acc[v], yv[v]);
                if (base == PI_Q4_1)
                    yv[v] = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sd + d + c + 8 * v))), off,
                                            yv[v]);
            }
        }
    }
    _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++) _mm256_storeu_ps(y + c + 8 * v, yv[v]);
}

AI2 void sweep2(const pi_mat *m, const int32_t *idx, const float *h, int n, int c0, int c1, float *y, const int base) {
    pi_group g[PI_GROUPS];
    for (int j = 0; j < n;) {
        const int ng = group_list(idx, h, n, j, g, PI_GROUPS, &j);
        for (int gi = 0; gi < ng; gi += PI_GSTEP) {
            const int gn = ng - gi < PI_GSTEP ? ng - gi : PI_GSTEP;
            int c = c0;
            for (; c + 64 <= c1; c += 64) chunk2(m, idx, h, g + gi, gn, c, c + 64 >= c1, y, 8, base);
            if (c1 - c == 32) chunk2(m, idx, h, g + gi, gn, c, 1, y, 4, base); /* c1 - c is a multiple of 32 */
        }
    }
}

__attribute__((target("avx2,fma,f16c")))
static void axpy_panels_avx2(const pi_mat *m, const int32_t *idx, const float *h, int n, int c0, int c1, float *y) {
    switch (pi_panel_base(m->qtype)) {
    case PI_Q4_0: sweep2(m, idx, h, n, c0, c1, y, PI_Q4_0); break;
    case PI_Q4_1: sweep2(m, idx, h, n, c0, c1, y, PI_Q4_1); break;
    default: sweep2(m, idx, h, n, c0, c1, y, PI_Q8_0); break;
    }
}
#endif

void pi_axpy_panels(const pi_mat *m, const int32_t *idx, const float *h, int n, int c0, int c1, float *y) {
#if defined(PI_X86)
    if (pi_k == &pi_kernels_avx512) { axpy_panels_avx512(m, idx, h, n, c0, c1, y); return; }
    if (pi_k == &pi_kernels_avx2) { axpy_panels_avx2(m, idx, h, n, c0, c1, y); return; }
#endif
    axpy_panels_portable(m, idx, h, n, c0, c1, y);
}
