/* The disk tier's methods of powerinfer._C.Decoder (disk.h); py_decoder.c checks the decoder is idle first. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>

#include "decoder.h"
#include "disk.h"
#include "pybind.h"

/* set_pack_ffn(mask): which FFN matrices are packed (1 gate, 2 up, 4 down); repacks every bound layer. */
PyObject *pi_py_set_pack_ffn(pi_decoder *D, PyObject *args) {
    int mask, rc;
    if (!PyArg_ParseTuple(args, "i", &mask)) return NULL;
    if (mask < 0 || mask > PI_PACK_ALL) return PyErr_Format(PyExc_ValueError, "pack mask 0..7");
    if (D->pack_ffn == mask) Py_RETURN_NONE;
    D->pack_ffn = mask;
    Py_BEGIN_ALLOW_THREADS
    rc = pi_decoder_repack(D);
    Py_END_ALLOW_THREADS
    if (rc) return PyErr_Format(PyExc_MemoryError, "out of memory repacking the weights");
    Py_RETURN_NONE;
}

/* disk_open(path, slot_bytes, n_resident, n_cache, n_io, direct) -> arena address (resident slots first). */
PyObject *pi_py_disk_open(pi_decoder *D, PyObject *args) {
    PyObject *opath;
    Py_ssize_t slot;
    int n_res, n_cache, n_io, direct;
    if (!PyArg_ParseTuple(args, "O&niiip", PyUnicode_FSConverter, &opath, &slot, &n_res, &n_cache, &n_io, &direct))
        return NULL;
    pi_disk *K;
    errno = 0;
    Py_BEGIN_ALLOW_THREADS
    K = pi_disk_new(PyBytes_AS_STRING(opath), D->n_layer, D->n_ff, (size_t)slot, n_res, n_cache, n_io, direct);
    Py_END_ALLOW_THREADS
    if (!K) {
        PyErr_SetFromErrnoWithFilenameObject(errno == ENOMEM ? PyExc_MemoryError : PyExc_OSError, opath);
        Py_DECREF(opath);
        return NULL;
    }
    Py_DECREF(opath);
    pi_disk_free(D->disk);
    D->disk = K;
    return PyLong_FromVoidPtr(K->base);
}

PyObject *pi_py_disk_close(pi_decoder *D) {
    pi_disk_free(D->disk);
    D->disk = NULL;
    Py_RETURN_NONE;
}

/* disk_layer(layer, where_ptr, off_ptr, bundle_bytes, gate_qtype, gate_off, up_qtype, up_off, down_qtype,
 * down_off, t_h): where int32 [n_ff] (resident slot or -1), off int64 [n_ff] (bundle offset or -1). */
PyObject *pi_py_disk_layer(pi_decoder *D, PyObject *args) {
    int il, gqt, uqt, dqt;
    void *where, *off;
    Py_ssize_t bb, goff, uoff, doff;
    float t_h;
    if (!PyArg_ParseTuple(args, "iO&O&ninininf", &il, pi_conv_ptr, &where, pi_conv_ptr, &off, &bb, &gqt, &goff, &uqt,
                          &uoff, &dqt, &doff, &t_h))
        return NULL;
    if (!D->disk) return PyErr_Format(PyExc_RuntimeError, "disk_open() first");
    if (il < 0 || il >= D->n_layer || !D->L[il].bound) return PyErr_Format(PyExc_IndexError, "layer %d not bound", il);
    if (!where || !off || !(t_h >= 0.0f)) return PyErr_Format(PyExc_ValueError, "null map or bad threshold");
    if ((gqt >= 0) != (D->L[il].gate.raw != NULL))
        return PyErr_Format(PyExc_ValueError, "layer %d: bundles carry a gate row exactly when the FFN is gated", il);
    if (pi_disk_set_layer(D->disk, il, D->n_ff, D->d, where, off, (size_t)bb, gqt, (size_t)goff, uqt, (size_t)uoff,
                          dqt, (size_t)doff))
        return PyErr_Format(PyExc_ValueError, "disk_layer(%d): bad neuron map, bundle layout or out of memory", il);
    D->L[il].t_h = t_h;
    D->L[il].t_x = 0.0f;
    Py_RETURN_NONE;
}

static int put(PyObject *d, const char *k, unsigned long long v) {
    PyObject *o = PyLong_FromUnsignedLongLong(v);
    if (!o) return -1;
    const int rc = PyDict_SetItemString(d, k, o);
    Py_DECREF(o);
    return rc;
}

/* disk_stats(reset) -> counters since the last reset: bytes read, preadv calls, bundles read, cache hits and
 * misses (disk neurons), resident hits, I/O wait ns, overflow (misses read past a full cache); direct (O_DIRECT in use); error (errno of a failed read). */
PyObject *pi_py_disk_stats(pi_decoder *D, PyObject *args) {
    int reset = 0;
    if (!PyArg_ParseTuple(args, "|p", &reset)) return NULL;
    pi_disk *K = D->disk;
    if (!K) Py_RETURN_NONE;
    PyObject *d = PyDict_New();
    if (!d) return NULL;
    if (put(d, "bytes", K->bytes) || put(d, "reads", K->reads_issued) || put(d, "bundles", K->bundles) ||
        put(d, "hits", K->hits) || put(d, "misses", K->misses) || put(d, "resident", K->resident_hits) ||
        put(d, "wait_ns", K->wait_ns) || put(d, "overflow", K->overflow) || put(d, "direct", (unsigned long long)K->direct) ||
        put(d, "error", (unsigned long long)K->err) || put(d, "arena_bytes", K->arena_bytes)) {
        Py_DECREF(d);
        return NULL;
    }
    if (reset) K->bytes = K->reads_issued = K->bundles = K->hits = K->misses = K->resident_hits = K->wait_ns = K->overflow = 0;
    K->err = 0;
    return d;
}
