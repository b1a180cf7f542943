"""The runner's neuron-sparse FFN end to end: exactness on ReLU models, agreement with the torch `threshold`
backend on SwiGLU models, statistics, and the CLI's --sparsity / --verbose on the bundled model."""
from __future__ import annotations

import json

import pytest
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from powerinfer.cli import main
from powerinfer.formats.loader import load_model
from powerinfer.kernels.sparse_ffn import Kept
from powerinfer.runtime import engine
from powerinfer.core.sparse_spec import SparseSpec
from powerinfer.runtime.runner import make_runner
from powerinfer.settings import SamplingParams
from powerinfer.sparse.artifacts import Thresholds, default_thresholds_path, model_fingerprint


def _greedy(runner, prompt, n):
    runner.truncate(0)
    logits = runner.eval(prompt)
    toks, all_logits = [], []
    for _ in range(n):
        tok = int(logits.argmax())
        toks.append(tok)
        logits = runner.eval([tok])
        all_logits.append(torch.tensor(logits))
    return toks, torch.stack(all_logits)


@pytest.mark.parametrize("ffn_kind", ["glu", "dglu"])
def test_relu_sparse_equals_dense(tiny_gguf, ffn_kind):
    """ReLU-family model, F32 weights: skipping the zero activations changes nothing but summation order
    (logits within 1e-4 relative; greedy tokens identical over 64 steps), and neurons really are skipped."""
    tiny = tiny_gguf(activation="relu", ffn_kind=ffn_kind if ffn_kind != "glu" else None, qtype=Q.F32,
                     n_layer=3, n_ff=256, context_length=128)
    loaded = load_model(tiny.path)
    dense, sparse = make_runner(loaded, 96, 2), make_runner(loaded, 96, 2)
    sparse.set_sparse(SparseSpec.uniform(loaded.config.n_layer, label="relu"))
    prompt = [1, 5, 9, 33]
    toks_d, logits_d = _greedy(dense, prompt, 64)
    toks_s, logits_s = _greedy(sparse, prompt, 64)
    assert toks_s == toks_d
    rel = ((logits_s - logits_d).abs().max(-1).values / logits_d.abs().max(-1).values).max().item()
    assert rel <= 1e-4, rel
    assert 0.2 < sparse.ffn_sparsity() < 0.9  # random ReLU layers skip about half their neurons
    assert dense.ffn_sparsity() == 0.0 and dense.ffn_stats() is None


def test_threshold_sparse_matches_torch_backend(tiny_gguf):
    """SwiGLU, F32: the C decoder's thresholded FFN against the torch `threshold` backend at the same
    thresholds, token by token (all_logits runs decode steps when sparse)."""
    tiny = tiny_gguf(qtype=Q.F32, n_layer=2, n_ff=256, context_length=128)
    loaded = load_model(tiny.path)
    th = SparseSpec.from_sites({"h": [0.02, 0.03]}, method="hu")
    c, t = make_runner(loaded, 64, 2), make_runner(loaded, 64, 1, compute="torch")
    for r in (c, t):
        r.set_sparse(th)
    ids = [1, 7, 3, 22, 9, 41, 5, 17, 2, 60]
    lc, lt = torch.from_numpy(c.eval(ids, all_logits=True)), torch.from_numpy(t.eval(ids, all_logits=True))
    assert np.array_equal(np.asarray(lc).argmax(-1), np.asarray(lt).argmax(-1))
    assert ((lc - lt).abs().max() / lt.abs().max()).item() < 1e-3
    assert 0.05 < c.ffn_sparsity() < 0.95
    stats = c.ffn_stats()
    assert stats["steps"] == len(ids) and len(stats["sparsity_per_layer"]) == 2
    assert stats["ffn_bytes_per_token"] < stats["ffn_dense_bytes"] * 1.5  # down_t rows only for kept neurons


def test_stream_reports_per_token_sparsity(tiny_gguf):
    tiny = tiny_gguf(activation="relu", qtype=Q.F32)
    loaded = load_model(tiny.path)
    r = make_runner(loaded, 64, 1)
    r.set_sparse(SparseSpec.uniform(loaded.config.n_layer))
    ids = [1, 2, 3]
    steps = engine.generate_step(r, ids, SamplingParams(temp=0))
    next(steps)  # first token: from the dense prefill
    assert r.last_ffn() is None
    next(steps)  # second: a sparse decode step
    s, nbytes = r.last_ffn()
    assert 0 < s < 1 and nbytes > 0
    steps.close()


def test_cli_sparsity_uses_cached_thresholds(capsys, monkeypatch, tmp_path, bundled_model):
    """--sparsity S with thresholds already cached (no calibration): the run says which artifact it used and
    --verbose prints per-layer sparsity."""
    monkeypatch.setenv("HOME", str(tmp_path))
    fp = model_fingerprint(bundled_model)
    n = bundled_model.config.n_layer
    th = Thresholds(method="hu", target_sparsity=0.5, values={"h": [0.05] * n}, fingerprint=fp,
                    calibration={"text": "test", "text_sha256": "0", "n_tokens": 0, "n_ctx": 0})
    path = th.save(default_thresholds_path(fp, "hu", 0.5))
    assert str(path).startswith(str(tmp_path))
    code = main(["run", "-p", "The capital of France is", "-n", "12", "--temp", "0", "--sparsity", "0.5",
                 "--verbose", "-t", "2"])
    out = capsys.readouterr()
    assert code == 0
    assert "threshold hu S=0.5" in out.err and str(path) in out.err
    assert "ffn sparsity" in out.err
    assert len([ln for ln in out.err.splitlines() if ln.strip()[:2].strip().isdigit()]) >= n
    assert out.out.startswith("The capital of France is")


def test_cli_bad_sparsity_value(capsys):
    code = main(["run", "-p", "x", "--sparsity", "lots"])
    err = capsys.readouterr().err
    assert code == 1 and "--sparsity" in err and "Traceback" not in err


def test_thresholds_for_another_model_are_refused(tmp_path, bundled_model):
    from powerinfer.errors import PowerInferError
    from powerinfer.sparse.artifacts import load_thresholds

    th = Thresholds(method="hu", target_sparsity=0.5, values={"h": [0.1] * 30}, fingerprint="0" * 16,
                    calibration={})
    p = th.save(tmp_path / "t.json")
    with pytest.raises(PowerInferError, match="calibrated for model"):
        load_thresholds(p, model_fingerprint(bundled_model))
    assert json.loads(p.read_text())["fingerprint"] == "0" * 16


def test_resolve_sparsity_choices(tiny_gguf, bundled_model):
    from powerinfer.errors import PowerInferError
    from powerinfer.runtime.sparsity import resolve_sparsity

    relu = load_model(tiny_gguf(activation="relu", qtype=Q.F32).path)
    th, desc = resolve_sparsity(relu, "auto")
    assert th == SparseSpec.uniform(relu.config.n_layer, method="relu") and "exact" in desc
    assert resolve_sparsity(relu, "off")[0] is None
    th, desc = resolve_sparsity(bundled_model, "auto")  # SwiGLU: measured slower than dense, so dense
    assert th is None and "dense" in desc
    with pytest.raises(PowerInferError, match="--sparse-method"):
        resolve_sparsity(bundled_model, "0.5", method="magic")
    with pytest.raises(PowerInferError, match=r"\[0, 1\)"):
        resolve_sparsity(bundled_model, "1.5")


def test_c_predictor_path(tiny_gguf):
    """The decoder's predictor path on a ReLU model. A perfect predictor (fixtures.tiny.perfect_predictor: its
    logits have the sign of the gate) reproduces dense while reading only the gate/up rows of the neurons it
    predicts; a predictor that predicts nothing skips every neuron and the result moves."""
    from fixtures.tiny import perfect_predictor
    from powerinfer.sparse.predictor import PredictorSet

    tiny = tiny_gguf(activation="relu", qtype=Q.F32, n_layer=3, n_ff=256, context_length=128)
    loaded = load_model(tiny.path)
    cfg = loaded.config
    pairs = [perfect_predictor(lw.gate_proj.dequantize().numpy(), lw.post_attention_layernorm.dequantize().numpy())
             for lw in loaded.weights.layers]
    fc1, fc2 = [torch.from_numpy(a) for a, _ in pairs], [torch.from_numpy(b) for _, b in pairs]
    dense, pred = make_runner(loaded, 64, 2), make_runner(loaded, 64, 2)
    pred.set_sparse(SparseSpec.uniform(cfg.n_layer, predictors=PredictorSet(fc1, fc2, 0.0)))
    ids = [1, 5, 9, 33, 7, 2, 11]
    a, b = torch.from_numpy(dense.eval(ids, all_logits=True)), torch.from_numpy(pred.eval(ids, all_logits=True))
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-4
    assert 0.2 < pred.ffn_sparsity() < 0.9
    read = Kept(*pred._ffn_kept).up_rows.sum() / (len(ids) * cfg.n_layer * cfg.n_ff)
    assert 0.1 < read < 0.8  # gate/up rows read only for the predicted neurons
    pred.set_sparse(SparseSpec.uniform(cfg.n_layer, predictors=PredictorSet(fc1, fc2, 1e9)))
    c = torch.from_numpy(pred.eval(ids, all_logits=True))
    assert pred.ffn_sparsity() == 1.0
    assert ((a - c).abs().max() / a.abs().max()).item() > 1e-2


def test_powerinfer_gguf_with_predictors_runs_sparse(tiny_gguf):
    """A PowerInfer-layout file (PWRI magic, ffn_down_t, f16 fc1/fc2, sparse_threshold): --sparsity auto uses the
    file's predictors and its own neuron-major down_t, and matches the dense run of the same file."""
    from powerinfer.runtime.sparsity import apply_sparsity

    tiny = tiny_gguf(activation="relu", qtype=Q.F16, n_layer=2, n_ff=128, pwri=True, ffn_down_t=True,
                     predictors=True)
    loaded = load_model(tiny.path)
    dense, sparse = make_runner(loaded, 64, 2), make_runner(loaded, 64, 2)
    desc = apply_sparsity(sparse, loaded, "auto")
    assert "predictors" in desc
    lw = loaded.weights.layers[0]
    assert lw.down_t is not None and sparse._sparse._copy(0, "down") is lw.down_t
    ids = [1, 4, 8, 15, 16, 23, 42]
    a = torch.from_numpy(dense.eval(ids, all_logits=True))
    b = torch.from_numpy(sparse.eval(ids, all_logits=True))
    assert np.array_equal(np.asarray(a).argmax(-1), np.asarray(b).argmax(-1))
    # dense reads down_proj (the f16 transpose, exact) with f16-rounded h; sparse reads down_t with f32 h
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-2
    assert sparse.ffn_sparsity() > 0.2


@pytest.mark.parametrize("kw", [dict(activation="relu", qtype=Q.F32), dict(activation="relu", ffn_kind="dglu",
                                                                             qtype=Q.Q8_0), dict(qtype=Q.Q4_0)])
def test_small_prompts_run_sparse_over_the_union(tiny_gguf, kw):
    """A prompt of <= 8 tokens goes through the sparse FFN over the union of its tokens' active neurons and gives
    what the same tokens give as single sparse decode steps; a longer one is prefilled dense."""
    tiny = tiny_gguf(n_layer=2, n_ff=256, context_length=64, **kw)
    loaded = load_model(tiny.path)
    th = SparseSpec.uniform(loaded.config.n_layer, h=0.0 if kw.get("activation") == "relu" else 0.05)
    for n_threads in (1, 2):
        for ids in ([1, 5, 9, 33, 7, 2], list(range(3, 15))):
            batch, steps, dense = (make_runner(loaded, 64, n_threads) for _ in range(3))
            batch.set_sparse(th)
            steps.set_sparse(th)
            lb = torch.tensor(batch.eval(ids))
            for t in ids:
                ls = torch.tensor(steps.eval([t]))
            ld = torch.tensor(dense.eval(ids))
            rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()  # noqa: E731
            if len(ids) <= 8:
                assert rel(lb, ls) < 1e-5
            else:
                assert rel(lb, ld) < 1e-6  # dense prefill
            if kw.get("activation") != "relu":
                assert rel(ls, ld) > 1e-4  # the thresholds do change the result
