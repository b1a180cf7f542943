"""Gemma's attention options in the C kernels (csrc/attn.h) against reference.attention_ref on every ISA: scores
soft-capped to c*tanh(s/c) (Gemma 2's attn_logit_softcapping) and a sliding window (the query at position p sees
rows p-W+1 .. p only), in decode (head split, and split-K past 256 positions) and in the prefill tiles (windows
that start mid-tile and mid-block). Tolerance as test_attention.py (1e-3 of the output scale); a cap of 2 on scores
of magnitude ~10 moves the output by far more than that, and so does one row too many or too few."""
from __future__ import annotations

import pytest
import torch

from kernel_helpers import ISAS
from powerinfer.kernels import reference as R
from powerinfer.kernels.attention import CHUNK, attention_decode, attention_prefill

TOL = 1e-3
SHAPES = {"gqa2-hd64": (4, 2, 64), "gqa2-hd48": (4, 2, 48), "mha-hd40": (2, 2, 40)}


def _cache(n_ctx, n_head_kv, hd, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n_ctx, n_head_kv * hd, generator=g) * 1.5).half(), \
        torch.randn(n_ctx, n_head_kv * hd, generator=g).half()


def _q(n, n_head, hd, seed):
    return torch.randn(n, n_head * hd, generator=torch.Generator().manual_seed(seed)) * 2.0


def _err(got, ref):
    return (got.double() - ref).abs().max().item() / ref.abs().max().item()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("softcap,window", [(2.0, 0), (0.0, 16), (3.0, 37), (0.0, CHUNK + 10)])
def test_decode(use_isa, isa, shape, softcap, window):
    use_isa(isa)
    nh, nkv, hd = SHAPES[shape]
    k, v = _cache(2 * CHUNK + 60, nkv, hd, seed=1)
    for pos in (0, 9, 40, CHUNK + 5, 2 * CHUNK + 59):
        q = _q(1, nh, hd, seed=pos)[0]
        ref = R.attention_ref(q.view(nh, hd), k, v, pos + 1, nh, nkv, hd, softcap=softcap, window=window)
        plain = R.attention_ref(q.view(nh, hd), k, v, pos + 1, nh, nkv, hd)
        for n_threads in (1, 2):
            got, _ = attention_decode(q, k, v, pos, nh, nkv, n_threads=n_threads, softcap=softcap, window=window)
            assert _err(got, ref) < TOL, (pos, n_threads)
        if pos and (softcap or pos >= window):  # the option changes the answer: the test can tell it was applied
            assert _err(plain, ref) > 10 * TOL, pos


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("softcap,window", [(2.0, 0), (0.0, 5), (0.0, 16), (3.0, 21)])
def test_prefill(use_isa, isa, shape, softcap, window):
    use_isa(isa)
    nh, nkv, hd = SHAPES[shape]
    k, v = _cache(CHUNK + 80, nkv, hd, seed=2)
    for pos0, n in ((0, 45), (CHUNK + 3, 37)):
        q = _q(n, nh, hd, seed=pos0)
        ref = torch.stack([R.attention_ref(q[t].view(nh, hd), k, v, pos0 + t + 1, nh, nkv, hd, softcap=softcap,
                                           window=window) for t in range(n)])
        got, _ = attention_prefill(q, k, v, pos0, nh, nkv, n_threads=2, softcap=softcap, window=window)
        for t in range(n):
            assert _err(got[t], ref[t]) < TOL, (pos0 + t)
