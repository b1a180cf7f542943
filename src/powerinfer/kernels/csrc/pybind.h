/* Glue shared by the Python-facing files. */
#ifndef PI_PYBIND_H
#define PI_PYBIND_H
#include <Python.h>

int pi_conv_ptr(PyObject *o, void *out); /* O& converter: int -> void*, None -> NULL */
int pi_add_decoder_type(PyObject *module);
int pi_add_attention_functions(PyObject *module); /* py_attn.c */
void pi_split(int total, int ith, int nth, int *a, int *b);

#endif
