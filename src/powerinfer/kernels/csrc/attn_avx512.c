/* AVX-512 attention kernels (pi_attn_ops, attn.h); the cache formats (f32, f16, q8_0) are compile-time constants
 * of the inner loops (ld16: one 16-value chunk of a row in f32), dispatched once per call.
 *   scores: 16 positions per pass, each an f32 fma chain over head_dim, then one 16x16 transpose-reduction
 *           (45 shuffles/adds) instead of 16 horizontal sums; with GQA the 16 K rows are converted to f32 once
 *           and read by each query head of the group; exp is a Cephes-style polynomial (~1 ulp).
 *   values: probabilities rounded to f16 in one vector pass, then each f16 V row is converted once per 64-dim
 *           chunk and used by up to 4 heads.
 *   tile:   lanes = 16 queries (see tile_head).
 * The decode kernels walk the rows in blocks (16 for scores, 32 for values) through every KV head in range and
 * prefetch whole cache rows one block ahead, so the cache streams once, row after row: SmolLM2's shape, 30
 * layers of a 16k cache from DRAM, one thread: 21 ms per step (17.8 GB/s) against 28 ms walking each KV head's
 * rows in turn (prefetching 32 or 64 rows ahead instead of 16: 22-26 ms).
 * head_dim: the kernels specialise 32, 64, 128 and take any other multiple of 16 in a loop (the tile up to
 * PI_ATTN_TILE_HD); the rest falls back to the portable kernels. */
#include "attn.h"

#if defined(PI_X86)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#include <immintrin.h>
#include <math.h>

#define AI static inline __attribute__((always_inline))

AI __m512 round_f16(__m512 x) { return _mm512_cvtph_ps(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT)); }

/* exp(x) for x <= 0 (softmax arguments); 2^n applied with scalef. Clamped at -87 (exp = 1.6e-38, still a
 * normal float, 0 after an f16 rounding) so -inf arguments never make denormals or NaN. */
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

/* cap * tanh(x / cap) (soft-capping, attn.h), tanh(|t|) = (1 - e) / (1 + e) with e = exp(-2|t|), sign restored;
 * absolute error ~1e-7 * cap, well inside the f16 rounding of the probabilities. */
AI __m512 softcap_ps(__m512 x, __m512 cap, __m512 inv_cap) {
    const __m512 t = _mm512_mul_ps(x, inv_cap);
    const __m512 a = _mm512_abs_ps(t);
    const __m512 e = exp_neg(_mm512_mul_ps(a, _mm512_set1_ps(-2.0f)));
    const __m512 th = _mm512_div_ps(_mm512_sub_ps(_mm512_set1_ps(1.0f), e), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
    const __m512i sign = _mm512_and_si512(_mm512_castps_si512(t), _mm512_set1_epi32((int)0x80000000u));
    return _mm512_mul_ps(_mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(th), sign)), cap);
}

/* r[i] = sum of the 16 lanes of a[i], i < 16. */
AI __m512 reduce16(const __m512 *a) {
    __m512 c[4];
    _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) {
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

/* Values [16j, 16j+16) of a cache row of format T, in f32 (q8_0: exact q * d). */
AI __m512 ld16(const int T, const uint8_t *r, int j) {
    if (T == PI_F32) return _mm512_loadu_ps((const float *)r + 16 * j);
    if (T == PI_F16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)r + 16 * j)));
    const pi_blk_q8_0 *b = (const pi_blk_q8_0 *)r + j / 2;
    const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b->qs + 16 * (j & 1)))));
    return _mm512_mul_ps(v, _mm512_set1_ps(_cvtsh_ss(b->d)));
}
AI __mmask16 tail_mask(int n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }
AI const uint8_t *row(const uint8_t *base, size_t stride, int t) { return base + (size_t)t * stride; }

/* Prefetch whole cache rows (every KV head of a position) into L1, PF_ROWS rows ahead: the rows stream once
 * through all the heads in range, block by block. */
#define PF_ROWS 16
AI void pf_rows(const uint8_t *base, size_t stride, int i, int nrows) {
    const uint8_t *p = base + (size_t)i * stride, *end = p + (size_t)nrows * stride;
    for (; p < end; p += 64) _mm_prefetch((const char *)p, _MM_HINT_T0);
}

void pi_to_f16_avx512(const float *x, uint16_t *y, int n) {
    int i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(y + i), _mm512_cvtps_ph(_mm512_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) y[i] = _cvtss_sh(x[i], 0);
}

/* ---- decode: scores ---- */
/* Rows [i0, i0+16) of KV head g against query heads [ha, hb) of its group: reduced scores into e, running max per
 * head in vmax. SHARE: the block is converted to f32 once for the group's heads (GQA). */
AI void scores_block(const float *qh, int ha, int hb, const int KT, const int ND, const int SHARE, const uint8_t *kb, size_t st,
                     int i0, int nt, __m512 vscale, float *kf, float *e, size_t ld, __m512 *vmax) {
    const int hd = 16 * ND;
    const __mmask16 km = tail_mask(nt);
    if (SHARE) {
        _Pragma("GCC unroll 16") for (int i = 0; i < 16; i++) {
            const uint8_t *kr = row(kb, st, i0 + (i < nt ? i : nt - 1));
            _Pragma("GCC unroll 8") for (int j = 0; j < ND; j++) _mm512_store_ps(kf + i * hd + 16 * j, ld16(KT, kr, j));
        }
    }
    for (int h = ha; h < hb; h++) {
        const float *qr = qh + (size_t)h * hd;
        __m512 acc[16];
        _Pragma("GCC unroll 16") for (int i = 0; i < 16; i++) {
            const uint8_t *kr = row(kb, st, i0 + (i < nt ? i : nt - 1));
            acc[i] = _mm512_mul_ps(_mm512_load_ps(qr), SHARE ? _mm512_load_ps(kf + i * hd) : ld16(KT, kr, 0));
            _Pragma("GCC unroll 8") for (int j = 1; j < ND; j++)
                acc[i] = _mm512_fmadd_ps(_mm512_load_ps(qr + 16 * j), SHARE ? _mm512_load_ps(kf + i * hd + 16 * j) : ld16(KT, kr, j), acc[i]);
        }
        const __m512 sv = _mm512_mul_ps(reduce16(acc), vscale);
        _mm512_mask_storeu_ps(e + (size_t)h * ld + i0, km, sv);
        vmax[h] = _mm512_mask_max_ps(vmax[h], km, vmax[h], sv);
    }
}

AI void scores_nd(const float *q, int h0, int h1, int rep, const int KT, const int ND, const pi_kv_head *kv, int t0,
                  int n, float scale, float softcap, float *e, size_t ld, float *m, float *l) {
    const int hd = 16 * ND;
    const size_t st = kv->kstride, hb_bytes = pi_kv_bytes(KT, hd);
    const uint8_t *kb = kv->k + (size_t)t0 * st;
    /* rounded q and running max, indexed by head - h0 */
    float qh[PI_ATTN_CALL_HEADS * PI_MAX_HEAD_DIM] __attribute__((aligned(64)));
    float kf[16 * PI_MAX_HEAD_DIM] __attribute__((aligned(64)));
    __m512 vm[PI_ATTN_CALL_HEADS];
    if (h1 - h0 < 1 || h1 - h0 > PI_ATTN_CALL_HEADS) __builtin_unreachable();
    for (int h = h0; h < h1; h++) {
        vm[h - h0] = _mm512_set1_ps(-INFINITY);
        if (KT == PI_Q8_0) pi_kv_round_q(KT, q + (size_t)h * hd, qh + (size_t)(h - h0) * hd, hd);
        else
            for (int j = 0; j < ND; j++) { /* f16 K: q rounded to f16; f32 K: as is */
                const __m512 x = _mm512_loadu_ps(q + (size_t)h * hd + 16 * j);
                _mm512_store_ps(qh + (size_t)(h - h0) * hd + 16 * j, KT == PI_F16 ? round_f16(x) : x);
            }
    }
    const __m512 vscale = _mm512_set1_ps(scale);
    const int g0 = h0 / rep, g1 = (h1 - 1) / rep + 1;
    for (int i0 = 0; i0 < n; i0 += 16) {
        const int nt = n - i0 < 16 ? n - i0 : 16;
        if (i0 + PF_ROWS < n) pf_rows(kb, st, i0 + PF_ROWS, n - i0 - PF_ROWS < 16 ? n - i0 - PF_ROWS : 16);
        for (int g = g0; g < g1; g++) {
            const int ha = g * rep > h0 ? g * rep : h0, hb = (g + 1) * rep < h1 ? (g + 1) * rep : h1;
            if (hb - ha > 1)
                scores_block(qh - (size_t)h0 * hd, ha, hb, KT, ND, 1, kb + g * hb_bytes, st, i0, nt, vscale, kf, e, ld, vm - h0);
            else
                scores_block(qh - (size_t)h0 * hd, ha, hb, KT, ND, 0, kb + g * hb_bytes, st, i0, nt, vscale, kf, e, ld, vm - h0);
        }
    }
    const __m512 vcap = _mm512_set1_ps(softcap), vinv = _mm512_set1_ps(softcap > 0.0f ? 1.0f / softcap : 0.0f);
    for (int h = h0; h < h1; h++) { /* e = exp(s - max), sum (capped s and max: tanh keeps the order) */
        float *er = e + (size_t)h * ld;
        float mx = _mm512_reduce_max_ps(vm[h - h0]);
        if (softcap > 0.0f) mx = _mm512_cvtss_f32(softcap_ps(_mm512_set1_ps(mx), vcap, vinv));
        const __m512 vmx = _mm512_set1_ps(mx);
        __m512 vs = _mm512_setzero_ps();
        for (int i0 = 0; i0 < n; i0 += 16) {
            const __mmask16 km = tail_mask(n - i0);
            __m512 sc = _mm512_maskz_loadu_ps(km, er + i0);
            if (softcap > 0.0f) sc = softcap_ps(sc, vcap, vinv);
            const __m512 x = _mm512_maskz_mov_ps(km, exp_neg(_mm512_sub_ps(sc, vmx)));
            _mm512_mask_storeu_ps(er + i0, km, x);
            vs = _mm512_add_ps(vs, x);
        }
        m[h] = mx;
        l[h] = _mm512_reduce_add_ps(vs);
    }
}

#define SCORES_HD(KT)                                                                                              \
    switch (hd) { /* constant head_dim chunks keep q and the accumulators in registers */                          \
    case 32: scores_nd(q, h0, h1, rep, KT, 2, kv, t0, n, scale, softcap, e, ld, m, l); break;                       \
    case 64: scores_nd(q, h0, h1, rep, KT, 4, kv, t0, n, scale, softcap, e, ld, m, l); break;                       \
    case 128: scores_nd(q, h0, h1, rep, KT, 8, kv, t0, n, scale, softcap, e, ld, m, l); break;                      \
    default: scores_nd(q, h0, h1, rep, KT, hd / 16, kv, t0, n, scale, softcap, e, ld, m, l);                        \
    }

static void scores(const float *q, int h0, int h1, int rep, int hd, const pi_kv_head *kv, int t0, int n, float scale,
                   float softcap, float *e, size_t ld, float *m, float *l) {
    if (hd % 16) { pi_attn_portable.scores(q, h0, h1, rep, hd, kv, t0, n, scale, softcap, e, ld, m, l); return; }
    switch (kv->ktype) {
    case PI_F32: SCORES_HD(PI_F32); break;
    case PI_Q8_0: SCORES_HD(PI_Q8_0); break;
    default: SCORES_HD(PI_F16); break;
    }
}

/* ---- decode: values ---- */
/* out[a][16*j0 .. 16*(j0+NJ)) += sum_i p_a[i] V[i] over rows [i0, i0+nb) for NR heads; NR*NJ <= 16 accumulators,
 * loaded from and stored back to out (the rows arrive block by block). */
AI void v_accum(const float *p, size_t ld, int i0, int nb, const int VT, const int NR, const int NJ, const uint8_t *vb,
                size_t st, int j0, float *out, int hd) {
    __m512 acc[4][4];
    _Pragma("GCC unroll 16") for (int a = 0; a < NR; a++)
        _Pragma("GCC unroll 16") for (int b = 0; b < NJ; b++) acc[a][b] = _mm512_loadu_ps(out + (size_t)a * hd + 16 * (j0 + b));
    for (int i = i0; i < i0 + nb; i++) {
        const uint8_t *vr = row(vb, st, i);
        __m512 vv[4];
        _Pragma("GCC unroll 16") for (int b = 0; b < NJ; b++) vv[b] = ld16(VT, vr, j0 + b);
        _Pragma("GCC unroll 16") for (int a = 0; a < NR; a++) {
            const __m512 pa = _mm512_set1_ps(p[(size_t)a * ld + i]);
            _Pragma("GCC unroll 16") for (int b = 0; b < NJ; b++) acc[a][b] = _mm512_fmadd_ps(pa, vv[b], acc[a][b]);
        }
    }
    _Pragma("GCC unroll 16") for (int a = 0; a < NR; a++)
        _Pragma("GCC unroll 16") for (int b = 0; b < NJ; b++) _mm512_storeu_ps(out + (size_t)a * hd + 16 * (j0 + b), acc[a][b]);
}

AI void v_heads(const float *p, size_t ld, int i0, int nb, int nr, const int VT, const int NJ, const uint8_t *vb,
                size_t st, int j0, float *o, int hd) {
    switch (nr) {
    case 1: v_accum(p, ld, i0, nb, VT, 1, NJ, vb, st, j0, o, hd); break;
    case 2: v_accum(p, ld, i0, nb, VT, 2, NJ, vb, st, j0, o, hd); break;
    case 3: v_accum(p, ld, i0, nb, VT, 3, NJ, vb, st, j0, o, hd); break;
    default: v_accum(p, ld, i0, nb, VT, 4, NJ, vb, st, j0, o, hd); break;
    }
}

#define V_BLOCK 32 /* rows per block: the accumulators' load/store is paid once per block and head group */

AI void values_vt(float *e, size_t ld, const float *f, int h0, int h1, int rep, int hd, const int VT,
                  const pi_kv_head *kv, int t0, int n, float *out) {
    for (int h = h0; h < h1; h++) { /* p = e * f in place, rounded to f16 for an f16 V */
        float *er = e + (size_t)h * ld;
        const __m512 vf = _mm512_set1_ps(f[h]);
        for (int i0 = 0; i0 < n; i0 += 16) {
            const __mmask16 km = tail_mask(n - i0);
            const __m512 p = _mm512_mul_ps(_mm512_maskz_loadu_ps(km, er + i0), vf);
            _mm512_mask_storeu_ps(er + i0, km, VT == PI_F16 ? round_f16(p) : p);
        }
        memset(out + (size_t)h * hd, 0, (size_t)hd * sizeof(float));
    }
    const int ND = hd / 16, g0 = h0 / rep, g1 = (h1 - 1) / rep + 1;
    const size_t st = kv->vstride;
    const uint8_t *vb = kv->v + (size_t)t0 * st;
    for (int i0 = 0; i0 < n; i0 += V_BLOCK) {
        const int nb = n - i0 < V_BLOCK ? n - i0 : V_BLOCK;
        if (i0 + V_BLOCK < n) pf_rows(vb, st, i0 + V_BLOCK, n - i0 - V_BLOCK < V_BLOCK ? n - i0 - V_BLOCK : V_BLOCK);
        for (int g = g0; g < g1; g++) {
            const int ha = g * rep > h0 ? g * rep : h0, hb = (g + 1) * rep < h1 ? (g + 1) * rep : h1;
            const uint8_t *vg = vb + pi_kv_bytes(VT, g * hd);
            for (int r0 = ha; r0 < hb; r0 += 4) {
                const int nr = hb - r0 < 4 ? hb - r0 : 4;
                const float *p = e + (size_t)r0 * ld;
                float *o = out + (size_t)r0 * hd;
                for (int j0 = 0; j0 < ND; j0 += 4) {
                    switch (ND - j0 < 4 ? ND - j0 : 4) {
                    case 1: v_heads(p, ld, i0, nb, nr, VT, 1, vg, st, j0, o, hd); break;
                    case 2: v_heads(p, ld, i0, nb, nr, VT, 2, vg, st, j0, o, hd); break;
                    case 3: v_heads(p, ld, i0, nb, nr, VT, 3, vg, st, j0, o, hd); break;
                    default: v_heads(p, ld, i0, nb, nr, VT, 4, vg, st, j0, o, hd); break;
                    }
                }
            }
        }
    }
}

static void values(float *e, size_t ld, const float *f, int h0, int h1, int rep, int hd, const pi_kv_head *kv, int t0,
                   int n, float *out) {
    if (hd % 16) { pi_attn_portable.values(e, ld, f, h0, h1, rep, hd, kv, t0, n, out); return; }
    switch (kv->vtype) {
    case PI_F32: values_vt(e, ld, f, h0, h1, rep, hd, PI_F32, kv, t0, n, out); break;
    case PI_Q8_0: values_vt(e, ld, f, h0, h1, rep, hd, PI_Q8_0, kv, t0, n, out); break;
    default: values_vt(e, ld, f, h0, h1, rep, hd, PI_F16, kv, t0, n, out); break;
    }
}

/* ---- prefill: causal attention for a tile of up to 16 consecutive queries, lanes = queries ----
 * S[pos][lane] = q_lane . K[pos] with the tile's q transposed once (Qt[d] = 16 queries' d-th value), so a K row
 * (converted to f32 once per 8-row block) feeds 16 queries through broadcast FMAs; the softmax max/sum are
 * vertical; the probabilities are normalized, then rounded to f16, then meet V (lanes = dims, 4 queries x 4
 * 16-dim chunks of accumulators per pass, stopping at the group's last visible row). */
AI void tile_head(const float *q, size_t q_stride, int nq, const int KT, const int VT, const int ND, const pi_kv_head *kv,
                  int pos0, float scale, float softcap, int window, float *S, float *Qt, float *kf, float *out,
                  size_t out_stride) {
    const int hd = 16 * ND, n_pos = pos0 + nq; /* positions 0 .. pos0+nq-1 */
    /* a sliding window: rows before the first query's window are never read (lo, a multiple of 8) */
    const int lo = window > 0 && pos0 + 1 > window ? (pos0 + 1 - window) / 8 * 8 : 0;
    float qq[KT == PI_Q8_0 ? 16 * PI_ATTN_TILE_HD : 1]; /* q8_0 K: the queries quantized and dequantized */
    if (KT == PI_Q8_0) {
        for (int l = 0; l < nq; l++) pi_kv_round_q(KT, q + (size_t)l * q_stride, qq + (size_t)l * hd, hd);
        q = qq, q_stride = (size_t)hd;
    }
    for (int d = 0; d < hd; d++) { /* Qt[d][lane], q as K's vec_dot_type, zero lanes past nq */
        float col[16];
        for (int l = 0; l < 16; l++) col[l] = l < nq ? q[(size_t)l * q_stride + d] : 0.0f;
        _mm512_store_ps(Qt + 16 * d, KT == PI_F16 ? round_f16(_mm512_loadu_ps(col)) : _mm512_loadu_ps(col));
    }
    const __m512i lane_pos = _mm512_add_epi32(_mm512_set1_epi32(pos0), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    const __m512 vscale = _mm512_set1_ps(scale), ninf = _mm512_set1_ps(-INFINITY);
    const __m512 vcap = _mm512_set1_ps(softcap), vinv = _mm512_set1_ps(softcap > 0.0f ? 1.0f / softcap : 0.0f);
    /* lane l sees rows > pos0 + l - window */
    const __m512i lane_lo = _mm512_sub_epi32(lane_pos, _mm512_set1_epi32(window > 0 ? window : 1 << 30));
    __m512 vmax = ninf;
    for (int p0 = lo; p0 < n_pos; p0 += 8) {
        const int np = n_pos - p0 < 8 ? n_pos - p0 : 8;
        _Pragma("GCC unroll 16") for (int i = 0; i < 8; i++) { /* K rows -> f32 scratch (tail rows repeat the last) */
            const uint8_t *kr = row(kv->k, kv->kstride, p0 + (i < np ? i : np - 1));
            _Pragma("GCC unroll 16") for (int j = 0; j < ND; j++) _mm512_store_ps(kf + i * hd + 16 * j, ld16(KT, kr, j));
        }
        __m512 acc[8];
        _Pragma("GCC unroll 16") for (int i = 0; i < 8; i++) acc[i] = _mm512_setzero_ps();
        for (int d = 0; d < hd; d++) {
            const __m512 qd = _mm512_load_ps(Qt + 16 * d);
            _Pragma("GCC unroll 16") for (int i = 0; i < 8; i++) acc[i] = _mm512_fmadd_ps(qd, _mm512_set1_ps(kf[i * hd + d]), acc[i]);
        }
        _Pragma("GCC unroll 16") for (int i = 0; i < np; i++) { /* causal: query lane l sees positions <= pos0 + l */
            const __m512i pv = _mm512_set1_epi32(p0 + i);
            const __mmask16 vis = _mm512_cmp_epi32_mask(pv, lane_pos, _MM_CMPINT_LE) &
                                  _mm512_cmp_epi32_mask(pv, lane_lo, _MM_CMPINT_NLE);
            __m512 sv = _mm512_mul_ps(acc[i], vscale);
            if (softcap > 0.0f) sv = softcap_ps(sv, vcap, vinv);
            sv = _mm512_mask_mov_ps(ninf, vis, sv);
            _mm512_store_ps(S + 16 * (size_t)(p0 + i), sv);
            vmax = _mm512_max_ps(vmax, sv);
        }
    }
    __m512 vsum = _mm512_setzero_ps();
    for (int p = lo; p < n_pos; p++) {
        const __m512 e = exp_neg(_mm512_sub_ps(_mm512_load_ps(S + 16 * (size_t)p), vmax));
        _mm512_store_ps(S + 16 * (size_t)p, e);
        vsum = _mm512_add_ps(vsum, e);
    }
    const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), vsum);
    for (int p = lo; p < n_pos; p++) {
        const __m512 pr = _mm512_mul_ps(_mm512_load_ps(S + 16 * (size_t)p), inv);
        _mm512_store_ps(S + 16 * (size_t)p, VT == PI_F16 ? round_f16(pr) : pr);
    }
    const int NJ = ND < 4 ? ND : 4;
    for (int l0 = 0; l0 < nq; l0 += 4) {
        const int nl = nq - l0 < 4 ? nq - l0 : 4, last = pos0 + l0 + nl; /* rows < last */
        for (int j0 = 0; j0 < ND; j0 += NJ) {
            const int nj = ND - j0 < NJ ? ND - j0 : NJ;
            __m512 acc[4][4];
            _Pragma("GCC unroll 16") for (int a = 0; a < 4; a++)
                _Pragma("GCC unroll 16") for (int b = 0; b < 4; b++) acc[a][b] = _mm512_setzero_ps();
            for (int p = lo; p < last; p++) {
                const uint8_t *vr = row(kv->v, kv->vstride, p);
                __m512 vv[4];
                _Pragma("GCC unroll 16") for (int b = 0; b < 4; b++) vv[b] = b < nj ? ld16(VT, vr, j0 + b) : _mm512_setzero_ps();
                _Pragma("GCC unroll 16") for (int a = 0; a < 4; a++) {
                    const __m512 pa = _mm512_set1_ps(S[16 * (size_t)p + l0 + a]);
                    _Pragma("GCC unroll 16") for (int b = 0; b < 4; b++) if (b < nj) acc[a][b] = _mm512_fmadd_ps(pa, vv[b], acc[a][b]);
                }
            }
            _Pragma("GCC unroll 16") for (int a = 0; a < nl; a++)
                _Pragma("GCC unroll 16") for (int b = 0; b < nj; b++) _mm512_storeu_ps(out + (size_t)(l0 + a) * out_stride + 16 * (j0 + b), acc[a][b]);
        }
    }
}

#define TILE_HD(KT, VT)                                                                                            \
    switch (hd) { /* constant head_dim: q columns and accumulators unroll */                                       \
    case 64: tile_head(qr, q_stride, nq, KT, VT, 4, kv, pos0, scale, softcap, window, S, Qt, kf, o, out_stride); break; \
    case 128: tile_head(qr, q_stride, nq, KT, VT, 8, kv, pos0, scale, softcap, window, S, Qt, kf, o, out_stride); break; \
    default: tile_head(qr, q_stride, nq, KT, VT, hd / 16, kv, pos0, scale, softcap, window, S, Qt, kf, o, out_stride); \
    }
#define TILE_V(KT)                                                                                                 \
    switch (kv->vtype) {                                                                                           \
    case PI_F32: TILE_HD(KT, PI_F32); break;                                                                       \
    case PI_Q8_0: TILE_HD(KT, PI_Q8_0); break;                                                                     \
    default: TILE_HD(KT, PI_F16); break;                                                                           \
    }

static void tile(const float *q, size_t q_stride, int nq, int n_rep, int hd, const pi_kv_head *kv, int pos0,
                 float scale, float softcap, int window, float *scratch, float *out, size_t out_stride) {
    if (hd % 16 || hd > PI_ATTN_TILE_HD) {
        pi_attn_portable.tile(q, q_stride, nq, n_rep, hd, kv, pos0, scale, softcap, window, scratch, out,
                                  out_stride);
        return;
    }
    float *Qt = scratch, *kf = Qt + 16 * PI_ATTN_TILE_HD, *S = kf + 8 * PI_ATTN_TILE_HD;
    for (int r = 0; r < n_rep; r++) {
        const float *qr = q + (size_t)r * hd;
        float *o = out + (size_t)r * hd;
        switch (kv->ktype) {
        case PI_F32: TILE_V(PI_F32); break;
        case PI_Q8_0: TILE_V(PI_Q8_0); break;
        default: TILE_V(PI_F16); break;
        }
    }
}

const pi_attn_ops pi_attn_avx512 = {scores, values, tile, 16};

#pragma GCC pop_options
#endif
