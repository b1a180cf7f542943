"""What the C kernels read, as addresses: the data address of a numpy array (or a torch tensor), the contiguous
float32 vectors and weight bytes a decoder binds, and the neuron-major copies the sparse FFN reads (transposes and
csrc/panels.c's neuron panels). numpy only, so the C decoder's process need not import torch (#17)."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from .. import _C
from ..core.tensor import QTensor
from ..formats import quants


def address(a) -> int:
    """Data address of a numpy array (read-only memmaps included) or a torch tensor."""
    if isinstance(a, np.ndarray):
        return a.__array_interface__["data"][0]
    return a.data_ptr()


def _f32_vec(t):
    """A C-contiguous float32 version of a QTensor / tensor / array (the original if already so)."""
    if isinstance(t, QTensor):
        if int(t.qtype) != 0:
            return t.dequantize_array().reshape(-1)
        t = t.data
    if not isinstance(t, np.ndarray) and hasattr(t, "detach"):  # a torch tensor stays one
        return t.detach().float().contiguous()
    a = np.asarray(t)
    return a if a.dtype == np.float32 and a.flags["C_CONTIGUOUS"] else np.ascontiguousarray(a, dtype=np.float32)


def _weight(t: QTensor) -> tuple[np.ndarray, int, int]:
    """(contiguous data, address, qtype) of a weight matrix, checked against its declared size; the qtype is the
    C kernels' code (a PanelTensor's is its panel type)."""
    data = np.asarray(t.data)
    if not data.flags["C_CONTIGUOUS"]:
        data = np.ascontiguousarray(data)
    if data.nbytes != t.nbytes:
        raise ValueError(f"{t.name}: {data.nbytes} bytes of data, expected {t.rows} x {t.row_bytes}")
    return data, address(data), int(t.qtype) + (PANEL_TYPES if isinstance(t, PanelTensor) else 0)


# csrc/panels.h: a panel copy's C type is 100 + its source's GGML type
PANEL_TYPES = 100
PANEL_SOURCES = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0)


class PanelTensor(QTensor):
    """The neuron panels of a row-major Q4_0/Q4_1/Q8_0 matrix [d, n_ff] (csrc/panels.c): a neuron-major [n_ff, d]
    copy for the sparse FFN's down_t made of the source's own blocks regrouped, 32 neurons a panel, so it holds
    the same bytes and the same weights bit for bit (a requantized Q8_0 down_t is 1.9x a Q4_0 down and rounds
    every weight again). `qtype` is the source's; rows are neurons and `row_bytes` their average share."""

    def dequantize(self):
        from .reference import panels_dequantize

        return panels_dequantize(self)

    def dequantize_array(self) -> np.ndarray:
        return self.dequantize().numpy()


def panels(t: QTensor, name: str | None = None) -> PanelTensor:
    """The neuron panels of `t` [d, n_ff] (Q4_0, Q4_1 or Q8_0; both sizes multiples of 32)."""
    if t.qtype not in PANEL_SOURCES or t.rows % 32 or t.cols % 32:
        raise ValueError(f"{t.name}: {t.qtype.name} [{t.rows}, {t.cols}] has no neuron panels")
    _, addr, qtype = _weight(t)
    out = PanelTensor(name or f"{t.name}.panels", t.qtype, (t.cols, t.rows), None)
    out.data = np.empty(out.nbytes, dtype=np.uint8)
    _C.make_panels(qtype, addr, t.rows, t.cols, address(out.data))
    return out


def transposed_qtype(t: QTensor):
    """The format `transposed(t)` stores (formats.quants.transposed_qtype: the one rule)."""
    return quants.transposed_qtype(t.qtype, t.rows)


def transposed(t: QTensor, name: str | None = None) -> QTensor:
    """The [cols, rows] copy of a weight (down_proj -> down_t, gate/up -> input-major): the fast twin of
    formats.quants.transpose. Q8_0 results are made tile by tile in C, without full-size f32 copies (byte for
    byte ggml's x86 Q8_0 rounding of the transposed dequantized matrix); float ones are the reference's exact
    transposes."""
    qtype = transposed_qtype(t)
    if qtype != GGMLQuantizationType.Q8_0:
        return quants.transpose(t, name=name or f"{t.name}.T")
    _, addr, src_qtype = _weight(t)
    data = np.empty((t.cols, t.rows // 32 * 34), dtype=np.uint8)
    _C.transpose_q8_0(src_qtype, addr, t.rows, t.cols, address(data))
    return QTensor(name or f"{t.name}.T", qtype, (t.cols, t.rows), data)
