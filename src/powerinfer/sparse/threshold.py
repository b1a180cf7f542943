"""`threshold` FFN backend: training-free activation sparsity for SwiGLU/GeGLU models, whose activations are
never exactly zero, by zeroing small entries with calibrated per-layer thresholds (TEAL, arXiv 2408.14690;
CATS, arXiv 2404.08763). Thresholds come from prepare/calibrate.py and live in a `Thresholds` artifact.

Two sites, each with its own per-layer threshold (0 = keep everything = dense):
  "h"  neuron site: h = act(gate x) * up x; entries with |h| < t_h are zeroed and down is computed only over the
       kept neurons (their rows of down_t). Gate and up stay dense, so only down's bytes shrink. Measured on
       SmolLM2 (reference/baselines.md 5.1): +2.3 % PPL at 50 %, +13 % at 70 %; thresholding |act(gate)| alone
       (CATS) costs +27 % at 50 %, which is why the criterion is the product.
  "x"  input site (TEAL): entries of the FFN input with |x| < t_x are zeroed before gate/up, so a kernel reads
       only the kept input channels' columns of gate and up (rows of a column-major copy). The same criterion
       applies to the attention projections' inputs; here it is used on the FFN only.
Methods (artifacts.METHODS): "hu" = h, "teal" = x, "teal-hu" = x then h (TEAL's full FFN recipe).

Batches gather the union of the tokens' kept indices with `index_select` and keep each token's own zeros inside
it (exact per token); statistics are per token. When nothing is pruned the computation is the dense backend's,
operation for operation, so zero thresholds reproduce "dense" bit for bit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.config import ModelConfig
from ..core.weights import LayerWeights
from .artifacts import Thresholds
from ..model.ffn import FFNWeights, ffn_hidden
from .base import register_ffn
from ..core.tensor import row_bytes
from .stats import SparsityStats

SITES = ("x", "h")


@register_ffn("threshold")
class ThresholdFFN(FFNWeights):
    """`thresholds`: a Thresholds artifact (this layer's values are used), a {site: [per-layer values]} dict, or
    None (all zero: dense). Change them later with `set_thresholds`."""

    def __init__(self, lw: LayerWeights, config: ModelConfig, dtype=torch.float32, layer: int = 0,
                 thresholds: Thresholds | dict | None = None):
        super().__init__(lw, config, dtype, layer)
        gate = lw.gate_proj if self.kind != "mlp" else None  # an mlp FFN has no gate
        n_ff, d = lw.up_proj.rows, lw.up_proj.cols
        in_mats = [t for t in (gate, lw.up_proj) if t is not None]
        # Bytes per token. Input site: each kept channel reads one n_ff-long column of gate and of up (a row of a
        # column-major copy). Neuron site: each kept neuron reads one d_model-long row of down_t.
        self._in_dense = sum(t.nbytes for t in in_mats)
        self._in_col = sum(row_bytes(t.qtype, n_ff) for t in in_mats)
        self._down_row = row_bytes(lw.down_proj.qtype, d)
        self.stats = SparsityStats({"x": d, "h": n_ff}, self._in_dense + lw.down_proj.nbytes)
        self.thresholds = {site: 0.0 for site in SITES}
        # Calibration hook (prepare/calibrate.py): when a list, forward stores its input there and returns zeros,
        # so the block's output is its residual stream without the FFN.
        self.capture: list[torch.Tensor] | None = None
        if isinstance(thresholds, Thresholds):
            self.set_thresholds(thresholds.for_layer(layer))
        elif thresholds is not None:
            self.set_thresholds({site: v[layer] for site, v in thresholds.items()})

    def set_thresholds(self, values: dict[str, float]) -> None:
        """Set this layer's thresholds by site; sites not named go back to 0 (no pruning)."""
        unknown = set(values) - set(SITES)
        if unknown:
            raise ValueError(f"unknown threshold site(s) {sorted(unknown)} (sites: {', '.join(SITES)})")
        self.thresholds = {site: float(values.get(site, 0.0)) for site in SITES}

    def hidden(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, d] -> (h [T, n_ff] after the input site, kept input channels per token [T])."""
        t_x = self.thresholds["x"]
        gate, up = self.gate_proj, self.up_proj
        if t_x > 0:
            keep = x.abs() >= t_x
            kept_x = keep.sum(1)
            x = x.masked_fill(~keep, 0)
            cols = keep.any(0).nonzero().squeeze(1)
            if cols.numel() < x.shape[1]:  # read only the kept channels' columns of gate/up
                x = x.index_select(1, cols)
                gate = gate.index_select(1, cols) if gate is not None else None
                up = up.index_select(1, cols)
        else:
            kept_x = torch.full((x.shape[0],), x.shape[1], dtype=torch.long)
        return ffn_hidden(self.kind, self.act, x, gate, up, self.up_bias), kept_x  # as DenseFFN, op for op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.capture is not None:
            self.capture.append(x.detach().clone())
            return torch.zeros_like(x)
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        h, kept_x = self.hidden(x)
        n_ff = h.shape[1]
        t_h = self.thresholds["h"]
        down = self.down_proj
        if t_h > 0:
            keep = h.abs() >= t_h
            kept_h = keep.sum(1)
            h = h.masked_fill(~keep, 0)
            idx = keep.any(0).nonzero().squeeze(1)
            if idx.numel() < n_ff:  # down only over the kept neurons (rows of down_t)
                h, down = h.index_select(1, idx), down.index_select(1, idx)
        else:
            kept_h = torch.full((x.shape[0],), n_ff, dtype=torch.long)
        out = F.linear(h, down, self.down_bias)
        in_bytes = kept_x * self._in_col if self.thresholds["x"] > 0 else torch.full_like(kept_x, self._in_dense)
        self.stats.record({"x": kept_x, "h": kept_h}, in_bytes + kept_h * self._down_row)
        return out.reshape(*lead, out.shape[-1])
