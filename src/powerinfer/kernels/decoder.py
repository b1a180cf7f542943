"""`bind_decoder`: a `_C.Decoder` (one C call per decode step, DESIGN decision 3) bound to a model's weights,
KV cache and RoPE tables. The enums here name what the C decoder's integer codes mean (csrc/decoder.h)."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from .. import _C
from ..core.tensor import QTensor, row_bytes
from ..errors import ModelFormatError, PowerInferError
from .arrays import _f32_vec, _weight, address

ROPE_STYLES = {"norm": 0, "neox": 1}
# ModelConfig.activation names: "gelu" is the erf form (HF "gelu"), "gelu_tanh" the tanh one (ggml_gelu).
ACTIVATIONS = {"silu": 0, "relu": 1, "gelu_tanh": 2, "gelu": 3}
FFN_KINDS = {"glu": 0, "dglu": 1, "mlp": 2}
NORM_KINDS = {"rms": 0, "layer": 1}
# FFN matrices a decoder packs in RAM (csrc/decoder.h PI_PACK_*): all of them, or what the disk tier keeps resident
PACK_GATE, PACK_UP, PACK_DOWN, PACK_ALL = 1, 2, 4, 7


class _Holder:
    """Addresses of the arrays a Decoder reads, with the arrays kept alive in `keep` (set as `dec._keep`)."""

    def __init__(self):
        self.keep = []

    def hold(self, obj) -> int:
        self.keep.append(obj)
        return address(obj)

    def mat(self, t: QTensor | None):
        if t is None:
            return None
        data, addr, qtype = _weight(t)
        self.keep.append(data)
        return (addr, qtype)

    def vec(self, t: QTensor | None, n: int):
        if t is None:
            return None
        v = _f32_vec(t)
        if v.reshape(-1).shape[0] != n:
            raise ValueError(f"{getattr(t, 'name', 'vector')}: expected {n} values")
        return self.hold(v)


def _host_rows(t) -> np.ndarray | None:
    """A KV cache array as numpy (a torch CPU tensor's shares its memory), or None where it is not in host memory."""
    if isinstance(t, np.ndarray):
        return t
    try:
        return t.numpy()
    except (AttributeError, RuntimeError, TypeError):  # not an array, or a tensor on another device
        return None


def _check_supported(c) -> None:
    if c.activation not in ACTIVATIONS:  # a property of the model file, not a caller's mistake
        raise ModelFormatError(f"FFN activation {c.activation!r} is not supported by the C decoder "
                               f"({', '.join(ACTIVATIONS)})")
    for name, table, choices in (("rope_style", c.rope_style, ROPE_STYLES), ("ffn_kind", c.ffn_kind, FFN_KINDS)):
        if table not in choices:
            raise ModelFormatError(f"{name} {table!r} is not supported by the C decoder ({', '.join(choices)})")


def _new_decoder(c, n_ctx: int, n_threads: int, ffn_only: bool = False) -> "_C.Decoder":
    try:
        # threads past the C pool's 64 are clamped there; clamping here keeps huge -t values out of C's int
        return _C.Decoder(c.n_layer, c.d_model, c.n_head, c.n_head_kv, c.head_dim, c.n_ff, c.n_vocab,
                          float(c.norm_eps), c.rope_dim if c.positions == "rope" else 0, ROPE_STYLES[c.rope_style], ACTIVATIONS[c.activation],
                          FFN_KINDS[c.ffn_kind], n_ctx, min(max(1, int(n_threads)), 1024), ffn_only)
    except (ValueError, OverflowError, MemoryError) as e:  # shapes are checked at load: this is memory or threads
        raise PowerInferError(f"cannot set up the C decoder for n_ctx {n_ctx}, {n_threads} threads: {e}") from None


def bind_decoder(config, weights, kv, rope_cos, rope_sin, n_threads: int = 1,
                 pack_ffn: int = PACK_ALL, before_layer=None, rope_local=None) -> "_C.Decoder":
    """A Decoder bound to ModelWeights / KVCache / ModelConfig; the arrays it reads are kept alive on it
    (`dec._keep`). Block-format matrices are repacked once (dec.packed_bytes) for the 16-row kernels and K-quant
    ones copied as they are into the same huge-page arenas (faster to stream than the file's pages); `pack_ffn`
    says which FFN matrices (the disk tier packs only a resident gate, or none). `before_layer(i)` runs before
    layer i is bound (the disk tier drops the file pages the previous layer's packing faulted in). `rope_local`:
    the (cos, sin) tables of Gemma 3's local layers (config.local_rope()), when the model has them."""
    c = config
    _check_supported(c)
    kv_dim = c.n_head_kv * c.head_dim
    dec = _new_decoder(c, kv.n_ctx, n_threads)
    dec.set_pack_ffn(pack_ffn)
    h = _Holder()
    half = c.rope_dim // 2
    cos, sin = _f32_vec(rope_cos), _f32_vec(rope_sin)
    for t in (cos, sin):
        if tuple(t.shape) != (kv.n_ctx, half):
            raise ValueError(f"rope tables must be [n_ctx={kv.n_ctx}, rope_dim/2={half}], got {tuple(t.shape)}")
    dec.set_rope(h.hold(cos), h.hold(sin))
    _set_scales(dec, h, c, kv.n_ctx, rope_local)
    kv_types = kv.type_k, kv.type_v
    for flag, name in zip(("-ctk", "-ctv"), kv_types):
        if name == "q8_0" and c.head_dim % 32:  # a block must not straddle two heads (csrc/attn.h)
            raise PowerInferError(f"{flag} q8_0: its 32-value blocks need a head_dim that is a multiple of 32; this "
                                  f"model's is {c.head_dim} (use f16 or f32)")
    if kv_types != ("f16", "f16"):
        dec.set_kv_types(*kv.ggml_types)
    # bytes of a cache row in each type (the cache's own GGML types: f32, f16, q8_0 blocks)
    row_sizes = [row_bytes(GGMLQuantizationType(t), kv_dim) for t in kv.ggml_types]
    if len(weights.layers) != c.n_layer or len(kv.k) != c.n_layer:
        raise ValueError("config.n_layer does not match the weights / KV cache")
    for i, L in enumerate(weights.layers):
        if before_layer is not None:
            before_layer(i)
        k, v = (_host_rows(t) for t in (kv.k[i], kv.v[i]))
        for t, size, name in zip((k, v), row_sizes, kv_types):
            if t is None or not t.flags.c_contiguous or t.ndim != 2 or t.shape[0] != kv.n_ctx or \
                    t.shape[1] * t.itemsize != size:
                raise ValueError(f"KV cache of layer {i} must be contiguous CPU {name} rows [{kv.n_ctx}, {kv_dim} "
                                 f"values]")
        h.keep += [kv.k[i], kv.v[i]]
        dec.set_kv(i, h.hold(k), h.hold(v))
        dec.set_layer(i, h.vec(L.input_layernorm, c.d_model), h.mat(L.q_proj), h.mat(L.k_proj), h.mat(L.v_proj),
                      h.mat(L.o_proj), h.vec(L.post_attention_layernorm, c.d_model), h.mat(L.gate_proj),
                      h.mat(L.up_proj), h.mat(L.down_proj), h.vec(L.q_bias, c.n_head * c.head_dim),
                      h.vec(L.k_bias, kv_dim), h.vec(L.v_bias, kv_dim))
        if L.q_norm is not None:
            dec.set_qk_norm(i, h.vec(L.q_norm, c.head_dim), h.vec(L.k_norm, c.head_dim))
        _set_biases(dec, h, c, i, L)
        if L.post_attn_norm is not None or c.is_local(i):  # Gemma
            window = c.sliding_window if c.is_local(i) else 0
            dec.set_layer_attn(i, h.vec(L.post_attn_norm, c.d_model) or 0, h.vec(L.post_ffn_norm, c.d_model) or 0,
                               window, bool(window) and rope_local is not None)
    head = h.mat(weights.lm_head)
    dec.set_output(h.vec(weights.norm, c.d_model), head[0], head[1])
    _set_form(dec, h, c, weights, kv.n_ctx)
    dec._keep = h.keep
    return dec


def bind_ffn_decoder(config, weights, n_threads: int = 1) -> "_C.Decoder":
    """An FFN-only Decoder (the CPU tier of a placement): per layer the FFN norm and matrices, read in place by
    row gathers (nothing repacked: only the rows this tier computes are ever touched), run with `dec.ffn(...)`
    once its sparse FFN is on (kernels.SparseFFN)."""
    c = config
    _check_supported(c)
    dec = _new_decoder(c, 1, n_threads, ffn_only=True)
    h = _Holder()
    if len(weights.layers) != c.n_layer:
        raise ValueError("config.n_layer does not match the weights")
    for i, L in enumerate(weights.layers):
        dec.set_layer(i, h.vec(L.input_layernorm, c.d_model), None, None, None, None,
                      h.vec(L.post_attention_layernorm, c.d_model), h.mat(L.gate_proj), h.mat(L.up_proj),
                      h.mat(L.down_proj), None, None, None)
        _set_biases(dec, h, c, i, L)
    _set_form(dec, h, c, weights, 1)
    dec._keep = h.keep
    return dec


def _set_scales(dec, h: _Holder, c, n_ctx: int, rope_local) -> None:
    """Gemma's embedding scale, q scale, soft-caps and local RoPE tables (decoder.h set_scales)."""
    if c.embed_scale == 1.0 and not (c.attn_scale or c.attn_softcap or c.final_softcap or rope_local is not None):
        return
    cl = sl = 0
    if rope_local is not None:
        cos, sin = (_f32_vec(t) for t in rope_local)
        if tuple(cos.shape) != (n_ctx, c.rope_dim // 2) or cos.shape != sin.shape:
            raise ValueError(f"local rope tables must be [n_ctx={n_ctx}, rope_dim/2], got {tuple(cos.shape)}")
        cl, sl = h.hold(cos), h.hold(sin)
    dec.set_scales(float(c.embed_scale), float(c.attn_scale), float(c.attn_softcap), float(c.final_softcap), cl, sl)


def _set_biases(dec, h: _Holder, c, i: int, L) -> None:
    """Layer i's LayerNorm and projection biases (falcon, opt); nothing for a model without them."""
    vecs = ((L.input_layernorm_bias, c.d_model), (L.post_attention_layernorm_bias, c.d_model), (L.o_bias, c.d_model),
            (L.up_bias, c.n_ff), (L.down_bias, c.d_model))
    if any(t is not None for t, _ in vecs):
        dec.set_biases(i, *(h.vec(t, n) or 0 for t, n in vecs))


def _set_form(dec, h: _Holder, c, weights, n_ctx: int) -> None:
    """The model's norm kind, parallel residual, final norm bias and learned positions (decoder.h set_form)."""
    pos = weights.pos_embd
    if pos is not None and pos.rows < n_ctx:
        raise PowerInferError(f"a context of {n_ctx} exceeds the model's {pos.rows} learned positions")
    if c.norm == "rms" and not c.parallel_residual and pos is None and weights.norm_bias is None:
        return
    pos_addr = 0
    if pos is not None:
        pos_addr = h.hold(_f32_vec(pos))  # dequantized once: one row is read per token
    dec.set_form(NORM_KINDS[c.norm], c.parallel_residual, h.vec(weights.norm_bias, c.d_model) or 0, pos_addr,
                 pos.rows if pos is not None else 0)
