"""`--sparsity auto|off|S`: which neuron-sparse FFN a run uses (run / bench / perplexity / the Python API).

  off   dense FFN.
  auto  ReLU-family models (activation relu: ReGLU, dReLU, ReLU MLPs): exact skipping of the zero activations.
        SwiGLU/GeGLU models: the `hu` thresholds at AUTO_TARGET, calibrated on first use with the built-in
        calibration text and cached under ~/.cache/powerinfer/<fingerprint>/.
  S     (0 <= S < 1) ReLU-family models: exact skipping, plus |h| thresholds at S if S exceeds what the model
        skips on its own; SwiGLU models: thresholds calibrated to skip S of the neurons per layer.
The method for SwiGLU models is `--sparse-method` (hu | teal | teal-hu; sparse/artifacts.METHODS).
"""
from __future__ import annotations

import sys

from ..errors import PowerInferError
from ..sparse.artifacts import METHODS, default_thresholds_path, load_thresholds, model_fingerprint, target_label

# The SwiGLU operating point of `auto`. Measured on SmolLM2-135M (benchmarks/RESULTS.md): hu at S=0.5 costs
# +2.6 % perplexity (within the 3 % budget); S=0.6 +6 %.
AUTO_TARGET = 0.5
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
    if spec == "off" or spec == 0.0 and cfg.activation != "relu":
        return None, "dense FFN"
    if cfg.activation == "relu":
        zeros = [{"h": 0.0} for _ in range(cfg.n_layer)]
        if spec == "auto" or spec == 0.0:
            return zeros, "relu: exact (zero activations skipped)"
    method = method or DEFAULT_METHOD
    if method not in METHODS:
        raise PowerInferError(f"--sparse-method {method!r}: choose one of {', '.join(METHODS)}")
    target = AUTO_TARGET if spec == "auto" else float(spec)
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
