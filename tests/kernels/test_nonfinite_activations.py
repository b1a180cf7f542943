"""Activations holding inf/NaN (from overflowing weights) quantize to a NaN block on every ISA: the integer paths
never see them (converting NaN to int is undefined; x86 gave INT_MIN, whose block sum made 8 * sum overflow in the
Q4_0 kernels, UBSan's finding under the fuzz corpus, and a NaN activation came out as a large finite garbage value).
Every output row that reads the block is NaN, which the runner then reports."""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from kernel_helpers import ISAS, make_qtensor
from powerinfer import kernels


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0], ids=lambda q: q.name)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_nonfinite_activation_gives_nan_rows(use_isa, isa, qtype, bad):
    use_isa(isa)
    rng = np.random.default_rng(3)
    w = make_qtensor(qtype, 37, 96, rng, 0.1)
    x = torch.from_numpy(rng.standard_normal(96).astype(np.float32))
    x[40] = bad  # the second of three q8 blocks: every row reads it
    for packed in (False, True):
        y = kernels.matvec(w, x, 1, packed=packed)
        assert torch.isnan(y).all(), (packed, y[:4])
    x[40] = 1.0  # and a finite block after it quantizes as before
    assert torch.isfinite(kernels.matvec(w, x, 1)).all()
