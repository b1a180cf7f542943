"""Load-time conversion of GGUF tensor types the kernels do not read (DESIGN decision 4).

The kernels read F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K and Q6_K (the K-quants as stored, so a
Q4_K_M file runs at its own size: kernels/csrc/kquant.h). Every other type is converted once, when the model
is loaded: dequantized with gguf-py's reference dequantizers (`gguf.quants.dequantize`) and requantized with
`gguf.quants.quantize` into the native type chosen below. The loss is measured while converting and
returned in a `ConversionReport` that the CLI prints.

How the targets were chosen (relative RMS error ||w' - w|| / ||w||, ggml's own quantizer via
`ggml_quantize_chunk`, 1024x1536 N(0,1) matrix; SmolLM2's token_embd rows and Student-t(4) data agree):

    source   own error   -> Q4_1 (5.0 bpw)          -> Q8_0 (8.5 bpw)
    Q2_K     0.297       +0.064, total 0.304 (+2%)  +0.005, total 0.297
    Q3_K     0.151       +0.081, total 0.173 (+15%) +0.005, total 0.151
    Q4_K     0.071       +0.043, total 0.084 (+18%) +0.005, total 0.072
    Q5_K     0.036       +0.076, total 0.085        +0.005, total 0.037
    Q6_K     0.018       +0.078, total 0.080        +0.005, total 0.019
    IQ2_XXS/XS/S, IQ1_S/M      total +0.05% .. +4%  (like Q2_K)
    IQ3_XXS/IQ3_S              total +8% / +13%
    IQ4_NL/IQ4_XS              total +49%           +0.001

Rule: Q4_1 where requantizing raises the source's own error by less than 5 %, Q8_0 otherwise; 5-, 6- and
8-bit types always go to Q8_0 (a 4-bit target would multiply their error by 2-4). The Q4_K/Q5_K/Q6_K rows
above are what those types cost before the kernels read them (Q6_K -> Q8_0 was +30 % memory); they no longer
convert. Q5_0/Q5_1 (llama.cpp's fallback for K-quant tensors whose rows are not a multiple of 256 values,
e.g. SmolLM2's 576-wide ones), Q2_K, Q3_K and the IQ types still do, and the load message says which.

Speed (numpy, one core): dequantize ~270 M values/s, quantize Q8_0 ~240 M/s, Q4_1 ~170 M/s, so a 7B
model takes about a minute; a tqdm bar is shown when the work exceeds a few seconds.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from ..errors import ModelFormatError
from ..core.tensor import NATIVE_TYPES, QTensor

TARGET: dict[Q, Q] = {
    Q.F64: Q.F32,
    Q.Q5_0: Q.Q8_0, Q.Q5_1: Q.Q8_0, Q.Q2_K: Q.Q4_1, Q.Q3_K: Q.Q8_0,
    Q.IQ1_S: Q.Q4_1, Q.IQ1_M: Q.Q4_1, Q.IQ2_XXS: Q.Q4_1, Q.IQ2_XS: Q.Q4_1, Q.IQ2_S: Q.Q4_1,
    Q.IQ3_XXS: Q.Q8_0, Q.IQ3_S: Q.Q8_0, Q.IQ4_NL: Q.Q8_0, Q.IQ4_XS: Q.Q8_0,
    # Ternary (TQ*) and fp4 (MXFP4, NVFP4) grids are not uniform 16-level grids: Q4_1 adds 20-50 %.
    Q.TQ1_0: Q.Q8_0, Q.TQ2_0: Q.Q8_0, Q.MXFP4: Q.Q8_0, Q.NVFP4: Q.Q8_0,
}
# Above this many values (about 2 s of numpy work) conversion shows a progress bar.
PROGRESS_MIN_VALUES = 400_000_000


@dataclass
class ConversionEntry:
    """Tensors of one source type converted to one target type, with the loss summed over them."""

    source: str
    target: str
    count: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    sq_error: float = 0.0  # sum of (converted - original)^2 over all values
    sq_value: float = 0.0  # sum of original^2

    @property
    def rel_rms_error(self) -> float:
        return float(np.sqrt(self.sq_error / self.sq_value)) if self.sq_value else 0.0


@dataclass
class ConversionReport:
    """What `convert_tensor` did during one load, keyed by "SOURCE->TARGET" (plus a note for transposes)."""

    entries: dict[str, ConversionEntry] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def __str__(self) -> str:
        parts = []
        for key, e in self.entries.items():
            parts.append(f"{e.count} {key} tensor{'s' if e.count != 1 else ''} "
                         f"({_mib(e.bytes_before)} -> {_mib(e.bytes_after)}, "
                         f"relative RMS error {e.rel_rms_error:.2e})")
        return "; ".join(parts) if parts else "nothing converted"

    def add(self, key: str, source: Q, target: Q, before: int, after: int, ref: np.ndarray, new: np.ndarray):
        e = self.entries.setdefault(key, ConversionEntry(source.name, target.name))
        e.count += 1
        e.bytes_before += before
        e.bytes_after += after
        e.sq_error += float(np.sum((new.astype(np.float64) - ref) ** 2))
        e.sq_value += float(np.sum(ref.astype(np.float64) ** 2))


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def needs_conversion(qtype: Q) -> bool:
    return qtype not in NATIVE_TYPES


def target_type(qtype: Q, name: str = "", path: str = "") -> Q:
    """The native type `qtype` converts to; ModelFormatError if gguf-py cannot dequantize it."""
    if qtype in NATIVE_TYPES:
        return qtype
    if qtype in TARGET:
        return TARGET[qtype]
    where = f"{path}: " if path else ""
    raise ModelFormatError(
        f"{where}tensor {name} has type {qtype.name}, which powerinfer cannot read "
        f"(readable: {', '.join(t.name for t in (*NATIVE_TYPES, *TARGET))})")


def to_float(qtype: Q, data: np.ndarray) -> np.ndarray:
    """float32 values of a raw GGUF tensor (rows of bytes for block types) via gguf-py's dequantizers."""
    if qtype == Q.F64:
        return np.asarray(data, dtype=np.float64).astype(np.float32)
    return dequantize(np.asarray(data).view(np.uint8) if qtype not in (Q.F32, Q.F16) else np.asarray(data), qtype)


def from_float(values: np.ndarray, qtype: Q) -> np.ndarray:
    """Encode float32 rows as `qtype` in QTensor's layout (typed arrays for F32/F16/BF16, else uint8 rows)."""
    out = quantize(np.ascontiguousarray(values, dtype=np.float32), qtype)
    return out.view(np.uint16) if qtype == Q.BF16 else out


def convert_tensor(t: QTensor, report: ConversionReport, values: np.ndarray | None = None) -> QTensor:
    """`t` in its native target type (unchanged if already native), loss recorded in `report`."""
    if not needs_conversion(t.qtype):
        return t
    target = target_type(t.qtype, t.name)
    ref = values if values is not None else to_float(t.qtype, t.data).reshape(t.shape)
    data = from_float(ref.reshape(t.rows, t.cols) if len(t.shape) > 1 else ref, target)
    new = QTensor(t.name, target, t.shape, data)
    report.add(f"{t.qtype.name}->{target.name}", t.qtype, target, t.nbytes, new.nbytes, ref,
               to_float(target, data).reshape(t.shape))
    return new


def transposed_qtype(qtype: Q, new_row_len: int) -> Q:
    """The format of a matrix's transpose (down_proj -> neuron-major down_t, gate/up -> input-major), for the
    reference `transpose` below and its C twin kernels.transposed. Float types are transposed exactly;
    block-quantized ones must be re-blocked along the other axis, so they are requantized to Q8_0 (one 8-bit
    rounding, ~0.5 % relative RMS) rather than stacking a second 4-bit rounding on top of the first (~+40 %
    error); F16 when the new rows do not fill whole Q8_0 blocks."""
    if qtype in (Q.F32, Q.F16, Q.BF16):
        return qtype
    return Q.Q8_0 if new_row_len % GGML_QUANT_SIZES[Q.Q8_0][0] == 0 else Q.F16


def transpose(t: QTensor, report: ConversionReport | None = None, name: str | None = None) -> QTensor:
    """The transposed matrix in `transposed_qtype` (numpy; the loss of a requantization goes to `report`)."""
    shape = (t.shape[1], t.shape[0])
    target = transposed_qtype(t.qtype, shape[1])
    if t.qtype in (Q.F32, Q.F16, Q.BF16):  # exact
        data = np.ascontiguousarray(np.asarray(t.data).T)
        return QTensor(name or t.name, t.qtype, shape, data)
    values = to_float(t.qtype, t.data).reshape(t.shape).T
    data = from_float(values, target)
    new = QTensor(name or t.name, target, shape, data)
    if report is not None:
            report.add(f"{t.qtype.name}->{target.name} (transposed)", t.qtype, target, t.nbytes, new.nbytes, values,
                   to_float(target, data).reshape(shape))
    return new

