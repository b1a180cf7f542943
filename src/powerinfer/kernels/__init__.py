"""Compiled CPU kernels (`powerinfer._C`) with friendly wrappers, and `bind_decoder`.

The extension is a plain CPython module that takes raw addresses (Python ints); this module extracts them
once from torch tensors / numpy arrays / QTensors and keeps the arrays alive. Decode on the CPU is one C call
per token (`Decoder.step`), because torch-eager glue costs 120-230 us per layer (DESIGN decision 3).
Numerics mimic ggml's CPU backend so greedy tokens agree with llama.cpp (see csrc/pi.h); BF16 weights
see bf16-rounded activations as in ggml (vec_dot_type BF16). The slow twins are in `reference.py`.
"""
from __future__ import annotations

import statistics

import numpy as np
import torch

from .. import _C
from ..core.tensor import QTensor

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


def _idx(idx) -> torch.Tensor:
    return torch.as_tensor(idx, dtype=torch.int32).contiguous().reshape(-1)


def gather(w: QTensor, idx, x: torch.Tensor, n_threads: int = 1, out: torch.Tensor | None = None) -> torch.Tensor:
    """Row-sparse dot y[j] = W[idx[j]] . x on the GGUF rows (float32 [len(idx)]); dense activation numerics."""
    data, addr, qtype = _weight(w)
    idx = _idx(idx)
    x = _x(x, w.cols).reshape(-1)
    y = _out((idx.numel(),), out)
    _C.sparse_run(1, qtype, addr, w.rows, w.cols, idx.data_ptr(), idx.numel(), x.data_ptr(), y.data_ptr(),
                  n_threads, 0, 0)
    return y


def axpy(wt: QTensor, idx, h: torch.Tensor, y: torch.Tensor | None = None, c0: int = 0, c1: int | None = None,
         n_threads: int = 1) -> torch.Tensor:
    """Neuron-major axpy y[c0:c1] += sum_j h[j] * Wt[idx[j], c0:c1] (y float32 [Wt.cols], zeros if None);
    threads split the index list and their sums are added, as in the decoder."""
    data, addr, qtype = _weight(wt)
    idx = _idx(idx)
    h = h.detach().to(torch.float32).contiguous().reshape(-1)
    if h.numel() != idx.numel():
        raise ValueError(f"{idx.numel()} indices but {h.numel()} values")
    y = torch.zeros(wt.cols, dtype=torch.float32) if y is None else _out((wt.cols,), y)
    _C.sparse_run(2, qtype, addr, wt.rows, wt.cols, idx.data_ptr(), idx.numel(), h.data_ptr(), y.data_ptr(),
                  n_threads, c0, wt.cols if c1 is None else c1)
    return y


def quantize_q8_0(x: torch.Tensor) -> np.ndarray:
    """Q8_0 blocks (uint8 [rows, cols/32*34]) of a float32 [rows, cols] tensor, with ggml's x86 rounding."""
    x = x.detach().to(torch.float32).contiguous()
    rows, cols = x.shape
    if cols % 32:
        raise ValueError("Q8_0 rows must be a multiple of 32 long")
    out = np.empty((rows, cols // 32 * 34), dtype=np.uint8)
    _C.quantize_q8_0(x.data_ptr(), rows * cols, address(out))
    return out


# Neuron-major copies of block-format matrices are requantized to Q8_0: a second 4-bit rounding along the other
# axis would add as much error as the original quantization, while 8 bits add ~1/254 of a block's range.
TRANSPOSE_FORMAT = {0: 0, 1: 1, 30: 30}  # F32, F16, BF16 transpose exactly; the rest -> Q8_0 (8)


def transposed_qtype(t: QTensor):
    """The format `transposed(t)` stores."""
    from gguf import GGMLQuantizationType as QT

    return QT(TRANSPOSE_FORMAT.get(int(t.qtype), 8))


def transposed(t: QTensor, name: str | None = None) -> QTensor:
    """The [cols, rows] copy of a weight (down_proj -> down_t, gate/up -> input-major) in TRANSPOSE_FORMAT."""
    from gguf import GGMLQuantizationType as QT

    qtype = int(transposed_qtype(t))
    if qtype == 8:  # tile by tile in C, without full-size f32 copies (needs t.rows, the new row length, % 32 == 0)
        src, addr, src_qtype = _weight(t)
        data = np.empty((t.cols, t.rows // 32 * 34), dtype=np.uint8)
        _C.transpose_q8_0(src_qtype, addr, t.rows, t.cols, address(data))
        return QTensor(name or f"{t.name}.T", QT(qtype), (t.cols, t.rows), data)
    dense = dequantize(t).t().contiguous()
    if qtype == 0:
        data = dense.numpy()
    elif qtype == 1:
        data = dense.to(torch.float16).numpy()
    else:  # 30, BF16: the last exact format in TRANSPOSE_FORMAT
        data = dense.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return QTensor(name or f"{t.name}.T", QT(qtype), (t.cols, t.rows), data)


def read_bandwidth(n_threads: int = 1, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes per second of a plain sequential read over a buffer far larger than the caches, split over
    n_threads (median of `repeats` passes after one that faults the pages in): the DRAM bandwidth the sparse
    kernels are measured against and the slow tier's speed in the placement cost model."""
    buf = np.ones(nbytes, dtype=np.uint8)
    ns = statistics.median(_C.read_bandwidth(address(buf), nbytes, n_threads, 1) for _ in range(repeats))
    return nbytes / ns * 1e9


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


class SparseFFN:
    """The neuron-sparse FFN of a bound Decoder (decode steps, and prompts of up to 8 tokens): per layer a
    neuron-major down_t (the model's own `down_t` when the file has one, else a transposed copy) and thresholds
    {"h": t_h, "x": t_x} (0 = off; with t_h = t_x = 0 only exact zeros are skipped, which is the exact ReLU
    path). Input-major gate/up copies are made only for layers with t_x > 0. Copies are cached, so changing
    thresholds is cheap; `off()` returns the decoder to the dense FFN."""

    def __init__(self, dec: "_C.Decoder", config, weights):
        self.dec, self.config, self.weights = dec, config, weights
        self._copies: dict[tuple[int, str], QTensor] = {}
        self.thresholds: list[dict[str, float]] | None = None
        self.predictors = None
        self._pred_keep: list[torch.Tensor] = []  # the f16 predictor matrices the decoder reads
        self._pred_bytes: list[int] = []
        self._row_bytes: torch.Tensor | None = None  # [n_layer, 5], see bytes_per_layer
        self._kept = torch.zeros(3, config.n_layer, dtype=torch.int32)

    def _copy(self, il: int, role: str) -> QTensor:
        key = (il, role)
        if key not in self._copies:
            lw = self.weights.layers[il]
            own = lw.down_t if role == "down" else None
            src = {"down": lw.down_proj, "gate": lw.gate_proj, "up": lw.up_proj}[role]
            self._copies[key] = own if own is not None else transposed(src, f"blk.{il}.{role}_t")
        return self._copies[key]

    @staticmethod
    def _mat(t: QTensor | None):
        if t is None:
            return None
        data, addr, qtype = _weight(t)
        return (addr, qtype)

    def on(self, thresholds: list[dict[str, float]] | None = None, predictors=None) -> None:
        """`predictors`: a sparse.predictor.PredictorSet (its fc1/fc2 are bound as f16) or None."""
        n = self.config.n_layer
        thresholds = thresholds or [{} for _ in range(n)]
        if len(thresholds) != n:
            raise ValueError(f"{len(thresholds)} layers of thresholds for a {n}-layer model")
        if predictors is not None and predictors.n_layer != n:
            raise ValueError(f"{predictors.n_layer} predictor layers for a {n}-layer model")
        self._pred_keep, self._pred_bytes = [], [0] * n
        for il in range(n):
            if predictors is None:
                self.dec.set_predictor(il, None, None, 1, 0.0)
                continue
            fc1, fc2 = (t.detach().to(torch.float16).contiguous() for t in (predictors.fc1[il], predictors.fc2[il]))
            self._pred_keep += [fc1, fc2]
            self._pred_bytes[il] = (fc1.numel() + fc2.numel()) * 2
            self.dec.set_predictor(il, (fc1.data_ptr(), 1), (fc2.data_ptr(), 1), fc1.shape[0],
                                   float(predictors.threshold_of(il)))
        self.predictors = predictors
        for il, th in enumerate(thresholds):
            t_h, t_x = float(th.get("h", 0.0)), float(th.get("x", 0.0))
            lw = self.weights.layers[il]
            gate_t = self._copy(il, "gate") if t_x > 0 and lw.gate_proj is not None else None
            up_t = self._copy(il, "up") if t_x > 0 else None
            self.dec.set_sparse(il, self._mat(self._copy(il, "down")), self._mat(gate_t), self._mat(up_t), t_h, t_x)
        self.thresholds = [dict(t) for t in thresholds]

    def off(self) -> None:
        for il in range(self.config.n_layer):
            self.dec.set_sparse(il, None, None, None, 0.0, 0.0)
            self.dec.set_predictor(il, None, None, 1, 0.0)
        self.thresholds, self.predictors = None, None

    def kept(self) -> torch.Tensor:
        """int32 [3, n_layer] of the last decode step: neurons kept (down rows read), FFN input channels kept, up
        rows read (a buffer the next call overwrites)."""
        self.dec.kept(self._kept.data_ptr())
        return self._kept

    def bytes_per_layer(self, kept: torch.Tensor) -> torch.Tensor:
        """FFN weight bytes each layer read in a step with these `kept` counts (int64 [n_layer])."""
        if self._row_bytes is None:  # per layer: dense gate, input-major column, up row, down_t row, gate row
            self._row_bytes = torch.tensor([self._layer_bytes(il) for il in range(self.config.n_layer)],
                                           dtype=torch.int64)
        th = self.thresholds or [{}] * self.config.n_layer
        x_on = torch.tensor([t.get("x", 0.0) > 0 for t in th])
        rb = self._row_bytes
        k = kept.to(torch.int64)
        if self.predictors is not None:  # predictor + the candidates' gate and up rows
            in_bytes = torch.tensor(self._pred_bytes, dtype=torch.int64) + k[2] * (rb[:, 2] + rb[:, 4])
        else:
            in_bytes = torch.where(x_on, k[1] * rb[:, 1], rb[:, 0] + k[2] * rb[:, 2])
        return in_bytes + k[0] * rb[:, 3]

    def _layer_bytes(self, il: int) -> list[int]:
        from ..core.tensor import row_bytes

        lw, n_ff = self.weights.layers[il], self.config.n_ff
        gate = lw.gate_proj.nbytes if lw.gate_proj is not None else 0
        col = sum(row_bytes(transposed_qtype(t), n_ff) for t in (lw.gate_proj, lw.up_proj) if t is not None)
        gate_row = lw.gate_proj.row_bytes if lw.gate_proj is not None else 0
        return [gate, col, lw.up_proj.row_bytes, self._copy(il, "down").row_bytes, gate_row]


__all__ = ["Decoder", "isa", "set_isa", "cpu_features", "available_isas", "address", "dequantize", "matvec",
           "matmul", "gather", "axpy", "quantize_q8_0", "transposed", "bind_decoder", "SparseFFN"]
