"""Compiled CPU kernels (`powerinfer._C`): `arrays` (addresses of what they read), `decoder` (`bind_decoder`), `ops`
(one torch wrapper per kernel) and `sparse_ffn` (the decoder's neuron-sparse FFN), re-exported here.

The extension is a plain CPython module that takes raw addresses (Python ints); the wrappers extract them
once from numpy arrays / torch tensors / QTensors and keep the arrays alive. Decode on the CPU is one C call
per token (`Decoder.step`), because torch-eager glue costs 120-230 us per layer (DESIGN decision 3).
Numerics mimic ggml's CPU backend so greedy tokens agree with llama.cpp (see csrc/pi.h); BF16 weights
see bf16-rounded activations as in ggml (vec_dot_type BF16). The slow twins are in `reference.py`.

The re-exports load their module on first use (PEP 562): `arrays` and `decoder` are numpy only, and a process that
only decodes with the C runner never imports torch, which `ops`, `attention` and `sparse_ffn` do (#17).
"""
from __future__ import annotations

import importlib

from .. import _C

Decoder = _C.Decoder
isa, set_isa, cpu_features = _C.isa, _C.set_isa, _C.cpu_features

_EXPORTS = {
    "arrays": ["address", "transposed", "transposed_qtype"],
    "decoder": ["ACTIVATIONS", "FFN_KINDS", "PACK_ALL", "PACK_DOWN", "PACK_GATE", "PACK_UP", "ROPE_STYLES",
                "bind_decoder", "bind_ffn_decoder"],
    "ops": ["available_isas", "axpy", "dequantize", "gather", "matmul", "matvec", "quantize_q8_0", "read_bandwidth"],
    "sparse_ffn": ["Kept", "KeptCounts", "RowBytes", "SparseFFN"],
    "attention": ["attention_decode", "attention_prefill"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = ["Decoder", "cpu_features", "isa", "set_isa"]
__all__ += list(_MODULE_OF)


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value
