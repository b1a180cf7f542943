"""Qwen3 (GGUF `qwen3`, HF Qwen3ForCausalLM): a llama with neox RoPE and an RMSNorm over every query and key head
before RoPE (`attn_q_norm` / `attn_k_norm`, [head_dim] each). Tiny random models written as GGUF and as an HF
directory, compared with transformers on the same weights: the torch reference model, the C decoder (prefill and
decode), and greedy text of the C decoder against the torch reference."""
import numpy as np
import pytest
import torch

from fixtures.tiny import hf_logits, stepwise_logits
from powerinfer.formats.loader import load_model
from powerinfer.model.llama import Transformer
from powerinfer.runtime.runner import make_runner

N_POS = 72  # positions compared (prefill 8, then one token at a time)
TOKENS = torch.from_numpy(np.random.default_rng(3).integers(0, 96, N_POS))


@pytest.fixture(scope="module")
def qwen3(tiny_gguf):
    from gguf import GGMLQuantizationType as Q

    return {q: tiny_gguf(arch="qwen3", qtype=getattr(Q, q), context_length=128) for q in ("F32", "Q8_0")}


def _c_logits(loaded, tokens: torch.Tensor, n_prefill: int = 8) -> torch.Tensor:
    runner = make_runner(loaded, n_ctx=128, n_threads=2, compute="c")
    ids = tokens.tolist()
    out = [torch.tensor(runner.eval(ids[:n_prefill], all_logits=True))]
    out += [torch.tensor(runner.eval([t]))[None] for t in ids[n_prefill:]]
    return torch.cat(out)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_config_and_weights(qwen3):
    loaded = load_model(qwen3["F32"].path)
    c = loaded.config
    assert (c.arch, c.rope_style, c.qk_norm, c.attn_bias) == ("qwen3", "neox", True, False)
    lw = loaded.weights.layers[1]
    assert tuple(lw.q_norm.shape) == tuple(lw.k_norm.shape) == (c.head_dim,)


def test_torch_reference_matches_transformers(qwen3):
    tiny = qwen3["F32"]
    loaded = load_model(tiny.path)
    ours = stepwise_logits(Transformer(loaded.config, loaded.weights), loaded.config, TOKENS, 8, n_ctx=128)
    torch.testing.assert_close(ours, hf_logits(tiny, TOKENS), atol=2e-5, rtol=2e-5)


# the C decoder rounds activations to Q8 blocks for Q8_0 weights (llama.cpp's vec_dot_q8_0_q8_0), the reference
# reads the same weights dequantized in f32
@pytest.mark.parametrize("qtype,tol", [("F32", 1e-3), ("Q8_0", 3e-2)])
def test_c_decoder_matches_transformers(qwen3, qtype, tol):
    """72 positions: max relative error 2.5e-4 (F32) / 1.2e-2 (Q8_0), top-1 72/72. The same files with the q/k
    norms left out of the C decoder: 0.18 / 0.18 and top-1 61/72 / 63/72."""
    tiny = qwen3[qtype]
    ours, ref = _c_logits(load_model(tiny.path), TOKENS), hf_logits(tiny, TOKENS)
    assert _rel(ours, ref) < tol
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_greedy_text_c_equals_torch(qwen3):
    loaded = load_model(qwen3["Q8_0"].path)
    texts = []
    for compute in ("c", "torch"):
        runner = make_runner(loaded, n_ctx=128, n_threads=2, compute=compute)
        ids, logits = [5, 17, 42], None
        logits = runner.eval(ids)
        for _ in range(32):
            ids.append(int(logits.argmax()))
            logits = runner.eval(ids[-1:])
        texts.append(ids)
    assert texts[0] == texts[1]


def test_hf_directory_matches_transformers(tiny_hf_dir):
    path, tiny = tiny_hf_dir(arch="qwen3")
    loaded = load_model(path)
    assert (loaded.config.arch, loaded.config.qk_norm) == ("qwen3", True)
    ours = _c_logits(loaded, TOKENS[:24])
    ref = hf_logits(tiny, TOKENS[:24])
    assert _rel(ours, ref) < 2e-3 and (ours.argmax(-1) == ref.argmax(-1)).all()
