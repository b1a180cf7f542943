"""The offline pipeline on tiny ReLU Falcon (40B layout, every bias) and OPT models from transformers: profile ->
train-predictors -> solve -> convert (HF directory + predictors -> PowerInfer GGUF) -> the C decoder with the
file's predictors. Firing here is whatever random weights give (about half the neurons), so the test asks for the
pipeline's contracts, not for high sparsity: counts that are the dense FFN's firings, predictors at their recall,
a placement, a GGUF carrying them, and decoding that agrees with dense."""
from __future__ import annotations

import numpy as np
import pytest
from fixtures.hf_families import TOKENS, c_logits, falcon_model, opt_model, rel
from powerinfer.cli import main
from powerinfer.core.sparse_spec import SparseSpec
from powerinfer.formats.gpuidx import read_gpuidx
from powerinfer.formats.loader import load_model
from powerinfer.formats.powerinfer_gguf import write_powerinfer_gguf
from powerinfer.prepare.profile import run_profile
from powerinfer.prepare.train import train_predictors
from powerinfer.runtime.runner import make_runner
from powerinfer.sparse.predictor import predictors_from_gguf

N_TOKENS = 2048


@pytest.mark.parametrize("family", ["falcon", "opt"])
def test_profile_predictors_solve_convert_run(family, tmp_path):
    model = falcon_model("40b+bias") if family == "falcon" else opt_model()
    hf = tmp_path / family
    model.save_pretrained(hf)
    loaded = load_model(hf)
    ids = [int(t) for t in np.random.default_rng(0).integers(0, 96, N_TOKENS)]
    prof = run_profile(loaded, ids, {"text": "random ids"}, tmp_path / "profile", N_TOKENS, 64, progress=False)
    assert prof.counts.shape == (2, 128) and prof.n_tokens == N_TOKENS
    assert 0.2 < prof.meta["sparsity_per_layer"][0] < 0.8  # ReLU of biased pre-activations: about half fire
    ps = train_predictors(loaded, prof, tmp_path / "predictors.safetensors", recall=0.95, progress=False)
    assert all(r["recall"] >= 0.95 for r in ps.meta["report"]), ps.meta["report"]

    gpuidx = tmp_path / "m.gpuidx"
    assert main(["solve", "-m", str(hf), "--activation", str(tmp_path / "profile" / "activation"), "-o",
                 str(gpuidx), "-c", "64", "--vram-budget", "0.0001", "--cpu-bandwidth", "30",
                 "--gpu-bandwidth", "300"]) == 0
    assert len(read_gpuidx(gpuidx).hot_index) == 2

    out = write_powerinfer_gguf(hf, tmp_path / "m.gguf", predictors=ps, progress=False)
    converted = load_model(out)
    assert converted.powerinfer_gguf and converted.config.arch == family
    preds = predictors_from_gguf(converted)
    assert preds is not None and preds.n_layer == 2

    # the C decoder with the file's predictors computes what the torch predictor backend computes (the predicted
    # neurons that fire); both leave out the ~5% of firing neurons the predictors miss. They differ where a
    # predictor logit sits at the threshold (C rounds the hidden layer to f16 for fc2): max rel 9e-4 (falcon) and
    # 1.7e-2 (opt), top-1 72/72 both, 53-54% of the neurons skipped
    spec = SparseSpec.uniform(2, predictors=preds, label="predictor")
    stats = {}
    sparse = c_logits(converted, spec=spec, stats=stats)
    assert stats["sparsity"] > 0.2
    torch_runner = make_runner(converted, n_ctx=128, n_threads=2, compute="torch")
    torch_runner.set_sparse(spec)
    ref = torch_runner.eval(TOKENS.tolist(), all_logits=True)
    assert rel(sparse, ref) < 4e-2 and (sparse.numpy().argmax(-1) == ref.argmax(-1)).mean() > 0.95
