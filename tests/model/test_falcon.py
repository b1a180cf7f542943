"""Falcon (GGUF `falcon`, HF FalconForCausalLM): LayerNorm with bias, attention and MLP in parallel from the layer
input, a fused query_key_value (multi-query 7B, grouped 40B with ln_attn/ln_mlp, per-head interleaved RW), NeoX
RoPE, a bias-free or fully biased GELU/ReLU MLP. Tiny random models from transformers, written to PowerInfer GGUF
by `convert`'s writer, run by the C decoder (prefill and decode) and the torch reference against transformers."""
import subprocess
import sys

import pytest
import torch

from fixtures.hf_families import (FALCON_LAYOUTS, TOKENS, c_logits, falcon_model, greedy, hf_logits, rel, save)
from fixtures.tiny import stepwise_logits
from powerinfer.core.sparse_spec import SparseSpec
from powerinfer.formats.loader import load_model
from powerinfer.model.llama import Transformer


@pytest.fixture(scope="module")
def falcons(tmp_path_factory):
    root = tmp_path_factory.mktemp("falcon")
    out = {}
    for layout in FALCON_LAYOUTS:
        model = falcon_model(layout)
        out[layout] = dict(save(model, root, layout, ("same", "q8_0")), ref=hf_logits(model))
    gelu = falcon_model("40b", activation="gelu")
    out["gelu"] = dict(save(gelu, root, "gelu"), ref=hf_logits(gelu))
    return out


def test_layouts_read_as_llama_roles(falcons):
    for layout, n_kv, shared in (("7b", 1, True), ("40b", 2, False), ("rw", 4, True)):
        for path in (falcons[layout]["hf"], falcons[layout]["same"]):
            loaded = load_model(path)
            c, lw = loaded.config, loaded.weights.layers[0]
            assert (c.arch, c.norm, c.parallel_residual, c.rope_style, c.ffn_kind, c.n_head_kv) == \
                ("falcon", "layer", True, "neox", "mlp", n_kv), (layout, path)
            assert (lw.input_layernorm is lw.post_attention_layernorm) == shared
            assert lw.gate_proj is None and lw.input_layernorm_bias is not None


@pytest.mark.parametrize("layout", ["7b", "40b+bias", "rw"])
def test_torch_reference_matches_transformers(falcons, layout):
    loaded = load_model(falcons[layout]["hf"])
    ours = stepwise_logits(Transformer(loaded.config, loaded.weights), loaded.config, TOKENS, 8, n_ctx=128)
    assert rel(ours, falcons[layout]["ref"]) < 2e-5  # measured 1.2e-6 .. 1.4e-6


@pytest.mark.parametrize("layout", [*FALCON_LAYOUTS, "gelu"])
def test_c_decoder_on_converted_gguf_matches_transformers(falcons, layout):
    """72 positions, F32 GGUF written by convert: max rel error ~1e-3 (the f16 KV cache and f16 attention
    probabilities, as llama.cpp), top-1 72/72."""
    ref = falcons[layout]["ref"]
    ours = c_logits(load_model(falcons[layout]["same"]))
    assert rel(ours, ref) < 3e-3
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_c_decoder_on_hf_directory(falcons):
    ref = falcons["40b+bias"]["ref"]
    ours = c_logits(load_model(falcons["40b+bias"]["hf"]))
    assert rel(ours, ref) < 3e-3 and (ours.argmax(-1) == ref.argmax(-1)).all()


def test_q8_0_c_decoder_matches_torch_reference(falcons):
    """The same Q8_0 weights: the C decoder rounds activations to Q8 blocks (llama.cpp's vec_dot_q8_0_q8_0), the
    reference reads the weights dequantized in f32: max rel error 3.4e-2 (these weights are 2.4x the llama
    fixtures' scale, so rounding h to 8 bits costs more), top-1 above 95%."""
    loaded = load_model(falcons["40b+bias"]["q8_0"])
    ref = stepwise_logits(Transformer(loaded.config, loaded.weights), loaded.config, TOKENS, 8, n_ctx=128)
    ours = c_logits(loaded)
    assert rel(ours, ref) < 5e-2 and (ours.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95


@pytest.mark.parametrize("layout", ["7b", "40b+bias"])
def test_greedy_text_c_equals_torch(falcons, layout):
    loaded = load_model(falcons[layout]["same"])
    assert greedy(loaded, "c") == greedy(loaded, "torch")


@pytest.mark.parametrize("layout", ["7b", "40b+bias"])
def test_relu_sparse_equals_dense(falcons, layout):
    """ReluFalcon: neurons with relu(up x + b) == 0 skip their down_t rows; the logits do not change (F32 weights:
    a Q8_0 dense down projection rounds h to Q8 blocks, the sparse axpy reads it in f32)."""
    loaded = load_model(falcons[layout]["same"])
    spec, stats = SparseSpec.uniform(loaded.config.n_layer, method="relu"), {}
    dense, sparse = c_logits(loaded), c_logits(loaded, spec=spec, stats=stats)
    assert rel(sparse, dense) < 1e-4  # measured 1e-6 .. 2e-6
    assert stats["sparsity"] > 0.3  # about half of the neurons are skipped


def test_info_prints_the_architecture(falcons):
    out = subprocess.run([sys.executable, "-m", "powerinfer", "info", "-m", str(falcons["40b"]["same"])],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = {line.split("  ", 1)[0]: line.split("  ", 1)[1].strip() for line in out.stdout.splitlines() if "  " in line}
    assert rows["architecture"] == "falcon" and rows["norm / residual"] == "LayerNorm / parallel attention + FFN"
    assert rows["heads / kv heads / head dim"] == "4 / 2 / 16" and rows["ffn"] == "mlp with relu"


@pytest.mark.parametrize("layout", ["7b", "40b"])
def test_llama_cpp_falcon_gguf_matches_llama_cpp(tmp_path, layout):
    """A falcon GGUF in llama.cpp's own layout (ffn_down not transposed, no powerinfer keys: GELU in ggml's tanh
    form), run by llama.cpp (llama-cpp-python, the bench extra) and by the C decoder: 64 positions, max rel error
    7.1e-4 (7b) / 5.5e-4 (40b), top-1 64/64."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import numpy as np

    from fixtures.hf_families import write_llama_cpp_falcon

    model = falcon_model(layout, activation="gelu", n_vocab=260)
    model.save_pretrained(tmp_path / "hf")
    path = write_llama_cpp_falcon(tmp_path / "falcon.gguf", load_model(tmp_path / "hf"))
    toks = [int(t) for t in np.random.default_rng(3).integers(0, 256, 64)]
    llm = llama_cpp.Llama(str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2)
    llm.eval(toks)
    ref = torch.tensor(np.array(llm.scores[:len(toks)]))
    loaded = load_model(path)
    assert loaded.config.activation == "gelu_tanh" and not loaded.powerinfer_gguf
    ours = c_logits(loaded, torch.tensor(toks), n_prefill=len(toks))
    assert rel(ours, ref) < 2e-3 and (ours.argmax(-1) == ref.argmax(-1)).all()
