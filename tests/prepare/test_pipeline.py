"""profile -> train-predictors -> run with predictors, on a tiny ReLU model whose firing is learnable.

The fixture (fixtures.tiny, gate_rank=4, gate_bias=0.9): every gate row is a combination of 4 directions of the
input plus a negative bias from a constant residual channel, so a neuron's firing is a function of 4 numbers
and most neurons are silent (~96 % in layer 0, ~87 % in layer 1). A rank-16 predictor can learn it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from powerinfer.errors import PowerInferError
from powerinfer.formats.loader import load_model
from powerinfer.prepare.profile import load_profile, run_profile
from powerinfer.prepare.train import train_predictors
from powerinfer.core.sparse_spec import SparseSpec
from powerinfer.runtime.runner import make_runner
from powerinfer.sparse.predictor import PredictorSet


@pytest.fixture(scope="module")
def pipeline(tiny_gguf, tmp_path_factory):
    tiny = tiny_gguf(activation="relu", qtype=Q.F32, n_layer=2, n_ff=256, gate_rank=4, gate_bias=0.9,
                     context_length=256)
    loaded = load_model(tiny.path)
    root = tmp_path_factory.mktemp("pipeline")
    ids = [int(t) for t in np.random.default_rng(0).integers(0, 96, 8192)]
    prof = run_profile(loaded, ids, {"text": "random ids, seed 0"}, root / "profile", 8192, 128, None, None,
                       progress=False)
    ps = train_predictors(loaded, prof, root / "predictors.safetensors", recall=0.95, progress=False)
    return loaded, prof, ps, root


def test_profile_outputs(pipeline):
    loaded, prof, ps, root = pipeline
    cfg = loaded.config
    assert prof.counts.shape == (cfg.n_layer, cfg.n_ff) and prof.n_tokens == 8192
    assert prof.meta["sparsity_per_layer"][0] > 0.9
    for i in range(cfg.n_layer):  # upstream's layout, loadable without unpickling code
        t = torch.load(root / "profile" / "activation" / f"activation_{i}.pt", weights_only=True)
        assert torch.equal(t, torch.from_numpy(prof.counts[i]))
    x, fired = prof.samples(1)
    assert x.shape == (8192, cfg.d_model) and fired.shape == (8192, cfg.n_ff)
    assert fired.sum(0).tolist() == prof.counts[1].tolist()  # the samples are the counted firings
    for png in ("power_law.png", "sparsity.png"):
        assert (root / "profile" / png).read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(PowerInferError, match="profiled model"):
        load_profile(root / "profile", "0" * 16)


def test_predictors_reach_recall_at_high_sparsity(pipeline):
    loaded, prof, ps, root = pipeline
    for r in ps.meta["report"]:
        assert r["recall"] >= 0.95 and r["predicted_sparsity"] >= 0.8, r
    again = PredictorSet.load(root / "predictors.safetensors", prof.meta["fingerprint"])
    assert again.thresholds == ps.thresholds and torch.equal(again.fc2[1], ps.fc2[1])


def test_resume_reuses_finished_layers(pipeline):
    loaded, prof, ps, root = pipeline
    parts = root / "predictors.parts"
    stamp = {p.name: p.stat().st_mtime_ns for p in parts.iterdir()}
    ps2 = train_predictors(loaded, prof, root / "predictors.safetensors", recall=0.95, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in parts.iterdir()} == stamp
    assert torch.equal(ps2.fc1[0], ps.fc1[0])


def test_predictors_vs_dense_on_fresh_tokens(pipeline):
    """Fresh tokens (not profiled): recall from the torch backend's miss counter, and top-1 agreement and
    perplexity of the C decoder with predictors against dense."""
    loaded, prof, ps, root = pipeline
    cfg = loaded.config
    ids = [int(t) for t in np.random.default_rng(1).integers(0, 96, 200)]
    t = make_runner(loaded, 256, 1, compute="torch")
    t.set_sparse(SparseSpec.uniform(cfg.n_layer, predictors=ps, label="predictor"))
    t.eval(ids, all_logits=True)
    misses = sum(b.ffn.misses for b in t.model.layers)
    active = sum(b.ffn.active for b in t.model.layers)
    recall = 1 - misses / active
    assert recall >= 0.9, recall
    dense, pred = make_runner(loaded, 256, 2), make_runner(loaded, 256, 2)
    pred.set_sparse(SparseSpec.uniform(cfg.n_layer, predictors=ps, label="predictor"))
    a, b = dense.eval(ids, all_logits=True), pred.eval(ids, all_logits=True)
    agree = (a.argmax(-1) == b.argmax(-1)).mean()
    tgt = torch.tensor(ids[1:])
    ppl = [torch.exp(torch.nn.functional.cross_entropy(torch.from_numpy(x[:-1]), tgt)).item() for x in (a, b)]
    print(f"fresh-token recall {recall:.3f}, top-1 agreement {agree:.3f}, ppl dense {ppl[0]:.3f} "
          f"predictors {ppl[1]:.3f}, FFN sparsity {pred.ffn_sparsity():.3f}")
    assert agree >= 0.9 and ppl[1] <= ppl[0] * 1.05
    assert pred.ffn_sparsity() > 0.85


def test_solve_convert_run_chain(pipeline, tmp_path):
    """The rest of the chain on the same model: placement from the profile, a PowerInfer GGUF with the trained
    predictors, and that file run with its own predictors against the original dense model."""
    from powerinfer.formats.powerinfer_gguf import write_powerinfer_gguf
    from powerinfer.runtime.sparsity import apply_sparsity
    from powerinfer.prepare.solve import model_parts, read_gpuidx, solve_placement, write_gpuidx
    from powerinfer.sparse.predictor import predictors_from_gguf

    loaded, prof, ps, root = pipeline
    cfg = loaded.config
    parts, per_neuron = model_parts(loaded, 256, ps.n_params() * 2)
    budget = sum(b for _, b in parts) + 100 * per_neuron[0]
    ours, up = solve_placement(list(prof.counts), prof.n_tokens, per_neuron, parts, budget)
    assert ours.used <= budget and sum(map(len, ours.hot)) == 100
    chosen = np.concatenate([prof.counts[l][h] for l, h in enumerate(ours.hot)])
    rest = np.concatenate([np.delete(prof.counts[l], h) for l, h in enumerate(ours.hot)])
    assert chosen.min() >= rest.max()  # equal bytes per neuron: the 100 most frequent neurons of the model
    hot, _ = read_gpuidx(write_gpuidx(tmp_path / "m.gpuidx", ours.hot, cfg.n_ff, budget))
    assert [h.tolist() for h in hot] == [h.tolist() for h in ours.hot]

    out = write_powerinfer_gguf(loaded.path, tmp_path / "m.powerinfer.gguf", ps, progress=False)
    conv = load_model(out)
    got = predictors_from_gguf(conv)
    assert got.thresholds == pytest.approx(ps.thresholds)
    ids = [int(t) for t in np.random.default_rng(2).integers(0, 96, 120)]
    dense = make_runner(loaded, 256, 2)
    sparse = make_runner(conv, 256, 2)
    assert "the file's predictors" in apply_sparsity(sparse, conv, "auto")
    a, b = dense.eval(ids, all_logits=True), sparse.eval(ids, all_logits=True)
    agree = (a.argmax(-1) == b.argmax(-1)).mean()
    assert agree >= 0.9 and sparse.ffn_sparsity() > 0.85, (agree, sparse.ffn_sparsity())


def test_prepare_cli_runs_the_steps_with_their_defaults(tiny_text_gguf, tmp_path, monkeypatch, capsys):
    """`powerinfer prepare` on a tiny SwiGLU model: thresholds, profile, predictors and placement under
    ~/.cache/powerinfer/<fingerprint>/, with train-predictors' recall and solve's measured CPU bandwidth."""
    from powerinfer.cli import main
    from powerinfer.formats.gpuidx import read_placement
    from powerinfer.sparse.artifacts import model_fingerprint

    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["prepare", "-m", str(tiny_text_gguf), "--tokens", "512", "--epochs", "1", "-t", "1",
                 "--vram-budget", "0.001"]) == 0
    out = capsys.readouterr().out
    assert "layer  sparsity" in out and "layer  rank  recall" in out and "fast tier:" in out
    fp = model_fingerprint(load_model(tiny_text_gguf))
    root = tmp_path / ".cache" / "powerinfer" / fp
    ps = PredictorSet.load(root / "predictors.safetensors", fp)
    assert ps.meta["recall_target"] == 0.95
    doc = read_placement(root / f"{tiny_text_gguf.name}.placement.json", fp)
    assert doc["bandwidths"]["slow"] == "measured"
    assert doc["inputs"]["n_ctx"] == 4096 and doc["parts"]["predictors"] == ps.n_params() * 2
