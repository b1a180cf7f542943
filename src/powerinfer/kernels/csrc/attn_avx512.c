/* AVX-512 attention core for one KV head and the n_rep query heads that share it (GQA), see pi_attn_fn.
 *   scores: 16 positions per pass, each an f32 fma chain over head_dim, then one 16x16 transpose-reduction
 *           (45 shuffles/adds) instead of 16 horizontal sums;
 *   softmax: vectorized exp (Cephes-style polynomial, ~1 ulp; ggml uses its own ggml_v_expf), f32 lanes
 *           summed in double per pass;
 *   V:      each f16 V row converted once per 64-dim chunk and used by up to 4 heads.
 * Specialised for head_dim 32, 64, 128; other sizes take the generic version (decoder.c). */
#include "pi.h"

#if defined(PI_X86)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#include <immintrin.h>
#include <math.h>

#define AI static inline __attribute__((always_inline))

AI __m512 round_f16(__m512 x) { return _mm512_cvtph_ps(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT)); }

/* exp(x) for x <= 0 (softmax arguments); 2^n applied with scalef, underflow goes to 0. */
AI __m512 exp_neg(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-103.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500E-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* r[i] = sum of the 16 lanes of a[i], i < 16 (see the derivation in the step comments). */
AI __m512 reduce16(const __m512 *a) {
    __m512 c[4];
    for (int j = 0; j < 4; j++) {
        const __m512 *x = a + 4 * j;
        /* per 128-bit lane: [x0[0]+x0[2], x1[0]+x1[2], x0[1]+x0[3], x1[1]+x1[3]] */
        const __m512 b01 = _mm512_add_ps(_mm512_unpacklo_ps(x[0], x[1]), _mm512_unpackhi_ps(x[0], x[1]));
        const __m512 b23 = _mm512_add_ps(_mm512_unpacklo_ps(x[2], x[3]), _mm512_unpackhi_ps(x[2], x[3]));
        /* per 128-bit lane: the lane's sums of x0..x3 */
        c[j] = _mm512_add_ps(_mm512_shuffle_ps(b01, b23, _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(b01, b23, _MM_SHUFFLE(3, 2, 3, 2)));
    }
    /* fold the four 128-bit lanes */
    const __m512 d = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512 e = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(d, e, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(d, e, _MM_SHUFFLE(3, 1, 3, 1)));
}

AI __m512 ldh(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }

void pi_to_f16_avx512(const float *x, uint16_t *y, int n) {
    int i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(y + i), _mm512_cvtps_ph(_mm512_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) y[i] = _cvtss_sh(x[i], 0);
}

/* generic fallback lives in decoder.c */
void pi_attn_generic(const float *q, int n_rep, int hd, const uint16_t *k, const uint16_t *v, size_t stride,
                     int n_kv, float scale, float *scores, float *out);

/* Scores of one head for positions t0.. (16 at a time, tail rows clamped and masked), ND = head_dim/16. */
AI void scores_head(const float *q, const int ND, const uint16_t *k, size_t stride, int n_kv, __m512 vscale,
                    float *sc) {
    __m512 qv[8];
    for (int j = 0; j < ND; j++) qv[j] = round_f16(_mm512_loadu_ps(q + 16 * j));
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    for (int t0 = 0; t0 < n_kv; t0 += 16) {
        const int nt = n_kv - t0 < 16 ? n_kv - t0 : 16;
        __m512 acc[16];
        for (int i = 0; i < 16; i++) {
            const uint16_t *kr = k + (size_t)(t0 + (i < nt ? i : nt - 1)) * stride;
            acc[i] = _mm512_mul_ps(qv[0], ldh(kr));
            for (int j = 1; j < ND; j++) acc[i] = _mm512_fmadd_ps(qv[j], ldh(kr + 16 * j), acc[i]);
        }
        const __mmask16 km = nt == 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nt) - 1);
        const __m512 s = _mm512_mul_ps(reduce16(acc), vscale);
        _mm512_mask_storeu_ps(sc + t0, km, s);
        vmax = _mm512_mask_max_ps(vmax, km, vmax, s);
    }
    /* softmax; probabilities rounded to f16 */
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
    double sum = 0.0;
    for (int t0 = 0; t0 < n_kv; t0 += 16) {
        const int nt = n_kv - t0 < 16 ? n_kv - t0 : 16;
        const __mmask16 km = nt == 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nt) - 1);
        const __m512 e = _mm512_maskz_mov_ps(km, exp_neg(_mm512_sub_ps(_mm512_maskz_loadu_ps(km, sc + t0), mx)));
        _mm512_mask_storeu_ps(sc + t0, km, e);
        sum += _mm512_reduce_add_ps(e);
    }
    const __m512 inv = _mm512_set1_ps((float)(1.0 / sum));
    for (int t0 = 0; t0 < n_kv; t0 += 16) {
        const int nt = n_kv - t0 < 16 ? n_kv - t0 : 16;
        const __mmask16 km = nt == 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nt) - 1);
        _mm512_mask_storeu_ps(sc + t0, km, round_f16(_mm512_mul_ps(_mm512_maskz_loadu_ps(km, sc + t0), inv)));
    }
}

/* out[a][16*j0 .. 16*(j0+NJ)) = sum_t p_a[t] V[t] for NR heads; NR*NJ <= 16 accumulators. */
AI void v_accum(const float *p, int n_kv, const int NR, const int NJ, const uint16_t *v, size_t stride, int j0,
                float *out, int hd) {
    __m512 acc[4][4];
    for (int a = 0; a < NR; a++)
        for (int b = 0; b < NJ; b++) acc[a][b] = _mm512_setzero_ps();
    for (int t = 0; t < n_kv; t++) {
        const uint16_t *vr = v + (size_t)t * stride + 16 * j0;
        __m512 vv[4];
        for (int b = 0; b < NJ; b++) vv[b] = ldh(vr + 16 * b);
        for (int a = 0; a < NR; a++) {
            const __m512 pa = _mm512_set1_ps(p[(size_t)a * n_kv + t]);
            for (int b = 0; b < NJ; b++) acc[a][b] = _mm512_fmadd_ps(pa, vv[b], acc[a][b]);
        }
    }
    for (int a = 0; a < NR; a++)
        for (int b = 0; b < NJ; b++) _mm512_storeu_ps(out + (size_t)a * hd + 16 * (j0 + b), acc[a][b]);
}

AI void attn_nd(const float *q, int n_rep, const int ND, const uint16_t *k, const uint16_t *v, size_t stride,
                int n_kv, float scale, float *scores, float *out) {
    const int hd = 16 * ND;
    for (int r = 0; r < n_rep; r++)
        scores_head(q + (size_t)r * hd, ND, k, stride, n_kv, _mm512_set1_ps(scale), scores + (size_t)r * n_kv);
    const int NJ = ND < 4 ? ND : 4;
    for (int r0 = 0; r0 < n_rep; r0 += 4) {
        const float *p = scores + (size_t)r0 * n_kv;
        float *o = out + (size_t)r0 * hd;
        for (int j0 = 0; j0 < ND; j0 += NJ) {
            switch (n_rep - r0 < 4 ? n_rep - r0 : 4) {
            case 1: v_accum(p, n_kv, 1, NJ, v, stride, j0, o, hd); break;
            case 2: v_accum(p, n_kv, 2, NJ, v, stride, j0, o, hd); break;
            case 3: v_accum(p, n_kv, 3, NJ, v, stride, j0, o, hd); break;
            default: v_accum(p, n_kv, 4, NJ, v, stride, j0, o, hd); break;
            }
        }
    }
}

void pi_attn_avx512(const float *q, int n_rep, int hd, const uint16_t *k, const uint16_t *v, size_t stride,
                    int n_kv, float scale, float *scores, float *out) {
    switch (hd) { /* constant head_dim chunks keep q and the accumulators in registers */
    case 32: attn_nd(q, n_rep, 2, k, v, stride, n_kv, scale, scores, out); break;
    case 64: attn_nd(q, n_rep, 4, k, v, stride, n_kv, scale, scores, out); break;
    case 128: attn_nd(q, n_rep, 8, k, v, stride, n_kv, scale, scores, out); break;
    default: pi_attn_generic(q, n_rep, hd, k, v, stride, n_kv, scale, scores, out); break;
    }
}

#pragma GCC pop_options
#endif
