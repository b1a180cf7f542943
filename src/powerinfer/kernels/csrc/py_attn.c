/* powerinfer._C attention entry points (attn.h), for the parity tests and the kernel bench: the decode split-K
 * driver and the prefill tiles on caller-owned arrays, with the kernel set selected by set_isa. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "attn.h"
#include "pool.h"
#include "pybind.h"

static pi_pool *a_pool;

static int ensure_pool(int nth) {
    if (a_pool && pi_pool_size(a_pool) != nth) { pi_pool_free(a_pool); a_pool = NULL; }
    if (!a_pool) a_pool = pi_pool_new(nth);
    return a_pool ? 0 : -1;
}

static void pool_barrier(void *ctx, int ith) { pi_barrier(ctx, ith); }

typedef struct {
    int kind; /* 0 decode, 1 prefill */
    pi_attn_decode_args d;
    /* prefill */
    const float *q;
    float *out, *scratch[64];
    int n, pos0;
} attn_job;

static void attn_job_fn(void *arg, int ith, int nth) {
    attn_job *j = arg;
    if (j->kind == 0) {
        pi_attn_decode(&j->d, ith, nth);
        return;
    }
    const pi_attn_decode_args *d = &j->d;
    const size_t qd = (size_t)d->n_head * d->hd;
    pi_attn_prefill(d->ops, j->q, qd, j->n, j->pos0, d->n_head, d->n_head_kv, d->hd, d->kv_type, d->k, d->v,
                    d->kv_dim, d->scale, d->softcap, d->window, j->scratch[ith], j->out, qd, ith, nth);
}

/* attention(kind, q_ptr, n_tok, pos0, n_head, n_head_kv, head_dim, k_ptr, v_ptr, n_ctx, out_ptr, n_threads, iters
 * [, softcap, window, k_type, v_type]) -> ns per call (softcap, window: attn.h; 0 = none). kind 0 (decode): q [n_head*hd]
 * against cache rows 0..pos0 (n_tok must be 1); kind 1 (prefill): q [n_tok][n_head*hd] at positions pos0.. against
 * rows 0..pos0+n_tok-1. Caches [n_ctx] rows of n_head_kv*hd values in k_type / v_type (GGML ids; default F16). */
static PyObject *py_attention(PyObject *self, PyObject *args) {
    int kind, n_tok, pos0, nh, nkv, hd, n_ctx, nth, iters, window = 0, kt = PI_F16, vt = PI_F16;
    float softcap = 0.0f;
    void *q, *k, *v, *out;
    if (!PyArg_ParseTuple(args, "iO&iiiiiO&O&iO&ii|fiii", &kind, pi_conv_ptr, &q, &n_tok, &pos0, &nh, &nkv, &hd,
                          pi_conv_ptr, &k, pi_conv_ptr, &v, &n_ctx, pi_conv_ptr, &out, &nth, &iters, &softcap,
                          &window, &kt, &vt))
        return NULL;
    if (!q || !k || !v || !out || (kind != 0 && kind != 1) || n_tok < 1 || pos0 < 0 || nh < 1 || nkv < 1 ||
        nh % nkv || hd < 1 || hd > PI_MAX_HEAD_DIM || pos0 + n_tok > n_ctx || (kind == 0 && n_tok != 1) ||
        iters < 1 || nth < 1 || nth > 64 || !(softcap >= 0.0f) || window < 0 || !pi_kv_format_ok(kt, hd) ||
        !pi_kv_format_ok(vt, hd))
        return PyErr_Format(PyExc_ValueError, "bad attention arguments");
    attn_job j = {.kind = kind, .q = q, .out = out, .n = n_tok, .pos0 = pos0};
    pi_attn_ws ws = {0};
    int rc = 0;
    double ns = 0.0;
    Py_BEGIN_ALLOW_THREADS
    j.d = (pi_attn_decode_args){pi_attn_ops_for(PI_KV_TYPE(kt, vt)), nh, nkv, hd, pos0 + 1, PI_KV_TYPE(kt, vt), k, v,
                                nkv * hd, q, out, &ws, pool_barrier, NULL, 0.0f, softcap, window};
    rc = kind == 0 ? pi_attn_ws_init(&ws, n_ctx, nh, hd, nth) : 0;
    for (int t = 0; t < nth && !rc; t++)
        if (kind == 1 && !(j.scratch[t] = pi_aligned_alloc(pi_attn_tile_floats(hd, n_ctx) * 4))) rc = -1;
    if (!rc) rc = ensure_pool(nth);
    if (!rc) {
        j.d.ctx = a_pool;
        const uint64_t t0 = pi_now_ns();
        for (int i = 0; i < iters; i++) pi_pool_run(a_pool, attn_job_fn, &j);
        ns = (double)(pi_now_ns() - t0) / iters;
    }
    for (int t = 0; t < nth; t++) pi_aligned_free(j.scratch[t]);
    pi_attn_ws_free(&ws);
    Py_END_ALLOW_THREADS
    if (rc) return PyErr_NoMemory();
    return PyFloat_FromDouble(ns);
}

static PyMethodDef attn_methods[] = {
    {"attention", py_attention, METH_VARARGS,
     "attention(kind, q_ptr, n_tok, pos0, n_head, n_head_kv, head_dim, k_ptr, v_ptr, n_ctx, out_ptr, n_threads, "
     "iters[, softcap, window, k_type, v_type]) -> ns per call; kind 0: decode split-K at position pos0, 1: prefill "
     "tiles for positions pos0..; softcap: scores capped to softcap*tanh(s/softcap), window: the last `window` rows "
     "only; k_type/v_type: GGML ids of the cache formats (F32 0, F16 1, Q8_0 8; default F16)"},
    {NULL, NULL, 0, NULL},
};

int pi_add_attention_functions(PyObject *module) { return PyModule_AddFunctions(module, attn_methods); }
