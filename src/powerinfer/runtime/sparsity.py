"""`--sparsity auto|off|S`: which neuron-sparse FFN a run uses (run / bench / perplexity / the Python API).

  off   dense FFN.
  auto  the fastest measured setting within 3 % perplexity. ReLU-family models (activation relu: ReGLU, dReLU,
        ReLU MLPs): exact skipping of the zero activations (7B-shaped ReLU Q4_0, 90 % inactive: 1.44x our dense
        decode, benchmarks/RESULTS.md). SwiGLU/GeGLU models: dense, because no threshold point within the
        budget is faster on this CPU: SmolLM2-135M Q4_1 at S=0.5 (+1-3 % perplexity) decodes at 0.83x our dense
        path. Skipping a neuron saves its down_t row, an f32 axpy over a Q8_0 row (~3 cycles per 32 weights),
        while the dense down projection is a VNNI int8 dot over 4-bit weights (~1 cycle per 32): at 50 %
        sparsity the sparse down reads about as many bytes and does more work.
  S     (0 < S < 1) SwiGLU models: thresholds calibrated on first use (built-in calibration text, cached under
        ~/.cache/powerinfer/<fingerprint>/) to skip S of the neurons per layer. ReLU-family models: exact
        skipping, plus |h| thresholds calibrated to S when S is given.
The method for SwiGLU models is `--sparse-method` (hu | teal | teal-hu; sparse/artifacts.METHODS).

This is run-time policy: it reads cached thresholds and predictors. Calibrating thresholds that are not cached
yet is offline work (prepare/calibrate.py), so the caller injects it (`calibrate=`); the API and CLI pass
prepare.calibrate.calibrate_default.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import replace

from ..core.sparse_spec import SparseSpec
from ..errors import PowerInferError
from ..settings import DEFAULT_SPARSE_METHOD, parse_sparsity
from ..sparse.artifacts import (METHODS, TEAL_HU_X_PER_H, default_thresholds_path, load_thresholds,
                                model_fingerprint, target_label)

# calibrate(loaded, method, target, cache_dir, log) -> a sparse.artifacts.Thresholds, saved at the default path
Calibrate = Callable[..., object]


def site_targets(method: str, s: float) -> float | dict[str, float]:
    """The per-site targets of `method` at S: teal-hu thresholds inputs at TEAL_HU_X_PER_H * S as well."""
    if method == "teal-hu":
        return {"x": round(s * TEAL_HU_X_PER_H, 4), "h": s}
    return s


def resolve_sparsity(loaded, sparsity, method: str | None = None, cache_dir=None, log=sys.stderr,
                     calibrate: Calibrate | None = None) -> tuple[SparseSpec | None, str]:
    """(the SparseSpec for Runner.set_sparse, or None for dense; a one-line description)."""
    sparsity = parse_sparsity(sparsity)
    cfg = loaded.config
    relu = cfg.activation == "relu"
    if sparsity == "off" or sparsity == 0.0 and not relu:
        return None, "dense FFN"
    if relu and sparsity in ("auto", 0.0):
        desc = "relu: exact (zero activations skipped)"
        return SparseSpec.uniform(cfg.n_layer, method="relu", label=desc), desc
    if sparsity == "auto":
        return None, ("dense FFN (auto: on SwiGLU models no threshold setting within 3% perplexity decodes "
                      "faster than the dense path on CPUs; --sparsity S forces one)")
    method = method or DEFAULT_SPARSE_METHOD
    if method not in METHODS:
        raise PowerInferError(f"--sparse-method {method!r}: choose one of {', '.join(METHODS)}")
    target = site_targets(method, float(sparsity))
    fingerprint = model_fingerprint(loaded)
    path = default_thresholds_path(fingerprint, method, target, cache_dir)
    if path.is_file():
        th = load_thresholds(path, fingerprint)
        where = f"cached {path}"
    elif calibrate is not None:
        th = calibrate(loaded, method, target, cache_dir, log)
        where = f"calibrated now, cached {path}"
    else:
        raise PowerInferError(f"no {method} thresholds for S={target_label(target)} are cached for this model "
                              f"(run `powerinfer calibrate --method {method} --target-sparsity "
                              f"{target_label(target)}`)")
    if th.n_layer != cfg.n_layer:
        raise PowerInferError(f"{path}: thresholds for {th.n_layer} layers, the model has {cfg.n_layer}")
    desc = f"threshold {method} S={target_label(target)} ({where})"
    return SparseSpec.from_sites(th.values, method=method, label=desc), desc


def apply_sparsity(runner, loaded, sparsity, method: str | None = None, predictors: str | None = None,
                   log=sys.stderr, calibrate: Calibrate | None = None) -> str:
    """Resolve `sparsity` and switch the runner's FFN accordingly; returns the description.

    Predictors, when the FFN is sparse: `predictors` = a file written by `powerinfer train-predictors`
    (checked against the model's fingerprint), else the ones a PowerInfer GGUF carries (blk.N.fc1/fc2)."""
    spec, desc = resolve_sparsity(loaded, sparsity, method, log=log, calibrate=calibrate)
    if spec is None:
        if predictors:
            raise PowerInferError("--predictors needs a sparse FFN (--sparsity auto or S)")
        runner.set_sparse(None)
        return desc
    # predictors are torch modules (sparse/predictor.py): imported only when a run has some, so an exact-ReLU
    # model's sparse decode stays free of torch
    preds = None
    if predictors:
        from ..sparse.predictor import PredictorSet

        preds = PredictorSet.load(predictors, model_fingerprint(loaded), loaded.config)
        desc += f" + predictors {predictors}"
    elif loaded.has_predictors:  # a PowerInfer GGUF's
        from ..sparse.predictor import predictors_from_gguf

        preds = predictors_from_gguf(loaded)
        desc += f" + the file's predictors (logit threshold {preds.threshold:g})"
    runner.set_sparse(replace(spec, predictors=preds, label=desc))
    return desc
