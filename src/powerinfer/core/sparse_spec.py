"""`SparseSpec`: the one description of a neuron-sparse FFN that every runner and the C binding accept.

Per layer, two named threshold sites (TEAL/CATS family, reference/baselines.md section 5):
  h  a neuron is skipped when |h| = |act(gate x) * up x| < h (its down_t row is not read). h = 0 skips only
     exact zeros, which is the exact path of ReLU-family models (PowerInfer, arXiv 2312.12456, section 2).
  x  an FFN input channel is skipped when |x| < x (its gate/up columns are not read; TEAL, arXiv 2408.14690).
     0 = off.
`predictors`, when set, decide which neurons' gate/up rows are read at all (PowerInfer's per-layer
fc2 . relu(fc1 . x)); any object with `n_layer`, `fc1[i]`, `fc2[i]` and `threshold_of(i)` (sparse.predictor's
PredictorSet). Produced by the run-time policy (runtime/sparsity.py) or from a thresholds artifact.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import PowerInferError

SITES = ("h", "x")


@dataclass(frozen=True)
class LayerThresholds:
    h: float = 0.0
    x: float = 0.0


@dataclass(frozen=True)
class SparseSpec:
    layers: tuple[LayerThresholds, ...]
    # How the thresholds were made: "relu" (exact zeros of a ReLU-family FFN) | hu | teal | teal-hu (calibrated,
    # sparse/artifacts.METHODS) | "threshold" (given by hand).
    method: str = "threshold"
    predictors: Any = field(default=None, compare=False)
    label: str = field(default="sparse", compare=False)  # one line for logs and stats

    @classmethod
    def uniform(cls, n_layer: int, h: float = 0.0, x: float = 0.0, **kw) -> "SparseSpec":
        """The same thresholds in every layer; SparseSpec.uniform(n) is exact zero skipping."""
        return cls(tuple(LayerThresholds(float(h), float(x)) for _ in range(n_layer)), **kw)

    @classmethod
    def from_sites(cls, values: dict[str, list[float]], **kw) -> "SparseSpec":
        """From per-site lists {"h": [t_0, ...], "x": [...]} (the thresholds artifact's layout)."""
        unknown = set(values) - set(SITES)
        if unknown:
            raise PowerInferError(f"unknown threshold site(s) {sorted(unknown)}; known: {', '.join(SITES)}")
        n = max((len(v) for v in values.values()), default=0)
        return cls(tuple(LayerThresholds(**{s: float(v[i]) for s, v in values.items()}) for i in range(n)), **kw)

    @property
    def n_layer(self) -> int:
        return len(self.layers)

    def site(self, name: str) -> list[float]:
        """One site's thresholds, layer by layer."""
        return [getattr(t, name) for t in self.layers]

    def check(self, n_layer: int) -> None:
        if self.n_layer != n_layer:
            raise PowerInferError(f"{self.n_layer} layers of thresholds for a {n_layer}-layer model")
        if self.predictors is not None and self.predictors.n_layer != n_layer:
            raise PowerInferError(f"{self.predictors.n_layer} predictor layers for a {n_layer}-layer model")
