"""Slow, obviously-correct torch twins of the C kernels in `powerinfer._C` (STYLE 3).

Everything here follows the C numerics *specification*, not its instruction order: ggml block layouts
(gguf-py's quants are the cross-check in tests), activations quantized exactly as ggml's x86
`quantize_row_q8_0/q8_1` (d = max|x|/127 stored as f16, q = round-half-even(x * 127/max), s = f16(d*sum q)),
F16 weights against f16-rounded x, BF16 against bf16-rounded x, F32 plain. Integer block dots are exact;
everything after them is float64, so the C kernels' f32 accumulation order is the only expected difference.

`decode_layer_ref` / `head_ref` state one decode step as llama.cpp computes it (flash attention off, f16
KV cache): rmsnorm with weight, q/k/v projections (+ biases), RoPE from the given tables, K/V[pos] stored as
f16, q rounded to f16 for the q.K dot, softmax over 0..pos, probabilities rounded to f16 for the V product,
GQA (kv head = q head // (n_head/n_head_kv)), scale 1/sqrt(head_dim), residual; FFN act(gate)*up |
act(gate)*act(up) | act(up) with silu | relu | gelu (erf) | gelu_tanh, residual.
"""
from __future__ import annotations

import math
import weakref

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize as gguf_dequantize

from ..core.tensor import QTensor

QK = 32
_BLOCK_BYTES = {QT.Q4_0: 18, QT.Q4_1: 20, QT.Q8_0: 34}


def _raw(data: np.ndarray, rows: int) -> torch.Tensor:
    """uint8 [rows, row_bytes] view of a weight array (copied: memmaps are read-only)."""
    a = np.ascontiguousarray(np.asarray(data)).view(np.uint8).reshape(rows, -1)
    return torch.from_numpy(a.copy())


def _f16(b: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 2k] -> float32 [..., k] reading little-endian f16 pairs."""
    return b.contiguous().view(torch.float16).float()


_CACHE: dict[int, tuple] = {}  # id(data) -> (weakref to data, qtype, shape, decoded): tests reuse weights
_CACHE_MAX_VALUES = 1 << 22


def _blocks(w: QTensor):
    """Integer quants and scales: (q int32 [rows, nb, 32], d f32 [rows, nb], m f32 [rows, nb] or None).
    Q4_0 q is nibble-8, Q4_1 q is the nibble (value = q*d + m), Q8_0 q is the int8."""
    hit = _CACHE.get(id(w.data))
    if hit is not None and hit[0]() is w.data and hit[1] == w.qtype and hit[2] == w.shape:
        return hit[3]
    out = _decode_blocks(w)
    if w.rows * w.cols <= _CACHE_MAX_VALUES:
        try:
            _CACHE[id(w.data)] = (weakref.ref(w.data), w.qtype, w.shape, out)
        except TypeError:  # data that cannot be weakly referenced is simply not cached
            pass
    return out


def _decode_blocks(w: QTensor):
    qtype = QT(w.qtype)
    raw = _raw(w.data, w.rows).view(w.rows, w.cols // QK, _BLOCK_BYTES[qtype])
    d = _f16(raw[..., 0:2]).squeeze(-1)
    m = None
    if qtype == QT.Q8_0:
        q = raw[..., 2:].view(torch.int8).to(torch.int32)
    else:
        off = 4 if qtype == QT.Q4_1 else 2
        qs = raw[..., off:off + 16].to(torch.int32)
        q = torch.cat((qs & 15, qs >> 4), dim=-1)  # low nibbles are elements 0..15, high 16..31
        if qtype == QT.Q4_0:
            q = q - 8
        else:
            m = _f16(raw[..., 2:4]).squeeze(-1)
    return q, d, m


def dequantize(w: QTensor) -> torch.Tensor:
    """float32 tensor of w.shape."""
    qtype = QT(w.qtype)
    if qtype == QT.F32:
        return torch.from_numpy(np.array(w.data, dtype=np.float32)).reshape(w.shape)
    if qtype == QT.F16:
        return torch.from_numpy(np.array(w.data).view(np.float16).astype(np.float32)).reshape(w.shape)
    if qtype == QT.BF16:
        u16 = np.array(w.data).view(np.uint16).astype(np.uint32) << 16
        return torch.from_numpy(u16.view(np.float32)).reshape(w.shape)
    if qtype in KQUANTS:
        return torch.from_numpy(gguf_dequantize(np.ascontiguousarray(np.asarray(w.data)).view(np.uint8), qtype)
                                .astype(np.float32).reshape(w.shape))
    q, d, m = _blocks(w)
    vals = q.float() * d[..., None]
    if m is not None:
        vals = vals + m[..., None]
    return vals.reshape(w.shape)


def quantize_q8(x: torch.Tensor):
    """ggml q8_1 activation blocks of x [..., n] (n % 32 == 0): (q int32 [..., n], d f32 [..., nb] (f16-rounded),
    s f32 [..., nb] = f16(d * sum q), sum int32 [..., nb]). q8_0 is the same without s."""
    x = x.float()
    xb = x.reshape(*x.shape[:-1], -1, QK)
    amax = xb.abs().amax(-1)
    d = amax / 127.0
    inv = torch.where(amax != 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(xb * inv[..., None])  # torch.round is half-to-even, as cvtps2dq
    qsum = q.sum(-1)
    s = (d * qsum).half().float()
    return q.to(torch.int32).reshape(x.shape), d.half().float(), s, qsum.to(torch.int32)


def quantize_q8_0(x: torch.Tensor):
    q, d, _, _ = quantize_q8(x)
    return q, d


def quantize_q8_1(x: torch.Tensor):
    q, d, s, _ = quantize_q8(x)
    return q, d, s


def block_terms(w: QTensor, x: torch.Tensor) -> torch.Tensor:
    """float64 [..., rows, n_terms]: the summands of y = W x as the kernels form them (per 32-block for
    quantized weights, per element otherwise). y = terms.sum(-1); tests bound rounding by |terms|.sum(-1)."""
    qtype = QT(w.qtype)
    x = x.float()
    if qtype in (QT.F32, QT.F16, QT.BF16):
        xr = {QT.F32: x, QT.F16: x.half().float(), QT.BF16: x.bfloat16().float()}[qtype]
        return dequantize(w).double() * xr.double()[..., None, :]
    if qtype in KQUANTS:
        return kquant_terms(w, x)
    q, d, m = _blocks(w)
    xq, xd, xs, _ = quantize_q8(x)
    nb = w.cols // QK
    xq = xq.reshape(*xq.shape[:-1], nb, QK)
    # exact integer block dots [..., rows, nb]
    isum = torch.einsum("rbj,...bj->...rb", q.double(), xq.double())
    terms = isum * (d.double() * xd.double()[..., None, :])
    if m is not None:
        terms = torch.cat((terms, m.double() * xs.double()[..., None, :]), dim=-1)
    return terms


# ---- K-quants (kernels/csrc/kquant.h): 256-value super-blocks against the same q8 activations ----
KQUANTS = (QT.Q4_K, QT.Q5_K, QT.Q6_K)
QK_K = 256


def kquant_ints(w: QTensor):
    """Integer quants and exact f32 scales of a K-quant matrix, one entry per scale group:
    Q4_K/Q5_K: (q int32 [rows, nsb*8, 32] (0..15 / 0..31), d*sc f32 [rows, nsb*8], dmin*m f32 [rows, nsb*8]),
    value = (d*sc)*q - dmin*m; Q6_K: (q int32 [rows, nsb*16, 16] (-32..31), d*sc f32 [rows, nsb*16], None),
    value = (d*sc)*q. Decoded from ggml's byte layout with numpy; tests check it against gguf-py's dequantizer."""
    qtype = QT(w.qtype)
    nsb = w.cols // QK_K
    raw = np.ascontiguousarray(np.asarray(w.data)).view(np.uint8).reshape(w.rows, nsb, -1)
    if qtype == QT.Q6_K:
        ql, qh = raw[..., 0:128].astype(np.int32), raw[..., 128:192].astype(np.int32)
        sc = raw[..., 192:208].view(np.int8).astype(np.float32)
        d = raw[..., 208:210].copy().view(np.float16).astype(np.float32)
        halves = []
        for h in range(2):
            lo, hi, bits = ql[..., 64 * h:64 * h + 32], ql[..., 64 * h + 32:64 * h + 64], qh[..., 32 * h:32 * h + 32]
            halves += [(lo & 15) | ((bits & 3) << 4), (hi & 15) | (((bits >> 2) & 3) << 4),
                       (lo >> 4) | (((bits >> 4) & 3) << 4), (hi >> 4) | (((bits >> 6) & 3) << 4)]
        q = np.concatenate(halves, axis=-1).reshape(w.rows, nsb * 16, 16) - 32
        ds = (d * sc).reshape(w.rows, nsb * 16)  # f16 x int8: exact in f32
        return torch.from_numpy(q), torch.from_numpy(ds), None
    d = raw[..., 0:2].copy().view(np.float16).astype(np.float32)
    dmin = raw[..., 2:4].copy().view(np.float16).astype(np.float32)
    sc6 = raw[..., 4:16].astype(np.int32)
    sc = np.concatenate([sc6[..., 0:4] & 63, (sc6[..., 8:12] & 15) | ((sc6[..., 0:4] >> 6) << 4)], axis=-1)
    mn = np.concatenate([sc6[..., 4:8] & 63, (sc6[..., 8:12] >> 4) | ((sc6[..., 4:8] >> 6) << 4)], axis=-1)
    qs = raw[..., 48 if qtype == QT.Q5_K else 16:].astype(np.int32).reshape(w.rows, nsb, 4, 1, 32)
    q = np.concatenate([qs & 15, qs >> 4], axis=3).reshape(w.rows, nsb, 8, 32)  # group g: sub-blocks 2g, 2g+1
    if qtype == QT.Q5_K:
        qh = raw[..., 16:48].astype(np.int32)[:, :, None, :]
        q = q + (((qh >> np.arange(8)[None, None, :, None]) & 1) << 4)
    ds = (d * sc.astype(np.float32)).reshape(w.rows, nsb * 8)
    dm = (dmin * mn.astype(np.float32)).reshape(w.rows, nsb * 8)
    return torch.from_numpy(q.reshape(w.rows, nsb * 8, 32)), torch.from_numpy(ds), torch.from_numpy(dm)


def kquant_terms(w: QTensor, x: torch.Tensor) -> torch.Tensor:
    """block_terms of a K-quant matrix (kquant.h): per 32-value activation block b and scale group s in it,
    (d*sc[s]) * dx[b] * sum(q * xq) and, for Q4_K/Q5_K, -(dmin*m[s]) * (dx[b] * sum(xq)); float64."""
    q, ds, dm = kquant_ints(w)
    xq, xd, _, xsum = quantize_q8(x.float())
    g = q.shape[-1]  # values per scale group: 32 or 16
    xq = xq.reshape(*xq.shape[:-1], -1, g).double()
    isum = torch.einsum("rbj,...bj->...rb", q.double(), xq)
    dx = xd.double().repeat_interleave(QK // g, dim=-1)  # the activation block of each group
    terms = isum * ds.double() * dx[..., None, :]
    if dm is not None:
        terms = torch.cat((terms, -dm.double() * (xd.double() * xsum.double())[..., None, :]), dim=-1)
    return terms


def matvec_ref(w: QTensor, x: torch.Tensor) -> torch.Tensor:
    """y = W x with ggml's activation quantization; x [cols] or [n_tok, cols]; float64 result."""
    return block_terms(w, x).sum(-1)


# ---- neuron-sparse kernels ----
def select_rows(w: QTensor, idx: torch.Tensor) -> QTensor:
    """The rows idx of w as their own QTensor (raw bytes copied; nothing else decoded)."""
    rows = np.ascontiguousarray(np.asarray(w.data)).reshape(w.rows, -1)  # one row per line, in its own dtype
    return QTensor(w.name, w.qtype, (int(idx.numel()), w.cols), rows[idx.long().numpy()])


def gather_ref(w: QTensor, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Row-sparse dot: y[j] = W[idx[j]] . x with the dense kernels' activation numerics; float64 [len(idx)]."""
    return block_terms(select_rows(w, idx), x).sum(-1)


def axpy_ref(wt: QTensor, idx: torch.Tensor, h: torch.Tensor, c0: int = 0, c1: int | None = None) -> torch.Tensor:
    """Neuron-major axpy: sum_j h[j] * Wt[idx[j], c0:c1] in float64 (h is not quantized)."""
    from .arrays import PanelTensor

    c1 = wt.cols if c1 is None else c1
    if isinstance(wt, PanelTensor):
        rows = panels_dequantize(wt)[idx.long(), c0:c1].double()
    else:
        rows = dequantize(select_rows(wt, idx))[:, c0:c1].double()
    return (h.double()[:, None] * rows).sum(0)


def panels_dequantize(p: QTensor) -> torch.Tensor:
    """float32 [n_ff, d] of neuron panels (ops.PanelTensor), decoded field by field from the layout csrc/panels.c
    documents: per panel of 32 neurons, d f16 scales, Q4_1's d f16 mins, then each neuron's quants for d outputs
    in 16-byte runs of 32 (low nibbles the first 16 outputs) or d int8 (Q8_0)."""
    n_ff, d = p.shape
    raw = np.ascontiguousarray(np.asarray(p.data)).view(np.uint8).reshape(n_ff // 32, -1)  # one panel per line
    scale = raw[:, :2 * d].copy().view(np.float16).astype(np.float32)  # [panels, d]
    mins = raw[:, 2 * d:4 * d].copy().view(np.float16).astype(np.float32) if p.qtype == QT.Q4_1 else None
    quants = raw[:, (4 if mins is not None else 2) * d:].reshape(n_ff // 32, 32, -1)  # [panels, neuron, bytes]
    if p.qtype == QT.Q8_0:
        vals = quants.view(np.int8).astype(np.float32)
    else:
        runs = quants.reshape(n_ff // 32, 32, d // 32, 16)
        vals = np.concatenate([runs & 0x0F, runs >> 4], axis=-1).reshape(n_ff // 32, 32, d).astype(np.float32)
        if p.qtype == QT.Q4_0:
            vals -= 8.0
    w = vals * scale[:, None, :] + (mins[:, None, :] if mins is not None else 0.0)
    return torch.from_numpy(np.ascontiguousarray(w.reshape(n_ff, d)))


def ffn_sparse_ref(config, layer, n: torch.Tensor, down_t: QTensor, t_h: float = 0.0, t_x: float = 0.0,
                   gate_t: QTensor | None = None, up_t: QTensor | None = None, cand: torch.Tensor | None = None):
    """The decoder's neuron-sparse FFN on the normed input n [d]: (float64 output [d], kept neuron ids).
    `cand` (bool [n_ff]): only these neurons may be kept (a tier's share of the layer, Decoder.ffn).

    Input site (t_x > 0): channels with |n| < t_x are zeroed and gate/up are axpys over the input-major copies
    (f32 n, no quantization). Otherwise gate/up are the dense kernels' dots. A neuron is kept iff h != 0 and
    |h| >= t_h; down is the axpy of the kept neurons' rows of down_t."""
    c = config
    if t_x > 0:
        n = n * (n.abs() >= t_x)
        u = n.double() @ dequantize(up_t).double()
        g = n.double() @ dequantize(gate_t).double() if layer.gate_proj is not None else None
    else:
        u = matvec_ref(layer.up_proj, n)
        g = matvec_ref(layer.gate_proj, n) if layer.gate_proj is not None else None
    h = ffn_ref(g, u, c.activation, c.ffn_kind)
    keep = (h != 0) & (h.abs() >= t_h)
    kept = (keep & cand if cand is not None else keep).nonzero().squeeze(1)
    return axpy_ref(down_t, kept, h[kept]), kept


# ---- the decode step ----
def rmsnorm_ref(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w.double()


def rope_ref(v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """v [n_heads, head_dim]; cos/sin [rope_dim/2] for this position."""
    half = cos.shape[-1]
    v = v.clone()
    c, s = cos.double(), sin.double()
    if style == "neox":
        i0, i1 = torch.arange(half), torch.arange(half) + half
    else:
        i0, i1 = torch.arange(half) * 2, torch.arange(half) * 2 + 1
    a, b = v[:, i0].clone(), v[:, i1].clone()
    v[:, i0] = a * c - b * s
    v[:, i1] = a * s + b * c
    return v


def act_ref(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return torch.relu(x)
    if activation == "gelu_tanh":  # ggml_gelu, HF "gelu_pytorch_tanh"
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * x * (1.0 + 0.044715 * x * x)))
    if activation == "gelu":  # erf form, HF "gelu"
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    if activation == "silu":
        return x * torch.sigmoid(x)
    raise ValueError(f"unknown activation {activation!r}")


def ffn_ref(g: torch.Tensor | None, u: torch.Tensor, activation: str, ffn_kind: str) -> torch.Tensor:
    if ffn_kind == "mlp":
        return act_ref(u, activation)
    if ffn_kind == "dglu":
        return act_ref(g, activation) * act_ref(u, activation)
    return act_ref(g, activation) * u


def _vec(t: QTensor | None) -> torch.Tensor | None:
    return None if t is None else dequantize(t).double().reshape(-1)


def kv_store_ref(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Rows x [..., n] f32 as a KV cache of type `kind` stores them: float32, float16 (round to nearest even) or
    q8_0 blocks (uint8 [..., n/32*34]: f16 d then 32 int8, quantized as quantize_q8)."""
    if kind == "f32":
        return x.float().clone()
    if kind == "f16":
        return x.half()
    q, d = quantize_q8_0(x)
    qb = q.to(torch.int8).reshape(*x.shape[:-1], -1, QK).view(torch.uint8)
    db = d.half().contiguous().view(torch.uint8).reshape(*x.shape[:-1], -1, 2)
    return torch.cat([db, qb], -1).reshape(*x.shape[:-1], -1)


def kv_values_ref(rows: torch.Tensor, kind: str) -> torch.Tensor:
    """float64 values of KV cache rows of type `kind` (q8_0: q * d per block, exact)."""
    if kind != "q8_0":
        return rows.double()
    b = rows.reshape(*rows.shape[:-1], -1, 34)
    d = b[..., :2].contiguous().view(torch.float16).double()
    return (b[..., 2:].contiguous().view(torch.int8).double() * d).reshape(*rows.shape[:-1], -1)


def kv_round_q_ref(q: torch.Tensor, k_type: str) -> torch.Tensor:
    """q as K's vec_dot_type sees it (ggml's mul_mat converts src1 to it): f32 as is, f16 rounded, q8_0 blocks."""
    if k_type == "f32":
        return q.float().double()
    if k_type == "f16":
        return q.half().double()
    qq, d = quantize_q8_0(q)
    return (qq.double().reshape(*q.shape[:-1], -1, QK) * d.double()[..., None]).reshape(q.shape)


def attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, n_kv: int, n_head: int,
                  n_head_kv: int, head_dim: int, scale: float = 0.0, softcap: float = 0.0,
                  window: int = 0, k_type: str = "f16", v_type: str = "f16") -> torch.Tensor:
    """q [n_head, head_dim] (roped); caches [n_ctx] rows of n_head_kv*head_dim values of k_type / v_type (f16:
    llama.cpp's default; kv_store_ref's layouts); float64 [n_head*head_dim]. Gemma's options: scale (0:
    1/sqrt(head_dim)), scores capped to softcap*tanh(s/softcap), only the last `window` rows.
    q meets K in K's vec_dot_type (kv_round_q_ref); the probabilities meet an f16 V rounded to f16 (flash_attn off:
    kq converted to V's vec_dot_type), an f32 or q8_0 V unrounded (q8_0 V: llama.cpp's flash attention, which
    converts V rows to f32)."""
    lo = n_kv - window if 0 < window < n_kv else 0
    k = kv_values_ref(k_cache[lo:n_kv], k_type).reshape(n_kv - lo, n_head_kv, head_dim)
    v = kv_values_ref(v_cache[lo:n_kv], v_type).reshape(n_kv - lo, n_head_kv, head_dim)
    out = []
    for h in range(n_head):
        g = h // (n_head // n_head_kv)
        qh = kv_round_q_ref(q[h], k_type)
        s = (k[:, g, :] @ qh) * (scale or 1.0 / math.sqrt(head_dim))
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        p = torch.softmax(s, dim=0)
        if v_type == "f16":
            p = p.half().double()  # kq rounded to f16 for the f16 V product
        out.append(p @ v[:, g, :])
    return torch.cat(out)


def decode_layer_ref(config, layer, x: torch.Tensor, pos: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor, sparse: dict | None = None) -> torch.Tensor:
    """One decode step of one layer (ModelConfig, LayerWeights). Writes K/V[pos] (f16) into the caches and
    returns the new residual x (float32 [d]). `sparse`: keyword arguments of ffn_sparse_ref (down_t, t_h, t_x,
    gate_t, up_t) for the neuron-sparse FFN instead of the dense one."""
    c = config
    hd, nh, nkv = c.head_dim, c.n_head, c.n_head_kv
    x = x.double()
    n = rmsnorm_ref(x, _vec(layer.input_layernorm), c.norm_eps).float()
    q = matvec_ref(layer.q_proj, n)
    k = matvec_ref(layer.k_proj, n)
    v = matvec_ref(layer.v_proj, n)
    for t, b in ((q, layer.q_bias), (k, layer.k_bias), (v, layer.v_bias)):
        if b is not None:
            t += _vec(b)
    if layer.q_norm is not None:  # qwen3: every head RMS-normalised before RoPE
        q = torch.stack([rmsnorm_ref(h, _vec(layer.q_norm), c.norm_eps) for h in q.view(nh, hd)]).reshape(-1)
        k = torch.stack([rmsnorm_ref(h, _vec(layer.k_norm), c.norm_eps) for h in k.view(nkv, hd)]).reshape(-1)
    q = rope_ref(q.view(nh, hd), cos[pos], sin[pos], c.rope_style)
    k = rope_ref(k.view(nkv, hd), cos[pos], sin[pos], c.rope_style)
    k_cache[pos] = k.reshape(-1).to(k_cache.dtype)
    v_cache[pos] = v.to(v_cache.dtype)
    att = attention_ref(q, k_cache, v_cache, pos + 1, nh, nkv, hd)
    x = x + matvec_ref(layer.o_proj, att.float())
    n = rmsnorm_ref(x, _vec(layer.post_attention_layernorm), c.norm_eps).float()
    if sparse is not None:
        return (x + ffn_sparse_ref(c, layer, n, **sparse)[0]).float()
    u = matvec_ref(layer.up_proj, n)
    g = matvec_ref(layer.gate_proj, n) if layer.gate_proj is not None else None
    h = ffn_ref(g, u, c.activation, c.ffn_kind)
    x = x + matvec_ref(layer.down_proj, h.float())
    return x.float()


def head_ref(config, weights, x: torch.Tensor) -> torch.Tensor:
    """Final rmsnorm + LM head: float64 logits [n_vocab]."""
    n = rmsnorm_ref(x, _vec(weights.norm), config.norm_eps).float()
    return matvec_ref(weights.lm_head, n)
