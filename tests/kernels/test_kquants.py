"""Q4_K, Q5_K and Q6_K read as stored (kernels/csrc/kquant.h): the C dequantizer and the reference's integer
decomposition against gguf-py's dequantizers, then the row dots (dense, packed-request, prefill, row-sparse), the
generic axpy, the transposed down_t, and whole decoder layers against kernels/reference.py on every ISA path.

Tolerance as test_kernels_matvec: the integer dots and the scale products d*sc, dmin*m, dx*sum(xq) are exact on
both sides, so only the kernels' f32 products and sums differ from the float64 reference (observed <= 1.4e-7 of
sum|terms|; RTOL 4e-6). One flipped nibble or a scale read from the wrong sub-block moves the result by O(terms).
Weights are random bytes in the block layouts (kernel_helpers.random_kquant): every bit pattern of the packed
6-bit scales, qh bits and int8 Q6_K scales occurs, which a quantizer's output would not guarantee.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize

from kernel_helpers import ISAS, KQUANTS, make_qtensor, new_kv, rope_tables, tiny_model
from powerinfer import _C, kernels
from powerinfer.core.sparse_spec import SparseSpec
from powerinfer.kernels import reference as R

RTOL = 4e-6
# 7B-like widths in miniature: one super-block, odd super-block counts, rows neither a multiple of 4 nor 16
SHAPES = [(37, 256), (61, 768), (5, 512), (256, 1536), (130, 1280)]
ids = lambda q: q.name  # noqa: E731


def _check(y, w, x):
    terms = R.block_terms(w, x)
    ref, bound = terms.sum(-1), terms.abs().sum(-1)
    worst = ((y.double() - ref).abs() / bound.clamp_min(1e-30)).max().item()
    assert worst <= RTOL, f"max |err| / sum|terms| = {worst:.2e}"


def _x(rng, n):
    x = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
    x[3] = 0.0
    x[5] *= 20
    return x


@pytest.mark.parametrize("qtype", KQUANTS, ids=ids)
def test_dequantize_matches_gguf(qtype):
    rng = np.random.default_rng(int(qtype))
    w = make_qtensor(qtype, 9, 768, rng)
    expect = gguf_dequantize(np.asarray(w.data).view(np.uint8), qtype).reshape(9, 768).astype(np.float32)
    assert np.array_equal(kernels.dequantize(w).numpy(), expect)
    assert np.array_equal(R.dequantize(w).numpy(), expect)
    q, ds, dm = R.kquant_ints(w)  # the decomposition block_terms uses, value by value
    vals = ds[..., None] * q.float() - (dm[..., None] if dm is not None else 0.0)
    assert np.array_equal(vals.reshape(9, 768).numpy(), expect)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", KQUANTS, ids=ids)
def test_matvec_matmul(use_isa, isa, qtype):
    use_isa(isa)
    rng = np.random.default_rng(int(qtype) * 7 + 1)
    for rows, cols in SHAPES:
        w = make_qtensor(qtype, rows, cols, rng, 0.1)
        x = _x(rng, cols)
        for n_threads in (1, 2):
            for packed in (False, True):  # no packed layout: both run the rows of the file
                _check(kernels.matvec(w, x, n_threads, packed=packed), w, x)
    w = make_qtensor(qtype, 61, 512, rng, 0.1)
    for n_tok in (1, 3, 6):  # prefill's matmul: each token as the single-token kernel, bit for bit
        xs = torch.from_numpy(rng.standard_normal((n_tok, 512)).astype(np.float32))
        y = kernels.matmul(w, xs, 2)
        _check(y, w, xs)
        for t in range(n_tok):
            assert torch.equal(y[t], kernels.matvec(w, xs[t], 1))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", KQUANTS, ids=ids)
def test_gather_and_axpy(use_isa, isa, qtype):
    """Row-sparse dot (gate/up rows of the kept neurons) and the neuron-major axpy on K-quant rows."""
    use_isa(isa)
    rng = np.random.default_rng(int(qtype) + 50)
    w = make_qtensor(qtype, 300, 768, rng, 0.1)
    x = _x(rng, 768)
    idx = torch.from_numpy(np.sort(rng.choice(300, 77, replace=False)).astype(np.int32))
    for n_threads in (1, 2):
        y = kernels.gather(w, idx, x, n_threads)
        terms = R.block_terms(R.select_rows(w, idx), x)
        assert ((y.double() - terms.sum(-1)).abs() / terms.abs().sum(-1)).max() <= RTOL
    h = torch.randn(77)
    ref = R.axpy_ref(w, idx, h)
    for c0, c1 in ((0, 768), (256, 512)):
        y = kernels.axpy(w, idx, h, c0=c0, c1=c1)
        assert torch.allclose(y[c0:c1].double(), ref[c0:c1], rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        assert (y[:c0] == 0).all() and (y[c1:] == 0).all()


@pytest.mark.parametrize("qtype", KQUANTS, ids=ids)
def test_transposed_down_t(qtype):
    """The sparse FFN's neuron-major down_t of a K-quant down_proj: Q8_0 of the transposed dequantized matrix,
    byte for byte (re-blocked along the other axis; the one conversion K-quant files still get)."""
    rng = np.random.default_rng(int(qtype) + 9)
    w = make_qtensor(qtype, 96, 512, rng, 0.1)
    t = kernels.transposed(w)
    assert int(t.qtype) == int(Q.Q8_0) and (t.rows, t.cols) == (512, 96)
    assert np.array_equal(np.asarray(t.data), kernels.quantize_q8_0(R.dequantize(w).t().contiguous()))


def test_parity_check_can_fail():
    """A weight with one nibble flipped, one Q5_K high bit flipped or one Q6_K scale changed is caught."""
    rng = np.random.default_rng(2)
    for qtype, byte in ((Q.Q4_K, 16 + 40), (Q.Q5_K, 16 + 5), (Q.Q6_K, 192 + 3)):
        w = make_qtensor(qtype, 16, 512, rng)
        x = torch.from_numpy(rng.standard_normal(512).astype(np.float32))
        y = kernels.matvec(w, x)
        bad = np.array(w.data, copy=True)
        bad[3, byte] ^= 0x11
        with pytest.raises(AssertionError):
            _check(y, type(w)(w.name, w.qtype, w.shape, bad), x)


def test_bad_widths():
    rng = np.random.default_rng(0)
    w = make_qtensor(Q.Q4_K, 8, 256, rng)
    x = torch.zeros(288)
    with pytest.raises(ValueError, match="multiple of 256"):
        _C.matvec(int(Q.Q4_K), kernels.address(np.asarray(w.data)), 1, 288, x.data_ptr(), x.data_ptr(), 1)
    with pytest.raises(ValueError, match="multiples of 256"):
        kernels.axpy(w, [1], torch.randn(1), c0=32, c1=256)


# ---- whole layers: every projection a K-quant, the Q6_K head of a Q4_K_M file ---------------------------------
KQ_MODEL = dict(d=256, n_head=4, n_head_kv=2, head_dim=64, n_ff=512, n_vocab=90, head_type=Q.Q6_K,
                types=dict(q=Q.Q4_K, k=Q.Q6_K, v=Q.Q5_K, o=Q.Q4_K, gate=Q.Q4_K, up=Q.Q5_K, down=Q.Q6_K))
N_CTX, TOL = 16, 5e-3  # as test_kernels_decoder: f32 vs float64 plus rare q8 rounding flips of the activations


def _close(a, b, what):
    scale = b.abs().max().item()
    err = (a.double() - b.double()).abs().max().item()
    assert err <= TOL * scale, f"{what}: max err {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("isa", ISAS)
def test_decoder_layers_head_and_sparse_ffn(use_isa, isa):
    use_isa(isa)
    cfg, w = tiny_model(**KQ_MODEL)
    cos, sin = rope_tables(cfg, N_CTX)
    kv, ref_kv = new_kv(cfg, N_CTX), new_kv(cfg, N_CTX)
    dec = kernels.bind_decoder(cfg, w, kv, cos, sin, 2)
    xs = torch.from_numpy(np.random.default_rng(3).standard_normal((6, cfg.d_model)).astype(np.float32))
    logits = torch.empty(cfg.n_vocab)
    for pos in range(6):
        x = xs[pos].clone()
        for il in range(cfg.n_layer):
            xr = R.decode_layer_ref(cfg, w.layers[il], x.clone(), pos, ref_kv.k[il], ref_kv.v[il], cos, sin)
            dec.layer(il, x.data_ptr(), pos)
            _close(x, xr, f"pos {pos} layer {il}")
        dec.head(x.data_ptr(), logits.data_ptr())
        _close(logits, R.head_ref(cfg, w, x), f"head pos {pos}")
    # the neuron-sparse FFN: gate/up row dots on the K-quant rows, down_t re-blocked to Q8_0
    sp = kernels.SparseFFN(dec, cfg, w)
    sp.on(SparseSpec.uniform(cfg.n_layer, h=0.05))
    ref_kv = new_kv(cfg, N_CTX)
    for il in range(cfg.n_layer):
        ref_kv.k[il].copy_(kv.k[il])
        ref_kv.v[il].copy_(kv.v[il])
    x = xs[0].clone()
    for il in range(cfg.n_layer):
        sparse = dict(down_t=sp._copy(il, "down"), t_h=0.05)
        xr = R.decode_layer_ref(cfg, w.layers[il], x.clone(), 6, ref_kv.k[il], ref_kv.v[il], cos, sin, sparse=sparse)
        dec.layer(il, x.data_ptr(), 6)
        _close(x, xr, f"sparse layer {il}")
    assert (sp.kept().neurons < cfg.n_ff).all()
    sp.off()


def test_decoder_prefill_equals_steps():
    cfg, w = tiny_model(**KQ_MODEL)
    cos, sin = rope_tables(cfg, N_CTX)
    xs = torch.from_numpy(np.random.default_rng(4).standard_normal((9, cfg.d_model)).astype(np.float32))
    kv = new_kv(cfg, N_CTX)
    dec = kernels.bind_decoder(cfg, w, kv, cos, sin, 2)
    logits = torch.empty(cfg.n_vocab)
    x = xs.clone()
    for pos in range(9):
        dec.step(x[pos].data_ptr(), pos, logits.data_ptr())
    kv2 = new_kv(cfg, N_CTX)
    dec2 = kernels.bind_decoder(cfg, w, kv2, cos, sin, 2)
    x2, lg2 = xs.clone(), torch.empty(cfg.n_vocab)
    dec2.prefill(x2.data_ptr(), 9, 0, lg2.data_ptr())
    assert torch.equal(kv2.k[0][:9], kv.k[0][:9])  # layer 0: the same row kernels, token by token
    _close(lg2, logits, "prefill logits")
