"""HF safetensors directories written by transformers' save_pretrained load to the same logits."""
import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from fixtures.tiny import hf_logits, stepwise_logits
from powerinfer.errors import ModelFormatError
from powerinfer.formats.loader import load_model
from powerinfer.model.llama import Transformer

TOKENS = torch.tensor([4, 8, 15, 16, 23, 42, 0, 95])


def _ours(path):
    loaded = load_model(path)
    return loaded, stepwise_logits(Transformer(loaded.config, loaded.weights), loaded.config, TOKENS, 5)


def test_llama_dir_matches_gguf_and_transformers(tiny_hf_dir, tiny_llama_gguf):
    path, tiny = tiny_hf_dir(arch="llama")
    loaded, ours = _ours(path)
    c = loaded.config
    assert (c.rope_style, c.arch, c.n_head_kv, c.head_dim, c.tie_embeddings) == ("neox", "llama", 2, 16, False)
    assert loaded.path == path and loaded.file_type == "HF safetensors (21 F32)"
    torch.testing.assert_close(ours, hf_logits(tiny, TOKENS), atol=2e-5, rtol=2e-5)
    _, from_gguf = _ours(tiny_llama_gguf("F32").path)  # same weights, permuted q/k and "norm" RoPE
    torch.testing.assert_close(ours, from_gguf, atol=2e-5, rtol=2e-5)


def test_qwen2_dir_with_biases(tiny_hf_dir):
    path, tiny = tiny_hf_dir(arch="qwen2")
    loaded, ours = _ours(path)
    assert loaded.config.attn_bias and loaded.weights.layers[0].q_bias.shape == (64,)
    torch.testing.assert_close(ours, hf_logits(tiny, TOKENS), atol=2e-5, rtol=2e-5)


def test_bf16_sharded_tied_relu_dir(tiny_hf_dir):
    path, tiny = tiny_hf_dir(dtype=torch.bfloat16, save_kw={"max_shard_size": "20KB"},
                             arch="llama", tie_embeddings=True, activation="relu")
    assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("*.safetensors"))) > 1
    loaded, ours = _ours(path)
    w = loaded.weights
    assert w.layers[0].up_proj.qtype == Q.BF16 and w.layers[0].up_proj.data.dtype == np.uint16
    assert isinstance(w.layers[0].up_proj.data, np.memmap)
    assert loaded.config.activation == "relu" and w.lm_head is w.embed_tokens
    # The reference runs the same bf16-rounded weights in fp32.
    torch.testing.assert_close(ours, _hf_fp32_of_bf16(tiny), atol=5e-5, rtol=5e-5)


def _hf_fp32_of_bf16(tiny):
    # Not hf_model(bfloat16).float(): that would also round the rotary inv_freq buffer to bf16.
    model = tiny.hf_model()
    model.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in tiny.hf_state.items()}, strict=False)
    with torch.inference_mode():
        return model(TOKENS[None]).logits[0]


def test_rope_scaling_and_legacy_config_keys(tiny_hf_dir, tmp_path):
    path, _ = tiny_hf_dir(arch="llama", rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert load_model(path).config.rope_scaling.kind == "linear"
    # transformers < 5 wrote rope_theta and rope_scaling at the top level.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    cfg = json.loads((path / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 64}
    (legacy / "config.json").write_text(json.dumps(cfg))
    for f in path.glob("*.safetensors"):
        (legacy / f.name).symlink_to(f)
    c = load_model(legacy).config
    assert (c.rope_theta, c.rope_scaling.kind, c.rope_scaling.factor, c.rope_scaling.original_context) == \
        (10000.0, "llama3", 8.0, 64)


def test_hf_errors(tiny_hf_dir, tmp_path):
    path, _ = tiny_hf_dir(arch="llama")
    cfg = json.loads((path / "config.json").read_text())

    def broken(name, config, with_weights=True):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(config))
        if with_weights:
            (d / "model.safetensors").symlink_to(path / "model.safetensors")
        with pytest.raises(ModelFormatError) as e:
            load_model(d)
        assert str(d) in str(e.value) and "\n" not in str(e.value)
        return str(e.value)

    assert "unsupported architecture" in broken("gpt2", {**cfg, "architectures": ["GPT2LMHeadModel"],
                                                         "model_type": "gpt2"})
    assert "no *.safetensors" in broken("empty", cfg, with_weights=False)
    assert "missing tensor model.layers.2." in broken("deeper", {**cfg, "num_hidden_layers": 3})
    assert "unsupported hidden_act" in broken("act", {**cfg, "hidden_act": "tanh"})
