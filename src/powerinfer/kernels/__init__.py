"""Compiled CPU kernels (`powerinfer._C`) with friendly wrappers, and `bind_decoder`.

The extension is a plain CPython module that takes raw addresses (Python ints); this module extracts them
once from torch tensors / numpy arrays / QTensors and keeps the arrays alive. Decode on the CPU is one C call
per token (`Decoder.step`), because torch-eager glue costs 120-230 us per layer (DESIGN decision 3).
Numerics mimic ggml's CPU backend so greedy tokens agree with llama.cpp (see csrc/pi.h); BF16 weights
see bf16-rounded activations as in ggml (vec_dot_type BF16). The slow twins are in `reference.py`.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import _C
from ..formats.tensor import QTensor

Decoder = _C.Decoder
isa = _C.isa
set_isa = _C.set_isa
cpu_features = _C.cpu_features

ROPE_STYLES = {"norm": 0, "neox": 1}
ACTIVATIONS = {"silu": 0, "relu": 1, "gelu": 2}
FFN_KINDS = {"glu": 0, "dglu": 1, "mlp": 2}


def available_isas() -> list[str]:
    """ISA paths this CPU can run, best first (the first is what `import` selected)."""
    current, out = _C.isa(), []
    for name in ("avx512", "avx2", "portable"):
        try:
            _C.set_isa(name)
            out.append(name)
        except ValueError:
            pass
    _C.set_isa(current)
    return out


def address(a) -> int:
    """Data address of a torch tensor or numpy array (read-only memmaps included)."""
    if isinstance(a, torch.Tensor):
        return a.data_ptr()
    return a.__array_interface__["data"][0]


def _f32_vec(t) -> torch.Tensor | np.ndarray:
    """A C-contiguous float32 version of a QTensor / tensor / array (the original if already so)."""
    if isinstance(t, QTensor):
        if int(t.qtype) != 0:
            return t.dequantize().reshape(-1).contiguous()
        t = t.data
    if isinstance(t, torch.Tensor):
        return t.detach().to(torch.float32).contiguous()
    a = np.asarray(t)
    return a if a.dtype == np.float32 and a.flags["C_CONTIGUOUS"] else np.ascontiguousarray(a, dtype=np.float32)


def _weight(t: QTensor) -> tuple[np.ndarray, int, int]:
    """(contiguous data, address, qtype) of a weight matrix, checked against its declared size."""
    data = np.asarray(t.data)
    if not data.flags["C_CONTIGUOUS"]:
        data = np.ascontiguousarray(data)
    if data.nbytes != t.nbytes:
        raise ValueError(f"{t.name}: {data.nbytes} bytes of data, expected {t.rows} x {t.row_bytes}")
    return data, address(data), int(t.qtype)


def _out(shape, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=torch.float32)
    if out.dtype != torch.float32 or not out.is_contiguous() or tuple(out.shape) != tuple(shape):
        raise ValueError(f"out must be a contiguous float32 tensor of shape {tuple(shape)}")
    return out


def _x(x: torch.Tensor, cols: int) -> torch.Tensor:
    x = x.detach().to(torch.float32).contiguous()
    if x.shape[-1] != cols:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {cols} columns")
    return x


def dequantize(t: QTensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """float32 tensor of t.shape via the C dequantizer."""
    data, addr, qtype = _weight(t)
    y = _out(t.shape, out)
    _C.dequantize(qtype, addr, t.rows * t.cols, y.data_ptr())
    return y


def matvec(w: QTensor, x: torch.Tensor, n_threads: int = 1, out: torch.Tensor | None = None,
           packed: bool = False) -> torch.Tensor:
    """y = W x with ggml's activation quantization (float32 [rows]). packed=True repacks W first (tests)."""
    data, addr, qtype = _weight(w)
    x = _x(x, w.cols).reshape(-1)
    y = _out((w.rows,), out)
    _C.matvec(qtype, addr, w.rows, w.cols, x.data_ptr(), y.data_ptr(), n_threads, packed)
    return y


def matmul(w: QTensor, x: torch.Tensor, n_threads: int = 1, out: torch.Tensor | None = None) -> torch.Tensor:
    """Y = X W^T for X [n_tok, cols] (float32 [n_tok, rows]), same numerics as matvec per token."""
    data, addr, qtype = _weight(w)
    x = _x(x, w.cols)
    if x.dim() != 2:
        raise ValueError("x must be [n_tok, cols]")
    y = _out((x.shape[0], w.rows), out)
    _C.matmul(qtype, addr, w.rows, w.cols, x.data_ptr(), x.shape[0], y.data_ptr(), n_threads)
    return y


def bind_decoder(config, weights, kv, rope_cos, rope_sin, n_threads: int = 1) -> "_C.Decoder":
    """A Decoder bound to ModelWeights / KVCache / ModelConfig; the arrays it reads are kept alive on it
    (`dec._keep`). Block-format matrices are repacked once (dec.packed_bytes) for the 16-row kernels."""
    c = config
    for name, table, choices in (("rope_style", c.rope_style, ROPE_STYLES), ("activation", c.activation, ACTIVATIONS),
                                 ("ffn_kind", c.ffn_kind, FFN_KINDS)):
        if table not in choices:
            raise ValueError(f"{name} {table!r} is not supported by the C decoder ({', '.join(choices)})")
    kv_dim = c.n_head_kv * c.head_dim
    dec = _C.Decoder(c.n_layer, c.d_model, c.n_head, c.n_head_kv, c.head_dim, c.n_ff, c.n_vocab, float(c.norm_eps),
                     c.rope_dim, ROPE_STYLES[c.rope_style], ACTIVATIONS[c.activation], FFN_KINDS[c.ffn_kind],
                     kv.n_ctx, max(1, int(n_threads)))
    keep = []

    def hold(obj):
        keep.append(obj)
        return address(obj)

    half = c.rope_dim // 2
    cos, sin = _f32_vec(rope_cos), _f32_vec(rope_sin)
    for t in (cos, sin):
        if tuple(t.shape) != (kv.n_ctx, half):
            raise ValueError(f"rope tables must be [n_ctx={kv.n_ctx}, rope_dim/2={half}], got {tuple(t.shape)}")
    dec.set_rope(hold(cos), hold(sin))

    def mat(t: QTensor | None):
        if t is None:
            return None
        data, addr, qtype = _weight(t)
        keep.append(data)
        return (addr, qtype)

    def vec(t: QTensor | None, n: int):
        if t is None:
            return None
        v = _f32_vec(t)
        if v.reshape(-1).shape[0] != n:
            raise ValueError(f"{getattr(t, 'name', 'vector')}: expected {n} values")
        return hold(v)

    if len(weights.layers) != c.n_layer or len(kv.k) != c.n_layer:
        raise ValueError("config.n_layer does not match the weights / KV cache")
    for i, L in enumerate(weights.layers):
        k, v = kv.k[i], kv.v[i]
        for t in (k, v):
            if t.dtype != torch.float16 or not t.is_contiguous() or t.device.type != "cpu" or \
                    tuple(t.shape) != (kv.n_ctx, kv_dim):
                raise ValueError(f"KV cache of layer {i} must be contiguous CPU float16 [{kv.n_ctx}, {kv_dim}]")
        dec.set_kv(i, hold(k), hold(v))
        dec.set_layer(i, vec(L.input_layernorm, c.d_model), mat(L.q_proj), mat(L.k_proj), mat(L.v_proj),
                      mat(L.o_proj), vec(L.post_attention_layernorm, c.d_model), mat(L.gate_proj), mat(L.up_proj),
                      mat(L.down_proj), vec(L.q_bias, c.n_head * c.head_dim), vec(L.k_bias, kv_dim),
                      vec(L.v_bias, kv_dim))
    head = mat(weights.lm_head)
    dec.set_output(vec(weights.norm, c.d_model), head[0], head[1])
    dec._keep = keep
    return dec


__all__ = ["Decoder", "isa", "set_isa", "cpu_features", "available_isas", "address", "dequantize", "matvec",
           "matmul", "bind_decoder"]
