"""The attention kernels over every KV cache type (-ctk/-ctv: f32, f16, q8_0, K and V independently) against
reference.attention_ref on every ISA: decode (one chunk, and chunks merged past 256 positions) and prefill tiles.

The caches hold what the decoder would store (reference.kv_store_ref: f16 rounded, q8_0 blocks), the reference
reads them as exact float64 values and rounds q and the probabilities where llama.cpp does for each type (q to K's
vec_dot_type: as is, f16, q8_0 blocks; the probabilities to f16 only for an f16 V). Tolerance as
test_attention.py: 1e-3 of the output scale; test_type_decides_the_result shows each type's roundings are bigger
than that, so a kernel reading a cache as the wrong type, or rounding where its type does not, fails."""
from __future__ import annotations

import itertools

import pytest
import torch

from kernel_helpers import ISAS
from powerinfer.kernels import reference as R
from powerinfer.kernels.attention import CHUNK, attention_decode, attention_prefill

TOL = 1e-3
TYPES = ("f32", "f16", "q8_0")
PAIRS = [p for p in itertools.product(TYPES, TYPES) if p != ("f16", "f16")]  # f16/f16: test_attention.py
SHAPES = {  # n_head, n_head_kv, head_dim
    "gqa3-hd64": (9, 3, 64),     # SmolLM2
    "mqa20-hd32": (20, 1, 32),   # more query heads per KV head than one kernel call takes (16)
    "mha-hd128": (2, 2, 128),    # 7B-like heads
}


def _cache(n_ctx, n_head_kv, hd, k_type, v_type, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n_ctx, n_head_kv * hd, generator=g) * 1.5
    v = torch.randn(n_ctx, n_head_kv * hd, generator=g)
    return R.kv_store_ref(k, k_type), R.kv_store_ref(v, v_type)


def _q(n, n_head, hd, seed):
    return torch.randn(n, n_head * hd, generator=torch.Generator().manual_seed(seed)) * 2.0


def _err(got, ref):
    return (got.double() - ref).abs().max().item() / ref.abs().max().item()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("types", PAIRS, ids="-".join)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_decode_matches_reference(use_isa, isa, types, shape):
    use_isa(isa)
    (nh, nkv, hd), (kt, vt) = SHAPES[shape], types
    k, v = _cache(2 * CHUNK + 40, nkv, hd, kt, vt, seed=1)
    for pos in (17, 2 * CHUNK + 39):  # one chunk (threads split heads); three chunks, a short last one
        q = _q(1, nh, hd, seed=pos)[0]
        ref = R.attention_ref(q.view(nh, hd), k, v, pos + 1, nh, nkv, hd, k_type=kt, v_type=vt)
        for n_threads in (1, 2):
            got, _ = attention_decode(q, k, v, pos, nh, nkv, n_threads=n_threads, k_type=kt, v_type=vt)
            assert _err(got, ref) <= TOL, f"{kt}/{vt} {shape} pos {pos} threads {n_threads}: {_err(got, ref):.3g}"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("types", PAIRS, ids="-".join)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_prefill_matches_reference(use_isa, isa, types, shape):
    """Tiles start mid-cache (pos0 not a multiple of 16) and the last one is partial."""
    use_isa(isa)
    (nh, nkv, hd), (kt, vt) = SHAPES[shape], types
    k, v = _cache(CHUNK + 80, nkv, hd, kt, vt, seed=2)
    for pos0, n in ((0, 21), (CHUNK + 3, 37)):
        q = _q(n, nh, hd, seed=pos0)
        got, _ = attention_prefill(q, k, v, pos0, nh, nkv, n_threads=2, k_type=kt, v_type=vt)
        for t in range(n):
            ref = R.attention_ref(q[t].view(nh, hd), k, v, pos0 + t + 1, nh, nkv, hd, k_type=kt, v_type=vt)
            assert _err(got[t], ref) <= TOL, f"{kt}/{vt} {shape} query at {pos0 + t}: {_err(got[t], ref):.3g}"


@pytest.mark.parametrize("isa", ISAS)
def test_f32_cache_on_a_head_dim_q8_0_cannot_take(use_isa, isa):
    """f32 and f16 take any head_dim the f16 kernels take (48: vector, 40: AVX-512 falls back); q8_0 refuses them."""
    use_isa(isa)
    for nh, nkv, hd in ((4, 2, 48), (4, 2, 40)):
        k, v = _cache(CHUNK + 20, nkv, hd, "f32", "f32", seed=3)
        q = _q(1, nh, hd, seed=4)[0]
        ref = R.attention_ref(q.view(nh, hd), k, v, CHUNK + 20, nh, nkv, hd, k_type="f32", v_type="f32")
        got, _ = attention_decode(q, k, v, CHUNK + 19, nh, nkv, n_threads=2, k_type="f32", v_type="f32")
        assert _err(got, ref) <= TOL
    k8, v8 = _cache(8, 2, 64, "q8_0", "q8_0", seed=5)
    with pytest.raises(ValueError):  # 4 heads of 48 values: the blocks would straddle heads
        attention_decode(_q(1, 4, 48, 0)[0], k8, v8, 3, 4, 2, k_type="q8_0", v_type="q8_0")


def test_type_decides_the_result():
    """What each type rounds is visible: the f32 cache's kernel matches the unrounded reference to 1e-5 and is off
    by more than that from the references that round q to f16 or the probabilities to f16 (an f16 rounding left in
    the f32 path fails); quantizing q to q8_0 moves the output by more than TOL (a q8_0 K read against an unquantized
    q fails the parity test)."""
    nh, nkv, hd = SHAPES["gqa3-hd64"]
    k, v = _cache(CHUNK, nkv, hd, "f32", "f32", seed=6)
    q = _q(1, nh, hd, seed=7)[0].view(nh, hd)
    got, _ = attention_decode(q.reshape(-1), k, v, CHUNK - 1, nh, nkv, k_type="f32", v_type="f32")
    assert _err(got, R.attention_ref(q, k, v, CHUNK, nh, nkv, hd, k_type="f32", v_type="f32")) <= 1e-5
    for kt, vt in (("f16", "f32"), ("f32", "f16")):  # the f16 roundings, on the same f32 rows
        assert _err(got, R.attention_ref(q, k, v, CHUNK, nh, nkv, hd, k_type=kt, v_type=vt)) > 1e-5, (kt, vt)
    k8 = R.kv_store_ref(k, "q8_0")
    exact_rows = R.kv_values_ref(k8, "q8_0").float()  # the same keys, read as f32: q is not quantized
    ref8 = R.attention_ref(q, k8, v, CHUNK, nh, nkv, hd, k_type="q8_0", v_type="f32")
    assert _err(ref8, R.attention_ref(q, exact_rows, v, CHUNK, nh, nkv, hd, k_type="f32", v_type="f32")) > 3 * TOL
