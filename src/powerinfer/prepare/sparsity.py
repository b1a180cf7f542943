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
"""
from __future__ import annotations

import sys

from ..errors import PowerInferError
from ..sparse.artifacts import METHODS, default_thresholds_path, load_thresholds, model_fingerprint, target_label

DEFAULT_METHOD = "hu"


def parse_sparsity(text: str | float | None) -> str | float:
    """'auto' | 'off' | a float in [0, 1)."""
    if text is None:
        return "off"
    t = str(text).strip().lower()
    if t in ("auto", "off"):
        return t
    try:
        v = float(t)
    except ValueError:
        raise PowerInferError(f"--sparsity: expected auto, off or a fraction such as 0.5, got {text!r}") from None
    if not 0 <= v < 1:
        raise PowerInferError(f"--sparsity must be in [0, 1), got {text}")
    return v


def resolve_sparsity(loaded, spec, method: str | None = None, cache_dir=None,
                     log=sys.stderr) -> tuple[list[dict[str, float]] | None, str]:
    """(per-layer thresholds for Runner.set_sparse or None for dense, a one-line description)."""
    spec = parse_sparsity(spec)
    cfg = loaded.config
    relu = cfg.activation == "relu"
    if spec == "off" or spec == 0.0 and not relu:
        return None, "dense FFN"
    if relu and spec in ("auto", 0.0):
        return [{"h": 0.0} for _ in range(cfg.n_layer)], "relu: exact (zero activations skipped)"
    if spec == "auto":
        return None, ("dense FFN (auto: on SwiGLU models no threshold setting within 3% perplexity decodes "
                      "faster than the dense path on CPUs; --sparsity S forces one)")
    method = method or DEFAULT_METHOD
    if method not in METHODS:
        raise PowerInferError(f"--sparse-method {method!r}: choose one of {', '.join(METHODS)}")
    target = float(spec)
    if method == "teal-hu":
        from .calibrate import site_targets

        target = site_targets(method, target)
    fingerprint = model_fingerprint(loaded)
    path = default_thresholds_path(fingerprint, method, target, cache_dir)
    if path.is_file():
        th = load_thresholds(path, fingerprint)
        where = f"cached {path}"
    else:
        from .calibrate import calibrate_default

        th = calibrate_default(loaded, method, target, cache_dir, log)
        where = f"calibrated now, cached {path}"
    thresholds = [th.for_layer(i) for i in range(cfg.n_layer)]
    return thresholds, f"threshold {method} S={target_label(target)} ({where})"


def apply_sparsity(runner, loaded, spec, method: str | None = None, predictors: str | None = None,
                   log=sys.stderr) -> str:
    """Resolve `spec` and switch the runner's FFN accordingly; returns the description.

    Predictors, when the FFN is sparse: `predictors` = a file written by `powerinfer train-predictors`
    (checked against the model's fingerprint), else the ones a PowerInfer GGUF carries (blk.N.fc1/fc2)."""
    from ..sparse.predictor import PredictorSet, predictors_from_gguf

    thresholds, desc = resolve_sparsity(loaded, spec, method, log=log)
    if thresholds is None:
        if predictors:
            raise PowerInferError("--predictors needs a sparse FFN (--sparsity auto or S)")
        runner.set_sparse(None)
        return desc
    if predictors:
        preds = PredictorSet.load(predictors, model_fingerprint(loaded))
        desc += f" + predictors {predictors}"
    else:
        preds = predictors_from_gguf(loaded)
        if preds is not None:
            desc += f" + the file's predictors (logit threshold {preds.threshold:g})"
    runner.set_sparse(thresholds, desc, preds)
    return desc


def add_sparsity_arguments(p, what: str = "") -> None:
    """--sparsity / --sparse-method / --predictors for a measuring command (bench, perplexity)."""
    p.add_argument("--sparsity", default="off", metavar="auto|off|S",
                   help=f"neuron-sparse FFN (as `powerinfer run --sparsity`; default: off){what}")
    p.add_argument("--sparse-method", default="hu", metavar="NAME",
                   help="threshold criterion for SwiGLU models: hu | teal | teal-hu (default: hu)")
    p.add_argument("--predictors", metavar="FILE",
                   help="activation predictors for the sparse FFN (from `powerinfer train-predictors`)")
