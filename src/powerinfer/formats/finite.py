"""Non-finite weights: which tensors of a model hold NaN or infinity (a corrupt or hostile file; ggml's
`ggml_validate_row_data`, which llama.cpp runs under --check-tensors, checks the same things).

Floats are checked value by value. Block formats are checked through their f16 scales (Q8_0/Q4_0: d; Q4_1: d and
m; Q4_K/Q5_K: d and dmin; Q6_K: d, its sub-block scales being int8): the quants themselves are small integers,
so a block decodes to a non-finite value exactly when a scale is one.
The scales are read as integers with a strided view (an f16 is non-finite iff its five exponent bits are all set),
so nothing is converted or copied: the bundled SmolLM2 Q4_1 (4.3 M blocks) takes 13-22 ms.
"""
from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

# f16 fields per block (byte offsets) of the native block formats
_SCALE_OFFSETS = {Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
_F16_EXP, _BF16_EXP = 0x7C00, 0x7F80


def _all_set(u16: np.ndarray, mask: int) -> bool:
    """True when any value has every bit of `mask` set (an exponent of all ones: inf or NaN)."""
    return bool(np.any((u16 & mask) == mask))


def is_finite(t) -> bool:
    """Whether the QTensor `t` decodes to finite values only (types other than the native ones: True)."""
    data = np.asarray(t.data)
    if t.qtype == Q.F32:
        return bool(np.isfinite(data).all())
    if t.qtype in (Q.F16, Q.BF16):
        return not _all_set(data.view(np.uint16), _F16_EXP if t.qtype == Q.F16 else _BF16_EXP)
    offsets = _SCALE_OFFSETS.get(t.qtype)
    if offsets is None:
        return True
    raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    block_bytes = GGML_QUANT_SIZES[t.qtype][1]
    n_blocks = raw.size // block_bytes
    for off in offsets:
        scales = np.ndarray((n_blocks,), dtype="<u2", buffer=raw, offset=off, strides=(block_bytes,))
        if _all_set(scales, _F16_EXP):
            return False
    return True


def nonfinite_tensors(weights) -> list[str]:
    """Names of the tensors of `weights` (core.weights.ModelWeights) that hold NaN or infinite values. Each tensor's
    file pages are dropped once checked: the scan reads every page of the file, and a model larger than the RAM
    budget (--ram-budget) must not end up resident because of it."""
    from .pages import release_mapped

    bad = []
    for _, t in weights.named_tensors(distinct=True):
        if not is_finite(t):
            bad.append(t.name)
        release_mapped(t.data)
    return bad
