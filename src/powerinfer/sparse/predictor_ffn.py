"""The `predictor` FFN backend (torch path): only the neurons a layer's predictor names are computed
(PowerInfer's fc2 . relu(fc1 . x) on the pre-norm residual, sparse/predictor.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.tensor import row_bytes
from ..errors import PowerInferError
from ..model.ffn import FFNWeights, ffn_hidden
from .base import register_ffn
from .predictor import PredictorSet
from .stats import SparsityStats


@register_ffn("predictor")
class PredictorFFN(FFNWeights):
    """Only the neurons the layer's predictor names (logit >= threshold on the pre-norm residual) are
    computed: their gate and up rows, then the down rows of those whose h != 0. Misses (neurons active in the
    dense computation, h != 0 / |h| >= t_h, but not predicted) are counted in `misses`; the torch path
    computes the dense h to count them, the C decoder does not."""

    takes_residual = True

    def __init__(self, lw, config, dtype=torch.float32, layer: int = 0, predictors: PredictorSet | None = None,
                 t_h: float = 0.0):
        if predictors is None:
            raise PowerInferError("the predictor backend needs predictors=PredictorSet")
        super().__init__(lw, config, dtype, layer)
        self.t_h = t_h
        self.register_buffer("fc1", predictors.fc1[layer].to(dtype))
        self.register_buffer("fc2", predictors.fc2[layer].to(dtype))
        self.threshold = predictors.threshold_of(layer)
        n_ff, d = lw.up_proj.rows, lw.up_proj.cols
        per_neuron = lw.up_proj.row_bytes + (lw.gate_proj.row_bytes if lw.gate_proj is not None else 0)
        self._in_row, self._down_row = per_neuron, row_bytes(lw.down_proj.qtype, d)
        self.stats = SparsityStats({"h": n_ff, "up": n_ff}, lw.up_proj.nbytes + lw.down_proj.nbytes + (
            lw.gate_proj.nbytes if lw.gate_proj is not None else 0))
        self.misses = 0  # truly active neurons not predicted
        self.active = 0  # truly active neurons

    def forward(self, x, residual=None):
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        r = (residual if residual is not None else x).reshape(-1, x.shape[-1])
        predicted = (torch.relu(r @ self.fc1.T) @ self.fc2.T) >= self.threshold
        h = ffn_hidden(self.kind, self.act, x, self.gate_proj, self.up_proj, self.up_bias)
        true = (h != 0) & (h.abs() >= self.t_h)
        self.active += int(true.sum())
        self.misses += int((true & ~predicted).sum())
        keep = true & predicted
        out = F.linear(h * keep, self.down_proj, self.down_bias)
        kept = keep.sum(1)
        n_pred = predicted.sum(1)
        self.stats.record({"h": kept, "up": n_pred}, n_pred * self._in_row + kept * self._down_row)
        return out.reshape(*lead, out.shape[-1])
