"""The C decoder (Decoder.layer / step / head / prefill) against kernels/reference.py on tiny random models.

Tolerance: the reference computes every step in float64 from the same quantized activations, f16 K/V and f16
probabilities; the C decoder works in f32. Differences are f32 rounding (~1e-6 relative) plus rare q8 rounding
flips: an f32 pre-quantization value that lands within an ulp of a .5 boundary may round the other way,
moving one activation by one step (max|x_block|/127) and the output by ~1e-3 of its scale. We allow
5e-3 * max|x| on the residual (and the same on logits, relative to their max), measured errors are
~1e-5 ... 1e-3. Every real mistake tried (wrong RoPE pairing, GQA mapping, missing bias, f32 instead of f16
probabilities in the wrong place, skipped position) moves the output by 1e-2 ... 1.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from kernel_helpers import ISAS, new_kv, rope_tables, tiny_model
from powerinfer import kernels
from powerinfer.kernels import reference as R

TOL = 5e-3
N_CTX = 40

CONFIGS = {
    # SmolLM2-like: Q4_1 everywhere, Q8_0 head, GQA 2:1, adjacent-pair RoPE, SwiGLU
    "llama-q4_1": dict(),
    # qwen2-like: neox RoPE, q/k/v biases, GQA 3:1, every format in one layer, dReLU FFN, F16 head
    "mixed-neox-bias-dglu": dict(d=96, n_head=3, n_head_kv=1, n_ff=160, rope_style="neox", bias=True,
                                 ffn_kind="dglu", activation="relu", head_type=Q.F16,
                                 types=dict(q=Q.Q4_0, k=Q.Q8_0, v=Q.F16, o=Q.BF16, gate=Q.Q4_1, up=Q.F32,
                                            down=Q.Q8_0)),
    # head_dim 48 (attention output straddles q8 blocks), partial RoPE, GELU MLP, no GQA, odd vocab
    "mlp-gelu-hd48": dict(d=96, n_head=2, n_head_kv=2, head_dim=48, n_ff=128, rope_dim=32, ffn_kind="mlp",
                          activation="gelu", n_vocab=77, head_type=Q.Q4_0,
                          types=dict(q=Q.Q8_0, k=Q.Q8_0, v=Q.Q8_0, o=Q.Q8_0, up=Q.Q4_0, down=Q.Q4_1)),
    # Gemma-like GeGLU with ggml's tanh GELU (the erf form above is HF "gelu"), MQA, one layer
    "geglu-tanh": dict(d=64, n_head=2, n_head_kv=1, n_ff=96, n_vocab=50, n_layer=1, activation="gelu_tanh"),
}


def _bind(cfg, w, n_threads):
    kv = new_kv(cfg, N_CTX)
    cos, sin = rope_tables(cfg, N_CTX)
    return kernels.bind_decoder(cfg, w, kv, cos, sin, n_threads), kv, cos, sin


def _close(a, b, what):
    scale = b.abs().max().item()
    err = (a.double() - b.double()).abs().max().item()
    assert err <= TOL * scale, f"{what}: max err {err:.3g} vs scale {scale:.3g}"


def _inputs(cfg, n, seed=3):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, cfg.d_model)).astype(np.float32))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_layer_and_head_match_reference(use_isa, isa, name):
    use_isa(isa)
    cfg, w = tiny_model(**CONFIGS[name])
    dec, kv, cos, sin = _bind(cfg, w, 2)
    ref_kv = new_kv(cfg, N_CTX)
    xs = _inputs(cfg, 12)
    logits = torch.empty(cfg.n_vocab)
    for pos in range(12):  # attention spans up to 12 cache rows
        x = xs[pos].clone()
        xr = xs[pos].clone()
        for il in range(cfg.n_layer):
            dec.layer(il, x.data_ptr(), pos)
            xr = R.decode_layer_ref(cfg, w.layers[il], xr, pos, ref_kv.k[il], ref_kv.v[il], cos, sin)
            _close(x, xr, f"{name} pos {pos} layer {il}")
            # the K/V rows written agree (f16; same tolerance, relative to the row)
            _close(kv.k[il][pos].float(), ref_kv.k[il][pos].float(), "K row")
            _close(kv.v[il][pos].float(), ref_kv.v[il][pos].float(), "V row")
            xr = x.clone()  # continue from the C state so errors do not compound across layers
        dec.head(x.data_ptr(), logits.data_ptr())
        _close(logits, R.head_ref(cfg, w, x), f"{name} head pos {pos}")


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("n_threads", [1, 2])
def test_step_and_prefill(name, n_threads):
    """step == layers + head; prefill(n) == n steps (same K/V, same last logits); compounding over layers
    stays within tolerance of the reference. 23 tokens in chunks of 5 and 18: prefill attention works on
    16-token tiles, so tiles start mid-chunk and cross the chunk boundary."""
    cfg, w = tiny_model(**CONFIGS[name])
    n = 23
    xs = _inputs(cfg, n, seed=4)

    dec, kv, cos, sin = _bind(cfg, w, n_threads)
    ref_kv = new_kv(cfg, N_CTX)
    logits = torch.empty(cfg.n_vocab)
    for pos in range(n):
        for il in range(cfg.n_layer):  # the reference continues from the C cache: no compounding over positions
            ref_kv.k[il].copy_(kv.k[il])
            ref_kv.v[il].copy_(kv.v[il])
        x = xs[pos].clone()
        dec.step(x.data_ptr(), pos, logits.data_ptr())
        xr = xs[pos].clone()
        for il in range(cfg.n_layer):
            xr = R.decode_layer_ref(cfg, w.layers[il], xr, pos, ref_kv.k[il], ref_kv.v[il], cos, sin)
        _close(x, xr, f"step {pos}")
        _close(logits, R.head_ref(cfg, w, x), f"step logits {pos}")  # the head on the same input

    # prefill in two chunks (second one continues at pos0 = 5) against the steps above. The projections are
    # the same kernels row for row; prefill attention sums q.K in another order (16 queries per tile), so an
    # f16 rounding of a probability may differ: same tolerance as against the reference.
    dec2, kv2, _, _ = _bind(cfg, w, n_threads)
    x2 = xs.clone()
    lg2 = torch.empty(cfg.n_vocab)
    dec2.prefill(x2[:5].data_ptr(), 5, 0, 0)
    dec2.prefill(x2[5:].data_ptr(), n - 5, 5, lg2.data_ptr())
    for il in range(cfg.n_layer):
        _close(kv2.k[il][:n].float(), kv.k[il][:n].float(), f"prefill K layer {il}")
        _close(kv2.v[il][:n].float(), kv.v[il][:n].float(), f"prefill V layer {il}")
    _close(lg2, logits, "prefill logits")
    _close(x2[-1], x, "prefill x")
    assert (kv2.k[0][:n].float() - kv.k[0][:n].float()).abs().max() == 0  # layer 0 K/V: same kernels exactly


def test_thread_counts_agree():
    """Row and head splits do not change results: 1, 2 and 3 threads give identical logits, also after
    set_threads re-lays out the packed weights of a bound decoder."""
    cfg, w = tiny_model(**CONFIGS["llama-q4_1"])
    xs = _inputs(cfg, 4)

    def run(dec):
        lg = torch.empty(cfg.n_vocab)
        for pos in range(4):
            x = xs[pos].clone()
            dec.step(x.data_ptr(), pos, lg.data_ptr())
        return lg

    out = [run(_bind(cfg, w, nt)[0]) for nt in (1, 2, 3)]
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])
    dec = _bind(cfg, w, 2)[0]
    for nt in (3, 1):
        dec.set_threads(nt)
        assert dec.n_threads == nt
        assert torch.equal(run(dec), out[0])


def test_reference_detects_wrong_rope_style():
    """Decoder bound with neox RoPE on a norm-RoPE model disagrees with the reference: the test can fail."""
    cfg, w = tiny_model()
    kv = new_kv(cfg, N_CTX)
    cos, sin = rope_tables(cfg, N_CTX)
    cfg_wrong = type(cfg)(**{**cfg.__dict__, "rope_style": "neox"})
    dec = kernels.bind_decoder(cfg_wrong, w, kv, cos, sin, 1)
    ref_kv = new_kv(cfg, N_CTX)
    xs = _inputs(cfg, 4)
    with pytest.raises(AssertionError):
        for pos in range(4):
            x, xr = xs[pos].clone(), xs[pos].clone()
            dec.layer(0, x.data_ptr(), pos)
            xr = R.decode_layer_ref(cfg, w.layers[0], xr, pos, ref_kv.k[0], ref_kv.v[0], cos, sin)
            _close(x, xr, "wrong rope")


def test_profile_and_errors():
    cfg, w = tiny_model()
    dec, _, _, _ = _bind(cfg, w, 2)
    dec.profile(True)
    x, lg = _inputs(cfg, 1)[0].clone(), torch.empty(cfg.n_vocab)
    dec.step(x.data_ptr(), 0, lg.data_ptr())
    st = dec.stats(reset=True)
    assert st["steps"] == 1 and st["total_ns"] > 0 and st["ffn_ns"] > 0 and st["head_ns"] > 0
    assert dec.stats()["total_ns"] == 0
    with pytest.raises(ValueError):
        dec.step(x.data_ptr(), N_CTX, lg.data_ptr())  # beyond the cache
    with pytest.raises(ValueError):
        dec.prefill(x.data_ptr(), 2, N_CTX - 1, 0)
    fresh = kernels.Decoder(1, 64, 2, 2, 32, 64, 10, 1e-5, 32, 0, 0, 0, 8, 1)
    with pytest.raises(RuntimeError):
        fresh.step(x.data_ptr(), 0, lg.data_ptr())  # nothing bound
