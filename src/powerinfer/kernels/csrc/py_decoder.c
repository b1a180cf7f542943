/* Python type powerinfer._C.Decoder wrapping pi_decoder (decoder.h). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>

#include "decoder.h"
#include "pybind.h"

typedef struct {
    PyObject_HEAD
    PyObject *dict; /* instance __dict__: kernels.bind_decoder keeps the bound arrays alive there */
    pi_decoder *D;
    int rope_set, head_set, busy;
    unsigned char *kv_set;
} DecoderObject;

static const char *PHASE_NAMES[PH_N] = {"attn_proj_ns", "attn_core_ns", "o_proj_ns", "ffn_ns", "head_ns", "barrier_ns"};

static int Decoder_init(DecoderObject *self, PyObject *args, PyObject *kw) {
    static char *kws[] = {"n_layer", "d_model", "n_head", "n_head_kv", "head_dim", "n_ff", "n_vocab", "norm_eps",
                          "rope_dim", "rope_style", "activation", "ffn_kind", "n_ctx", "n_threads", "ffn_only", NULL};
    int nl, d, nh, nkv, hd, nff, nv, rd, rs, act, fk, nctx, nth = 1, ffn_only = 0;
    float eps;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iiiiiiifiiiii|ip", kws, &nl, &d, &nh, &nkv, &hd, &nff, &nv, &eps, &rd,
                                     &rs, &act, &fk, &nctx, &nth, &ffn_only))
        return -1;
    if (rs < 0 || rs > 1 || act < 0 || act > 3 || fk < 0 || fk > 2) {
        PyErr_SetString(PyExc_ValueError, "rope_style 0|1, activation 0|1|2|3, ffn_kind 0|1|2");
        return -1;
    }
    if (self->D) { pi_decoder_free(self->D); self->D = NULL; }
    free(self->kv_set);
    self->D = pi_decoder_new(nl, d, nh, nkv, hd, nff, nv, eps, rd, rs, act, fk, nctx, nth);
    self->kv_set = calloc((size_t)(nl > 0 ? nl : 1), 1);
    if (!self->D || !self->kv_set) {
        PyErr_SetString(PyExc_ValueError, "invalid decoder shape (or out of memory)");
        return -1;
    }
    self->D->ffn_only = ffn_only;
    self->rope_set = self->head_set = self->busy = 0;
    return 0;
}

static void Decoder_dealloc(DecoderObject *self) {
    pi_decoder_free(self->D);
    free(self->kv_set);
    Py_CLEAR(self->dict);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int check_layer(DecoderObject *self, int il) {
    if (!self->D) { PyErr_SetString(PyExc_RuntimeError, "Decoder not initialised"); return -1; }
    if (il < 0 || il >= self->D->n_layer) { PyErr_Format(PyExc_IndexError, "layer %d out of range", il); return -1; }
    return 0;
}

static int idle(DecoderObject *self) {
    if (!self->D) { PyErr_SetString(PyExc_RuntimeError, "Decoder not initialised"); return -1; }
    if (self->busy) { PyErr_SetString(PyExc_RuntimeError, "Decoder is running"); return -1; }
    return 0;
}

static PyObject *Decoder_set_rope(DecoderObject *self, PyObject *args) {
    void *c, *s;
    if (idle(self)) return NULL;
    if (!PyArg_ParseTuple(args, "O&O&", pi_conv_ptr, &c, pi_conv_ptr, &s)) return NULL;
    if (!c || !s) return PyErr_Format(PyExc_ValueError, "null rope table");
    self->D->cos = c; self->D->sin = s;
    self->rope_set = 1;
    Py_RETURN_NONE;
}

static PyObject *Decoder_set_kv(DecoderObject *self, PyObject *args) {
    int il;
    void *k, *v;
    if (!PyArg_ParseTuple(args, "iO&O&", &il, pi_conv_ptr, &k, pi_conv_ptr, &v)) return NULL;
    if (idle(self) || check_layer(self, il)) return NULL;
    if (!k || !v) return PyErr_Format(PyExc_ValueError, "null KV pointer");
    self->D->L[il].kc = k; self->D->L[il].vc = v;
    self->kv_set[il] = 1;
    Py_RETURN_NONE;
}

/* set_kv_types(k_type, v_type): the cache formats (GGML type ids: F32, F16, Q8_0) of every layer's K and V; before
 * the first step, with caches of that format bound by set_kv. */
static PyObject *Decoder_set_kv_types(DecoderObject *self, PyObject *args) {
    int kt, vt;
    if (!PyArg_ParseTuple(args, "ii", &kt, &vt)) return NULL;
    if (idle(self)) return NULL;
    if (!pi_kv_format_ok(kt, self->D->hd) || !pi_kv_format_ok(vt, self->D->hd))
        return PyErr_Format(PyExc_ValueError, "KV cache types %d/%d: f32, f16 or q8_0 (q8_0 needs head_dim %% 32 == 0, "
                            "head_dim is %d)", kt, vt, self->D->hd);
    self->D->kv_type = PI_KV_TYPE(kt, vt);
    Py_RETURN_NONE;
}

/* (ptr, qtype) tuple -> pi_mat (raw only; the decoder packs). None allowed when opt. */
static int parse_mat(PyObject *o, int rows, int cols, pi_mat *m, int opt, const char *what) {
    memset(m, 0, sizeof *m);
    if (o == Py_None && opt) return 1;
    void *p;
    int qt;
    if (!PyArg_ParseTuple(o, "O&i", pi_conv_ptr, &p, &qt) || !p) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s: expected a (ptr, qtype) tuple", what);
        return -1;
    }
    if (pi_row_bytes(qt, cols) == 0 || (pi_need_of(qt) == PI_NEED_Q8 && cols % PI_QK)) {
        PyErr_Format(PyExc_ValueError, "%s: type %d with %d columns is not supported", what, qt, cols);
        return -1;
    }
    m->qtype = qt; m->raw = p; m->rows = rows; m->cols = cols; m->row_bytes = pi_row_bytes(qt, cols);
    return 0;
}

static PyObject *Decoder_set_layer(DecoderObject *self, PyObject *args) {
    int il;
    void *an, *fn, *bq, *bk, *bv;
    PyObject *oq, *ok, *ov, *oo, *og, *ou, *od;
    if (!PyArg_ParseTuple(args, "iO&OOOOO&OOOO&O&O&", &il, pi_conv_ptr, &an, &oq, &ok, &ov, &oo, pi_conv_ptr, &fn,
                          &og, &ou, &od, pi_conv_ptr, &bq, pi_conv_ptr, &bk, pi_conv_ptr, &bv))
        return NULL;
    if (idle(self) || check_layer(self, il)) return NULL;
    pi_decoder *D = self->D;
    if (!an || !fn) return PyErr_Format(PyExc_ValueError, "null norm weight");
    const int qd = D->n_head * D->hd, kvd = D->n_head_kv * D->hd;
    pi_mat q, k, v, o, g, u, dn;
    int gate_none;
    const int fo = D->ffn_only; /* an FFN-only decoder takes None for q/k/v/o */
    if (parse_mat(oq, qd, D->d, &q, fo, "q") < 0 || parse_mat(ok, kvd, D->d, &k, fo, "k") < 0 ||
        parse_mat(ov, kvd, D->d, &v, fo, "v") < 0 || parse_mat(oo, D->d, qd, &o, fo, "o") < 0 ||
        (gate_none = parse_mat(og, D->n_ff, D->d, &g, 1, "gate")) < 0 || parse_mat(ou, D->n_ff, D->d, &u, 0, "up") ||
        parse_mat(od, D->d, D->n_ff, &dn, 0, "down"))
        return NULL;
    const int none = (q.raw == NULL) + (k.raw == NULL) + (v.raw == NULL) + (o.raw == NULL);
    if (none != (fo ? 4 : 0))
        return PyErr_Format(PyExc_ValueError, "q/k/v/o: all given (a full decoder) or all None (ffn_only)");
    if (gate_none != (D->ffn_kind == FFN_MLP))
        return PyErr_Format(PyExc_ValueError, "gate must be given exactly when ffn_kind is glu or dglu");
    int rc;
    self->busy = 1; /* packing runs without the GIL */
    Py_BEGIN_ALLOW_THREADS
    rc = pi_decoder_set_layer(D, il, an, fo ? NULL : &q, fo ? NULL : &k, fo ? NULL : &v, fo ? NULL : &o, fn,
                              gate_none ? NULL : &g, &u, &dn, bq, bk, bv);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (rc) return PyErr_Format(PyExc_ValueError, "set_layer(%d) failed (shape or out of memory)", il);
    Py_RETURN_NONE;
}

/* set_sparse(layer, down_t, gate_t, up_t, t_h, t_x): (ptr, qtype) tuples or None; down_t None turns it off. */
static PyObject *Decoder_set_sparse(DecoderObject *self, PyObject *args) {
    int il;
    float t_h, t_x;
    PyObject *odt, *ogt, *out;
    if (!PyArg_ParseTuple(args, "iOOOff", &il, &odt, &ogt, &out, &t_h, &t_x)) return NULL;
    if (idle(self) || check_layer(self, il)) return NULL;
    pi_decoder *D = self->D;
    if (!D->L[il].bound) return PyErr_Format(PyExc_RuntimeError, "layer %d: set_layer() first", il);
    pi_mat dt, gt, ut;
    int dn, gn, un;
    if ((dn = parse_mat(odt, D->n_ff, D->d, &dt, 1, "down_t")) < 0 ||
        (gn = parse_mat(ogt, D->d, D->n_ff, &gt, 1, "gate_t")) < 0 || (un = parse_mat(out, D->d, D->n_ff, &ut, 1, "up_t")) < 0)
        return NULL;
    if (pi_decoder_set_sparse(D, il, dn ? NULL : &dt, gn ? NULL : &gt, un ? NULL : &ut, t_h, t_x))
        return PyErr_Format(PyExc_ValueError, "set_sparse(%d): thresholds must be >= 0 and t_x > 0 needs up_t "
                            "(and gate_t for gated FFNs) [d_model, n_ff]", il);
    Py_RETURN_NONE;
}

/* set_qk_norm(layer, q_norm, k_norm): float32 [head_dim] pointers (qwen3), both or neither (0) */
static PyObject *Decoder_set_qk_norm(DecoderObject *self, PyObject *args) {
    int il;
    void *qn, *kn;
    if (!PyArg_ParseTuple(args, "iO&O&", &il, pi_conv_ptr, &qn, pi_conv_ptr, &kn)) return NULL;
    if (idle(self) || check_layer(self, il)) return NULL;
    if (pi_decoder_set_qk_norm(self->D, il, qn, kn))
        return PyErr_Format(PyExc_ValueError, "set_qk_norm(%d): give both norms after set_layer", il);
    Py_RETURN_NONE;
}

/* set_form(norm_kind, parallel, out_norm_bias, pos_embd, n_pos): NORM_RMS 0 | NORM_LAYER 1, the parallel residual
 * flag, the final LayerNorm's bias (f32 [d] pointer or 0), learned positions (f32 [n_pos, d] pointer or 0) */
static PyObject *Decoder_set_form(DecoderObject *self, PyObject *args) {
    int nk, par, n_pos;
    void *onb, *pe;
    if (!PyArg_ParseTuple(args, "ipO&O&i", &nk, &par, pi_conv_ptr, &onb, pi_conv_ptr, &pe, &n_pos)) return NULL;
    if (idle(self)) return NULL;
    if (pi_decoder_set_form(self->D, nk, par, onb, pe, n_pos))
        return PyErr_Format(PyExc_ValueError, "set_form: norm kind 0|1, and learned positions need n_pos >= n_ctx "
                            "(%d)", self->D->n_ctx);
    Py_RETURN_NONE;
}

/* set_scales(embed_scale, attn_scale, attn_softcap, final_softcap, cos_local, sin_local): Gemma's input scale, q
 * scale (0: 1/sqrt(head_dim) in the kernels), soft-caps (0: off) and local RoPE tables (f32 [n_ctx, rope_dim/2]
 * pointers, or 0, 0) */
static PyObject *Decoder_set_scales(DecoderObject *self, PyObject *args) {
    float es, as, ac, fc;
    void *cl, *sl;
    if (!PyArg_ParseTuple(args, "ffffO&O&", &es, &as, &ac, &fc, pi_conv_ptr, &cl, pi_conv_ptr, &sl)) return NULL;
    if (idle(self)) return NULL;
    if (pi_decoder_set_scales(self->D, es, as, ac, fc, cl, sl))
        return PyErr_Format(PyExc_ValueError, "set_scales: embed_scale > 0, the others >= 0, both local tables or "
                            "neither");
    Py_RETURN_NONE;
}

/* set_layer_attn(layer, attn_post_norm, ffn_post_norm, window, rope_local): Gemma's post norms (f32 [d] pointers,
 * both or 0, 0), attention window (0: all positions) and local RoPE flag, after set_layer */
static PyObject *Decoder_set_layer_attn(DecoderObject *self, PyObject *args) {
    int il, window, local;
    void *an, *fn;
    if (!PyArg_ParseTuple(args, "iO&O&ip", &il, pi_conv_ptr, &an, pi_conv_ptr, &fn, &window, &local)) return NULL;
    if (idle(self) || check_layer(self, il)) return NULL;
    if (pi_decoder_set_layer_attn(self->D, il, an, fn, window, local))
        return PyErr_Format(PyExc_ValueError, "set_layer_attn(%d): set_layer() first, both post norms or neither, "
                            "window >= 0, local RoPE after set_scales' tables", il);
    Py_RETURN_NONE;
}

/* set_biases(layer, attn_norm_b, ffn_norm_b, o_bias, up_bias, down_bias): f32 pointers or 0, after set_layer */
static PyObject *Decoder_set_biases(DecoderObject *self, PyObject *args) {
    int il;
    void *an, *fn, *bo, *bu, *bd;
    if (!PyArg_ParseTuple(args, "iO&O&O&O&O&", &il, pi_conv_ptr, &an, pi_conv_ptr, &fn, pi_conv_ptr, &bo, pi_conv_ptr,
                          &bu, pi_conv_ptr, &bd))
        return NULL;
    if (idle(self) || check_layer(self, il)) return NULL;
    if (pi_decoder_set_biases(self->D, il, an, fn, bo, bu, bd))
        return PyErr_Format(PyExc_ValueError, "set_biases(%d): set_layer() first", il);
    Py_RETURN_NONE;
}

/* set_predictor(layer, fc1, fc2, threshold): (ptr, qtype) tuples, fc1 [r, d], fc2 [n_ff, r]; fc1 None removes it. */
static PyObject *Decoder_set_predictor(DecoderObject *self, PyObject *args) {
    int il, r;
    float thr;
    PyObject *o1, *o2;
    if (!PyArg_ParseTuple(args, "iOOif", &il, &o1, &o2, &r, &thr)) return NULL;
    if (idle(self) || check_layer(self, il)) return NULL;
    pi_decoder *D = self->D;
    if (r <= 0) return PyErr_Format(PyExc_ValueError, "predictor rank must be > 0");
    pi_mat f1, f2;
    int n1, n2;
    if ((n1 = parse_mat(o1, r, D->d, &f1, 1, "fc1")) < 0 || (n2 = parse_mat(o2, D->n_ff, r, &f2, 1, "fc2")) < 0)
        return NULL;
    if (n1 != n2) return PyErr_Format(PyExc_ValueError, "give both fc1 and fc2, or neither");
    if (pi_decoder_set_predictor(D, il, n1 ? NULL : &f1, n2 ? NULL : &f2, thr))
        return PyErr_Format(PyExc_ValueError, "set_predictor(%d): bad shapes or out of memory", il);
    Py_RETURN_NONE;
}

/* kept(buf_ptr): int32 [4, n_layer] <- per layer, in the last step: FFN neurons kept (down rows read), input
 * channels kept, up rows read, gate rows read by gathers (predictor or tier candidates). */
static PyObject *Decoder_kept(DecoderObject *self, PyObject *args) {
    int32_t *out;
    if (!PyArg_ParseTuple(args, "O&", pi_conv_ptr, &out)) return NULL;
    if (idle(self)) return NULL;
    if (!out) return PyErr_Format(PyExc_ValueError, "null buffer");
    pi_decoder *D = self->D;
    for (int il = 0; il < D->n_layer; il++) {
        int h = 0, x = 0, u = 0, g = 0;
        for (int t = 0; t < D->nth; t++) {
            h += D->tw[t].kept_h[il]; x += D->tw[t].kept_x[il]; u += D->tw[t].kept_u[il]; g += D->tw[t].kept_g[il];
        }
        out[il] = h;
        out[D->n_layer + il] = x;
        out[2 * D->n_layer + il] = u;
        out[3 * D->n_layer + il] = g;
    }
    Py_RETURN_NONE;
}

static PyObject *Decoder_set_output(DecoderObject *self, PyObject *args) {
    void *norm, *head;
    int qt;
    if (!PyArg_ParseTuple(args, "O&O&i", pi_conv_ptr, &norm, pi_conv_ptr, &head, &qt)) return NULL;
    if (idle(self)) return NULL;
    pi_decoder *D = self->D;
    if (!norm || !head) return PyErr_Format(PyExc_ValueError, "null pointer");
    if (pi_row_bytes(qt, D->d) == 0) return PyErr_Format(PyExc_ValueError, "head type %d not supported", qt);
    if (pi_need_of(qt) == PI_NEED_Q8 && D->d % PI_QK) return PyErr_Format(PyExc_ValueError, "d_model must be a multiple of 32");
    int rc;
    self->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    rc = pi_decoder_set_output(D, norm, head, qt);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (rc) return PyErr_Format(PyExc_ValueError, "set_output failed (out of memory?)");
    self->head_set = 1;
    Py_RETURN_NONE;
}

static int usable(DecoderObject *self) {
    if (!self->D) { PyErr_SetString(PyExc_RuntimeError, "Decoder not initialised"); return -1; }
    if (self->D->broken) {
        PyErr_SetString(PyExc_MemoryError, "the decoder ran out of memory repacking its weights; load the model again");
        return -1;
    }
    return 0;
}

static int ready(DecoderObject *self, int l0, int l1, int want_head) {
    if (usable(self)) return -1;
    if (self->busy) { PyErr_SetString(PyExc_RuntimeError, "Decoder is already running (one call at a time)"); return -1; }
    if (self->D->ffn_only) { PyErr_SetString(PyExc_RuntimeError, "an ffn_only decoder runs ffn() only"); return -1; }
    if (l1 > l0 && !self->rope_set) { PyErr_SetString(PyExc_RuntimeError, "set_rope() first"); return -1; }
    for (int i = l0; i < l1; i++)
        if (!self->D->L[i].bound || !self->kv_set[i]) {
            PyErr_Format(PyExc_RuntimeError, "layer %d: set_layer() and set_kv() first", i);
            return -1;
        }
    if (want_head && !self->head_set) { PyErr_SetString(PyExc_RuntimeError, "set_output() first"); return -1; }
    return 0;
}

static int check_pos(DecoderObject *self, int pos, int n) {
    if (pos < 0 || n < 1 || pos + n > self->D->n_ctx) {
        PyErr_Format(PyExc_ValueError, "positions %d..%d outside the context of %d", pos, pos + n - 1, self->D->n_ctx);
        return -1;
    }
    return 0;
}

static PyObject *run_step(DecoderObject *self, float *x, int pos, int l0, int l1, float *logits) {
    if (!x) return PyErr_Format(PyExc_ValueError, "null x");
    if (ready(self, l0, l1, logits != NULL) || (l1 > l0 && check_pos(self, pos, 1))) return NULL;
    self->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    pi_decoder_step(self->D, x, pos, l0, l1, logits);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    Py_RETURN_NONE;
}

static PyObject *Decoder_layer(DecoderObject *self, PyObject *args) {
    int il, pos;
    void *x;
    if (!PyArg_ParseTuple(args, "iO&i", &il, pi_conv_ptr, &x, &pos)) return NULL;
    if (check_layer(self, il)) return NULL;
    return run_step(self, x, pos, il, il + 1, NULL);
}

/* ffn(layer, x_ptr, y_ptr, cand_ptr): y += FFN(norm(x)) of one layer for one token, over the neurons with
 * cand[i] != 0 (uint8 [n_ff]); the layer's sparse FFN must be on (set_sparse). Runs without the GIL. */
static PyObject *Decoder_ffn(DecoderObject *self, PyObject *args) {
    int il;
    void *x, *y, *cand;
    if (!PyArg_ParseTuple(args, "iO&O&O&", &il, pi_conv_ptr, &x, pi_conv_ptr, &y, pi_conv_ptr, &cand)) return NULL;
    if (usable(self) || idle(self) || check_layer(self, il)) return NULL;
    if (!x || !y || !cand) return PyErr_Format(PyExc_ValueError, "null x, y or cand");
    int rc;
    self->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    rc = pi_decoder_ffn(self->D, il, x, y, cand);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (rc) return PyErr_Format(PyExc_RuntimeError, "layer %d: set_layer() and set_sparse() first", il);
    Py_RETURN_NONE;
}

static PyObject *Decoder_head(DecoderObject *self, PyObject *args) {
    void *x, *lg;
    if (!PyArg_ParseTuple(args, "O&O&", pi_conv_ptr, &x, pi_conv_ptr, &lg)) return NULL;
    if (!lg) return PyErr_Format(PyExc_ValueError, "null logits");
    return run_step(self, x, 0, 0, 0, lg);
}

static PyObject *Decoder_step(DecoderObject *self, PyObject *args) {
    int pos;
    void *x, *lg;
    if (!PyArg_ParseTuple(args, "O&iO&", pi_conv_ptr, &x, &pos, pi_conv_ptr, &lg)) return NULL;
    return run_step(self, x, pos, 0, self->D ? self->D->n_layer : 0, lg);
}

static PyObject *Decoder_prefill(DecoderObject *self, PyObject *args) {
    int n, pos0;
    void *x, *lg;
    if (!PyArg_ParseTuple(args, "O&iiO&", pi_conv_ptr, &x, &n, &pos0, pi_conv_ptr, &lg)) return NULL;
    if (!x) return PyErr_Format(PyExc_ValueError, "null x");
    if (ready(self, 0, self->D ? self->D->n_layer : 0, lg != NULL) || check_pos(self, pos0, n)) return NULL;
    if (self->D->disk) return PyErr_Format(PyExc_RuntimeError, "a decoder with a disk tier runs step() per token");
    int rc;
    self->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    rc = pi_decoder_prefill(self->D, x, n, pos0, lg);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *Decoder_set_threads(DecoderObject *self, PyObject *args) {
    int n;
    if (!PyArg_ParseTuple(args, "i", &n)) return NULL;
    if (!self->D || self->busy) return PyErr_Format(PyExc_RuntimeError, "Decoder busy or not initialised");
    int rc;
    self->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    rc = pi_decoder_set_threads(self->D, n);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (rc == -1)
        return PyErr_Format(PyExc_MemoryError, "could not start %d threads (thread limit or out of memory); the "
                            "decoder keeps its %d", n, self->D->nth);
    if (rc) return PyErr_Format(PyExc_MemoryError, "out of memory repacking the weights for %d threads", n);
    Py_RETURN_NONE;
}

static PyObject *Decoder_profile(DecoderObject *self, PyObject *args) {
    int on;
    if (!PyArg_ParseTuple(args, "p", &on)) return NULL;
    if (idle(self)) return NULL;
    self->D->prof = on;
    Py_RETURN_NONE;
}

static PyObject *Decoder_reset_stats(DecoderObject *self, PyObject *args) {
    if (idle(self)) return NULL;
    memset(self->D->ns, 0, sizeof self->D->ns);
    self->D->steps = self->D->tokens = 0;
    Py_RETURN_NONE;
}

static PyObject *Decoder_stats(DecoderObject *self, PyObject *args, PyObject *kw) {
    static char *kws[] = {"reset", NULL};
    int reset = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|p", kws, &reset)) return NULL;
    if (idle(self)) return NULL;
    pi_decoder *D = self->D;
    PyObject *d = PyDict_New();
    if (!d) return NULL;
    uint64_t total = 0;
    for (int i = 0; i < PH_N; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(D->ns[i]);
        PyDict_SetItemString(d, PHASE_NAMES[i], v);
        Py_DECREF(v);
        total += D->ns[i];
    }
    PyObject *v = PyLong_FromUnsignedLongLong(total); PyDict_SetItemString(d, "total_ns", v); Py_DECREF(v);
    v = PyLong_FromUnsignedLongLong(D->steps); PyDict_SetItemString(d, "steps", v); Py_DECREF(v);
    v = PyLong_FromUnsignedLongLong(D->tokens); PyDict_SetItemString(d, "tokens", v); Py_DECREF(v);
    v = PyLong_FromLong(D->nth); PyDict_SetItemString(d, "n_threads", v); Py_DECREF(v);
    v = PyUnicode_FromString(pi_k->name); PyDict_SetItemString(d, "isa", v); Py_DECREF(v);
    if (reset) { memset(D->ns, 0, sizeof D->ns); D->steps = D->tokens = 0; }
    return d;
}

PyObject *pi_py_set_pack_ffn(pi_decoder *D, PyObject *args);
PyObject *pi_py_disk_open(pi_decoder *D, PyObject *args);
PyObject *pi_py_disk_close(pi_decoder *D);
PyObject *pi_py_disk_layer(pi_decoder *D, PyObject *args);
PyObject *pi_py_disk_stats(pi_decoder *D, PyObject *args);
#define DISK_METHOD(name, call)                                                                                      \
    static PyObject *Decoder_##name(DecoderObject *self, PyObject *args) {                                           \
        if (idle(self)) return NULL;                                                                                 \
        self->busy = 1;                                                                                              \
        PyObject *r = call;                                                                                          \
        self->busy = 0;                                                                                              \
        return r;                                                                                                    \
    }
DISK_METHOD(set_pack_ffn, pi_py_set_pack_ffn(self->D, args))
DISK_METHOD(disk_open, pi_py_disk_open(self->D, args))
DISK_METHOD(disk_close, pi_py_disk_close(self->D))
DISK_METHOD(disk_layer, pi_py_disk_layer(self->D, args))
DISK_METHOD(disk_stats, pi_py_disk_stats(self->D, args))

static PyObject *Decoder_get_n_threads(DecoderObject *self, void *c) { return PyLong_FromLong(self->D ? self->D->nth : 0); }
static PyObject *Decoder_get_packed_bytes(DecoderObject *self, void *c) {
    size_t tot = 0;
    pi_decoder *D = self->D;
    for (int t = 0; D && t < PI_MAX_THREADS; t++)
        for (int i = 0; i < D->arena[t].n; i++) tot += D->arena[t].sizes[i] - (i == D->arena[t].n - 1 ? D->arena[t].left : 0);
    return PyLong_FromSize_t(tot);
}

static PyGetSetDef getset[] = {
    {"n_threads", (getter)Decoder_get_n_threads, NULL, "threads in use (caller included)", NULL},
    {"packed_bytes", (getter)Decoder_get_packed_bytes, NULL, "bytes of repacked weight copies held", NULL},
    {NULL},
};

static PyMethodDef Decoder_methods[] = {
    {"set_rope", (PyCFunction)Decoder_set_rope, METH_VARARGS, "set_rope(cos_ptr, sin_ptr): f32 [n_ctx, rope_dim/2]"},
    {"set_kv", (PyCFunction)Decoder_set_kv, METH_VARARGS,
     "set_kv(layer, k_ptr, v_ptr): [n_ctx] rows of n_head_kv*head_dim values in the set_kv_types formats (f16)"},
    {"set_kv_types", (PyCFunction)Decoder_set_kv_types, METH_VARARGS,
     "set_kv_types(k_type, v_type): GGML type ids of the K and V caches (F32 0, F16 1, Q8_0 8)"},
    {"set_layer", (PyCFunction)Decoder_set_layer, METH_VARARGS,
     "set_layer(layer, attn_norm, q, k, v, o, ffn_norm, gate, up, down, q_bias, k_bias, v_bias); "
     "matrices (ptr, qtype), gate may be None, biases None or f32 ptr"},
    {"set_sparse", (PyCFunction)Decoder_set_sparse, METH_VARARGS,
     "set_sparse(layer, down_t, gate_t, up_t, t_h, t_x): neuron-sparse FFN for decode ((ptr, qtype) or None)"},
    {"set_qk_norm", (PyCFunction)Decoder_set_qk_norm, METH_VARARGS,
     "set_qk_norm(layer, q_norm, k_norm): per-head RMSNorm weights of q and k before RoPE (qwen3), or 0, 0"},
    {"set_form", (PyCFunction)Decoder_set_form, METH_VARARGS,
     "set_form(norm_kind, parallel, out_norm_bias, pos_embd, n_pos): RMS 0 | LayerNorm 1, parallel residual, "
     "final norm bias and learned positions (pointers or 0)"},
    {"set_scales", (PyCFunction)Decoder_set_scales, METH_VARARGS,
     "set_scales(embed_scale, attn_scale, attn_softcap, final_softcap, cos_local, sin_local): Gemma's scales, "
     "soft-caps (0: off) and local RoPE tables (pointers or 0, 0)"},
    {"set_layer_attn", (PyCFunction)Decoder_set_layer_attn, METH_VARARGS,
     "set_layer_attn(layer, attn_post_norm, ffn_post_norm, window, rope_local): Gemma's post norms, attention window "
     "and local RoPE, after set_layer"},
    {"set_biases", (PyCFunction)Decoder_set_biases, METH_VARARGS,
     "set_biases(layer, attn_norm_b, ffn_norm_b, o_bias, up_bias, down_bias): f32 pointers or 0, after set_layer"},
    {"set_predictor", (PyCFunction)Decoder_set_predictor, METH_VARARGS,
     "set_predictor(layer, fc1, fc2, rank, threshold): activation predictor for the sparse FFN ((ptr, qtype) or None)"},
    {"kept", (PyCFunction)Decoder_kept, METH_VARARGS,
     "kept(buf_ptr): int32 [3, n_layer] <- FFN neurons kept, input channels kept, up rows read per layer (last step)"},
    {"set_output", (PyCFunction)Decoder_set_output, METH_VARARGS, "set_output(norm_ptr, head_ptr, head_qtype)"},
    {"layer", (PyCFunction)Decoder_layer, METH_VARARGS, "layer(layer, x_ptr, pos): one layer, x in place"},
    {"head", (PyCFunction)Decoder_head, METH_VARARGS, "head(x_ptr, logits_ptr): final norm + LM head"},
    {"ffn", (PyCFunction)Decoder_ffn, METH_VARARGS,
     "ffn(layer, x_ptr, y_ptr, cand_ptr): y += FFN(norm(x)) over the neurons with cand[i] != 0 (uint8 [n_ff])"},
    {"step", (PyCFunction)Decoder_step, METH_VARARGS, "step(x_ptr, pos, logits_ptr): all layers (+ head if logits_ptr)"},
    {"prefill", (PyCFunction)Decoder_prefill, METH_VARARGS,
     "prefill(x_ptr, n_tok, pos0, logits_ptr): x [n_tok, d] in place; logits of the last token"},
    {"set_threads", (PyCFunction)Decoder_set_threads, METH_VARARGS, "set_threads(n)"},
    {"profile", (PyCFunction)Decoder_profile, METH_VARARGS, "profile(on): accumulate per-phase times"},
    {"stats", (PyCFunction)(void (*)(void))Decoder_stats, METH_VARARGS | METH_KEYWORDS,
     "stats(reset=False) -> dict of accumulated ns per phase (thread 0's view), steps, tokens"},
    {"reset_stats", (PyCFunction)Decoder_reset_stats, METH_NOARGS, "reset_stats()"},
    {"set_pack_ffn", (PyCFunction)Decoder_set_pack_ffn, METH_VARARGS,
     "set_pack_ffn(mask): FFN matrices packed in RAM (1 gate, 2 up, 4 down); repacks"},
    {"disk_open", (PyCFunction)Decoder_disk_open, METH_VARARGS,
     "disk_open(path, slot_bytes, n_resident, n_cache, n_io, direct) -> arena address: the disk tier (disk.h)"},
    {"disk_close", (PyCFunction)Decoder_disk_close, METH_NOARGS, "disk_close(): every layer back in RAM"},
    {"disk_layer", (PyCFunction)Decoder_disk_layer, METH_VARARGS,
     "disk_layer(layer, where_ptr, off_ptr, bundle_bytes, gate_qtype, gate_off, up_qtype, up_off, down_qtype, "
     "down_off, t_h)"},
    {"disk_stats", (PyCFunction)Decoder_disk_stats, METH_VARARGS, "disk_stats(reset=False) -> dict of counters"},
    {NULL},
};

static PyTypeObject DecoderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "powerinfer._C.Decoder",
    .tp_basicsize = sizeof(DecoderObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Decoder(n_layer, d_model, n_head, n_head_kv, head_dim, n_ff, n_vocab, norm_eps, rope_dim, "
              "rope_style, activation, ffn_kind, n_ctx, n_threads): one C call per decode step",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Decoder_init,
    .tp_dealloc = (destructor)Decoder_dealloc,
    .tp_methods = Decoder_methods,
    .tp_getset = getset,
    .tp_dictoffset = offsetof(DecoderObject, dict),
};

int pi_add_decoder_type(PyObject *m) {
    if (PyType_Ready(&DecoderType) < 0) return -1;
    Py_INCREF(&DecoderType);
    if (PyModule_AddObject(m, "Decoder", (PyObject *)&DecoderType) < 0) { Py_DECREF(&DecoderType); return -1; }
    return 0;
}
