"""The torch reference model against transformers (LlamaForCausalLM / Qwen2ForCausalLM; Qwen3 in test_qwen3.py) on tiny GGUFs,
and on the real bundled SmolLM2."""
import numpy as np
import pytest
import torch
from torch import nn

from fixtures.tiny import hf_logits, stepwise_logits
from powerinfer.formats.loader import load_model
from powerinfer.model.kvcache import KVCache
from powerinfer.model.llama import Transformer
from powerinfer.sparse.ffn import DenseFFN, ffn_factory, make_ffn, register_ffn

TOKENS = torch.tensor([3, 17, 42, 5, 88, 61, 0, 95, 23, 23, 7, 50])


def _compare(tiny, cache_dtype=torch.float32, n_prefill=6):
    loaded = load_model(tiny.path)
    ours = stepwise_logits(Transformer(loaded.config, loaded.weights), loaded.config, TOKENS, n_prefill, cache_dtype)
    return ours, hf_logits(tiny, TOKENS)


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
def test_llama_swiglu_matches_transformers(tiny_llama_gguf, qtype):
    ours, ref = _compare(tiny_llama_gguf(qtype))
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=2e-5)


def test_llama_relu_matches_transformers(tiny_llama_gguf):
    tiny = tiny_llama_gguf("Q4_1", activation="relu")
    assert load_model(tiny.path).config.activation == "relu"
    ours, ref = _compare(tiny)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=2e-5)


def test_qwen2_biases_match_transformers(tiny_qwen2_gguf):
    tiny = tiny_qwen2_gguf("Q8_0")
    cfg = load_model(tiny.path).config
    assert (cfg.attn_bias, cfg.rope_style) == (True, "neox")
    ours, ref = _compare(tiny)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=2e-5)


def test_tied_embeddings_and_mha_match_transformers(tiny_llama_gguf):
    tiny = tiny_llama_gguf("Q8_0", tie_embeddings=True, n_head_kv=4)
    loaded = load_model(tiny.path)
    assert loaded.config.tie_embeddings and loaded.weights.lm_head is loaded.weights.embed_tokens
    ours, ref = _compare(tiny, n_prefill=1)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=2e-5)


@pytest.mark.parametrize("rope_scaling", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
], ids=["linear", "llama3", "yarn"])
def test_rope_scaling_matches_transformers(tiny_llama_gguf, rope_scaling):
    tiny = tiny_llama_gguf(rope_scaling=rope_scaling)
    assert load_model(tiny.path).config.rope_scaling.kind == rope_scaling["rope_type"]
    ours, ref = _compare(tiny)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=2e-5)


def test_f16_cache_stays_close_and_holds_the_rows(tiny_llama_gguf):
    tiny = tiny_llama_gguf("F32")
    ours, ref = _compare(tiny, cache_dtype=torch.float16)
    # f16 K/V (llama.cpp's default cache type) costs ~1e-3 relative; logits here are O(3).
    torch.testing.assert_close(ours, ref, atol=5e-3, rtol=0)
    loaded = load_model(tiny.path)
    cfg = loaded.config
    cache = KVCache.allocate(cfg.n_layer, 16, cfg.n_head_kv * cfg.head_dim)
    for t in cache.k + cache.v:  # the cache is allocated uninitialized: no reader may look past the last row
        t.fill_(float("nan"))
    model = Transformer(cfg, loaded.weights)
    logits = model(TOKENS[:5], 0, cache)
    assert torch.isfinite(logits).all()
    assert cache.k[0][:5].isfinite().all() and cache.k[0][:5].abs().sum(-1).gt(0).all()
    assert cache.k[0][5:].isnan().all() and cache.v[0][5:].isnan().all()
    # V rows are v_proj(input_layernorm(embedding)) for layer 0: no RoPE, no mixing.
    x = model.layers[0].input_layernorm(model.embed_tokens[TOKENS[:5]])
    torch.testing.assert_close(cache.v[0][:5].float(), x @ model.layers[0].attn.v_proj.T, atol=2e-3, rtol=1e-3)


def test_prefill_in_chunks_equals_one_pass(tiny_llama_gguf):
    loaded = load_model(tiny_llama_gguf("Q4_0").path)
    model = Transformer(loaded.config, loaded.weights)
    whole = stepwise_logits(model, loaded.config, TOKENS, len(TOKENS))
    cfg = loaded.config
    cache = KVCache.allocate(cfg.n_layer, 32, cfg.n_head_kv * cfg.head_dim, dtype=torch.float32)
    parts = torch.cat([model(TOKENS[:4], 0, cache), model(TOKENS[4:9], 4, cache), model(TOKENS[9:], 9, cache)])
    torch.testing.assert_close(parts, whole, atol=1e-5, rtol=1e-5)


def test_dglu_ffn_is_relu_gate_times_relu_up(tiny_gguf):
    tiny = tiny_gguf(arch="bamboo")
    loaded = load_model(tiny.path)
    assert (loaded.config.ffn_kind, loaded.config.activation) == ("dglu", "relu")
    lw = loaded.weights.layers[1]
    ffn = make_ffn("dense", lw, loaded.config)
    x = torch.randn(3, loaded.config.d_model, generator=torch.Generator().manual_seed(0))
    g, u, d = (torch.from_numpy(np.asarray(t.data, dtype=np.float32)) for t in (lw.gate_proj, lw.up_proj, lw.down_proj))
    expected = (torch.relu(x @ g.T) * torch.relu(x @ u.T)) @ d.T
    torch.testing.assert_close(ffn(x), expected, atol=1e-5, rtol=1e-5)


def test_ffn_is_injected_by_name_or_factory(tiny_llama_gguf):
    loaded = load_model(tiny_llama_gguf("Q8_0").path)
    calls = []

    @register_ffn("counting-test")
    class Counting(DenseFFN):
        def forward(self, x):
            calls.append(x.shape)
            return super().forward(x)

    dense = stepwise_logits(Transformer(loaded.config, loaded.weights), loaded.config, TOKENS, 4)
    named = stepwise_logits(Transformer(loaded.config, loaded.weights, ffn=ffn_factory("counting-test")), loaded.config, TOKENS, 4)
    assert torch.equal(named, dense) and len(calls) == loaded.config.n_layer * (1 + len(TOKENS) - 4)

    class Zero(nn.Module):
        def forward(self, x):
            return torch.zeros_like(x)

    model = Transformer(loaded.config, loaded.weights, ffn=lambda lw, cfg, **kw: Zero())
    assert not torch.allclose(stepwise_logits(model, loaded.config, TOKENS, 4), dense)
    with pytest.raises(ValueError, match="unknown FFN backend 'nope'.*dense"):
        ffn_factory("nope")


@pytest.mark.slow  # ~3 s: the bundled 135M model in torch
def test_bundled_smollm2_predicts_paris(bundled_model):
    cfg = bundled_model.config
    vocab = bundled_model.metadata["tokenizer.ggml.tokens"]
    index = {t: i for i, t in enumerate(vocab)}
    # "The capital of France is" in SmolLM2's byte-level BPE (Ġ marks a leading space).
    ids = torch.tensor([index[t] for t in ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]])
    model = Transformer(cfg, bundled_model.weights)
    cache = KVCache.allocate(cfg.n_layer, 16, cfg.n_head_kv * cfg.head_dim)
    with torch.inference_mode():
        logits = model(ids, 0, cache)
        first = int(logits[-1].argmax())
        second = int(model(torch.tensor([first]), len(ids), cache)[-1].argmax())
    assert vocab[first] == "ĠParis"
    assert vocab[second] in (".", ",")
    assert torch.isfinite(logits).all()
