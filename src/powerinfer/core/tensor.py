"""A weight tensor kept in its compact on-disk format (DESIGN decision 4).

`data` is the raw bytes of a row-major matrix as GGUF stores it: `rows` rows, each `row_bytes` long,
each row holding `cols` logical values in `qtype`'s block layout. For F32 / F16 / BF16 `data` is the
typed numpy array itself. The arrays are usually read-only memmaps of the model file.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import ModelFormatError

# Formats the kernels read natively; anything else is converted once at load (formats/quants.py).
NATIVE_TYPES = (
    GGMLQuantizationType.F32,
    GGMLQuantizationType.F16,
    GGMLQuantizationType.BF16,
    GGMLQuantizationType.Q8_0,
    GGMLQuantizationType.Q4_0,
    GGMLQuantizationType.Q4_1,
    GGMLQuantizationType.Q4_K,
    GGMLQuantizationType.Q5_K,
    GGMLQuantizationType.Q6_K,
)


def row_bytes(qtype: GGMLQuantizationType, n: int) -> int:
    """Bytes of one row of `n` values in `qtype`'s block layout (QTensor.row_bytes for another row length).

    Used for the layouts a sparse kernel reads: a neuron of `down_t` is a row of d_model values, an input
    channel of a column-major gate/up copy is a row of n_ff values."""
    block, nbytes = GGML_QUANT_SIZES[qtype]
    if n % block:
        raise ModelFormatError(f"a row of {n} values does not fill whole {qtype.name} blocks of {block}")
    return n // block * nbytes


@dataclass
class QTensor:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # torch order: (rows, cols) for matrices, (n,) for vectors
    data: np.ndarray

    @property
    def rows(self) -> int:
        return self.shape[0] if len(self.shape) > 1 else 1

    @property
    def cols(self) -> int:
        return self.shape[-1]

    @property
    def row_bytes(self) -> int:
        return row_bytes(self.qtype, self.cols)

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes

    def dequantize(self):
        """float32 torch tensor of `shape` (reference path: gguf-py's numpy dequantizers)."""
        import torch

        return torch.from_numpy(self.dequantize_array())

    def dequantize_array(self) -> np.ndarray:
        """float32 C-contiguous numpy array of `shape` (gguf-py's numpy dequantizers)."""
        from gguf.quants import dequantize

        if self.qtype == GGMLQuantizationType.F32:
            arr = np.asarray(self.data, dtype=np.float32)
        elif self.qtype == GGMLQuantizationType.F16:
            arr = np.asarray(self.data).view(np.float16).astype(np.float32)
        else:
            arr = dequantize(np.asarray(self.data).view(np.uint8), self.qtype).astype(np.float32)
        return np.ascontiguousarray(arr.reshape(self.shape))
