"""Helpers for the kernel parity tests: random weights in every native format, tiny random models held in
memory as ModelWeights (no GGUF round trip: the kernels only see arrays), ISA switching."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize

from powerinfer import kernels
from powerinfer.core.tensor import QTensor
from powerinfer.core.config import ModelConfig
from powerinfer.model.kvcache import KVCache
from powerinfer.core.weights import LayerWeights, ModelWeights

# Every kernel set is a test case on every machine; one this CPU cannot run shows up as a skip with the reason.
ISAS = [pytest.param(isa, marks=pytest.mark.skipif(isa not in kernels.available_isas(),
                                                   reason=f"this CPU lacks {isa}"))
        for isa in ("avx512", "avx2", "portable")]
FORMATS = [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.F16, Q.BF16, Q.F32]
KQUANTS = [Q.Q4_K, Q.Q5_K, Q.Q6_K]  # 256-value super-blocks: shapes with cols % 256 == 0
_KQ_BYTES = {Q.Q4_K: 144, Q.Q5_K: 176, Q.Q6_K: 210}


def random_kquant(qtype, rows, cols, rng, scale=1.0) -> np.ndarray:
    """uint8 [rows, row_bytes] of random K-quant super-blocks: every quant, qh and scale byte random (all bit
    patterns of the packed 6-bit scales and the int8 Q6_K scales occur), f16 d (and dmin) sized so values are
    O(scale). gguf-py has no K-quant quantizer; the kernels' parity does not need plausible weights, only valid ones."""
    nsb, bb = cols // 256, _KQ_BYTES[qtype]
    raw = rng.integers(0, 256, size=(rows, nsb, bb), dtype=np.uint8)
    d = (rng.uniform(0.5, 1.5, size=(rows, nsb)) * scale).astype(np.float16)
    if qtype == Q.Q6_K:
        raw[..., 208:210] = (d / np.float16(1024)).view(np.uint8).reshape(rows, nsb, 2)  # |sc*q| up to 4096
    else:
        # dmin = d * the mean quant (7.5 for 4 bits, 15.5 for 5): weights average about zero, as real ones do
        dd = d / np.float16(256)
        raw[..., 0:2] = dd.view(np.uint8).reshape(rows, nsb, 2)
        raw[..., 2:4] = (dd * np.float16(7.5 if qtype == Q.Q4_K else 15.5)).astype(np.float16).view(np.uint8).reshape(rows, nsb, 2)
    return raw.reshape(rows, nsb * bb)


def make_qtensor(qtype, rows, cols, rng, scale=1.0, name="w") -> QTensor:
    """Random N(0, scale^2) matrix in `qtype` (gguf-py's quantizers), shaped like the loader's QTensors."""
    w = (rng.standard_normal((rows, cols)) * scale).astype(np.float32)
    if qtype == Q.F32:
        data = w
    elif qtype == Q.F16:
        data = w.astype(np.float16)
    elif qtype == Q.BF16:
        data = quantize(w, Q.BF16).view(np.uint16)
    elif qtype in KQUANTS:
        data = random_kquant(qtype, rows, cols, rng, scale)
    else:
        data = quantize(w, qtype)
    return QTensor(name, Q(qtype), (rows, cols), data)


def make_vec(n, rng, mean=1.0, scale=0.1) -> QTensor:
    return QTensor("v", Q.F32, (n,), (mean + scale * rng.standard_normal(n)).astype(np.float32))


def tiny_model(seed=0, *, d=128, n_head=4, n_head_kv=2, head_dim=32, n_ff=224, n_vocab=200, n_layer=2,
               rope_dim=0, rope_style="norm", activation="silu", ffn_kind="glu", bias=False,
               types=None, head_type=Q.Q8_0):
    """(ModelConfig, ModelWeights) of a small random llama-family model. `types` maps q k v o gate up down to
    formats (default Q4_1 everywhere, like SmolLM2). Weight scales keep activations O(1) through the layers."""
    rng = np.random.default_rng(seed)
    t = dict.fromkeys(("q", "k", "v", "o", "gate", "up", "down"), Q.Q4_1)
    t.update(types or {})
    cfg = ModelConfig(arch="llama", n_vocab=n_vocab, d_model=d, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv,
                      head_dim=head_dim, n_ff=n_ff, rope_dim=rope_dim, rope_style=rope_style, rope_theta=10000.0,
                      activation=activation, ffn_kind=ffn_kind, attn_bias=bias, norm_eps=1e-5)
    qd, kvd = n_head * head_dim, n_head_kv * head_dim
    layers = []
    for _ in range(n_layer):
        m = lambda k, r, c, s: make_qtensor(t[k], r, c, rng, s)  # noqa: E731
        layers.append(LayerWeights(
            input_layernorm=make_vec(d, rng), q_proj=m("q", qd, d, 0.15), k_proj=m("k", kvd, d, 0.15),
            v_proj=m("v", kvd, d, 0.3), o_proj=m("o", d, qd, 0.3 / np.sqrt(qd / 32)),
            post_attention_layernorm=make_vec(d, rng),
            gate_proj=m("gate", n_ff, d, 0.15) if ffn_kind != "mlp" else None, up_proj=m("up", n_ff, d, 0.15),
            down_proj=m("down", d, n_ff, 0.3 / np.sqrt(n_ff / 32)),
            q_bias=make_vec(qd, rng, 0.0, 0.2) if bias else None, k_bias=make_vec(kvd, rng, 0.0, 0.2) if bias else None,
            v_bias=make_vec(kvd, rng, 0.0, 0.2) if bias else None))
    emb = make_qtensor(Q.Q8_0, n_vocab, d, rng, 1.0)
    head = make_qtensor(head_type, n_vocab, d, rng, 0.2)
    return cfg, ModelWeights(emb, layers, make_vec(d, rng), head)


def rope_tables(cfg: ModelConfig, n_ctx: int):
    inv = cfg.rope_theta ** (-torch.arange(0, cfg.rope_dim, 2, dtype=torch.float64) / cfg.rope_dim)
    ang = torch.arange(n_ctx, dtype=torch.float64)[:, None] * inv[None, :]
    return ang.cos().float().contiguous(), ang.sin().float().contiguous()


def new_kv(cfg: ModelConfig, n_ctx: int) -> KVCache:
    return KVCache.allocate(cfg.n_layer, n_ctx, cfg.n_head_kv * cfg.head_dim)
