"""The `relu` FFN backend against dense on tiny ReLU-family llamas: same logits (up to summation order), same
greedy tokens through the runner, and per-token statistics (active neurons, weight bytes touched)."""
import pytest
import torch

from fixtures.tiny import stepwise_logits
from powerinfer.core.sparse_spec import SparseSpec
from powerinfer.sparse.ffn import ffn_factory
from powerinfer.formats.loader import load_model
from powerinfer.model.llama import Transformer
from powerinfer.sparse.ffn import make_ffn
from powerinfer.core.tensor import row_bytes
from powerinfer.sparse.stats import ffn_stats, summarize_stats

TOKENS = torch.tensor([3, 17, 42, 5, 88, 61, 0, 95, 23, 23, 7, 50])


@pytest.mark.parametrize("ffn_kind", [None, "dglu", "mlp"])  # ReGLU, dReLU, plain ReLU MLP
def test_relu_logits_equal_dense(tiny_llama_gguf, ffn_kind):
    loaded = load_model(tiny_llama_gguf("F32", activation="relu", ffn_kind=ffn_kind).path)
    cfg, w = loaded.config, loaded.weights
    sparse = Transformer(cfg, w, ffn=ffn_factory("relu"))
    want = stepwise_logits(Transformer(cfg, w), cfg, TOKENS, n_prefill=6)
    got = stepwise_logits(sparse, cfg, TOKENS, n_prefill=6)
    assert ((got - want).abs().max() / want.abs().max()) < 1e-4
    # Random ReLU FFNs fire about half their neurons: the backend really skipped rows.
    s = summarize_stats(ffn_stats(sparse))
    assert s["tokens"] == len(TOKENS) and 0.2 < s["sparsity_h"]["mean"] < 0.9
    assert s["bytes_fraction"] < 1


def test_greedy_tokens_equal_dense_through_the_runner(tiny_llama_gguf):
    from powerinfer.runtime.runner import make_runner

    loaded = load_model(tiny_llama_gguf("F32", activation="relu").path)
    runners = []
    for spec in (None, SparseSpec.uniform(loaded.config.n_layer, method="relu")):
        r = make_runner(loaded, n_ctx=96, n_threads=1, compute="torch")
        r.set_sparse(spec)
        assert type(r.model.layers[0].ffn).__name__ == ("DenseFFN" if spec is None else "ReluFFN")
        runners.append(r)
    streams = []
    for r in runners:
        logits = r.eval([3, 17, 42, 5])
        out = []
        for _ in range(64):
            out.append(int(logits.argmax()))
            logits = r.eval([out[-1]])
        streams.append(out)
    assert streams[0] == streams[1]
    assert len(set(streams[0])) > 3  # not a degenerate repetition


def test_per_token_active_counts_and_bytes(tiny_llama_gguf):
    """Q4_1 weights: bytes = the dense gate + one up row and one down_t row per active neuron, per token."""
    loaded = load_model(tiny_llama_gguf("Q4_1", activation="relu").path)
    lw, cfg = loaded.weights.layers[1], loaded.config
    ffn, ref = make_ffn("relu", lw, cfg, layer=1), make_ffn("dense", lw, cfg)
    x = torch.randn(5, cfg.d_model)
    with torch.inference_mode():
        torch.testing.assert_close(ffn(x), ref(x), atol=1e-5, rtol=1e-5)
        active = (x @ lw.gate_proj.dequantize().T > 0).sum(1)
    assert torch.equal(ffn.stats.last_kept["h"], active)
    per_neuron = lw.up_proj.row_bytes + row_bytes(lw.down_proj.qtype, cfg.d_model)
    assert per_neuron == 2 * (cfg.d_model // 32 * 20)  # Q4_1: 20 bytes per block of 32
    assert ffn.stats.last_bytes.tolist() == [lw.gate_proj.nbytes + int(k) * per_neuron for k in active]
    assert ffn.stats.tokens == 5
    assert ffn.stats.sparsity("h") == pytest.approx(1 - active.sum().item() / (5 * cfg.n_ff))


def test_relu_backend_refuses_swiglu(tiny_llama_gguf):
    loaded = load_model(tiny_llama_gguf("F32").path)
    with pytest.raises(ValueError, match="threshold"):
        make_ffn("relu", loaded.weights.layers[0], loaded.config)
