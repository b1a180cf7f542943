"""The C decoder past one attention chunk (256 positions: decode splits the sequence over the threads and merges the
chunks' softmax states; prefill tiles reach far back), against kernels/reference.py, on a tiny model for every ISA
and on the bundled SmolLM2 at 8k context.

The reference continues from the C decoder's cache (as in test_kernels_decoder.py), so differences do not
compound over positions; tolerance as there (5e-3 of the scale: f32 vs float64 plus rare q8 rounding flips)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kernel_helpers import ISAS, new_kv, rope_tables, tiny_model
from powerinfer import kernels
from powerinfer.kernels import reference as R
from powerinfer.kernels.attention import CHUNK

TOL = 5e-3


def _close(a, b, what):
    scale = b.abs().max().item()
    err = (a.double() - b.double()).abs().max().item()
    assert err <= TOL * scale, f"{what}: max err {err:.3g} vs scale {scale:.3g}"


def _ref_token(cfg, w, kv, x, pos, cos, sin):
    """Every layer of one token at pos from the reference, on copies of the caches (rows < pos as the C side wrote
    them); returns the residual and the logits."""
    xr = x.clone()
    for il in range(cfg.n_layer):
        k, v = kv.k[il].clone(), kv.v[il].clone()
        xr = R.decode_layer_ref(cfg, w.layers[il], xr, pos, k, v, cos, sin)
    return xr, R.head_ref(cfg, w, xr)


@pytest.mark.parametrize("isa", ISAS)
def test_tiny_model_past_one_chunk(use_isa, isa):
    """Prefill of 2*256+40 tokens (its last token checked against the reference), then decode steps at positions
    in the third chunk, with 2 threads."""
    use_isa(isa)
    cfg, w = tiny_model(n_head=4, n_head_kv=2, head_dim=32)
    n, n_ctx = 2 * CHUNK + 40, 2 * CHUNK + 48
    kv = new_kv(cfg, n_ctx)
    cos, sin = rope_tables(cfg, n_ctx)
    dec = kernels.bind_decoder(cfg, w, kv, cos, sin, 2)
    xs = torch.from_numpy(np.random.default_rng(5).standard_normal((n + 3, cfg.d_model)).astype(np.float32))
    x = xs[:n].clone()
    logits = torch.empty(cfg.n_vocab)
    dec.prefill(x.data_ptr(), n, 0, logits.data_ptr())
    xr, lr = _ref_token(cfg, w, kv, xs[n - 1], n - 1, cos, sin)
    _close(x[n - 1], xr, "prefill, last token")
    _close(logits, lr, "prefill logits")
    for pos in range(n, n + 3):
        xt = xs[pos].clone()
        dec.step(xt.data_ptr(), pos, logits.data_ptr())
        xr, lr = _ref_token(cfg, w, kv, xs[pos], pos, cos, sin)
        _close(xt, xr, f"step {pos}")
        _close(logits, lr, f"step logits {pos}")


def test_thread_counts_agree_past_one_chunk():
    """Chunk boundaries and the order chunk partials are added in do not depend on the thread count: 1, 2 and 3
    threads give the same logits at positions past one chunk."""
    cfg, w = tiny_model(n_head=4, n_head_kv=2, head_dim=32)
    n_ctx = 3 * CHUNK
    xs = torch.from_numpy(np.random.default_rng(6).standard_normal((n_ctx, cfg.d_model)).astype(np.float32))

    def run(nt):
        kv = new_kv(cfg, n_ctx)
        cos, sin = rope_tables(cfg, n_ctx)
        dec = kernels.bind_decoder(cfg, w, kv, cos, sin, nt)
        x = xs[:n_ctx - 2].clone()
        dec.prefill(x.data_ptr(), n_ctx - 2, 0, 0)
        lg = torch.empty(cfg.n_vocab)
        xt = xs[n_ctx - 2].clone()
        dec.step(xt.data_ptr(), n_ctx - 2, lg.data_ptr())
        return lg

    out = [run(nt) for nt in (1, 2, 3)]
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])


def test_bundled_model_at_8k(bundled_model):
    """SmolLM2 at 8k context on real text, the cache filled by the C prefill: a decode step at position 8191 equals
    the reference layer by layer (each layer from the C decoder's input to it) and in its logits, and the prefill
    tiles over the model's own cache (every layer's K and V rows 0..8191, queries at the last 16 positions) equal
    the reference attention. Layer by layer, because over 30 layers single q8 rounding flips compound: at 100
    tokens of the same text the whole-model logits of the decoder and of the reference run end to end differ by
    up to 60% of their scale at some positions, with the previous attention kernels as well."""
    from powerinfer.formats.loader import load_tokenizer
    from powerinfer.kernels.attention import attention_prefill
    from powerinfer.textdata import pydoc_topics

    cfg, w = bundled_model.config, bundled_model.weights
    n_ctx, nh, nkv, hd = 8192, cfg.n_head, cfg.n_head_kv, cfg.head_dim
    ids = load_tokenizer(bundled_model).encode(pydoc_topics("eval"))[:n_ctx]
    assert len(ids) == n_ctx
    kv = new_kv(cfg, n_ctx)
    cos, sin = rope_tables(cfg, n_ctx)
    dec = kernels.bind_decoder(cfg, w, kv, cos, sin, 2)
    emb = w.embed_tokens.dequantize()
    x = emb[ids[:n_ctx - 1]].float().contiguous()
    dec.prefill(x.data_ptr(), n_ctx - 1, 0, 0)
    xt = emb[ids[n_ctx - 1]].float().contiguous()
    for il in range(cfg.n_layer):
        xin = xt.clone()
        dec.layer(il, xt.data_ptr(), n_ctx - 1)
        xr = R.decode_layer_ref(cfg, w.layers[il], xin, n_ctx - 1, kv.k[il].clone(), kv.v[il].clone(), cos, sin)
        _close(xt, xr, f"layer {il} at 8191")
    logits = torch.empty(cfg.n_vocab)
    dec.head(xt.data_ptr(), logits.data_ptr())
    _close(logits, R.head_ref(cfg, w, xt), "logits at 8191")
    q = torch.randn(16, nh * hd, generator=torch.Generator().manual_seed(0)) * 2.0
    for il in range(cfg.n_layer):
        got, _ = attention_prefill(q, kv.k[il], kv.v[il], n_ctx - 16, nh, nkv, n_threads=2)
        for t in (0, 15):
            ref = R.attention_ref(q[t].view(nh, hd), kv.k[il], kv.v[il], n_ctx - 15 + t, nh, nkv, hd)
            _close(got[t], ref, f"prefill attention, layer {il}, query at {n_ctx - 16 + t}")
