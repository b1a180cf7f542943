"""Wrappers of the compiled kernels (`powerinfer._C`): ISA selection, addresses of arrays, and one call per
kernel on torch tensors (dequantize, matvec, matmul, row gather, neuron-major axpy, Q8_0 quantization, the
neuron-major transpose, the DRAM read probe). The C functions take raw addresses (Python ints); these extract them
once (arrays.py) and check shapes. The slow twins are in `reference.py`."""
from __future__ import annotations

import statistics

import numpy as np
import torch

from .. import _C
from ..core.tensor import QTensor
from .arrays import _weight, address

isa = _C.isa
set_isa = _C.set_isa
cpu_features = _C.cpu_features


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
    _C.sparse_gather(qtype, addr, w.rows, w.cols, idx.data_ptr(), idx.numel(), x.data_ptr(), y.data_ptr(), n_threads)
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
    _C.sparse_axpy(qtype, addr, wt.rows, wt.cols, idx.data_ptr(), idx.numel(), h.data_ptr(), y.data_ptr(), n_threads,
                   c0, wt.cols if c1 is None else c1)
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


def read_bandwidth(n_threads: int = 1, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes per second of a plain sequential read over a buffer far larger than the caches, split over
    n_threads (median of `repeats` passes after one that faults the pages in): the DRAM bandwidth the sparse
    kernels are measured against and the slow tier's speed in the placement cost model."""
    buf = np.ones(nbytes, dtype=np.uint8)
    ns = statistics.median(_C.read_bandwidth(address(buf), nbytes, n_threads, 1) for _ in range(repeats))
    return nbytes / ns * 1e9
