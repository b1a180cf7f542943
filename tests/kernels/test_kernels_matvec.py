"""Parity of the C format kernels with their twins in kernels/reference.py, over formats x shapes x threads x
ISA paths x layouts (GGUF rows and the packed 16-row layout).

Tolerance: the integer block dots are exact on both sides and the reference sums the block terms in float64,
so the only difference is the kernels' f32 accumulation (and f32 products of the scales). For K summands that
is at most ~K * 2^-24 of sum|terms| in the worst case; we allow 4e-6 * sum|terms| (observed <= 1.1e-6, the
largest for GGUF-row Q8_0/Q4_0 whose offset correction rides in one lane). A wrong nibble, block, scale or
row is off by O(|terms|), four to six orders of magnitude more.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize

from kernel_helpers import FORMATS, ISAS, make_qtensor
from powerinfer import _C, kernels
from powerinfer.kernels import reference as R

RTOL = 4e-6
# SmolLM2 projections (576->1536 gate/up, 1536->576 down, 576->192 k/v), odd rows (neither a multiple of 4
# nor of 16), short rows, and one multiple-of-32-but-not-64 width.
SHAPES = [(1536, 576), (576, 1536), (192, 576), (37, 64), (61, 96), (5, 32)]


def _check(y: torch.Tensor, w, x: torch.Tensor):
    terms = R.block_terms(w, x)
    ref, bound = terms.sum(-1), terms.abs().sum(-1)
    err = (y.double() - ref).abs()
    worst = (err / bound.clamp_min(1e-30)).max().item()
    assert worst <= RTOL, f"max |err| / sum|terms| = {worst:.2e}"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", FORMATS, ids=lambda q: q.name)
def test_matvec(use_isa, isa, qtype):
    use_isa(isa)
    rng = np.random.default_rng(int(qtype) * 7 + 1)
    for rows, cols in SHAPES:
        w = make_qtensor(qtype, rows, cols, rng, 0.1)
        x = torch.from_numpy(rng.standard_normal(cols).astype(np.float32))
        x[3] = 0.0  # a zero and a large value: quantization edge cases
        x[5] *= 20
        for n_threads in (1, 2):
            for packed in (False, True):
                _check(kernels.matvec(w, x, n_threads, packed=packed), w, x)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", FORMATS, ids=lambda q: q.name)
def test_matmul(use_isa, isa, qtype):
    """Register-blocked prefill kernel: every token-tile remainder (n_tok % 4) and both thread counts."""
    use_isa(isa)
    rng = np.random.default_rng(int(qtype) + 100)
    for rows, cols in [(576, 576), (37, 64), (61, 96)]:
        w = make_qtensor(qtype, rows, cols, rng, 0.1)
        for n_tok in (1, 3, 6, 9):
            x = torch.from_numpy(rng.standard_normal((n_tok, cols)).astype(np.float32))
            for n_threads in (1, 2):
                y = kernels.matmul(w, x, n_threads)
                _check(y, w, x)
                # each token equals the single-token kernel on the same packed layout, bit for bit
                for t in range(n_tok):
                    assert torch.equal(y[t], kernels.matvec(w, x[t], 1, packed=True))


def test_lm_head_shape(use_isa):
    """SmolLM2's tied Q8_0 LM head, 49152 x 576, once on the selected ISA with 2 threads."""
    rng = np.random.default_rng(5)
    w = make_qtensor(Q.Q8_0, 49152, 576, rng, 0.05)
    x = torch.from_numpy(rng.standard_normal(576).astype(np.float32))
    _check(kernels.matvec(w, x, 2, packed=True), w, x)


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda q: q.name)
def test_dequantize_matches_gguf(qtype):
    rng = np.random.default_rng(int(qtype) + 3)
    w = make_qtensor(qtype, 7, 96, rng)
    expect = torch.from_numpy(gguf_dequantize(np.asarray(w.data).view(np.uint8), qtype).reshape(7, 96)
                              .astype(np.float32)) if qtype not in (Q.F32, Q.F16) else w.dequantize()
    assert torch.equal(R.dequantize(w), expect)
    assert torch.equal(kernels.dequantize(w), expect)


@pytest.mark.parametrize("isa", ISAS)
def test_activation_quantization_is_bit_exact(use_isa, isa):
    """q8_1 activation blocks equal the reference exactly (they decide the integer dots)."""
    use_isa(isa)
    rng = np.random.default_rng(11)
    x = torch.from_numpy((rng.standard_normal(32 * 40) * np.repeat(rng.uniform(0.01, 30, 40), 32)).astype(np.float32))
    x[:32] = 0.0  # all-zero block: d = 0, q = 0
    x[32:64] = torch.arange(32) - 15.5  # ties at .5 after scaling: round half to even
    qs = torch.empty(x.numel(), dtype=torch.int8)
    d, s = torch.empty(40), torch.empty(40)
    sm = torch.empty(40, dtype=torch.int32)
    _C.quantize_act(x.data_ptr(), x.numel(), qs.data_ptr(), d.data_ptr(), s.data_ptr(), sm.data_ptr())
    rq, rd, rs, rsum = R.quantize_q8(x)
    assert torch.equal(qs.to(torch.int32), rq)
    assert torch.equal(d, rd)
    assert torch.equal(s, rs)
    assert torch.equal(sm, rsum)


def test_kernels_differ_from_a_wrong_reference():
    """The parity check can fail: a weight with one nibble flipped is caught."""
    rng = np.random.default_rng(2)
    w = make_qtensor(Q.Q4_1, 16, 64, rng)
    x = torch.from_numpy(rng.standard_normal(64).astype(np.float32))
    y = kernels.matvec(w, x, packed=True)
    bad = np.array(w.data, copy=True)
    bad[3, 10] ^= 0x0F
    w_bad = type(w)(w.name, w.qtype, w.shape, bad)
    with pytest.raises(AssertionError):
        _check(y, w_bad, x)


def test_bad_arguments():
    x = torch.zeros(40)
    with pytest.raises(ValueError):
        _C.matvec(99, x.data_ptr(), 1, 32, x.data_ptr(), x.data_ptr(), 1)
    with pytest.raises(ValueError):
        _C.matvec(int(Q.Q8_0), x.data_ptr(), 1, 40, x.data_ptr(), x.data_ptr(), 1)  # cols % 32
    with pytest.raises(ValueError):
        kernels.set_isa("sse1")
