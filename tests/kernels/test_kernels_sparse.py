"""The neuron-sparse kernels against their twins in kernels/reference.py, and the decoder's sparse FFN.

Sweep: every format x sparsity {0, 0.5, 0.9, 0.99} x the SmolLM2 (1536 neurons x 576) and 7B (11008 x 4096)
layer shapes x threads {1, 2} x every ISA path this CPU runs. Row-sparse dot ("gather", up/gate rows of the
active neurons): the integer block dots are exact on both sides, so the tolerance is the f32 accumulation's,
as for the dense kernels (4e-6 of sum|terms|). Neuron-major axpy (down_t rows): h is f32 on both sides, the
reference sums in float64; the bound is 4e-6 of sum_j |h_j w_jc| per column (K summands of f32 rounding).
Sparsity 0 of the axpy equals the dense product (the sweep's s=0 row is every neuron).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from kernel_helpers import FORMATS, ISAS, new_kv, rope_tables, tiny_model
from powerinfer.core.sparse_spec import SparseSpec
from powerinfer import kernels
from powerinfer.formats import quants
from powerinfer.core.tensor import QTensor
from powerinfer.kernels import reference as R

RTOL = 4e-6
SHAPES = {"smollm2": (1536, 576), "7b": (11008, 4096)}  # (neurons, d_model)
SPARSITY = (0.0, 0.5, 0.9, 0.99)
_BLOCK = {Q.Q4_0: 18, Q.Q4_1: 20, Q.Q8_0: 34}


def random_weights(qtype, rows, cols, rng) -> QTensor:
    """Random bytes in qtype's layout with sane scales (f16 d ~ 0.01, Q4_1 m ~ -0.08): fast at 7B size, and
    every nibble/byte value occurs."""
    if qtype in _BLOCK:
        nb = cols // 32
        raw = rng.integers(0, 256, size=(rows, nb, _BLOCK[qtype]), dtype=np.uint8)
        scales = (rng.uniform(0.005, 0.015, size=(rows, nb, 2)) * [1, -8]).astype(np.float16)
        raw[..., :2] = scales[..., :1].view(np.uint8)
        if qtype == Q.Q4_1:
            raw[..., 2:4] = scales[..., 1:].view(np.uint8)
        data = raw.reshape(rows, -1)
    else:
        w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
        data = {Q.F32: w, Q.F16: w.astype(np.float16)}.get(qtype)
        if data is None:  # BF16: truncated f32 bits
            data = (w.view(np.uint32) >> 16).astype(np.uint16)
    return QTensor("w", qtype, (rows, cols), data)


def _idx(rng, n, s):
    k = max(1, round(n * (1 - s)))
    return torch.from_numpy(np.sort(rng.choice(n, k, replace=False)).astype(np.int32))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", ["smollm2", pytest.param("7b", marks=pytest.mark.slow)])  # 7B rows: 3-5 s a case
@pytest.mark.parametrize("qtype", FORMATS, ids=lambda q: q.name)
def test_gather_and_axpy_sweep(use_isa, isa, shape, qtype):
    use_isa(isa)
    n_ff, d = SHAPES[shape]
    rng = np.random.default_rng(int(qtype) * 31 + len(shape))
    up = random_weights(qtype, n_ff, d, rng)      # gate/up: a row per neuron, d_model long
    down_t = random_weights(qtype, n_ff, d, rng)  # down_t: a row per neuron, d_model long
    x = torch.from_numpy(rng.standard_normal(d).astype(np.float32))
    for s in SPARSITY:
        idx = _idx(rng, n_ff, s)
        h = torch.from_numpy(rng.standard_normal(idx.numel()).astype(np.float32))
        terms = R.block_terms(R.select_rows(up, idx), x)
        ref_g, bound_g = terms.sum(-1), terms.abs().sum(-1)
        ref_a = R.axpy_ref(down_t, idx, h)
        bound_a = (h.double().abs()[:, None] * R.dequantize(R.select_rows(down_t, idx)).double().abs()).sum(0)
        for n_threads in (1, 2):
            g = kernels.gather(up, idx, x, n_threads)
            err = ((g.double() - ref_g).abs() / bound_g.clamp_min(1e-30)).max().item()
            assert err <= RTOL, f"gather s={s} t={n_threads}: {err:.2e}"
            a = kernels.axpy(down_t, idx, h, n_threads=n_threads)
            err = ((a.double() - ref_a).abs() / bound_a.abs().clamp_min(1e-30)).max().item()
            assert err <= RTOL, f"axpy s={s} t={n_threads}: {err:.2e}"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", FORMATS, ids=lambda q: q.name)
def test_axpy_column_range_and_accumulation(use_isa, isa, qtype):
    """y[c0:c1] accumulates onto what y holds; columns outside the range are untouched."""
    use_isa(isa)
    rng = np.random.default_rng(5)
    wt = random_weights(qtype, 96, 160, rng)
    idx = _idx(rng, 96, 0.5)
    h = torch.randn(idx.numel())
    y0 = torch.randn(160)
    y = kernels.axpy(wt, idx, h, y0.clone(), c0=32, c1=128)
    assert torch.equal(y[:32], y0[:32]) and torch.equal(y[128:], y0[128:])
    ref = y0[32:128].double() + R.axpy_ref(wt, idx, h, 32, 128)
    assert torch.allclose(y[32:128].double(), ref, rtol=1e-5, atol=1e-5)


def test_sparsity_zero_axpy_equals_dense_product():
    """All neurons through down_t = the dense down projection (F32: the same sum in another order)."""
    rng = np.random.default_rng(1)
    down = random_weights(Q.F32, 576, 1536, rng)  # [d, n_ff]
    down_t = kernels.transposed(down)
    h = torch.randn(1536)
    y = kernels.axpy(down_t, torch.arange(1536), h)
    dense = R.dequantize(down).double() @ h.double()
    assert torch.allclose(y.double(), dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
@pytest.mark.parametrize("rows, cols", [(576, 1536), (4096, 1024)])
def test_transposed_is_dequantize_transpose_quantize(qtype, rows, cols):
    """down_t of a block-format down_proj, made tile by tile in C, is byte for byte the Q8_0 quantization of
    the transposed dequantized matrix."""
    rng = np.random.default_rng(rows + cols)
    w = random_weights(qtype, rows, cols, rng)
    t = kernels.transposed(w)
    expect = kernels.quantize_q8_0(R.dequantize(w).t().contiguous())
    assert int(t.qtype) == int(Q.Q8_0) and (t.rows, t.cols) == (cols, rows)
    assert np.array_equal(np.asarray(t.data), expect)
    # the numpy reference (formats.quants.transpose) rounds with gguf-py: the same values within one Q8_0 step
    ref = quants.transpose(w)
    assert ref.qtype == Q.Q8_0 and ref.shape == t.shape
    a, b = R.dequantize(t), R.dequantize(ref)
    assert ((a - b).abs() <= a.abs().amax(1, keepdim=True) / 127 + 1e-6).all()
    # rows that do not fill whole Q8_0 blocks: F16, the reference's exact choice
    odd = random_weights(qtype, 48, 64, rng)
    assert np.array_equal(np.asarray(kernels.transposed(odd).data), np.asarray(quants.transpose(odd).data))


def test_bad_arguments():
    rng = np.random.default_rng(0)
    w = random_weights(Q.Q8_0, 64, 64, rng)
    with pytest.raises(IndexError, match="out of range"):
        kernels.gather(w, [0, 64], torch.randn(64))
    with pytest.raises(ValueError, match="indices but"):
        kernels.axpy(w, [1, 2], torch.randn(3))
    with pytest.raises(ValueError, match="multiples of 32"):
        kernels.axpy(w, [1], torch.randn(1), c0=16, c1=64)


# ---- the decoder's sparse FFN ------------------------------------------------------------------------------

N_CTX = 16
TOL = 5e-3  # as test_kernels_decoder: f32 vs float64 plus rare q8 rounding flips of the activations
DECODER_CONFIGS = {
    "swiglu-q4_1": dict(),
    "relu-glu-q4_0": dict(activation="relu", types=dict(gate=Q.Q4_0, up=Q.Q4_0, down=Q.Q4_0)),
    "drelu-mixed": dict(activation="relu", ffn_kind="dglu", types=dict(gate=Q.Q8_0, up=Q.F32, down=Q.F16)),
    "relu-mlp": dict(activation="relu", ffn_kind="mlp", types=dict(up=Q.BF16, down=Q.Q8_0)),
}
THRESHOLDS = ({"h": 0.0}, {"h": 0.05}, {"h": 0.02, "x": 0.3})


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", list(DECODER_CONFIGS))
def test_decoder_sparse_ffn_matches_reference(use_isa, isa, name):
    use_isa(isa)
    cfg, w = tiny_model(**DECODER_CONFIGS[name])
    for n_threads in (1, 2):
        kv = new_kv(cfg, N_CTX)
        cos, sin = rope_tables(cfg, N_CTX)
        dec = kernels.bind_decoder(cfg, w, kv, cos, sin, n_threads)
        sp = kernels.SparseFFN(dec, cfg, w)
        xs = torch.from_numpy(np.random.default_rng(3).standard_normal((4, cfg.d_model)).astype(np.float32))
        for th in THRESHOLDS:
            sp.on(SparseSpec.uniform(cfg.n_layer, **th))
            ref_kv = new_kv(cfg, N_CTX)
            for pos in range(4):
                x = xs[pos].clone()
                for il in range(cfg.n_layer):
                    sparse = dict(down_t=sp._copy(il, "down"), t_h=th["h"], t_x=th.get("x", 0.0),
                                  gate_t=sp._copies.get((il, "gate")), up_t=sp._copies.get((il, "up")))
                    xr = R.decode_layer_ref(cfg, w.layers[il], x.clone(), pos, ref_kv.k[il], ref_kv.v[il], cos, sin,
                                            sparse=sparse)
                    dec.layer(il, x.data_ptr(), pos)
                    err = (x.double() - xr.double()).abs().max().item()
                    assert err <= TOL * xr.abs().max().item(), f"{name} t={n_threads} {th} pos {pos} layer {il}"
            kept = sp.kept()
            assert kept.neurons.max() <= cfg.n_ff and kept.inputs.max() <= cfg.d_model
            if th.get("x"):
                assert (kept.inputs < cfg.d_model).all()  # the input site dropped channels
            if th["h"] > 0 or cfg.activation == "relu":
                assert (kept.neurons < cfg.n_ff).all()  # neurons were skipped
        sp.off()


def test_decoder_sparse_off_restores_dense():
    cfg, w = tiny_model()
    kv = new_kv(cfg, N_CTX)
    cos, sin = rope_tables(cfg, N_CTX)
    dec = kernels.bind_decoder(cfg, w, kv, cos, sin, 2)
    x0 = torch.from_numpy(np.random.default_rng(0).standard_normal(cfg.d_model).astype(np.float32))
    dense = x0.clone()
    dec.layer(0, dense.data_ptr(), 0)
    sp = kernels.SparseFFN(dec, cfg, w)
    sp.on(SparseSpec.uniform(cfg.n_layer, h=0.1))
    sparse = x0.clone()
    dec.layer(0, sparse.data_ptr(), 0)
    assert not torch.equal(sparse, dense)
    sp.off()
    again = x0.clone()
    dec.layer(0, again.data_ptr(), 0)
    assert torch.equal(again, dense)
