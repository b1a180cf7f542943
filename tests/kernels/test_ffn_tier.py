"""Decoder.ffn: one layer's FFN over a tier's share of the neurons (the CPU tier of a placement). Against the
reference twin on the same neurons; two disjoint shares add up to the whole layer; an FFN-only decoder, which
binds no attention and packs nothing, computes exactly what a full decoder does."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from kernel_helpers import ISAS, new_kv, rope_tables, tiny_model
from test_kernels_sparse import DECODER_CONFIGS, TOL

from powerinfer import kernels
from powerinfer.core.sparse_spec import SparseSpec
from powerinfer.kernels import reference as R


def _ffn(dec, il, x, cand):
    y = torch.zeros_like(x)
    mask = cand.to(torch.uint8).contiguous()
    dec.ffn(il, x.data_ptr(), y.data_ptr(), mask.data_ptr())
    return y


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", list(DECODER_CONFIGS))
def test_tier_ffn_matches_reference_and_shares_add_up(use_isa, isa, name):
    use_isa(isa)
    cfg, w = tiny_model(**DECODER_CONFIGS[name])
    rng = np.random.default_rng(7)
    t_h = 0.0 if cfg.activation == "relu" else 0.05
    spec = SparseSpec.uniform(cfg.n_layer, h=t_h)
    for n_threads in (1, 2):
        kv = new_kv(cfg, 8)
        cos, sin = rope_tables(cfg, 8)
        full = kernels.bind_decoder(cfg, w, kv, cos, sin, n_threads)
        tier = kernels.bind_ffn_decoder(cfg, w, n_threads)
        assert tier.packed_bytes == 0  # raw rows, read in place
        sp_full, sp_tier = kernels.SparseFFN(full, cfg, w), kernels.SparseFFN(tier, cfg, w, gathers=True)
        sp_full.on(spec)
        sp_tier.on(spec)
        for il in range(cfg.n_layer):
            x = torch.from_numpy(rng.standard_normal(cfg.d_model).astype(np.float32))
            share = torch.from_numpy(rng.random(cfg.n_ff) < 0.4)
            n = R.rmsnorm_ref(x.double(), R._vec(w.layers[il].post_attention_layernorm), cfg.norm_eps).float()
            down_t = sp_tier._copy(il, "down")
            for cand in (share, ~share, torch.ones(cfg.n_ff, dtype=torch.bool)):
                got = _ffn(tier, il, x, cand)
                want, kept = R.ffn_sparse_ref(cfg, w.layers[il], n, down_t, t_h, cand=cand)
                assert (got.double() - want).abs().max().item() <= TOL * max(want.abs().max().item(), 1e-3), \
                    f"{name} t={n_threads} layer {il}"
                assert torch.equal(got, _ffn(full, il, x, cand))  # no attention bound, nothing packed: same sums
            a, b, whole = _ffn(tier, il, x, share), _ffn(tier, il, x, ~share), _ffn(tier, il, x, share | ~share)
            # the same neurons, summed in another order (and, at a threshold, a rare rounding flip: TOL as above)
            assert (a + b - whole).abs().max().item() <= TOL * whole.abs().max().item()
            counts = sp_tier.kept()
            assert counts.neurons[il].item() == len(R.ffn_sparse_ref(cfg, w.layers[il], n, down_t, t_h)[1])


def test_ffn_only_decoder_refuses_decode_steps():
    cfg, w = tiny_model()
    tier = kernels.bind_ffn_decoder(cfg, w, 1)
    x = torch.zeros(cfg.d_model)
    with pytest.raises(RuntimeError, match="ffn_only"):
        tier.layer(0, x.data_ptr(), 0)
    with pytest.raises(RuntimeError, match="set_sparse"):  # the FFN call needs the layer's down_t
        _ffn(tier, 0, x, torch.ones(cfg.n_ff, dtype=torch.bool))
