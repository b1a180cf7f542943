"""Neuron panels (csrc/panels.c): the neuron-major down_t of a Q4_0/Q4_1/Q8_0 down made of its own blocks.

The panels hold the source's weights bit for bit (decoded field by field by reference.panels_dequantize, compared
with gguf-py's dequantization of the source), in the source's bytes; the axpy over them is checked against the
float64 reference on every ISA path, for sorted and unsorted neuron lists and column ranges that end in a partial
vector chunk; and the decoder's sparse FFN reads them as it reads any down_t.

The axpy's bound is f32 rounding over what it actually sums: per output, a panel's neurons (up to 32 terms
h_j q_jc, Q4_0 then less 8 sum h_j, Q4_1 plus m_c sum h_j) and then one term per run of one panel's neurons in
the list (n_ff/32 runs when it is sorted), so at most (runs + 34) roundings of 2^-24 relative to the sum of the magnitudes |s_c| sum |h_j| (|q_jc| + 8) (+ |m_c| sum |h_j|).

"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from kernel_helpers import ISAS, new_kv, rope_tables, tiny_model
from test_kernels_sparse import random_weights
from powerinfer import kernels
from powerinfer.core.sparse_spec import SparseSpec
from powerinfer.kernels import reference as R
from powerinfer.kernels.arrays import PanelTensor, panels

SOURCES = (Q.Q4_0, Q.Q4_1, Q.Q8_0)


@pytest.mark.parametrize("qtype", SOURCES, ids=lambda q: q.name)
@pytest.mark.parametrize("shape", [(96, 160), (576, 1536)])  # (d, n_ff): a tiny one, SmolLM2's down
def test_panels_hold_the_source_weights_bit_for_bit(qtype, shape):
    down = random_weights(qtype, *shape, np.random.default_rng(int(qtype)))
    p = panels(down)
    assert isinstance(p, PanelTensor) and p.shape == (shape[1], shape[0])
    assert p.nbytes == down.nbytes == np.asarray(p.data).nbytes
    assert torch.equal(R.panels_dequantize(p), R.dequantize(down).t().contiguous())


def _check_axpy(p, idx, h, c0=0, c1=None, y0=None, n_threads=1):
    c1 = p.cols if c1 is None else c1
    y0 = torch.zeros(p.cols) if y0 is None else y0
    y = kernels.axpy(p, idx, h, y0.clone(), c0=c0, c1=c1, n_threads=n_threads)
    assert torch.equal(y[:c0], y0[:c0]) and torch.equal(y[c1:], y0[c1:])  # outside the range: untouched
    ref = R.axpy_ref(p, idx, h, c0, c1)
    err = (y[c0:c1].double() - y0[c0:c1].double() - ref).abs()
    panel = idx.long() // 32
    groups = 1 + int((panel[1:] != panel[:-1]).sum())  # runs of one panel in the list: one y term each
    bound = (groups + 34) * 2.0 ** -24 * (_magnitudes(p, idx, h)[c0:c1] + y0[c0:c1].double().abs())  # y0: added to
    assert (err <= bound).all()


def _magnitudes(p, idx, h) -> torch.Tensor:
    """Per output, the sum of the magnitudes the panel axpy adds up (module docstring)."""
    n_ff, d = p.shape
    raw = np.asarray(p.data).reshape(n_ff // 32, -1)
    scale = torch.from_numpy(raw[:, :2 * d].copy().view(np.float16).astype(np.float64)).abs()  # [panels, d]
    mins = torch.from_numpy(raw[:, 2 * d:4 * d].copy().view(np.float16).astype(np.float64)).abs() \
        if p.qtype == Q.Q4_1 else torch.zeros_like(scale)
    panel = idx.long() // 32
    w = R.panels_dequantize(p).double()[idx.long()]
    if p.qtype == Q.Q4_1:  # w = s q + m with m < 0 in these weights: |s q| = w + |m|
        sq = w + mins[panel]
    elif p.qtype == Q.Q4_0:  # w = s (q - 8): |s q| <= |w| + 8 |s|, and the 8 s sum h term adds 8 |s| again
        sq = w.abs() + 16 * scale[panel]
    else:
        sq = w.abs()
    return (h.double().abs()[:, None] * (sq.abs() + mins[panel])).sum(0)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", SOURCES, ids=lambda q: q.name)
def test_panel_axpy_matches_reference(use_isa, isa, qtype):
    use_isa(isa)
    rng = np.random.default_rng(7 + int(qtype))
    for d, n_ff in ((576, 1536), (160, 96), (4096, 256)):  # 576 and 160 end in a partial chunk of outputs
        p = panels(random_weights(qtype, d, n_ff, rng))
        for s in (0.0, 0.5, 0.9, 0.99):
            k = max(1, round(n_ff * (1 - s)))
            idx = torch.from_numpy(np.sort(rng.choice(n_ff, k, replace=False)).astype(np.int32))
            h = torch.from_numpy(rng.standard_normal(k).astype(np.float32))
            for n_threads in (1, 2):
                _check_axpy(p, idx, h, n_threads=n_threads)
        shuffled = torch.from_numpy(rng.permutation(n_ff)[: n_ff // 3].astype(np.int32))  # any order is correct
        _check_axpy(p, shuffled, torch.randn(shuffled.numel()))
        _check_axpy(p, idx, h, c0=32, c1=d - 32, y0=torch.randn(d))  # a column range, accumulating onto y


def test_panels_refuse_what_they_cannot_hold():
    rng = np.random.default_rng(0)
    for bad in (random_weights(Q.F16, 64, 64, rng), random_weights(Q.Q4_0, 48, 64, rng)):  # type; d % 32
        with pytest.raises(ValueError, match="no neuron panels"):
            panels(bad)


@pytest.mark.parametrize("isa", ISAS)
def test_decoder_sparse_ffn_reads_panels(use_isa, isa):
    """Exact ReLU on a Q4_0 model: the sparse FFN reads its down as panels of the same bytes, and every layer
    equals the reference's (float64 over the same weights) as with any other down_t (test_kernels_sparse)."""
    use_isa(isa)
    cfg, w = tiny_model(activation="relu", types=dict(gate=Q.Q4_0, up=Q.Q4_0, down=Q.Q4_1))
    kv, ref_kv = new_kv(cfg, 8), new_kv(cfg, 8)
    cos, sin = rope_tables(cfg, 8)
    dec = kernels.bind_decoder(cfg, w, kv, cos, sin, 2)
    sp = kernels.SparseFFN(dec, cfg, w, use_panels=True)
    sp.on(SparseSpec.uniform(cfg.n_layer, h=0.0))
    for il in range(cfg.n_layer):
        down_t = sp._copy(il, "down")
        assert isinstance(down_t, PanelTensor) and down_t.nbytes == w.layers[il].down_proj.nbytes
    xs = torch.from_numpy(np.random.default_rng(3).standard_normal((4, cfg.d_model)).astype(np.float32))
    for pos in range(4):
        x = xs[pos].clone()
        for il in range(cfg.n_layer):
            xr = R.decode_layer_ref(cfg, w.layers[il], x.clone(), pos, ref_kv.k[il], ref_kv.v[il], cos, sin,
                                    sparse=dict(down_t=sp._copy(il, "down"), t_h=0.0, t_x=0.0))
            dec.layer(il, x.data_ptr(), pos)
            assert (x.double() - xr.double()).abs().max().item() <= 5e-3 * xr.abs().max().item()
    assert (sp.kept().neurons < cfg.n_ff).all()
