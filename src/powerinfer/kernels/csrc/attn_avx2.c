/* AVX2 + FMA + F16C attention kernels (pi_attn_ops, attn.h; cache formats f32, f16, q8_0 as compile-time constants
 * of the inner loops, ld8); the structure of
 * attn_avx512.c at 8 lanes: scores 8 positions per pass with an 8x8 horizontal reduction, values 4 heads x 16
 * dims of accumulators per pass over 32-row blocks (both walking the rows through every KV head in range), the
 * prefill tile 8 queries per lane vector over 8-row blocks.
 * head_dim must be a multiple of 8 (values: 16; else the portable kernels run). */
#include "attn.h"

#if defined(PI_X86)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>
#include <math.h>

#define AI static inline __attribute__((always_inline))

/* Values [8j, 8j+8) of a cache row of format T, in f32 (q8_0: exact q * d). */
AI __m256 ld8(const int T, const uint8_t *r, int j) {
    if (T == PI_F32) return _mm256_loadu_ps((const float *)r + 8 * j);
    if (T == PI_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)r + 8 * j)));
    const pi_blk_q8_0 *b = (const pi_blk_q8_0 *)r + j / 4;
    const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(b->qs + 8 * (j & 3)))));
    return _mm256_mul_ps(v, _mm256_set1_ps(_cvtsh_ss(b->d)));
}
AI __m256 round_f16(__m256 x) { return _mm256_cvtph_ps(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT)); }
AI const uint8_t *row(const uint8_t *base, size_t stride, int t) { return base + (size_t)t * stride; }
AI float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
AI float hmax(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
/* lanes [0, n) set */
AI __m256 tail_mask(int n) {
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}

AI __m256 exp_neg(__m256 x) { /* x <= 0, clamped at -87 so 2^n stays a normal float (and -inf gives ~0, not NaN) */
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500E-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* cap * tanh(x / cap), as attn_avx512.c's softcap_ps */
AI __m256 softcap_ps(__m256 x, __m256 cap, __m256 inv_cap) {
    const __m256 t = _mm256_mul_ps(x, inv_cap), sign = _mm256_set1_ps(-0.0f);
    const __m256 a = _mm256_andnot_ps(sign, t);
    const __m256 e = exp_neg(_mm256_mul_ps(a, _mm256_set1_ps(-2.0f)));
    const __m256 th = _mm256_div_ps(_mm256_sub_ps(_mm256_set1_ps(1.0f), e), _mm256_add_ps(_mm256_set1_ps(1.0f), e));
    return _mm256_mul_ps(_mm256_or_ps(th, _mm256_and_ps(sign, t)), cap);
}

AI __m256 reduce8(const __m256 *a) { /* r[i] = sum of the 8 lanes of a[i] */
    const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* ---- decode (the row-block walk of attn_avx512.c: 8 rows for scores, 32 for values, through every KV head) ---- */
AI void pf_rows(const uint8_t *base, size_t stride, int i, int nrows) {
    const uint8_t *p = base + (size_t)i * stride, *end = p + (size_t)nrows * stride;
    for (; p < end; p += 64) _mm_prefetch((const char *)p, _MM_HINT_T0);
}

/* Rows [i0, i0+8) of one KV head against query heads [ha, hb): SHARE converts the rows to f32 once (GQA). */
AI void scores_block(const float *qh, int ha, int hb, const int KT, const int ND, const int SHARE, const uint8_t *kb, size_t st,
                     int i0, int nt, __m256 vscale, float *kf, float *e, size_t ld, __m256 *vmax) {
    const int hd = 8 * ND;
    const __m256 km = tail_mask(nt);
    if (SHARE)
        for (int i = 0; i < 8; i++) {
            const uint8_t *kr = row(kb, st, i0 + (i < nt ? i : nt - 1));
            for (int j = 0; j < ND; j++) _mm256_store_ps(kf + i * hd + 8 * j, ld8(KT, kr, j));
        }
    for (int h = ha; h < hb; h++) {
        const float *qr = qh + (size_t)h * hd;
        __m256 acc[8];
        _Pragma("GCC unroll 8") for (int i = 0; i < 8; i++) {
            const uint8_t *kr = row(kb, st, i0 + (i < nt ? i : nt - 1));
            acc[i] = _mm256_mul_ps(_mm256_load_ps(qr), SHARE ? _mm256_load_ps(kf + i * hd) : ld8(KT, kr, 0));
            for (int j = 1; j < ND; j++)
                acc[i] = _mm256_fmadd_ps(_mm256_load_ps(qr + 8 * j), SHARE ? _mm256_load_ps(kf + i * hd + 8 * j) : ld8(KT, kr, j), acc[i]);
        }
        const __m256 s = _mm256_mul_ps(reduce8(acc), vscale);
        _mm256_maskstore_ps(e + (size_t)h * ld + i0, _mm256_castps_si256(km), s);
        vmax[h] = _mm256_max_ps(vmax[h], _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), s, km));
    }
}

AI void scores_nd(const float *q, int h0, int h1, int rep, const int KT, const int ND, const pi_kv_head *kv, int t0,
                  int n, float scale, float softcap, float *e, size_t ld, float *m, float *l) {
    const int hd = 8 * ND;
    const size_t st = kv->kstride, hb_bytes = pi_kv_bytes(KT, hd);
    const uint8_t *kb = kv->k + (size_t)t0 * st;
    float qh[PI_ATTN_CALL_HEADS * PI_MAX_HEAD_DIM] __attribute__((aligned(32)));
    float kf[8 * PI_MAX_HEAD_DIM] __attribute__((aligned(32)));
    __m256 vm[PI_ATTN_CALL_HEADS];
    if (h1 - h0 < 1 || h1 - h0 > PI_ATTN_CALL_HEADS) __builtin_unreachable();
    for (int h = h0; h < h1; h++) {
        vm[h - h0] = _mm256_set1_ps(-INFINITY);
        if (KT == PI_Q8_0) pi_kv_round_q(KT, q + (size_t)h * hd, qh + (size_t)(h - h0) * hd, hd);
        else
            for (int j = 0; j < ND; j++) { /* f16 K: q rounded to f16; f32 K: as is */
                const __m256 x = _mm256_loadu_ps(q + (size_t)h * hd + 8 * j);
                _mm256_store_ps(qh + (size_t)(h - h0) * hd + 8 * j, KT == PI_F16 ? round_f16(x) : x);
            }
    }
    const __m256 vscale = _mm256_set1_ps(scale);
    const int g0 = h0 / rep, g1 = (h1 - 1) / rep + 1;
    for (int i0 = 0; i0 < n; i0 += 8) {
        const int nt = n - i0 < 8 ? n - i0 : 8;
        if (i0 + 16 < n) pf_rows(kb, st, i0 + 16, n - i0 - 16 < 8 ? n - i0 - 16 : 8);
        for (int g = g0; g < g1; g++) {
            const int ha = g * rep > h0 ? g * rep : h0, hb = (g + 1) * rep < h1 ? (g + 1) * rep : h1;
            if (hb - ha > 1)
                scores_block(qh - (size_t)h0 * hd, ha, hb, KT, ND, 1, kb + g * hb_bytes, st, i0, nt, vscale, kf, e, ld, vm - h0);
            else
                scores_block(qh - (size_t)h0 * hd, ha, hb, KT, ND, 0, kb + g * hb_bytes, st, i0, nt, vscale, kf, e, ld, vm - h0);
        }
    }
    const __m256 vcap = _mm256_set1_ps(softcap), vinv = _mm256_set1_ps(softcap > 0.0f ? 1.0f / softcap : 0.0f);
    for (int h = h0; h < h1; h++) { /* e = exp(s - max), sum (capped s and max: tanh keeps the order) */
        float *er = e + (size_t)h * ld;
        float mx = hmax(vm[h - h0]);
        if (softcap > 0.0f) mx = _mm256_cvtss_f32(softcap_ps(_mm256_set1_ps(mx), vcap, vinv));
        __m256 vs = _mm256_setzero_ps();
        for (int i0 = 0; i0 < n; i0 += 8) {
            const __m256i km = _mm256_castps_si256(tail_mask(n - i0));
            __m256 sc = _mm256_maskload_ps(er + i0, km);
            if (softcap > 0.0f) sc = softcap_ps(sc, vcap, vinv);
            const __m256 x = _mm256_and_ps(exp_neg(_mm256_sub_ps(sc, _mm256_set1_ps(mx))), _mm256_castsi256_ps(km));
            _mm256_maskstore_ps(er + i0, km, x);
            vs = _mm256_add_ps(vs, x);
        }
        m[h] = mx;
        l[h] = hsum(vs);
    }
}

#define SCORES_HD(KT)                                                                                              \
    switch (hd) {                                                                                                  \
    case 64: scores_nd(q, h0, h1, rep, KT, 8, kv, t0, n, scale, softcap, e, ld, m, l); break;                       \
    case 128: scores_nd(q, h0, h1, rep, KT, 16, kv, t0, n, scale, softcap, e, ld, m, l); break;                     \
    default: scores_nd(q, h0, h1, rep, KT, hd / 8, kv, t0, n, scale, softcap, e, ld, m, l);                         \
    }

static void scores(const float *q, int h0, int h1, int rep, int hd, const pi_kv_head *kv, int t0, int n, float scale,
                   float softcap, float *e, size_t ld, float *m, float *l) {
    if (hd % 8) { pi_attn_portable.scores(q, h0, h1, rep, hd, kv, t0, n, scale, softcap, e, ld, m, l); return; }
    switch (kv->ktype) {
    case PI_F32: SCORES_HD(PI_F32); break;
    case PI_Q8_0: SCORES_HD(PI_Q8_0); break;
    default: SCORES_HD(PI_F16); break;
    }
}

#define V_BLOCK 32

AI void values_vt(float *e, size_t ld, const float *f, int h0, int h1, int rep, int hd, const int VT,
                  const pi_kv_head *kv, int t0, int n, float *out) {
    for (int h = h0; h < h1; h++) { /* p = e * f in place, rounded to f16 for an f16 V */
        float *er = e + (size_t)h * ld;
        for (int i0 = 0; i0 < n; i0 += 8) {
            const __m256i km = _mm256_castps_si256(tail_mask(n - i0));
            const __m256 p = _mm256_mul_ps(_mm256_maskload_ps(er + i0, km), _mm256_set1_ps(f[h]));
            _mm256_maskstore_ps(er + i0, km, VT == PI_F16 ? round_f16(p) : p);
        }
        memset(out + (size_t)h * hd, 0, (size_t)hd * sizeof(float));
    }
    const int nd = hd / 8, g0 = h0 / rep, g1 = (h1 - 1) / rep + 1;
    const size_t st = kv->vstride;
    const uint8_t *vb = kv->v + (size_t)t0 * st;
    for (int i0 = 0; i0 < n; i0 += V_BLOCK) {
        const int nb = n - i0 < V_BLOCK ? n - i0 : V_BLOCK;
        if (i0 + V_BLOCK < n) pf_rows(vb, st, i0 + V_BLOCK, n - i0 - V_BLOCK < V_BLOCK ? n - i0 - V_BLOCK : V_BLOCK);
        for (int g = g0; g < g1; g++) {
            const int ha = g * rep > h0 ? g * rep : h0, hb = (g + 1) * rep < h1 ? (g + 1) * rep : h1;
            const uint8_t *vg = vb + pi_kv_bytes(VT, g * hd);
            for (int r0 = ha; r0 < hb; r0 += 4) { /* 4 heads x 16 dims of accumulators per pass */
                const int nr = hb - r0 < 4 ? hb - r0 : 4;
                for (int j0 = 0; j0 < nd; j0 += 2) {
                    __m256 acc[4][2];
                    for (int a = 0; a < 4; a++) {
                        acc[a][0] = a < nr ? _mm256_loadu_ps(out + (size_t)(r0 + a) * hd + 8 * j0) : _mm256_setzero_ps();
                        acc[a][1] = a < nr ? _mm256_loadu_ps(out + (size_t)(r0 + a) * hd + 8 * j0 + 8) : _mm256_setzero_ps();
                    }
                    for (int i = i0; i < i0 + nb; i++) {
                        const uint8_t *vr = row(vg, st, i);
                        const __m256 v0 = ld8(VT, vr, j0), v1 = ld8(VT, vr, j0 + 1);
                        _Pragma("GCC unroll 4") for (int a = 0; a < 4; a++) {
                            if (a < nr) {
                                const __m256 pa = _mm256_set1_ps(e[(size_t)(r0 + a) * ld + i]);
                                acc[a][0] = _mm256_fmadd_ps(pa, v0, acc[a][0]);
                                acc[a][1] = _mm256_fmadd_ps(pa, v1, acc[a][1]);
                            }
                        }
                    }
                    for (int a = 0; a < nr; a++) {
                        _mm256_storeu_ps(out + (size_t)(r0 + a) * hd + 8 * j0, acc[a][0]);
                        _mm256_storeu_ps(out + (size_t)(r0 + a) * hd + 8 * j0 + 8, acc[a][1]);
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

/* ---- prefill: a tile of up to 8 queries (lanes), one head at a time ----
 * S[pos][lane] = q_lane . K[pos] over 8-row blocks of K converted to f32 once (broadcast into the 8 queries'
 * fma chains); softmax down the lanes; probabilities normalized, rounded to f16; then O^T[d][lane] += P[pos] *
 * V[pos][d] over 8-row blocks of V, 4 dims in flight (independent chains). */
AI void tile_head(const float *q, size_t q_stride, int nq, int hd, const int KT, const int VT, const pi_kv_head *kv,
                  int pos0, float scale, float softcap, int window, float *Qt, float *kf, float *Ot, float *S, float *out,
                  size_t out_stride) {
    const int n_pos = pos0 + nq;
    /* a sliding window: rows before the first query's window are never read (lo, a multiple of 8) */
    const int lo = window > 0 && pos0 + 1 > window ? (pos0 + 1 - window) / 8 * 8 : 0;
    float qq[KT == PI_Q8_0 ? 8 * PI_ATTN_TILE_HD : 1]; /* q8_0 K: the queries quantized and dequantized */
    if (KT == PI_Q8_0) {
        for (int j = 0; j < nq; j++) pi_kv_round_q(KT, q + (size_t)j * q_stride, qq + (size_t)j * hd, hd);
        q = qq, q_stride = (size_t)hd;
    }
    for (int d = 0; d < hd; d++) {
        float col[8];
        for (int j = 0; j < 8; j++) col[j] = j < nq ? q[(size_t)j * q_stride + d] : 0.0f;
        _mm256_store_ps(Qt + 8 * d, KT == PI_F16 ? round_f16(_mm256_loadu_ps(col)) : _mm256_loadu_ps(col));
        _mm256_store_ps(Ot + 8 * d, _mm256_setzero_ps());
    }
    const __m256i lane_next = _mm256_add_epi32(_mm256_set1_epi32(pos0 + 1), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256 vscale = _mm256_set1_ps(scale), ninf = _mm256_set1_ps(-INFINITY);
    const __m256 vcap = _mm256_set1_ps(softcap), vinv = _mm256_set1_ps(softcap > 0.0f ? 1.0f / softcap : 0.0f);
    /* lane j sees rows >= pos0 + 1 + j - window */
    const __m256i lane_lo = _mm256_sub_epi32(lane_next, _mm256_set1_epi32(window > 0 ? window : 1 << 30));
    __m256 vmax = ninf;
    for (int p0 = lo; p0 < n_pos; p0 += 8) {
        const int np = n_pos - p0 < 8 ? n_pos - p0 : 8;
        for (int i = 0; i < 8; i++) { /* tail rows repeat the last (finite; masked) */
            const uint8_t *kr = row(kv->k, kv->kstride, p0 + (i < np ? i : np - 1));
            for (int j = 0; j < hd; j += 8) _mm256_store_ps(kf + i * hd + j, ld8(KT, kr, j / 8));
        }
        __m256 acc[8];
        _Pragma("GCC unroll 8") for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();
        for (int d = 0; d < hd; d++) {
            const __m256 qd = _mm256_load_ps(Qt + 8 * d);
            _Pragma("GCC unroll 8") for (int i = 0; i < 8; i++) acc[i] = _mm256_fmadd_ps(qd, _mm256_broadcast_ss(kf + i * hd + d), acc[i]);
        }
        for (int i = 0; i < np; i++) { /* causal: lane j sees positions <= pos0 + j */
            const __m256i pv = _mm256_set1_epi32(p0 + i);
            const __m256 vis = _mm256_castsi256_ps(_mm256_andnot_si256(_mm256_cmpgt_epi32(lane_lo, pv),
                                                                       _mm256_cmpgt_epi32(lane_next, pv)));
            __m256 sv = _mm256_mul_ps(acc[i], vscale);
            if (softcap > 0.0f) sv = softcap_ps(sv, vcap, vinv);
            sv = _mm256_blendv_ps(ninf, sv, vis);
            _mm256_store_ps(S + 8 * (size_t)(p0 + i), sv);
            vmax = _mm256_max_ps(vmax, sv);
        }
    }
    __m256 vsum = _mm256_setzero_ps();
    for (int p = lo; p < n_pos; p++) {
        const __m256 e = exp_neg(_mm256_sub_ps(_mm256_load_ps(S + 8 * (size_t)p), vmax));
        _mm256_store_ps(S + 8 * (size_t)p, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    const __m256 inv = _mm256_div_ps(_mm256_set1_ps(1.0f), vsum);
    for (int p = lo; p < n_pos; p++) /* masked scores were -inf: exp ~1e-38, 0 after the f16 rounding */
        _mm256_store_ps(S + 8 * (size_t)p, VT == PI_F16 ? round_f16(_mm256_mul_ps(_mm256_load_ps(S + 8 * (size_t)p), inv))
                                                        : _mm256_mul_ps(_mm256_load_ps(S + 8 * (size_t)p), inv));
    float *vf = kf;
    for (int p0 = lo; p0 < n_pos; p0 += 8) {
        const int np = n_pos - p0 < 8 ? n_pos - p0 : 8;
        __m256 P[8];
        for (int i = 0; i < 8; i++) {
            const uint8_t *vr = row(kv->v, kv->vstride, p0 + (i < np ? i : np - 1));
            for (int j = 0; j < hd; j += 8) _mm256_store_ps(vf + i * hd + j, ld8(VT, vr, j / 8));
            P[i] = i < np ? _mm256_load_ps(S + 8 * (size_t)(p0 + i)) : _mm256_setzero_ps();
        }
        for (int d = 0; d < hd; d += 4) { /* hd % 8 == 0 */
            __m256 o[4];
            _Pragma("GCC unroll 4") for (int c = 0; c < 4; c++) o[c] = _mm256_load_ps(Ot + 8 * (d + c));
            _Pragma("GCC unroll 8") for (int i = 0; i < 8; i++)
                _Pragma("GCC unroll 4") for (int c = 0; c < 4; c++) o[c] = _mm256_fmadd_ps(P[i], _mm256_broadcast_ss(vf + i * hd + d + c), o[c]);
            _Pragma("GCC unroll 4") for (int c = 0; c < 4; c++) _mm256_store_ps(Ot + 8 * (d + c), o[c]);
        }
    }
    for (int d = 0; d < hd; d++) {
        float col[8] __attribute__((aligned(32)));
        _mm256_store_ps(col, _mm256_load_ps(Ot + 8 * d));
        for (int j = 0; j < nq; j++) out[(size_t)j * out_stride + d] = col[j];
    }
}

static void tile(const float *q, size_t q_stride, int nq, int n_rep, int hd, const pi_kv_head *kv, int pos0,
                 float scale, float softcap, int window, float *scratch, float *out, size_t out_stride) {
    if (hd % 8 || hd > PI_ATTN_TILE_HD) {
        pi_attn_portable.tile(q, q_stride, nq, n_rep, hd, kv, pos0, scale, softcap, window, scratch, out,
                                  out_stride);
        return;
    }
    float *Qt = scratch, *kf = Qt + 8 * PI_ATTN_TILE_HD, *Ot = kf + 8 * PI_ATTN_TILE_HD, *S = Ot + 8 * PI_ATTN_TILE_HD;
#define TILE_KV(KT, VT)                                                                                            \
    for (int r = 0; r < n_rep; r++)                                                                                \
        tile_head(q + (size_t)r * hd, q_stride, nq, hd, KT, VT, kv, pos0, scale, softcap, window, Qt, kf, Ot, S,   \
                  out + (size_t)r * hd, out_stride)
#define TILE_V(KT)                                                                                                 \
    switch (kv->vtype) {                                                                                           \
    case PI_F32: TILE_KV(KT, PI_F32); break;                                                                       \
    case PI_Q8_0: TILE_KV(KT, PI_Q8_0); break;                                                                     \
    default: TILE_KV(KT, PI_F16); break;                                                                           \
    }
    switch (kv->ktype) {
    case PI_F32: TILE_V(PI_F32); break;
    case PI_Q8_0: TILE_V(PI_Q8_0); break;
    default: TILE_V(PI_F16); break;
    }
}

const pi_attn_ops pi_attn_avx2 = {scores, values, tile, 8};

#pragma GCC pop_options
#endif
