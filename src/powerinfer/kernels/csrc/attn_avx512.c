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

/* exp(x) for x <= 0 (softmax arguments); 2^n applied with scalef. Clamped at -87 (exp = 1.6e-38, still a
 * normal float, 0 after the f16 rounding of probabilities) so masked -inf scores never make denormals. */
AI __m512 exp_neg(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
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

/* Prefetch the n chunks of 16 f16 (32 bytes each) starting at p. Measured at position 1000: the f16 row
 * loads were the hot spot (cache misses on rows strided by n_head_kv*head_dim). */
AI void pf_row(const uint16_t *p, int n) {
    for (int j = 0; j < n; j += 2) _mm_prefetch((const char *)(p + 16 * j), _MM_HINT_T0);
}

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
    _Pragma("GCC unroll 16") for (int j = 0; j < ND; j++) qv[j] = round_f16(_mm512_loadu_ps(q + 16 * j));
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    for (int t0 = 0; t0 < n_kv; t0 += 16) {
        const int nt = n_kv - t0 < 16 ? n_kv - t0 : 16;
        /* the cache rows are strided (all KV heads interleaved): prefetch the next block's rows */
        for (int i = 16; i < 32 && t0 + i < n_kv; i++) pf_row(k + (size_t)(t0 + i) * stride, ND);
        __m512 acc[16];
        _Pragma("GCC unroll 16") for (int i = 0; i < 16; i++) {
            const uint16_t *kr = k + (size_t)(t0 + (i < nt ? i : nt - 1)) * stride;
            acc[i] = _mm512_mul_ps(qv[0], ldh(kr));
            _Pragma("GCC unroll 16") for (int j = 1; j < ND; j++) acc[i] = _mm512_fmadd_ps(qv[j], ldh(kr + 16 * j), acc[i]);
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
    _Pragma("GCC unroll 16") for (int a = 0; a < NR; a++)
        _Pragma("GCC unroll 16") for (int b = 0; b < NJ; b++) acc[a][b] = _mm512_setzero_ps();
    for (int t = 0; t < n_kv; t++) {
        if (t + 16 < n_kv) pf_row(v + (size_t)(t + 16) * stride + 16 * j0, NJ);
        const uint16_t *vr = v + (size_t)t * stride + 16 * j0;
        __m512 vv[4];
        _Pragma("GCC unroll 16") for (int b = 0; b < NJ; b++) vv[b] = ldh(vr + 16 * b);
        _Pragma("GCC unroll 16") for (int a = 0; a < NR; a++) {
            const __m512 pa = _mm512_set1_ps(p[(size_t)a * n_kv + t]);
            _Pragma("GCC unroll 16") for (int b = 0; b < NJ; b++) acc[a][b] = _mm512_fmadd_ps(pa, vv[b], acc[a][b]);
        }
    }
    _Pragma("GCC unroll 16") for (int a = 0; a < NR; a++)
        _Pragma("GCC unroll 16") for (int b = 0; b < NJ; b++) _mm512_storeu_ps(out + (size_t)a * hd + 16 * (j0 + b), acc[a][b]);
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

/* ---- prefill: causal attention for a tile of up to 16 consecutive query tokens, lanes = queries ----
 * S[pos][lane] = q_lane . K[pos] with the tile's q transposed once (Qt[d] = 16 queries' d-th value), so a K row
 * (converted to f32 once) feeds 16 queries through broadcast FMAs; the softmax max/sum are vertical. */
AI void tile_head(const float *q, size_t q_stride, int nq, const int ND, const uint16_t *k, const uint16_t *v,
                  size_t kv_stride, int pos0, float scale, float *S, float *Qt, float *kf, float *out,
                  size_t out_stride) {
    const int hd = 16 * ND, n_pos = pos0 + nq; /* positions 0 .. pos0+nq-1 */
    for (int d = 0; d < hd; d++) { /* Qt[d][lane], f16-rounded q, zero lanes past nq */
        float col[16];
        for (int l = 0; l < 16; l++) col[l] = l < nq ? q[(size_t)l * q_stride + d] : 0.0f;
        _mm512_store_ps(Qt + 16 * d, round_f16(_mm512_loadu_ps(col)));
    }
    const __m512i lane_pos = _mm512_add_epi32(_mm512_set1_epi32(pos0), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    const __m512 vscale = _mm512_set1_ps(scale), ninf = _mm512_set1_ps(-INFINITY);
    __m512 vmax = ninf;
    for (int p0 = 0; p0 < n_pos; p0 += 8) {
        const int np = n_pos - p0 < 8 ? n_pos - p0 : 8;
        _Pragma("GCC unroll 16") for (int i = 0; i < 8; i++) { /* K rows -> f32 scratch (tail rows repeat the last) */
            const uint16_t *kr = k + (size_t)(p0 + (i < np ? i : np - 1)) * kv_stride;
            _Pragma("GCC unroll 16") for (int j = 0; j < ND; j++) _mm512_store_ps(kf + i * hd + 16 * j, ldh(kr + 16 * j));
        }
        __m512 acc[8];
        _Pragma("GCC unroll 16") for (int i = 0; i < 8; i++) acc[i] = _mm512_setzero_ps();
        for (int d = 0; d < hd; d++) {
            const __m512 qd = _mm512_load_ps(Qt + 16 * d);
            _Pragma("GCC unroll 16") for (int i = 0; i < 8; i++) acc[i] = _mm512_fmadd_ps(qd, _mm512_set1_ps(kf[i * hd + d]), acc[i]);
        }
        _Pragma("GCC unroll 16") for (int i = 0; i < np; i++) { /* causal: query lane l sees positions <= pos0 + l */
            const __mmask16 vis = _mm512_cmp_epi32_mask(_mm512_set1_epi32(p0 + i), lane_pos, _MM_CMPINT_LE);
            const __m512 sv = _mm512_mask_mul_ps(ninf, vis, acc[i], vscale);
            _mm512_store_ps(S + 16 * (size_t)(p0 + i), sv);
            vmax = _mm512_max_ps(vmax, sv);
        }
    }
    __m512 vsum = _mm512_setzero_ps();
    for (int p = 0; p < n_pos; p++) {
        const __m512 e = exp_neg(_mm512_sub_ps(_mm512_load_ps(S + 16 * (size_t)p), vmax));
        _mm512_store_ps(S + 16 * (size_t)p, e);
        vsum = _mm512_add_ps(vsum, e);
    }
    const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), vsum);
    for (int p = 0; p < n_pos; p++)
        _mm512_store_ps(S + 16 * (size_t)p, round_f16(_mm512_mul_ps(_mm512_load_ps(S + 16 * (size_t)p), inv)));
    /* out[l] = sum_p S[p][l] V[p]: 4 queries x 4 dim-chunks of accumulators; stop at the group's last visible row */
    const int NJ = ND < 4 ? ND : 4;
    for (int l0 = 0; l0 < nq; l0 += 4) {
        const int nl = nq - l0 < 4 ? nq - l0 : 4, last = pos0 + l0 + nl; /* rows < last */
        for (int j0 = 0; j0 < ND; j0 += NJ) {
            __m512 acc[4][4];
            _Pragma("GCC unroll 16") for (int a = 0; a < 4; a++)
                _Pragma("GCC unroll 16") for (int b = 0; b < 4; b++) acc[a][b] = _mm512_setzero_ps();
            for (int p = 0; p < last; p++) {
                const uint16_t *vr = v + (size_t)p * kv_stride + 16 * j0;
                __m512 vv[4];
                _Pragma("GCC unroll 16") for (int b = 0; b < NJ; b++) vv[b] = ldh(vr + 16 * b);
                _Pragma("GCC unroll 16") for (int a = 0; a < 4; a++) {
                    const __m512 pa = _mm512_set1_ps(S[16 * (size_t)p + l0 + a]);
                    _Pragma("GCC unroll 16") for (int b = 0; b < NJ; b++) acc[a][b] = _mm512_fmadd_ps(pa, vv[b], acc[a][b]);
                }
            }
            _Pragma("GCC unroll 16") for (int a = 0; a < nl; a++)
                _Pragma("GCC unroll 16") for (int b = 0; b < NJ; b++) _mm512_storeu_ps(out + (size_t)(l0 + a) * out_stride + 16 * (j0 + b), acc[a][b]);
        }
    }
}

/* Scratch floats pi_attn_tile_avx512 needs for n_ctx positions. */
size_t pi_attn_tile_scratch(int n_ctx) { return (size_t)16 * (n_ctx + 16) + 16 * PI_MAX_HD_TILE + 8 * PI_MAX_HD_TILE + 64; }

int pi_attn_tile_avx512(const float *q, size_t q_stride, int nq, int n_rep, int hd, const uint16_t *k,
                        const uint16_t *v, size_t kv_stride, int pos0, float scale, float *scratch, float *out,
                        size_t out_stride) {
    float *S = (float *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    float *Qt = S + 16 * (size_t)(pos0 + 16), *kf = Qt + 16 * PI_MAX_HD_TILE;
    for (int r = 0; r < n_rep; r++) {
        const float *qr = q + (size_t)r * hd;
        float *o = out + (size_t)r * hd;
        switch (hd) {
        case 32: tile_head(qr, q_stride, nq, 2, k, v, kv_stride, pos0, scale, S, Qt, kf, o, out_stride); break;
        case 64: tile_head(qr, q_stride, nq, 4, k, v, kv_stride, pos0, scale, S, Qt, kf, o, out_stride); break;
        case 128: tile_head(qr, q_stride, nq, 8, k, v, kv_stride, pos0, scale, S, Qt, kf, o, out_stride); break;
        default: return -1;
        }
    }
    return 0;
}

#pragma GCC pop_options
#endif
