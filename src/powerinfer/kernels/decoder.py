"""`bind_decoder`: a `_C.Decoder` (one C call per decode step, DESIGN decision 3) bound to a model's weights,
KV cache and RoPE tables. The enums here name what the C decoder's integer codes mean (csrc/decoder.h)."""
from __future__ import annotations

import torch

from .. import _C
from ..core.tensor import QTensor
from ..errors import ModelFormatError
from .ops import _f32_vec, _weight, address

ROPE_STYLES = {"norm": 0, "neox": 1}
# ModelConfig.activation names: "gelu" is the erf form (HF "gelu"), "gelu_tanh" the tanh one (ggml_gelu).
ACTIVATIONS = {"silu": 0, "relu": 1, "gelu_tanh": 2, "gelu": 3}
FFN_KINDS = {"glu": 0, "dglu": 1, "mlp": 2}


def bind_decoder(config, weights, kv, rope_cos, rope_sin, n_threads: int = 1) -> "_C.Decoder":
    """A Decoder bound to ModelWeights / KVCache / ModelConfig; the arrays it reads are kept alive on it
    (`dec._keep`). Block-format matrices are repacked once (dec.packed_bytes) for the 16-row kernels."""
    c = config
    if c.activation not in ACTIVATIONS:  # a property of the model file, not a caller's mistake
        raise ModelFormatError(f"FFN activation {c.activation!r} is not supported by the C decoder "
                               f"({', '.join(ACTIVATIONS)})")
    for name, table, choices in (("rope_style", c.rope_style, ROPE_STYLES), ("ffn_kind", c.ffn_kind, FFN_KINDS)):
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
