"""Phi-3 (GGUF `phi3`, HF Phi3ForCausalLM): a llama with fused attn_qkv (q | k | v rows) and ffn_up (gate | up rows),
read as row views of the one tensor, NeoX RoPE, and for the 128k models LongRoPE (long factors past the original
context, short ones within it, cos/sin scaled by the attention factor). Tiny random models from transformers, written
to PowerInfer GGUF by `convert`'s writer, run by the C decoder (prefill and decode, dense and threshold-sparse) and
the torch reference against transformers, and a llama.cpp-layout file against llama.cpp itself."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures.hf_families import (PHI3_LONG_FACTORS, PHI3_SHORT_FACTORS, TOKENS, c_logits, greedy, hf_logits,
                                  phi3_model, rel, save, write_llama_cpp_phi3)
from fixtures.tiny import stepwise_logits
from powerinfer.core.sparse_spec import SparseSpec
from powerinfer.formats.loader import load_model
from powerinfer.model.llama import Transformer
from powerinfer.runtime.runner import make_runner

TEMPLATE = (Path(__file__).resolve().parents[1] / "data" / "templates" / "phi3.jinja").read_text()
LAYOUTS = {"4k": False, "128k": True}  # LongRoPE or not


@pytest.fixture(scope="module")
def phi3s(tmp_path_factory):
    root = tmp_path_factory.mktemp("phi3")
    out = {}
    for name, longrope in LAYOUTS.items():
        model = phi3_model(longrope)
        model.save_pretrained(root / name)
        (root / name / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
        out[name] = dict(save(model, root, name, ("same", "q8_0")), ref=hf_logits(model), model=model)
    return out


def _address(t) -> int:
    return t.data.__array_interface__["data"][0]


@pytest.mark.parametrize("source", ["hf", "same"])
def test_fused_tensors_are_row_views(phi3s, source):
    """q/k/v and gate/up are consecutive row blocks of one buffer (no copy: the model is in memory once)."""
    loaded = load_model(phi3s["128k"][source])
    c, lw = loaded.config, loaded.weights.layers[1]
    assert (c.arch, c.rope_style, c.ffn_kind, c.activation, c.norm) == ("phi3", "neox", "glu", "silu", "rms")
    rs = c.rope_scaling
    assert (rs.kind, rs.original_context) == ("longrope", 32)
    assert rs.long_factors == pytest.approx(PHI3_LONG_FACTORS) and rs.short_factors == pytest.approx(PHI3_SHORT_FACTORS)
    assert rs.attn_factor == pytest.approx(np.sqrt(1 + np.log(8) / np.log(32)))  # GGUF float32
    assert _address(lw.k_proj) == _address(lw.q_proj) + lw.q_proj.nbytes
    assert _address(lw.v_proj) == _address(lw.k_proj) + lw.k_proj.nbytes
    assert _address(lw.up_proj) == _address(lw.gate_proj) + lw.gate_proj.nbytes
    assert lw.gate_proj.shape == lw.up_proj.shape == (c.n_ff, c.d_model)


@pytest.mark.parametrize("name,source", [("4k", "same"), ("128k", "hf"), ("128k", "same")])
def test_torch_reference_matches_transformers(phi3s, name, source):
    loaded = load_model(phi3s[name][source])
    ours = stepwise_logits(Transformer(loaded.config, loaded.weights), loaded.config, TOKENS, 8, n_ctx=128)
    assert rel(ours, phi3s[name]["ref"]) < 2e-5


@pytest.mark.parametrize("name", LAYOUTS)
def test_c_decoder_on_converted_gguf_matches_transformers(phi3s, name):
    """72 positions of the F32 GGUF written by convert: max rel error 1.2e-3 (4k) / 2.1e-3 (128k), what the f16 KV
    cache costs, top-1 72/72. The 128k model's 128-position context is past its original 32, so the long factors
    are used, as transformers does for a 72-token pass."""
    ref = phi3s[name]["ref"]
    ours = c_logits(load_model(phi3s[name]["same"]))
    assert rel(ours, ref) < 5e-3
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_longrope_short_factors_within_the_original_context(phi3s):
    """A context of 32 (= the original): the short factors, as transformers uses for 24 tokens (max rel error
    1.3e-3, top-1 24/24); the long factors' logits are 0.7 away from those (a wrong pick cannot pass)."""
    loaded = load_model(phi3s["128k"]["same"])
    ref = hf_logits(phi3s["128k"]["model"], TOKENS[:24])
    short = c_logits(loaded, TOKENS[:24], n_ctx=32)
    assert rel(short, ref) < 5e-3 and (short.argmax(-1) == ref.argmax(-1)).all()
    assert rel(c_logits(loaded, TOKENS[:24], n_ctx=128), ref) > 0.1


def test_c_decoder_on_hf_directory(phi3s):
    ref = phi3s["128k"]["ref"]
    ours = c_logits(load_model(phi3s["128k"]["hf"]))
    assert rel(ours, ref) < 5e-3 and (ours.argmax(-1) == ref.argmax(-1)).all()


def test_phi4_mini_shape(tmp_path):
    """Phi-4-mini's form of phi3: RoPE over 3/4 of each head (partial_rotary_factor 0.75: rope dimension 12 of 16,
    six LongRoPE factors) and the head tied to the embeddings: max rel error 1.1e-3, top-1 72/72."""
    import transformers

    from fixtures.hf_families import _randomize

    cfg = transformers.Phi3Config(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, original_max_position_embeddings=32, sliding_window=None,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, partial_rotary_factor=0.75, tie_word_embeddings=True,
        rope_scaling=dict(type="longrope", long_factor=[1.0, 1.5, 2.2, 3.0, 4.1, 5.0],
                          short_factor=[1.0, 1.05, 1.1, 1.2, 1.25, 1.3]))
    model = _randomize(transformers.Phi3ForCausalLM(cfg), 6, scale=0.15)
    path = save(model, tmp_path, "phi4")["same"]
    loaded = load_model(path)
    assert (loaded.config.rope_dim, loaded.config.tie_embeddings) == (12, True)
    ref, ours = hf_logits(model), c_logits(loaded)
    assert rel(ours, ref) < 5e-3 and (ours.argmax(-1) == ref.argmax(-1)).all()


def test_q8_0_c_decoder_matches_torch_reference(phi3s):
    """The same Q8_0 weights (gate and up are row views of the quantized ffn_up): the C decoder rounds activations
    to Q8 blocks as llama.cpp does, the reference reads the weights dequantized in f32: max rel error 4.9e-2, top-1
    70/72 (against llama.cpp itself on a Q8_0 file: test_llama_cpp_phi3_gguf_matches_llama_cpp)."""
    loaded = load_model(phi3s["128k"]["q8_0"])
    ref = stepwise_logits(Transformer(loaded.config, loaded.weights), loaded.config, TOKENS, 8, n_ctx=128)
    ours = c_logits(loaded)
    assert rel(ours, ref) < 8e-2 and (ours.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95


@pytest.mark.parametrize("name", LAYOUTS)
def test_greedy_text_c_equals_torch(phi3s, name):
    loaded = load_model(phi3s[name]["same"])
    assert greedy(loaded, "c") == greedy(loaded, "torch")


def test_threshold_sparse_matches_torch_backend(phi3s):
    """--sparsity's thresholded SwiGLU FFN on the fused gate/up views: the C decoder against the torch `threshold`
    backend at the same thresholds, token by token."""
    loaded = load_model(phi3s["128k"]["same"])
    spec = SparseSpec.from_sites({"h": [0.05, 0.08]}, method="hu")
    c, t = make_runner(loaded, 64, 2), make_runner(loaded, 64, 1, compute="torch")
    for r in (c, t):
        r.set_sparse(spec)
    ids = TOKENS[:12].tolist()
    lc, lt = (torch.from_numpy(r.eval(ids, all_logits=True)) for r in (c, t))
    assert np.array_equal(np.asarray(lc).argmax(-1), np.asarray(lt).argmax(-1))
    assert rel(lc, lt) < 1e-3
    assert 0.1 < c.ffn_sparsity() < 0.95


def test_info_prints_architecture_and_template(phi3s):
    out = subprocess.run([sys.executable, "-m", "powerinfer", "info", "--template", "-m", str(phi3s["128k"]["same"])],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = {line.split("  ", 1)[0]: line.split("  ", 1)[1].strip() for line in out.stdout.splitlines() if "  " in line}
    assert rows["architecture"] == "phi3" and rows["ffn"] == "glu with silu"
    assert rows["heads / kv heads / head dim"] == "4 / 2 / 16" and rows["d_model / n_ff"] == "64 / 128"
    assert rows["rope"] == "theta 10000, neox style, scaling longrope"
    assert rows["chat template"] == f"{len(TEMPLATE)} chars"
    assert out.stdout.rstrip("\n").endswith(TEMPLATE)


def test_run_with_sparsity(tmp_path):
    """`run --sparsity 0.5` on a llama.cpp-layout phi3 GGUF (with a vocabulary): thresholds calibrated on first use,
    a sparse decode that reports its FFN sparsity."""
    model = phi3_model(True, n_vocab=260)  # the byte-level vocabulary's 260 tokens
    model.save_pretrained(tmp_path / "hf260")
    path = write_llama_cpp_phi3(tmp_path / "phi3.gguf", load_model(tmp_path / "hf260"))
    out = subprocess.run([sys.executable, "-m", "powerinfer", "run", "-m", str(path), "-p", "hello", "-n", "12",
                          "--temp", "0", "--sparsity", "0.5", "-c", "128", "--verbose"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "ffn sparsity" in out.stderr, out.stderr


@pytest.mark.parametrize("name,qtype", [("4k", "F32"), ("128k", "F32"), ("128k", "Q8_0")])
def test_llama_cpp_phi3_gguf_matches_llama_cpp(tmp_path, name, qtype):
    """A phi3 GGUF in llama.cpp's own layout (fused attn_qkv and ffn_up, ffn_down not transposed, LongRoPE factor
    tensors), run by llama.cpp (llama-cpp-python, the bench extra) and by the C decoder: 64 positions, max rel error
    2.1e-5 (4k) / 9.3e-5 (128k, long factors) / 9.6e-8 (128k Q8_0), top-1 64/64."""
    llama_cpp = pytest.importorskip("llama_cpp")

    model = phi3_model(LAYOUTS[name], n_vocab=260)
    model.save_pretrained(tmp_path / "hf")
    path = write_llama_cpp_phi3(tmp_path / "phi3.gguf", load_model(tmp_path / "hf"), qtype)
    toks = [int(t) for t in np.random.default_rng(3).integers(0, 256, 64)]
    llm = llama_cpp.Llama(str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2)
    llm.eval(toks)
    ref = torch.tensor(np.array(llm.scores[:len(toks)]))
    loaded = load_model(path)
    assert loaded.config.arch == "phi3" and not loaded.powerinfer_gguf
    ours = c_logits(loaded, torch.tensor(toks), n_prefill=len(toks))
    print(f"phi3 {name} {qtype} vs llama.cpp: max rel error {rel(ours, ref):.2e}, "
          f"top-1 {(ours.argmax(-1) == ref.argmax(-1)).sum().item()}/{len(toks)}")
    assert rel(ours, ref) < 5e-4 and (ours.argmax(-1) == ref.argmax(-1)).all()  # measured 9.3e-5
    if qtype == "F32":  # llama.cpp reads the file as transformers runs the model
        assert (hf_logits(model, torch.tensor(toks)).argmax(-1) == ref.argmax(-1)).all()
