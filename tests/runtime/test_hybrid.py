"""Hybrid execution with the fast tier on the CPU (--hot-device cpu): the same torch + C code a GPU would run
(`pytest --hot-device cuda` runs these on a GPU, benchmarks/gpu_check.py). Any placement computes what the
all-CPU engines compute: the FFN split is exact (against the torch engine, whose attention the fast tier shares,
within 1e-4 in f32; the f16 fast tier of CUDA within f16's precision) and the tokens are the C engine's."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from powerinfer.core.sparse_spec import SparseSpec
from powerinfer.formats.gpuidx import gpuidx_path, read_gpuidx, write_gpuidx
from powerinfer.formats.loader import load_model
from powerinfer.prepare.solve import solve_hot_sets
from powerinfer.runtime.hybrid_runner import HybridRunner
from powerinfer.runtime.placement import GIB, dense_parts, neuron_bytes
from powerinfer.runtime.runner import make_runner
from powerinfer.settings import PlacementSettings

N_CTX = 64
IDS = [1, 5, 9, 33, 7, 2, 11, 40, 3]


@pytest.fixture(autouse=True)
def _device(hot_device):
    global DEVICE, VB, TOL
    DEVICE = hot_device
    VB, TOL = (4, 1e-4) if hot_device == "cpu" else (2, 2e-2)  # f32 fast tier on the CPU, f16 on CUDA


def _budget(loaded, fraction: float, n_ctx: int = N_CTX) -> float:
    """GiB that hold the dense parts and `fraction` of every layer's neurons in the fast tier's format."""
    dense = sum(dense_parts(loaded, n_ctx, VB).values())
    per = neuron_bytes(loaded, VB)
    return (dense + sum(int(fraction * loaded.config.n_ff) * b for b in per)) / GIB


def _hybrid(loaded, fraction, n_ctx=N_CTX, **kw):
    kw.setdefault("reset_gpu_index", True)
    s = PlacementSettings(vram_budget=_budget(loaded, fraction, n_ctx), hot_device=DEVICE, **kw)
    r = make_runner(loaded, n_ctx, 2, placement=s, solve=solve_hot_sets)
    assert isinstance(r, HybridRunner)
    return r


def _rel(a, b):
    a, b = torch.as_tensor(a), torch.as_tensor(b)  # runners' logits are numpy
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(params=[dict(activation="relu"), dict(activation="relu", ffn_kind="dglu")], ids=["relu", "drelu"])
def relu_model(request, tiny_gguf):
    return load_model(tiny_gguf(qtype=Q.F32, n_layer=3, n_ff=256, context_length=128, **request.param).path)


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_any_placement_equals_the_cpu_engines(relu_model, fraction):
    loaded = relu_model
    spec = SparseSpec.uniform(loaded.config.n_layer, method="relu")
    hyb = _hybrid(loaded, fraction)
    hot = sum(len(h) for h in hyb.plan.hot) / (loaded.config.n_layer * loaded.config.n_ff)
    assert abs(hot - fraction) < 0.13  # groups of 32 neurons
    ref, c = make_runner(loaded, N_CTX, 2, compute="torch", device=DEVICE), make_runner(loaded, N_CTX, 2)
    for r in (hyb, ref, c):
        r.set_sparse(spec)
    a, b, cc = (r.eval(IDS, all_logits=True) for r in (hyb, ref, c))
    assert _rel(a, b) < TOL, fraction
    # the C engine rounds q and attention probabilities to f16 as ggml does; torch's attention does not
    assert _rel(a, cc) < max(TOL, 1e-3) and np.array_equal(np.asarray(a).argmax(-1), np.asarray(cc).argmax(-1))


def test_greedy_text_is_the_cpu_engines(relu_model):
    loaded = relu_model
    spec = SparseSpec.uniform(loaded.config.n_layer, method="relu")
    outs = []
    for r in (_hybrid(loaded, 0.5, n_ctx=96), make_runner(loaded, 96, 2)):
        r.set_sparse(spec)
        logits, toks = r.eval([1, 2, 3]), []
        for _ in range(64):
            toks.append(int(logits.argmax()))
            logits = r.eval([toks[-1]])
        outs.append(toks)
    assert outs[0] == outs[1]


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_exact_predictors_on_both_tiers(tiny_gguf, fraction):
    """Perfect predictors (their logits have the sign of the gate): both tiers skip what the predictor rules out,
    and every placement gives the all-CPU engines' logits."""
    from fixtures.tiny import perfect_predictor
    from powerinfer.sparse.predictor import PredictorSet

    loaded = load_model(tiny_gguf(activation="relu", qtype=Q.F32, n_layer=3, n_ff=256, context_length=128).path)
    pairs = [perfect_predictor(lw.gate_proj.dequantize().numpy(), lw.post_attention_layernorm.dequantize().numpy())
             for lw in loaded.weights.layers]
    ps = PredictorSet([torch.from_numpy(a) for a, _ in pairs], [torch.from_numpy(b) for _, b in pairs], 0.0)
    spec = SparseSpec.uniform(loaded.config.n_layer, method="relu", predictors=ps)
    hyb, c = _hybrid(loaded, fraction), make_runner(loaded, N_CTX, 2)
    ref = make_runner(loaded, N_CTX, 1, compute="torch", device=DEVICE)
    for r in (hyb, ref, c):
        r.set_sparse(spec)
    a, b, cc = (r.eval(IDS, all_logits=True) for r in (hyb, ref, c))
    assert _rel(a, b) < TOL
    assert _rel(a, cc) < max(TOL, 1e-3) and np.array_equal(np.asarray(a).argmax(-1), np.asarray(cc).argmax(-1))
    if hyb.cpu is not None:
        kept = hyb.cpu.ffn.kept()  # the CPU tier read gate rows only for its predicted neurons
        assert (kept.gate_rows < np.asarray(hyb.cpu.n_cold)).all()


def test_placement_from_an_upstream_index(relu_model, tmp_path):
    """An index beside the model solved for this budget is used as it is; another budget solves again and caches
    its own; --reset-gpu-index ignores indexes; --disable-gpu-index places no neurons and writes nothing."""
    import shutil

    src = relu_model.path
    model = tmp_path / src.name
    shutil.copy(src, model)
    loaded = load_model(model)
    cfg = loaded.config
    budget = _budget(loaded, 0.5)
    hot = [np.arange(i * 32, i * 32 + 64) for i in range(cfg.n_layer)]  # not what the solver would choose
    write_gpuidx(gpuidx_path(model), hot, cfg.n_ff, int(budget * GIB))
    r = _hybrid(loaded, 0.5, reset_gpu_index=False)
    assert "index" in r.plan.source and all(np.array_equal(a, b) for a, b in zip(r.plan.hot, hot))
    r.set_sparse(SparseSpec.uniform(cfg.n_layer, method="relu"))
    ref = make_runner(loaded, N_CTX, 1, compute="torch", device=DEVICE)
    ref.set_sparse(SparseSpec.uniform(cfg.n_layer, method="relu"))
    assert _rel(r.eval(IDS, all_logits=True), ref.eval(IDS, all_logits=True)) < TOL

    bigger = _hybrid(loaded, 0.75, reset_gpu_index=False)  # a larger budget solves again
    assert "solved now" in bigger.plan.source and sum(map(len, bigger.plan.hot)) > sum(map(len, hot))
    cached = read_gpuidx(bigger.plan.source.split("cached ")[1].rstrip(")"), cfg.n_layer, cfg.n_ff)
    assert cached.vram_capacity == int(_budget(loaded, 0.75) * GIB)
    assert read_gpuidx(gpuidx_path(model)).vram_capacity == int(budget * GIB)  # the user's file is untouched

    assert "solved now" in _hybrid(loaded, 0.5, reset_gpu_index=True).plan.source
    stamp = gpuidx_path(model).stat().st_mtime_ns
    off = _hybrid(loaded, 0.5, disable_gpu_index=True)
    assert sum(map(len, off.plan.hot)) == 0 and "disable" in off.plan.source
    assert gpuidx_path(model).stat().st_mtime_ns == stamp


def test_a_budget_below_the_dense_parts_runs_on_the_cpu(relu_model):
    import io

    log = io.StringIO()
    s = PlacementSettings(vram_budget=_budget(relu_model, 0.0) * 0.5, hot_device=DEVICE)
    r = make_runner(relu_model, N_CTX, 2, placement=s, solve=solve_hot_sets, log=log)
    assert r.compute == "c" and "running everything on the CPU" in log.getvalue()
    assert "\n" not in log.getvalue().strip()


def test_without_a_fast_device_nothing_changes(relu_model):
    r = make_runner(relu_model, N_CTX, 2, placement=PlacementSettings(), solve=solve_hot_sets)
    assert r.compute == ("hybrid" if torch.cuda.is_available() else "c")


def test_neurons_counted_on_both_tiers(relu_model):
    """The hybrid runner reports the neurons each layer computed, hot plus cold, as the C engine counts them."""
    spec = SparseSpec.uniform(relu_model.config.n_layer, method="relu")
    hyb, c = _hybrid(relu_model, 0.5), make_runner(relu_model, N_CTX, 2)
    for r in (hyb, c):
        r.set_sparse(spec)
        r.eval([1, 5, 9])
        r.reset_ffn_stats()
        r.eval([33])
    hot, cold = hyb.last_ffn_tiers()
    assert all(h > 0 for h in hot) and all(k > 0 for k in cold)
    assert [h + k for h, k in zip(hot, cold)] == hyb.last_ffn_layers() == c._sparse.kept().neurons.tolist()
    assert abs(hyb.ffn_sparsity() - c.ffn_sparsity()) < 1e-9 and 0.2 < hyb.ffn_sparsity() < 0.9
    assert hyb.last_ffn()[0] == pytest.approx(c.last_ffn()[0])
