"""Compiled CPU kernels (`powerinfer._C`): `ops` (one wrapper per kernel), `decoder` (`bind_decoder`) and
`sparse_ffn` (the decoder's neuron-sparse FFN), re-exported here.

The extension is a plain CPython module that takes raw addresses (Python ints); the wrappers extract them
once from torch tensors / numpy arrays / QTensors and keep the arrays alive. Decode on the CPU is one C call
per token (`Decoder.step`), because torch-eager glue costs 120-230 us per layer (DESIGN decision 3).
Numerics mimic ggml's CPU backend so greedy tokens agree with llama.cpp (see csrc/pi.h); BF16 weights
see bf16-rounded activations as in ggml (vec_dot_type BF16). The slow twins are in `reference.py`.
"""
from __future__ import annotations

from .. import _C
from .attention import attention_decode, attention_prefill
from .decoder import (ACTIVATIONS, FFN_KINDS, PACK_ALL, PACK_DOWN, PACK_GATE, PACK_UP, ROPE_STYLES, bind_decoder,
                      bind_ffn_decoder)
from .ops import (address, available_isas, axpy, cpu_features, dequantize, gather, isa, matmul, matvec, quantize_q8_0,
                  read_bandwidth, set_isa, transposed, transposed_qtype)
from .sparse_ffn import Kept, RowBytes, SparseFFN

Decoder = _C.Decoder

__all__ = ["Decoder", "isa", "set_isa", "cpu_features", "available_isas", "address", "dequantize", "matvec",
           "matmul", "gather", "axpy", "quantize_q8_0", "transposed", "transposed_qtype", "read_bandwidth",
           "bind_decoder", "bind_ffn_decoder", "PACK_ALL", "PACK_GATE", "PACK_UP", "PACK_DOWN", "ROPE_STYLES", "ACTIVATIONS", "FFN_KINDS", "SparseFFN", "Kept", "RowBytes",
           "attention_decode", "attention_prefill"]
