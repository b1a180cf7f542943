"""benchmarks/make_synthetic.py: the written file loads, tokenizes with the copied vocabulary, runs in the
engine, and its ReLU FFNs are as sparse as asked, measured independently with the torch reference model."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import powerinfer
from powerinfer.formats.tokenizer import Tokenizer
from powerinfer.model.llama import Transformer
from powerinfer.sparse.ffn import make_ffn
from powerinfer.textdata import pydoc_topics

TINY = ["--shape", "custom", "--d-model", "128", "--n-ff", "512", "--n-layer", "3", "--n-head", "4",
        "--n-head-kv", "2", "--vocab", "1024"]


class GateRecorder(torch.nn.Module):
    """Dense FFN that also records which relu(gate) outputs are exactly zero."""

    def __init__(self, lw, cfg, dtype=torch.float32, layer=0, log=None):
        super().__init__()
        self.inner = make_ffn("dense", lw, cfg, dtype=dtype)
        self.log = log

    def forward(self, x):
        self.log.append((F.relu(F.linear(x, self.inner.gate_proj)) == 0).float().mean(-1))
        return self.inner(x)


def test_sparse_relu_model(make_synthetic, tmp_path, capsys):
    out = tmp_path / "syn.gguf"
    assert make_synthetic([*TINY, "--type", "Q4_0", "--sparsity", "0.8", "--verify-tokens", "16", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "measured on 16 held-out tokens" in printed and "(target 0.8)" in printed

    llm = powerinfer.load(str(out), n_ctx=128, n_threads=1)
    cfg = llm.config
    assert (cfg.activation, cfg.n_layer, cfg.d_model, cfg.n_ff, cfg.n_vocab) == ("relu", 3, 128, 512, 1024)
    text = "The quick brown fox jumps over the lazy dog."
    ids = llm.tokenizer.encode(text, add_bos=False)
    assert max(ids) < 1024 and llm.tokenizer.decode(ids) == text

    # Held-out tokens (not the script's calibration or verification tokens): per-token sparsity per layer.
    ids = llm.tokenizer.encode(pydoc_topics("eval")[5000:8000], add_bos=False)[:96]
    log = []
    model = Transformer(cfg, llm.loaded.weights, ffn=lambda lw, c, **kw: GateRecorder(lw, c, log=log, **kw))
    from powerinfer.model.kvcache import KVCache

    with torch.inference_mode():
        model(torch.tensor(ids), 0, KVCache.allocate(cfg.n_layer, len(ids), cfg.n_head_kv * cfg.head_dim))
    per_layer = torch.stack(log)  # [layer, token]
    assert per_layer.mean().item() == pytest.approx(0.8, abs=0.03)
    assert per_layer.mean(1).min().item() > 0.75 and per_layer.mean(1).max().item() < 0.85
    assert per_layer.min().item() > 0.65  # no token has a dense FFN

    logits = llm.runner.eval(ids[:16])  # the compiled decoder runs it
    assert np.isfinite(logits).all()


@pytest.mark.slow  # ~6 s: builds and runs a synthetic model from the bundled one
def test_dense_silu_model_with_padded_vocabulary(make_synthetic, tmp_path, capsys, bundled_model):
    out = tmp_path / "silu.gguf"
    argv = ["--shape", "custom", "--vocab", "49200", "--type", "F16", "--activation", "silu",
            "--verify-tokens", "0", "-o", str(out)]
    assert make_synthetic(argv) == 0
    llm = powerinfer.load(str(out), n_ctx=32, n_threads=1)
    assert (llm.config.activation, llm.config.n_vocab) == ("silu", 49200)
    ids = llm.tokenizer.encode("Hello world", add_bos=False)
    assert ids == Tokenizer.from_gguf_metadata(bundled_model.metadata).encode("Hello world", add_bos=False)
    assert np.isfinite(llm.runner.eval(ids)).all()


def test_sparsity_needs_relu(make_synthetic, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        make_synthetic(["--shape", "custom", "--activation", "silu", "--sparsity", "0.5", "-o", str(tmp_path / "x")])
    assert e.value.code == 2
    assert "--sparsity needs --activation relu" in capsys.readouterr().err
