"""KV cache types (-ctk/-ctv f32, f16, q8_0) through the runners: what the C decoder stores (q8_0 rows as
reference.kv_store_ref quantizes them), prefill against step-by-step decode, the C decoder against the torch model
on an f32 cache, the K-shift of a q8_0 cache, the API and CLI settings and their one-line errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

import powerinfer
from fixtures.shift import shifted_and_fresh
from powerinfer.cli import main
from powerinfer.errors import PowerInferError
from powerinfer.formats.loader import load_model, load_tokenizer
from powerinfer.kernels import reference as R
from powerinfer.runtime.runner import make_runner

IDS = [(7 * i + 3) % 96 for i in range(40)]


@pytest.fixture(scope="module")
def tiny32(tiny_gguf):
    """head_dim 32: one q8_0 block per head"""
    return load_model(tiny_gguf(arch="llama", qtype=Q.F32, d_model=128, n_head=4, n_head_kv=2).path)


def test_q8_0_rows_are_the_reference_quantization_of_the_f32_rows(tiny32):
    """Layer 0's K and V at a position depend only on the token and the position: the q8_0 cache holds exactly the
    q8_0 blocks of what the f32 cache holds (decode writes and prefill writes alike)."""
    f32 = make_runner(tiny32, 64, 2, cache_types=("f32", "f32"))
    q8 = make_runner(tiny32, 64, 2, cache_types=("q8_0", "q8_0"))
    for r in (f32, q8):
        r.eval(IDS[:20])  # prefill
        r.eval(IDS[20:21])  # one decode step
    assert q8.kv.k[0].dtype == np.uint8 and q8.kv.k[0].shape == (64, 64 // 32 * 34)
    for got, rows in ((q8.kv.k[0][:21], f32.kv.k[0][:21]), (q8.kv.v[0][:21], f32.kv.v[0][:21])):
        assert torch.equal(torch.from_numpy(got), R.kv_store_ref(torch.from_numpy(rows), "q8_0"))


@pytest.mark.parametrize("types", [("f32", "f32"), ("q8_0", "f16"), ("f16", "q8_0"), ("q8_0", "q8_0")],
                         ids="-".join)
def test_prefill_equals_decode_steps(tiny32, types):
    """The prefill tiles and the decode kernels read the cache types the same way: all-position logits of one
    prefill against token-by-token decode steps."""
    a = make_runner(tiny32, 64, 2, cache_types=types)
    b = make_runner(tiny32, 64, 2, cache_types=types)
    pre = torch.from_numpy(a.eval(IDS, all_logits=True))
    steps = torch.stack([torch.tensor(b.eval([t])) for t in IDS])
    err = (pre - steps).abs().max().item()
    assert err <= 1e-4 * steps.abs().max().item(), err


def test_c_decoder_on_an_f32_cache_matches_the_torch_model(tiny32):
    """Nothing in an f32/f32 cache is rounded (q as is, probabilities unrounded), like the torch model's f32
    attention: logits agree to f32 rounding; the default f16 cache is visibly further off (its roundings count)."""
    ref = make_runner(tiny32, 64, 1, compute="torch", cache_types=("f32", "f32")).eval(IDS, all_logits=True)
    ref = torch.from_numpy(ref)
    scale = ref.abs().max().item()
    got = torch.from_numpy(make_runner(tiny32, 64, 2, cache_types=("f32", "f32")).eval(IDS, all_logits=True))
    f16 = torch.from_numpy(make_runner(tiny32, 64, 2).eval(IDS, all_logits=True))
    err32, err16 = ((x - ref).abs().max().item() / scale for x in (got, f16))
    assert err32 <= 2e-5 and err16 > 4 * err32, (err32, err16)


def test_torch_model_refuses_q8_0(tiny32):
    with pytest.raises(PowerInferError, match="q8_0"):
        make_runner(tiny32, 64, 1, compute="torch", cache_types=("q8_0", "f16"))


def test_q8_0_needs_head_dim_a_multiple_of_32(tiny_gguf):
    small = load_model(tiny_gguf(arch="llama", qtype=Q.F32).path)  # head_dim 16
    with pytest.raises(PowerInferError, match="head_dim"):
        make_runner(small, 64, 1, cache_types=("f16", "q8_0"))


@pytest.mark.parametrize("types", [("q8_0", "q8_0"), ("f32", "f32")], ids="-".join)
def test_k_shift_of_each_cache_type(bundled_model, types):
    """As test_context_shift's: after dropping 30 positions layer 0's shifted keys equal a fresh evaluation of the
    shortened sequence within the type's rounding (q8_0: dequantized, rotated, quantized again, as llama.cpp's
    K-shift of a quantized cache; one q8_0 step at the largest key), values moved byte for byte."""
    ids = load_tokenizer(bundled_model).encode("The quick brown fox jumps over the lazy dog. " * 12)[:100]
    shifted, fresh = shifted_and_fresh(bundled_model, ids, 128, cache_types=types)
    n = fresh.n_past
    ks, kf = (R.kv_values_ref(torch.from_numpy(r.kv.k[0][:n]), types[0]) for r in (shifted, fresh))
    step = kf.abs().max().item() * (1 / 127 if types[0] == "q8_0" else 1e-6)
    assert (ks - kf).abs().max().item() <= step
    assert np.array_equal(shifted.kv.v[0][:n], fresh.kv.v[0][:n])


def test_api_and_kv_bytes(bundled_model_path):
    """powerinfer.load(cache_type_k=..., cache_type_v=...): the cache's bytes per type (SmolLM2: 30 layers, 3 KV
    heads of 64; q8_0 is 34 bytes per 32 values) and the same greedy text start as f16."""
    sizes = {}
    for t in ("f32", "f16", "q8_0"):
        llm = powerinfer.load(bundled_model_path, n_ctx=256, cache_type_k=t, cache_type_v=t, sparsity="off")
        sizes[t] = llm.runner.kv.nbytes
        assert llm.generate("The capital of France is", n_predict=3, temp=0).startswith(" Paris")
    assert sizes == {"f32": 2 * 30 * 256 * 192 * 4, "f16": 2 * 30 * 256 * 192 * 2, "q8_0": 2 * 30 * 256 * 6 * 34}
    with pytest.raises(PowerInferError, match="cache-type-k"):
        powerinfer.load(bundled_model_path, cache_type_k="q4_0")


def test_cli_flags(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    assert "-ctk TYPE, --cache-type-k TYPE" in out and "-ctv TYPE, --cache-type-v TYPE" in out and "q8_0" in out
    for argv in (["run", "-ctk", "bf16", "-p", "x"], ["run", "--cache-type-v", "fp8", "-p", "x"]):
        assert main(argv) == 1
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 1 and err[0].startswith("error: --cache-type-"), err
