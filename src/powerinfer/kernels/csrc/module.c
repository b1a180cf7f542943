/* powerinfer._C: plain CPython extension (no torch/numpy headers); pointers arrive as Python ints.
 * Module functions: isa, set_isa, cpu_features, dequantize, quantize_act, matvec, matmul; type Decoder
 * (py_decoder.c). Every call that computes releases the GIL. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>

#include "pi.h"
#include "panels.h"
#include "pool.h"
#include "pybind.h"

int pi_conv_ptr(PyObject *o, void *out) {
    if (o == Py_None) { *(void **)out = NULL; return 1; }
    void *p = PyLong_AsVoidPtr(o);
    if (p == NULL && PyErr_Occurred()) return 0;
    *(void **)out = p;
    return 1;
}

static int check_qtype(int qtype) {
    if (pi_row_bytes(qtype, PI_QK_K) == 0) {
        PyErr_Format(PyExc_ValueError, "unsupported ggml type id %d (native: 0 F32, 1 F16, 2 Q4_0, 3 Q4_1, 8 Q8_0, "
                     "12 Q4_K, 13 Q5_K, 14 Q6_K, 30 BF16)", qtype);
        return -1;
    }
    return 0;
}

static PyObject *py_isa(PyObject *self, PyObject *args) { return PyUnicode_FromString(pi_k->name); }

static PyObject *py_set_isa(PyObject *self, PyObject *args) {
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    if (pi_select_isa(name)) return PyErr_Format(PyExc_ValueError, "ISA '%s' is unknown or not supported by this CPU", name);
    return PyUnicode_FromString(pi_k->name);
}

static PyObject *py_cpu_features(PyObject *self, PyObject *args) {
    static const char *names[] = {"sse4.2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
                                  "avx512dq", "avx512vnni", "avx512bf16"};
    PyObject *d = PyDict_New();
    if (!d) return NULL;
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        PyObject *v = PyBool_FromLong(pi_cpu_feature(names[i]));
        PyDict_SetItemString(d, names[i], v);
        Py_DECREF(v);
    }
    return d;
}

static PyObject *py_dequantize(PyObject *self, PyObject *args) {
    int qtype;
    void *src, *dst;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "iO&nO&", &qtype, pi_conv_ptr, &src, &n, pi_conv_ptr, &dst)) return NULL;
    if (check_qtype(qtype)) return NULL;
    if (!src || !dst || n < 0) return PyErr_Format(PyExc_ValueError, "null pointer or negative length");
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = pi_dequantize(qtype, src, (size_t)n, dst);
    Py_END_ALLOW_THREADS
    if (rc) return PyErr_Format(PyExc_ValueError, "n_values must be a multiple of 32 for block formats");
    Py_RETURN_NONE;
}

/* quantize_act(x_ptr, n, qs_ptr, d_ptr, s_ptr, sum_ptr): the q8 activation form (tests, bench). */
static PyObject *py_quantize_act(PyObject *self, PyObject *args) {
    void *x, *qs, *d, *s, *sum;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "O&nO&O&O&O&", pi_conv_ptr, &x, &n, pi_conv_ptr, &qs, pi_conv_ptr, &d,
                          pi_conv_ptr, &s, pi_conv_ptr, &sum))
        return NULL;
    if (n % PI_QK || !x || !qs || !d || !s || !sum) return PyErr_Format(PyExc_ValueError, "n must be a multiple of 32, pointers non-null");
    Py_BEGIN_ALLOW_THREADS
    pi_k->quant_q8(x, (int)(n / PI_QK), qs, d, s, sum);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ---- standalone matvec / matmul on a shared pool ---- */
static pi_pool *g_pool;
static pthread_mutex_t g_pool_mu = PTHREAD_MUTEX_INITIALIZER;

typedef struct { const pi_mat *m; const pi_act *a; int n_tok; float *y; } mm_args;

static void mm_job(void *varg, int ith, int nth) {
    mm_args *s = varg;
    int u0, u1;
    pi_split(pi_mat_units(s->m), ith, nth, &u0, &u1);
    pi_mat_run_units(s->m, u0, u1, s->a, s->n_tok, s->y, s->m->rows);
}

static PyObject *run_mm(int qtype, const void *w, int rows, int cols, const float *x, int n_tok, float *y,
                        int nth, int pack, int iters, double *ns_per_call) {
    if (check_qtype(qtype)) return NULL;
    if (!w || !x || !y || rows <= 0 || cols <= 0 || n_tok <= 0) return PyErr_Format(PyExc_ValueError, "bad pointer or shape");
    if (pi_need_of(qtype) == PI_NEED_Q8 && cols % PI_QK) return PyErr_Format(PyExc_ValueError, "cols must be a multiple of 32");
    if (pi_is_kquant(qtype) && cols % PI_QK_K) return PyErr_Format(PyExc_ValueError, "K-quants need cols a multiple of 256");
    if (nth < 1) nth = 1;
    pi_mat m;
    const int need = pi_need_of(qtype);
    void *mem = NULL;
    int rc = 0;
    Py_BEGIN_ALLOW_THREADS
    rc = pi_mat_init(&m, qtype, w, rows, cols, pack);
    if (!rc) mem = pi_aligned_alloc(pi_act_bytes(cols, n_tok, need));
    if (!rc && mem) {
        pi_act a;
        pi_act_bind(&a, mem, cols, n_tok, need);
        for (int t = 0; t < n_tok; t++) pi_act_fill(&a, x + (size_t)t * cols, t, 0, cols, need);
        mm_args s = {&m, &a, n_tok, y};
        pthread_mutex_lock(&g_pool_mu);
        if (g_pool && pi_pool_size(g_pool) != nth) { pi_pool_free(g_pool); g_pool = NULL; }
        if (!g_pool) g_pool = pi_pool_new(nth);
        if (g_pool) {
            pi_pool_run(g_pool, mm_job, &s); /* warm */
            const uint64_t t0 = pi_now_ns();
            for (int i = 0; i < iters; i++) pi_pool_run(g_pool, mm_job, &s);
            if (ns_per_call) *ns_per_call = iters > 0 ? (double)(pi_now_ns() - t0) / iters : 0.0;
        } else rc = -1;
        pthread_mutex_unlock(&g_pool_mu);
    } else rc = -1;
    pi_aligned_free(mem);
    pi_mat_free(&m);
    Py_END_ALLOW_THREADS
    if (rc) return PyErr_NoMemory();
    if (ns_per_call) return PyFloat_FromDouble(*ns_per_call);
    Py_RETURN_NONE;
}

static PyObject *py_matvec(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kws[] = {"qtype", "w_ptr", "rows", "cols", "x_ptr", "y_ptr", "n_threads", "packed", NULL};
    int qtype, rows, cols, nth = 1, packed = 0;
    void *w, *x, *y;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iO&iiO&O&|ip", kws, &qtype, pi_conv_ptr, &w, &rows, &cols,
                                     pi_conv_ptr, &x, pi_conv_ptr, &y, &nth, &packed))
        return NULL;
    return run_mm(qtype, w, rows, cols, x, 1, y, nth, packed, 0, NULL);
}

static PyObject *py_matmul(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kws[] = {"qtype", "w_ptr", "rows", "cols", "x_ptr", "n_tok", "y_ptr", "n_threads", NULL};
    int qtype, rows, cols, n_tok, nth = 1;
    void *w, *x, *y;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iO&iiO&iO&|i", kws, &qtype, pi_conv_ptr, &w, &rows, &cols,
                                     pi_conv_ptr, &x, &n_tok, pi_conv_ptr, &y, &nth))
        return NULL;
    return run_mm(qtype, w, rows, cols, x, n_tok, y, nth, 1, 0, NULL);
}

/* bench_mm(qtype, w_ptr, rows, cols, x_ptr, n_tok, y_ptr, n_threads, packed, iters) -> ns per call of the
 * kernels alone (weights packed and activations quantized once, outside the timing). */
static PyObject *py_bench_mm(PyObject *self, PyObject *args) {
    int qtype, rows, cols, n_tok, nth, packed, iters;
    void *w, *x, *y;
    if (!PyArg_ParseTuple(args, "iO&iiO&iO&ipi", &qtype, pi_conv_ptr, &w, &rows, &cols, pi_conv_ptr, &x, &n_tok,
                          pi_conv_ptr, &y, &nth, &packed, &iters))
        return NULL;
    double ns = 0.0;
    return run_mm(qtype, w, rows, cols, x, n_tok, y, nth, packed, iters < 1 ? 1 : iters, &ns);
}

/* quantize_q8_0(x_ptr, n, dst_ptr): Q8_0 blocks (d f16 + 32 int8) of n f32 values, ggml's x86 rounding. */
static PyObject *py_quantize_q8_0(PyObject *self, PyObject *args) {
    void *x, *dst;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "O&nO&", pi_conv_ptr, &x, &n, pi_conv_ptr, &dst)) return NULL;
    if (n % PI_QK || !x || !dst) return PyErr_Format(PyExc_ValueError, "n must be a multiple of 32, pointers non-null");
    Py_BEGIN_ALLOW_THREADS
    int8_t qs[PI_QK];
    float d, s;
    int32_t sum;
    pi_blk_q8_0 *out = dst;
    for (Py_ssize_t b = 0; b < n / PI_QK; b++) {
        pi_k->quant_q8((const float *)x + b * PI_QK, 1, qs, &d, &s, &sum);
        out[b].d = pi_fp32_to_fp16(d); /* d is already f16-rounded: exact */
        memcpy(out[b].qs, qs, PI_QK);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* make_panels(qtype, src_ptr, rows, cols, dst_ptr): the neuron panels (panels.h) of a GGUF-layout Q4_0/Q4_1/Q8_0
 * matrix [rows = d, cols = n_ff], the same bytes regrouped: type pi_panels_of(qtype), [cols, rows]. */
static PyObject *py_make_panels(PyObject *self, PyObject *args) {
    int qtype, rows, cols, rc;
    void *src, *dst;
    if (!PyArg_ParseTuple(args, "iO&iiO&", &qtype, pi_conv_ptr, &src, &rows, &cols, pi_conv_ptr, &dst)) return NULL;
    if (!src || !dst || rows <= 0 || cols <= 0) return PyErr_Format(PyExc_ValueError, "bad pointer or shape");
    Py_BEGIN_ALLOW_THREADS
    rc = pi_make_panels(qtype, src, rows, cols, dst);
    Py_END_ALLOW_THREADS
    if (rc) return PyErr_Format(PyExc_ValueError, "make_panels: type %d [%d, %d] has no panels (Q4_0, Q4_1, Q8_0 with "
                                "both sizes multiples of 32)", qtype, rows, cols);
    Py_RETURN_NONE;
}

/* transpose_q8_0(qtype, src_ptr, rows, cols, dst_ptr): the [cols, rows] Q8_0 copy of a GGUF-layout matrix
 * (down_proj -> down_t). One 32-column strip at a time: the strip's block of every source row is dequantized
 * into a [rows][32] tile (512 KB at rows = 4096; the source lines stay in cache for the next strip), then its 32
 * output rows are written whole, in order. The values and roundings are those of dequantize, transpose,
 * quantize_q8_0, bit for bit, without their full-size f32 temporaries: 7B down_proj 0.26 s per layer that way,
 * 0.16 s tiling source rows (each output block then lands on another line), about 0.05 s in strips. */
static PyObject *py_transpose_q8_0(PyObject *self, PyObject *args) {
    int qtype, rows, cols;
    void *src, *dst;
    if (!PyArg_ParseTuple(args, "iO&iiO&", &qtype, pi_conv_ptr, &src, &rows, &cols, pi_conv_ptr, &dst)) return NULL;
    if (check_qtype(qtype)) return NULL;
    const int sw = pi_is_kquant(qtype) ? PI_QK_K : PI_QK; /* strip width: one block of the source */
    if (!src || !dst || rows <= 0 || cols <= 0 || rows % PI_QK || cols % sw)
        return PyErr_Format(PyExc_ValueError, "rows must be a positive multiple of 32 and cols of %d, pointers non-null", sw);
    float *tile = pi_aligned_alloc((size_t)rows * sw * sizeof(float));
    if (!tile) return PyErr_NoMemory();
    const size_t row_bytes = pi_row_bytes(qtype, cols), blk_bytes = pi_row_bytes(qtype, sw);
    const size_t nb = (size_t)rows / PI_QK;
    Py_BEGIN_ALLOW_THREADS
    pi_blk_q8_0 *out = dst;
    for (int cb = 0; cb < cols / sw; cb++) {
        const uint8_t *strip = (const uint8_t *)src + (size_t)cb * blk_bytes;
        for (int r = 0; r < rows; r++) pi_dequantize(qtype, strip + (size_t)r * row_bytes, sw, tile + (size_t)r * sw);
        for (int k = 0; k < sw; k++) {
            pi_blk_q8_0 *o = out + ((size_t)cb * sw + k) * nb;
            for (size_t rb = 0; rb < nb; rb++) {
                float col[PI_QK], d, s;
                int8_t qs[PI_QK];
                int32_t sum;
                for (int i = 0; i < PI_QK; i++) col[i] = tile[(rb * PI_QK + i) * sw + k];
                pi_k->quant_q8(col, 1, qs, &d, &s, &sum);
                o[rb].d = pi_fp32_to_fp16(d); /* d is already f16-rounded: exact */
                memcpy(o[rb].qs, qs, PI_QK);
            }
        }
    }
    Py_END_ALLOW_THREADS
    pi_aligned_free(tile);
    Py_RETURN_NONE;
}

/* ---- row-sparse kernels (tests and kernels bench) ---- */
static int check_idx(const int32_t *idx, int n, int rows) {
    for (int j = 0; j < n; j++)
        if (idx[j] < 0 || idx[j] >= rows) {
            PyErr_Format(PyExc_IndexError, "row index %d out of range (rows %d)", idx[j], rows);
            return -1;
        }
    return 0;
}

/* Threads split the index list as the decoder does: each computes its slice (gather) or its slice's sum into
 * its own y (axpy; the sums are added afterwards). */
enum { BS_DENSE = 0, BS_GATHER = 1, BS_AXPY = 2 }; /* bench_sparse's kind codes */
typedef struct {
    int kind, nw, ni, n, iters, c0, c1;
    pi_mat *mats;
    const int32_t **idx;
    const pi_act *a;
    const float *h;
    float *y, **yp;
} bs_args;

static void bs_job(void *varg, int ith, int nth) {
    bs_args *s = varg;
    for (int it = 0; it < s->iters; it++) {
        const pi_mat *m = &s->mats[it % s->nw];
        const int32_t *idx = s->ni ? s->idx[it % s->ni] : NULL;
        int j0, j1;
        if (s->kind == BS_DENSE) {
            int u0, u1;
            pi_split(pi_mat_units(m), ith, nth, &u0, &u1);
            pi_mat_run_units(m, u0, u1, s->a, 1, s->y, m->rows);
        } else if (s->kind == BS_GATHER) {
            pi_split(s->n, ith, nth, &j0, &j1);
            pi_mat_gather(m, idx + j0, j1 - j0, s->a, s->y + j0);
        } else {
            pi_split(s->n, ith, nth, &j0, &j1);
            memset(s->yp[ith], 0, (size_t)m->cols * sizeof(float));
            pi_mat_axpy(m, idx + j0, s->h + j0, j1 - j0, s->c0, s->c1, s->yp[ith]);
        }
    }
}

/* Run job on the shared pool of nth threads (after one untimed call when warm); ns <- time of the timed one. */
static int run_pool(int nth, void (*job)(void *, int, int), void *arg, int warm, uint64_t *ns) {
    pthread_mutex_lock(&g_pool_mu);
    if (g_pool && pi_pool_size(g_pool) != nth) { pi_pool_free(g_pool); g_pool = NULL; }
    if (!g_pool) g_pool = pi_pool_new(nth);
    int rc = -1;
    if (g_pool) {
        if (warm) pi_pool_run(g_pool, job, arg);
        const uint64_t t0 = pi_now_ns();
        pi_pool_run(g_pool, job, arg);
        if (ns) *ns = pi_now_ns() - t0;
        rc = 0;
    }
    pthread_mutex_unlock(&g_pool_mu);
    return rc;
}

/* The checks and the threaded run shared by sparse_gather (vec = x [cols], y [n]) and sparse_axpy (vec = h [n],
 * y [cols] += the per-thread sums over [c0, c1)). */
static PyObject *sparse_call(int kind, int qtype, void *w, int rows, int cols, void *idx, int n, void *vec, void *y,
                             int nth, int c0, int c1) {
    if (check_qtype(qtype)) return NULL;
    if (!w || !y || (n > 0 && (!idx || !vec)) || rows <= 0 || cols <= 0 || n < 0)
        return PyErr_Format(PyExc_ValueError, "bad pointer or shape");
    if (kind == BS_AXPY && (c0 < 0 || c1 > cols || c0 > c1))
        return PyErr_Format(PyExc_ValueError, "column range [%d, %d) outside [0, %d)", c0, c1, cols);
    if ((pi_need_of(qtype) == PI_NEED_Q8 || pi_panel_base(qtype) >= 0) &&
        (cols % PI_QK || (kind == BS_AXPY && (c0 % PI_QK || c1 % PI_QK))))
        return PyErr_Format(PyExc_ValueError, "block formats need cols (and c0, c1) multiples of 32");
    if (pi_is_kquant(qtype) && (cols % PI_QK_K || (kind == BS_AXPY && (c0 % PI_QK_K || c1 % PI_QK_K))))
        return PyErr_Format(PyExc_ValueError, "K-quants need cols (and c0, c1) multiples of 256");
    if (check_idx(idx, n, rows)) return NULL;
    if (nth < 1) nth = 1;
    const int need = pi_need_of(qtype);
    pi_mat m;
    pi_act a;
    void *amem = kind == BS_GATHER ? pi_aligned_alloc(pi_act_bytes(cols, 1, need)) : NULL;
    float **yp = calloc((size_t)nth, sizeof(float *));
    int ok = yp && (kind == BS_AXPY || amem) && !pi_mat_init(&m, qtype, w, rows, cols, 0);
    for (int t = 0; ok && kind == BS_AXPY && t < nth; t++) ok = (yp[t] = pi_aligned_alloc((size_t)cols * 4)) != NULL;
    if (ok) {
        const int32_t *ip = idx;
        bs_args s = {kind, 1, 1, n, 1, c0, c1, &m, &ip, &a, vec, y, yp};
        Py_BEGIN_ALLOW_THREADS
        if (kind == BS_GATHER) {
            pi_act_bind(&a, amem, cols, 1, need);
            pi_act_fill(&a, vec, 0, 0, cols, need);
        }
        ok = !run_pool(nth, bs_job, &s, 0, NULL);
        if (ok && kind == BS_AXPY)
            for (int t = 0; t < nth; t++)
                for (int c = c0; c < c1; c++) ((float *)y)[c] += yp[t][c];
        Py_END_ALLOW_THREADS
    }
    for (int t = 0; yp && t < nth; t++) pi_aligned_free(yp[t]);
    free(yp);
    pi_aligned_free(amem);
    if (!ok) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* sparse_gather(qtype, w_ptr, rows, cols, idx_ptr, n, x_ptr, y_ptr, n_threads): y[j] = W[idx[j]] . x (ggml
 * activation numerics). */
static PyObject *py_sparse_gather(PyObject *self, PyObject *args) {
    int qtype, rows, cols, n, nth;
    void *w, *idx, *x, *y;
    if (!PyArg_ParseTuple(args, "iO&iiO&iO&O&i", &qtype, pi_conv_ptr, &w, &rows, &cols, pi_conv_ptr, &idx, &n,
                          pi_conv_ptr, &x, pi_conv_ptr, &y, &nth))
        return NULL;
    return sparse_call(BS_GATHER, qtype, w, rows, cols, idx, n, x, y, nth, 0, 0);
}

/* sparse_axpy(qtype, w_ptr, rows, cols, idx_ptr, n, h_ptr, y_ptr, n_threads, c0, c1):
 * y[c0:c1] += sum_j h[j] W[idx[j]][c0:c1] (W neuron-major). */
static PyObject *py_sparse_axpy(PyObject *self, PyObject *args) {
    int qtype, rows, cols, n, nth, c0, c1;
    void *w, *idx, *h, *y;
    if (!PyArg_ParseTuple(args, "iO&iiO&iO&O&iii", &qtype, pi_conv_ptr, &w, &rows, &cols, pi_conv_ptr, &idx, &n,
                          pi_conv_ptr, &h, pi_conv_ptr, &y, &nth, &c0, &c1))
        return NULL;
    return sparse_call(BS_AXPY, qtype, w, rows, cols, idx, n, h, y, nth, c0, c1);
}

/* bench_sparse(kind, qtype, w_ptrs, rows, cols, idx_ptrs, n, vec_ptr, n_threads, iters) -> ns per call.
 * kind 0: dense matvec on the packed copy of each weight copy (our dense path); 1: gather (row-sparse dot,
 * vec = x [cols]); 2: axpy (vec = h [n], y [cols] per thread, summed like the decoder does). Call i uses weight
 * copy i % len(w_ptrs) and index set i % len(idx_ptrs), so with enough copies the weights come from DRAM.
 * Threads split the work as the decoder does: rows (dense), the index list (gather, axpy). */
static PyObject *py_bench_sparse(PyObject *self, PyObject *args) {
    int kind, qtype, rows, cols, n, nth, iters;
    PyObject *ows, *ois;
    void *vec;
    if (!PyArg_ParseTuple(args, "iiOiiOiO&ii", &kind, &qtype, &ows, &rows, &cols, &ois, &n, pi_conv_ptr, &vec, &nth,
                          &iters))
        return NULL;
    if (check_qtype(qtype)) return NULL;
    if (kind < 0 || kind > 2 || !PyTuple_Check(ows) || !PyTuple_Check(ois) || PyTuple_GET_SIZE(ows) < 1 ||
        (kind && PyTuple_GET_SIZE(ois) < 1) || !vec || rows <= 0 || cols <= 0 || iters < 1 || n < 0)
        return PyErr_Format(PyExc_ValueError, "bad arguments");
    if (nth < 1) nth = 1;
    const int nw = (int)PyTuple_GET_SIZE(ows), ni = (int)PyTuple_GET_SIZE(ois);
    const int need = pi_need_of(qtype), vcols = kind == BS_AXPY ? rows : cols;
    (void)vcols;
    bs_args s = {kind, nw, ni, n, iters, 0, cols, calloc(nw, sizeof(pi_mat)), calloc(ni ? ni : 1, sizeof(int32_t *)),
                 NULL, vec, NULL, calloc(nth, sizeof(float *))};
    void *amem = pi_aligned_alloc(pi_act_bytes(cols, 1, need));
    float *y = pi_aligned_alloc((size_t)(rows > n ? rows : n) * 4);
    int ok = s.mats && s.idx && s.yp && amem && y;
    for (int i = 0; ok && i < nw; i++) {
        void *p = PyLong_AsVoidPtr(PyTuple_GET_ITEM(ows, i));
        ok = p && !pi_mat_init(&s.mats[i], qtype, p, rows, cols, kind == 0);
    }
    for (int i = 0; ok && i < ni; i++) {
        s.idx[i] = PyLong_AsVoidPtr(PyTuple_GET_ITEM(ois, i));
        ok = s.idx[i] && !check_idx(s.idx[i], n, rows);
    }
    for (int t = 0; ok && t < nth; t++) ok = (s.yp[t] = pi_aligned_alloc((size_t)cols * 4)) != NULL;
    double ns = -1.0;
    if (ok) {
        pi_act a;
        pi_act_bind(&a, amem, cols, 1, need);
        if (kind != BS_AXPY) pi_act_fill(&a, vec, 0, 0, cols, need);
        s.a = &a;
        s.y = y;
        Py_BEGIN_ALLOW_THREADS
        const int it = s.iters;
        s.iters = 1;
        uint64_t t = 0;
        if (!run_pool(nth, bs_job, &s, 1, NULL)) { /* warm-up call, then the timed loop */
            s.iters = it;
            if (!run_pool(nth, bs_job, &s, 0, &t)) ns = (double)t / it;
        }
        Py_END_ALLOW_THREADS
    }
    for (int i = 0; s.mats && i < nw; i++) pi_mat_free(&s.mats[i]);
    for (int t = 0; s.yp && t < nth; t++) pi_aligned_free(s.yp[t]);
    free(s.mats); free(s.idx); free(s.yp);
    pi_aligned_free(amem); pi_aligned_free(y);
    if (PyErr_Occurred()) return NULL;
    if (ns < 0) return PyErr_NoMemory();
    return PyFloat_FromDouble(ns);
}

/* read_bandwidth(ptr, n_bytes, n_threads, iters) -> ns per pass of an AVX-512/AVX2 sum over the buffer:
 * the DRAM bandwidth the kernels bench compares against. */
typedef struct { const uint8_t *p; size_t n; int iters; volatile double sink; } rb_args;
static void rb_job(void *varg, int ith, int nth) {
    rb_args *s = varg;
    size_t a = s->n * ith / nth, b = s->n * (ith + 1) / nth;
    a &= ~(size_t)63; b &= ~(size_t)63;
    s->sink += pi_read_sum(s->p + a, b - a, s->iters);
}

static PyObject *py_read_bandwidth(PyObject *self, PyObject *args) {
    void *p;
    Py_ssize_t n;
    int nth, iters;
    if (!PyArg_ParseTuple(args, "O&nii", pi_conv_ptr, &p, &n, &nth, &iters)) return NULL;
    if (!p || n < 4096 || iters < 1) return PyErr_Format(PyExc_ValueError, "bad buffer or iteration count");
    if (nth < 1) nth = 1;
    rb_args s = {p, (size_t)n, 1, 0.0};
    double ns = -1.0;
    uint64_t t = 0;
    Py_BEGIN_ALLOW_THREADS
    if (!run_pool(nth, rb_job, &s, 1, NULL)) {
        s.iters = iters;
        if (!run_pool(nth, rb_job, &s, 0, &t)) ns = (double)t / iters;
    }
    Py_END_ALLOW_THREADS
    if (ns < 0) return PyErr_NoMemory();
    return PyFloat_FromDouble(ns);
}

static PyMethodDef methods[] = {
    {"isa", py_isa, METH_NOARGS, "isa() -> name of the kernel set in use"},
    {"set_isa", py_set_isa, METH_VARARGS, "set_isa(name): force 'avx512' | 'avx2' | 'portable' | 'auto'"},
    {"cpu_features", py_cpu_features, METH_NOARGS, "cpu_features() -> {feature: bool}"},
    {"dequantize", py_dequantize, METH_VARARGS, "dequantize(qtype, src_ptr, n_values, dst_ptr): to f32"},
    {"quantize_act", py_quantize_act, METH_VARARGS,
     "quantize_act(x_ptr, n, qs_ptr, d_ptr, s_ptr, sum_ptr): q8_1 activation blocks (int8, f32, f32, int32)"},
    {"matvec", (PyCFunction)(void (*)(void))py_matvec, METH_VARARGS | METH_KEYWORDS,
     "matvec(qtype, w_ptr, rows, cols, x_ptr, y_ptr, n_threads=1, packed=False): y = W x (ggml numerics)"},
    {"matmul", (PyCFunction)(void (*)(void))py_matmul, METH_VARARGS | METH_KEYWORDS,
     "matmul(qtype, w_ptr, rows, cols, x_ptr, n_tok, y_ptr, n_threads=1): Y[n_tok, rows] = X W^T"},
    {"bench_mm", py_bench_mm, METH_VARARGS,
     "bench_mm(qtype, w_ptr, rows, cols, x_ptr, n_tok, y_ptr, n_threads, packed, iters) -> ns per kernel call"},
    {"quantize_q8_0", py_quantize_q8_0, METH_VARARGS, "quantize_q8_0(x_ptr, n, dst_ptr): Q8_0 blocks of n f32 values"},
    {"make_panels", py_make_panels, METH_VARARGS,
     "make_panels(qtype, src_ptr, rows, cols, dst_ptr): neuron panels of a [rows, cols] Q4_0/Q4_1/Q8_0 matrix"},
    {"transpose_q8_0", py_transpose_q8_0, METH_VARARGS,
     "transpose_q8_0(qtype, src_ptr, rows, cols, dst_ptr): the [cols, rows] Q8_0 copy of a GGUF-layout matrix"},
    {"sparse_gather", py_sparse_gather, METH_VARARGS,
     "sparse_gather(qtype, w_ptr, rows, cols, idx_ptr, n, x_ptr, y_ptr, n_threads): y[j] = W[idx[j]] . x"},
    {"sparse_axpy", py_sparse_axpy, METH_VARARGS,
     "sparse_axpy(qtype, w_ptr, rows, cols, idx_ptr, n, h_ptr, y_ptr, n_threads, c0, c1): "
     "y[c0:c1] += sum_j h[j] W[idx[j]][c0:c1]"},
    {"bench_sparse", py_bench_sparse, METH_VARARGS,
     "bench_sparse(kind, qtype, w_ptrs, rows, cols, idx_ptrs, n, vec_ptr, n_threads, iters) -> ns per call "
     "(kind 0 dense packed matvec, 1 gather, 2 axpy)"},
    {"read_bandwidth", py_read_bandwidth, METH_VARARGS,
     "read_bandwidth(ptr, n_bytes, n_threads, iters) -> ns per full read of the buffer"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_C", "powerinfer C kernels", -1, methods};

PyMODINIT_FUNC PyInit__C(void) {
    pi_init_tables();
    pi_select_isa("auto");
    PyObject *m = PyModule_Create(&moddef);
    if (!m) return NULL;
    if (pi_add_decoder_type(m) < 0) { Py_DECREF(m); return NULL; }
    if (pi_add_attention_functions(m) < 0) { Py_DECREF(m); return NULL; }
    return m;
}
