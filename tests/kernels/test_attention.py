"""The attention kernels (csrc/attn.h) against reference.attention_ref on every ISA: decode (one query position,
head-split up to 256 positions, split into 256-position chunks with merged softmax states past that) and
prefill tiles (a run of causal queries).

Tolerance: both sides round q and the probabilities to f16 exactly where llama.cpp does; the reference sums in
float64, the kernels in f32 (decode: chunk partials added in chunk order; prefill: 16 queries per tile). Measured
differences are ~1e-7 of the output scale, up to ~2e-4 where a probability near an f16 rounding boundary rounds the
other way in f32 (one f16 step of a large probability), so leaving the probabilities unrounded is told apart by
the typical error instead (test_probabilities_are_rounded_to_f16). 1e-3 of the output scale catches a chunk merged
with its own max instead of the global one, an off-by-one row, a wrong KV head (each moves the output by
1e-2 ... 1)."""
from __future__ import annotations

import math

import pytest
import torch

from kernel_helpers import ISAS
from powerinfer.kernels import reference as R
from powerinfer.kernels.attention import CHUNK, attention_decode, attention_prefill

TOL = 1e-3

SHAPES = {  # n_head, n_head_kv, head_dim
    "gqa3-hd64": (9, 3, 64),     # SmolLM2
    "mha-hd128": (4, 4, 128),    # 7B-like
    "mqa20-hd32": (20, 1, 32),   # more query heads per KV head than one kernel call takes (16)
    "gqa2-hd48": (4, 2, 48),     # head_dim a multiple of 16, not specialised
    "gqa2-hd40": (4, 2, 40),     # head_dim not a multiple of 16 (AVX-512 falls back; AVX2 scores do not)
}


def _cache(n_ctx, n_head_kv, hd, seed):
    g = torch.Generator().manual_seed(seed)
    k = (torch.randn(n_ctx, n_head_kv * hd, generator=g) * 1.5).half()
    v = torch.randn(n_ctx, n_head_kv * hd, generator=g).half()
    return k, v


def _q(n, n_head, hd, seed):
    return torch.randn(n, n_head * hd, generator=torch.Generator().manual_seed(seed)) * 2.0


def _close(got, ref, what):
    scale = ref.abs().max().item()
    err = (got.double() - ref).abs().max().item()
    assert err <= TOL * scale, f"{what}: max err {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_decode_matches_reference(use_isa, isa, shape):
    use_isa(isa)
    nh, nkv, hd = SHAPES[shape]
    k, v = _cache(3 * CHUNK + 40, nkv, hd, seed=1)
    # one position; a single chunk's end; one past it; chunks with a short last one
    for pos in (0, 17, CHUNK - 1, CHUNK, 2 * CHUNK + 7, 3 * CHUNK + 39):
        q = _q(1, nh, hd, seed=pos)[0]
        ref = R.attention_ref(q.view(nh, hd), k, v, pos + 1, nh, nkv, hd)
        for n_threads in (1, 2):
            got, _ = attention_decode(q, k, v, pos, nh, nkv, n_threads=n_threads)
            _close(got, ref, f"{shape} pos {pos} threads {n_threads}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_prefill_matches_reference(use_isa, isa, shape):
    """Tiles start mid-cache (pos0 not a multiple of 16) and the last one is partial."""
    use_isa(isa)
    nh, nkv, hd = SHAPES[shape]
    k, v = _cache(CHUNK + 80, nkv, hd, seed=2)
    for pos0, n in ((0, 21), (CHUNK + 3, 37)):
        q = _q(n, nh, hd, seed=pos0)
        ref = torch.stack([R.attention_ref(q[t].view(nh, hd), k, v, pos0 + t + 1, nh, nkv, hd) for t in range(n)])
        got, _ = attention_prefill(q, k, v, pos0, nh, nkv, n_threads=2)
        for t in range(n):
            _close(got[t], ref[t], f"{shape} query at {pos0 + t}")


@pytest.mark.parametrize("isa", ISAS)
def test_decode_does_not_depend_on_thread_count(use_isa, isa):
    """Chunk boundaries depend on the position only, and chunk partials are added in chunk order: 1, 2 and 3
    threads give the same bits, in the head-split range and past it."""
    use_isa(isa)
    nh, nkv, hd = SHAPES["gqa3-hd64"]
    k, v = _cache(5 * CHUNK, nkv, hd, seed=3)
    for pos in (100, 5 * CHUNK - 1):
        q = _q(1, nh, hd, seed=4)[0]
        outs = [attention_decode(q, k, v, pos, nh, nkv, n_threads=t)[0] for t in (1, 2, 3)]
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_probabilities_are_rounded_to_f16():
    """The kernels round the probabilities to f16 where llama.cpp does: their typical (median) difference from the
    reference is f32 noise, ~1000x below their difference from a reference that keeps the probabilities in
    float64 (split-K decode at 300 positions, and prefill)."""
    nh, nkv, hd = SHAPES["gqa3-hd64"]
    k, v = _cache(400, nkv, hd, seed=5)
    q = _q(8, nh, hd, seed=6)

    def unrounded(qt, n_kv):
        kk = k[:n_kv].double().view(n_kv, nkv, hd)
        vv = v[:n_kv].double().view(n_kv, nkv, hd)
        out = []
        for h in range(nh):
            g = h // (nh // nkv)
            p = torch.softmax((kk[:, g] @ qt[h].half().double()) / math.sqrt(hd), 0)
            out.append(p @ vv[:, g])
        return torch.cat(out)

    got = [attention_decode(q[0], k, v, 299, nh, nkv)[0]] + list(attention_prefill(q, k, v, 300, nh, nkv)[0])
    pos = [299] + [300 + t for t in range(8)]
    qs = [q[0]] + list(q)
    for out, p, qt in zip(got, pos, qs):
        to_ref = (out.double() - R.attention_ref(qt.view(nh, hd), k, v, p + 1, nh, nkv, hd)).abs().median()
        to_unrounded = (out.double() - unrounded(qt.view(nh, hd), p + 1)).abs().median()
        assert to_unrounded > 100 * to_ref, f"position {p}: {to_unrounded:.3g} vs {to_ref:.3g}"


def test_bad_arguments_are_errors():
    nh, nkv, hd = SHAPES["gqa3-hd64"]
    k, v = _cache(8, nkv, hd, seed=7)
    q = _q(1, nh, hd, seed=8)[0]
    with pytest.raises(ValueError):
        attention_decode(q, k, v, 8, nh, nkv)  # beyond the cache
    with pytest.raises(ValueError):
        attention_decode(q, k.float(), v, 3, nh, nkv)  # not f16
    with pytest.raises(ValueError):
        attention_prefill(_q(4, nh, hd, seed=9), k, v, 6, nh, nkv)  # runs past the cache
