"""Gemma 2 and Gemma 3 (GGUF `gemma2` / `gemma3`, HF Gemma2ForCausalLM / Gemma3ForCausalLM): embeddings times
sqrt(d), GeGLU (gelu-tanh), RMSNorms before and after attention and FFN, q scaled by query_pre_attn_scalar^-0.5,
attention and final logit soft-capping (gemma2), sliding-window layers (gemma2: every other one; gemma3: 5 of 6,
with their own RoPE base). Tiny random models from transformers (fixtures/gemma.py: window 16 over 72 positions,
caps that bite), written to PowerInfer GGUF by `convert`'s writer, run by the C decoder (prefill and decode) and
the torch reference against transformers, and in llama.cpp's own layout against llama.cpp."""
import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch

from fixtures.gemma import SPM_N_VOCAB, WINDOW, gemma_model, write_llama_cpp_gemma
from fixtures.hf_families import TOKENS, c_logits, greedy, hf_logits, rel, save
from fixtures.shift import shifted_and_fresh
from fixtures.tiny import stepwise_logits
from powerinfer.core.sparse_spec import SparseSpec
from powerinfer.formats.loader import load_model
from powerinfer.model.llama import Transformer
from powerinfer.runtime.runner import make_runner

ARCHS = ("gemma2", "gemma3")


@pytest.fixture(scope="module")
def gemmas(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma")
    out = {}
    for arch in ARCHS:
        model = gemma_model(arch)
        out[arch] = dict(save(model, root, arch, ("same", "q8_0")), ref=hf_logits(model), model=model)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_config_from_gguf_and_hf(gemmas, arch):
    local = [0, 2] if arch == "gemma2" else [0, 1, 2, 3, 4]
    for key in ("hf", "same"):
        loaded = load_model(gemmas[arch][key])
        c = loaded.config
        assert (c.arch, c.rope_style, c.activation, c.ffn_kind, c.post_norms, c.sliding_window) == \
            (arch, "neox", "gelu_tanh", "glu", True, WINDOW), key
        assert [i for i in range(c.n_layer) if c.is_local(i)] == local
        assert c.embed_scale == pytest.approx(8.0)
        if arch == "gemma2":  # query_pre_attn_scalar 24 (the GGUF states it: llama.cpp's rule gives head_dim 16)
            assert (c.attn_scale, c.attn_softcap, c.final_softcap) == (pytest.approx(24 ** -0.5), 3.0, 8.0)
            assert c.local_rope() is None
        else:
            assert (c.attn_scale, c.attn_softcap, c.final_softcap, c.qk_norm) == (0.25, 0.0, 0.0, True)
            assert (c.rope_theta, c.rope_scaling.kind, c.rope_scaling.factor) == (1e6, "linear", 2.0)
            assert (c.local_rope().rope_theta, c.local_rope().rope_scaling.kind) == (10000.0, "none")
        # HF's Gemma norms multiply by 1 + w: the loaded (and written) weight is 1 + w, llama.cpp's form
        w = gemmas[arch]["model"].model.layers[1].post_feedforward_layernorm.weight.detach()
        assert torch.equal(loaded.weights.layers[1].post_ffn_norm.dequantize().reshape(-1), w + 1)


@pytest.mark.parametrize("arch", ARCHS)
def test_torch_reference_matches_transformers(gemmas, arch):
    loaded = load_model(gemmas[arch]["same"])
    ours = stepwise_logits(Transformer(loaded.config, loaded.weights), loaded.config, TOKENS, 8, n_ctx=128)
    assert rel(ours, gemmas[arch]["ref"]) < 2e-5  # measured 5.5e-7 (gemma2) / 4.0e-7 (gemma3)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("key,tol", [("same", 2e-3), ("hf", 2e-3), ("q8_0", 5e-2)])
def test_c_decoder_matches_transformers(gemmas, arch, key, tol):
    """72 positions, window 16: a prefill of 8 then decode steps, and one prefill of all 72 (the windowed tiles).
    Max rel error (F32 / HF / Q8_0): gemma2 5.5e-4 / 5.5e-4 / 2.9e-2, gemma3 2.2e-4 / 2.2e-4 / 1.4e-2; top-1 72/72
    (Q8_0: the C decoder rounds activations to Q8 blocks, llama.cpp's vec_dot_q8_0_q8_0)."""
    loaded, ref = load_model(gemmas[arch][key]), gemmas[arch]["ref"]
    for n_prefill in (8, len(TOKENS)):
        ours = c_logits(loaded, n_prefill=n_prefill)
        assert rel(ours, ref) < tol, n_prefill
        assert (ours.argmax(-1) == ref.argmax(-1)).all(), n_prefill


OPTIONS = [("gemma2", "attn_softcap", 0.0), ("gemma2", "final_softcap", 0.0), ("gemma2", "sliding_window", 0),
           ("gemma2", "attn_scale", 0.0), ("gemma2", "embed_scale", 1.0), ("gemma3", "sliding_window", 0),
           ("gemma3", "rope_local_theta", 0.0), ("gemma3", "embed_scale", 1.0)]


@pytest.mark.parametrize("arch,option,off", OPTIONS)
def test_each_option_decides_the_logits(gemmas, arch, option, off):
    """The C decoder with one of Gemma's options left out is far from transformers (measured max rel error: gemma2
    without attention soft-capping 0.68, final soft-capping 1.27, the window 0.65, query_pre_attn_scalar 0.07, the
    embedding scale 1.39; gemma3 without the window 0.61, the local RoPE base 0.27, the embedding scale 0.99), so the
    parity above is evidence that each one is applied."""
    loaded = load_model(gemmas[arch]["same"])
    loaded.config = dataclasses.replace(loaded.config, **{option: off})
    assert rel(c_logits(loaded), gemmas[arch]["ref"]) > 0.03


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_text_c_equals_torch(gemmas, arch):
    loaded = load_model(gemmas[arch]["q8_0"])
    assert greedy(loaded, "c") == greedy(loaded, "torch")


@pytest.mark.parametrize("arch", ARCHS)
def test_threshold_sparse_matches_torch_backend(gemmas, arch):
    """--sparsity's thresholded GeGLU FFN (|gelu(gate) * up| below a layer's threshold skipped) with the post-FFN norm
    after the sparse sum: the C decoder against the torch `threshold` backend at the same thresholds, over a prefill
    (the batched sparse FFN) and decode steps."""
    loaded = load_model(gemmas[arch]["same"])
    spec = SparseSpec.from_sites({"h": [0.05] * loaded.config.n_layer}, method="hu")
    c, t = make_runner(loaded, 64, 2), make_runner(loaded, 64, 1, compute="torch")
    outs = []
    for r in (c, t):
        r.set_sparse(spec)
        ids = TOKENS[:24].tolist()
        outs.append(torch.cat([torch.tensor(r.eval(ids[:6], all_logits=True))] +
                              [torch.tensor(r.eval([tok]))[None] for tok in ids[6:]]))
    assert torch.equal(outs[0].argmax(-1), outs[1].argmax(-1))
    assert rel(outs[0], outs[1]) < 2e-3
    assert 0.1 < c.ffn_sparsity() < 0.95


def test_info_prints_the_architecture(gemmas):
    out = subprocess.run([sys.executable, "-m", "powerinfer", "info", "-m", str(gemmas["gemma2"]["same"])],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = {line.split("  ", 1)[0]: line.split("  ", 1)[1].strip() for line in out.stdout.splitlines() if "  " in line}
    assert rows["architecture"] == "gemma2" and rows["ffn"] == "glu with gelu_tanh"
    assert rows["heads / kv heads / head dim"] == "4 / 2 / 16" and rows["d_model / n_ff"] == "64 / 128"
    assert rows["attention"] == "q scale 0.2041, soft-cap 3.0, sliding window 16 on 2 of 4 layers"
    assert rows["post norms / embedding scale / final soft-cap"] == "yes / 8 / 8.0"


@pytest.fixture(scope="module")
def llama_cpp_gemmas(tmp_path_factory):
    """gemma2 / gemma3 GGUFs in llama.cpp's own layout with a Gemma-style SPM vocabulary (query_pre_attn_scalar =
    head_dim: llama.cpp derives the q scale from the shape and reads no key for it)."""
    root = tmp_path_factory.mktemp("gemma_llama_cpp")
    out = {}
    for arch in ARCHS:
        model = gemma_model(arch, vocab_size=SPM_N_VOCAB, query_pre_attn_scalar=16)
        model.save_pretrained(root / arch)
        out[arch] = (write_llama_cpp_gemma(root / f"{arch}.gguf", load_model(root / arch)), model)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_llama_cpp_gemma_gguf_matches_llama_cpp(llama_cpp_gemmas, arch):
    """llama.cpp (llama-cpp-python, the bench extra) and the C decoder on the same file, 64 positions past the
    window: max rel error 6.8e-4 (gemma2) / 2.5e-4 (gemma3), top-1 64/64; transformers agrees with llama.cpp."""
    llama_cpp = pytest.importorskip("llama_cpp")
    path, model = llama_cpp_gemmas[arch]
    toks = [int(t) for t in np.random.default_rng(3).integers(6, SPM_N_VOCAB, 64)]
    llm = llama_cpp.Llama(str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2)
    llm.eval(toks)
    ref = torch.tensor(np.array(llm.scores[:len(toks)]))
    loaded = load_model(path)
    assert loaded.config.arch == arch and not loaded.powerinfer_gguf
    for n_prefill in (8, len(toks)):
        ours = c_logits(loaded, torch.tensor(toks), n_prefill=n_prefill)
        assert rel(ours, ref) < 2e-3 and (ours.argmax(-1) == ref.argmax(-1)).all(), n_prefill
    assert (hf_logits(model, torch.tensor(toks)).argmax(-1) == ref.argmax(-1)).all()


def test_run_with_sparsity(llama_cpp_gemmas):
    """`run --sparsity 0.5` on a gemma2 GGUF with a vocabulary: thresholds calibrated on first use on the GeGLU gate,
    a sparse decode that reports its FFN sparsity."""
    path, _ = llama_cpp_gemmas["gemma2"]
    out = subprocess.run([sys.executable, "-m", "powerinfer", "run", "-m", str(path), "-p", "hello world", "-n", "12",
                          "--temp", "0", "--sparsity", "0.5", "-c", "128", "--verbose"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "ffn sparsity" in out.stderr, out.stderr


def test_k_shift_rotates_local_layers_with_their_base(gemmas):
    """Gemma 3's layer 0 is local (RoPE base 10000, against the global layers' 1e6 scaled by 2): after dropping 30
    positions its shifted keys equal a fresh evaluation of the shortened sequence (within one f16 ulp); rotated
    back with the global base instead they are off by 1.8x the largest key."""
    loaded = load_model(gemmas["gemma3"]["same"])
    ids = [(7 * i + 3) % loaded.config.n_vocab for i in range(100)]
    shifted, fresh = shifted_and_fresh(loaded, ids, 128)
    n = fresh.n_past
    k, k_ref = shifted.kv.k[0][:n].astype(np.float32), fresh.kv.k[0][:n].astype(np.float32)
    assert np.abs(k - k_ref).max() <= 2 ** -8 * np.abs(k_ref).max()
