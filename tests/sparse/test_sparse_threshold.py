"""The `threshold` FFN backend: zero thresholds reproduce dense bit for bit; with thresholds it computes exactly
the dense FFN of the zeroed activations (|h| site and |x| site), and it counts what a sparse kernel reads."""
import pytest
import torch
import torch.nn.functional as F

from fixtures.tiny import stepwise_logits
from powerinfer.sparse.ffn import ffn_factory
from powerinfer.formats.loader import load_model
from powerinfer.model.llama import Transformer
from powerinfer.sparse.artifacts import Thresholds
from powerinfer.sparse.ffn import make_ffn
from powerinfer.core.tensor import row_bytes

TOKENS = torch.tensor([3, 17, 42, 5, 88, 61, 0, 95, 23, 23, 7, 50])


@pytest.mark.parametrize("qtype", ["F32", "Q4_1"])
@pytest.mark.parametrize("thresholds", [None, {"h": [0.0, 0.0]}, {"x": [0.0, 0.0], "h": [0.0, 0.0]}])
def test_zero_thresholds_equal_dense_exactly(tiny_llama_gguf, qtype, thresholds):
    loaded = load_model(tiny_llama_gguf(qtype).path)
    cfg, w = loaded.config, loaded.weights
    want = stepwise_logits(Transformer(cfg, w), cfg, TOKENS, n_prefill=6)
    got = stepwise_logits(Transformer(cfg, w, ffn=ffn_factory("threshold", thresholds=thresholds)),
                          cfg, TOKENS, n_prefill=6)
    assert torch.equal(got, want)


@pytest.fixture(scope="module")
def layer(tiny_llama_gguf):
    loaded = load_model(tiny_llama_gguf("Q4_1").path)
    lw = loaded.weights.layers[0]
    w = {k: getattr(lw, k).dequantize() for k in ("gate_proj", "up_proj", "down_proj")}
    return loaded.config, lw, w


def _h(w, x):
    return F.silu(x @ w["gate_proj"].T) * (x @ w["up_proj"].T)


def test_neuron_site_zeroes_small_h(layer):
    cfg, lw, w = layer
    x = torch.randn(7, cfg.d_model)
    h = _h(w, x)
    t = float(h.abs().median())
    ffn = make_ffn("threshold", lw, cfg, thresholds={"h": [t]})
    with torch.inference_mode():
        got = ffn(x)
    keep = h.abs() >= t
    torch.testing.assert_close(got, (h * keep) @ w["down_proj"].T, atol=1e-5, rtol=1e-5)
    assert torch.equal(ffn.stats.last_kept["h"], keep.sum(1))
    assert ffn.stats.last_kept["x"].tolist() == [cfg.d_model] * 7
    # gate and up are read densely, down only over the kept neurons (one d_model row of down_t each)
    down_row = row_bytes(lw.down_proj.qtype, cfg.d_model)
    dense_in = lw.gate_proj.nbytes + lw.up_proj.nbytes
    assert ffn.stats.last_bytes.tolist() == [dense_in + int(k) * down_row for k in keep.sum(1)]
    assert ffn.stats.sparsity("h") == pytest.approx(1 - keep.float().mean().item())


def test_input_site_is_dense_ffn_of_the_zeroed_input(layer):
    cfg, lw, w = layer
    x = torch.randn(7, cfg.d_model)
    t = float(x.abs().quantile(0.6))
    ffn = make_ffn("threshold", lw, cfg, thresholds={"x": [t]})
    with torch.inference_mode():
        got = ffn(x)
    keep = x.abs() >= t
    xs = x * keep
    torch.testing.assert_close(got, _h(w, xs) @ w["down_proj"].T, atol=1e-5, rtol=1e-5)
    assert torch.equal(ffn.stats.last_kept["x"], keep.sum(1))
    # each kept input channel reads one n_ff-long column of gate and of up; down is dense
    col = row_bytes(lw.gate_proj.qtype, cfg.n_ff) + row_bytes(lw.up_proj.qtype, cfg.n_ff)
    assert ffn.stats.last_bytes.tolist() == [int(k) * col + lw.down_proj.nbytes for k in keep.sum(1)]
    assert ffn.stats.dense_bytes == lw.gate_proj.nbytes + lw.up_proj.nbytes + lw.down_proj.nbytes


def test_both_sites(layer):
    cfg, lw, w = layer
    x = torch.randn(4, cfg.d_model)
    tx = float(x.abs().quantile(0.3))
    xs = x * (x.abs() >= tx)
    h = _h(w, xs)
    th = float(h.abs().quantile(0.5))
    ffn = make_ffn("threshold", lw, cfg, thresholds={"x": [tx], "h": [th]})
    with torch.inference_mode():
        got = ffn(x)
    torch.testing.assert_close(got, (h * (h.abs() >= th)) @ w["down_proj"].T, atol=1e-5, rtol=1e-5)


def test_thresholds_artifact_per_layer_and_layer_count(tiny_llama_gguf):
    loaded = load_model(tiny_llama_gguf("F32").path)
    th = Thresholds("hu", 0.5, {"h": [0.1, 0.2]}, "f" * 16, {})
    m = Transformer(loaded.config, loaded.weights, ffn=ffn_factory("threshold", thresholds=th))
    assert [b.ffn.thresholds["h"] for b in m.layers] == [0.1, 0.2]
    short = Thresholds("hu", 0.5, {"h": [0.1]}, "f" * 16, {})
    with pytest.raises(Exception, match="cover 1 layers"):
        Transformer(loaded.config, loaded.weights, ffn=ffn_factory("threshold", thresholds=short))
