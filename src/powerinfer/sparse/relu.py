"""`relu` FFN backend: exact neuron skipping for ReLU-family FFNs (ReGLU, dReLU, ReLU MLPs: ReluLLaMA,
ProSparse, Bamboo, ReluFalcon, OPT), with the gate as the oracle (PowerInfer, arXiv 2312.12456, section 2;
Deja Vu, arXiv 2310.17157, for the row/column gather).

Per token the gate is computed densely; a neuron is active iff relu(gate) > 0, and only the active neurons'
rows of up_proj and of the neuron-major down projection (`down_t`, i.e. columns of `down_proj`) are read.
Inactive neurons contribute exactly 0 to the dense sum, so the output equals dense up to summation order.
The torch code gathers rows with `index_select`; the C decoder's sparse FFN (kernels/csrc/decoder.c) reads
them in place (reference/sparsity-anchors.md section 10: never materialise the gathered weights in a fast path).
For a batch of tokens (prefill) the union of the tokens' active sets is gathered and each token's own
inactive neurons are exact zeros inside it; statistics are per token, as a one-token kernel would see them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.config import ModelConfig
from ..core.tensor import row_bytes
from ..core.weights import LayerWeights
from ..model.ffn import FFNWeights
from .base import register_ffn
from .stats import SparsityStats


def _union(active: torch.Tensor) -> torch.Tensor:
    """Indices of the columns active for at least one token ([T, n] bool -> [k] long)."""
    return active.any(0).nonzero().squeeze(1)




@register_ffn("relu")
class ReluFFN(FFNWeights):
    """Dense gate, then only the active neurons' up rows and down_t rows (exact for ReLU-family FFNs).

    glu  (ReGLU):  h = relu(gate x) * (up x);        active iff gate x > 0
    dglu (dReLU):  h = relu(gate x) * relu(up x);    up rows for gate x > 0, down rows where h > 0
    mlp  (ReLU):   h = relu(up x) (up is the gate);  down rows where up x > 0
    """

    def __init__(self, lw: LayerWeights, config: ModelConfig, dtype=torch.float32, layer: int = 0):
        if config.activation != "relu":
            raise ValueError(f"the 'relu' FFN backend needs a ReLU-family model; this one uses "
                             f"{config.activation!r} (use the 'threshold' backend with calibrated thresholds)")
        super().__init__(lw, config, dtype, layer)
        gate = lw.gate_proj if self.kind != "mlp" else None  # an mlp FFN's up is its gate
        n_ff, d = lw.up_proj.rows, lw.up_proj.cols
        # Per-token bytes: the dense gate (or, for mlp, the dense up), plus one up row and one down_t row
        # (d_model values in down's type) per neuron read.
        self._gate_bytes = gate.nbytes if gate is not None else 0
        self._up_row = lw.up_proj.row_bytes
        self._up_bytes = lw.up_proj.nbytes
        self._down_row = row_bytes(lw.down_proj.qtype, d)
        self.stats = SparsityStats({"up": n_ff, "h": n_ff},
                                   self._gate_bytes + lw.up_proj.nbytes + lw.down_proj.nbytes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        n_ff = self.up_proj.shape[0]
        if self.kind == "mlp":
            pre = F.linear(x, self.up_proj)
            active = pre > 0
            idx = _union(active)
            h = F.relu(pre.index_select(1, idx))
            kept_up = torch.full((x.shape[0],), n_ff, dtype=torch.long)
            kept_h = active.sum(1)
            up_bytes = torch.full_like(kept_h, self._up_bytes)
        else:
            g = F.linear(x, self.gate_proj)
            active = g > 0
            idx = _union(active)
            up = self.up_proj if idx.numel() == n_ff else self.up_proj.index_select(0, idx)
            u = F.linear(x, up)
            a = F.relu(g if idx.numel() == n_ff else g.index_select(1, idx))
            kept_up = active.sum(1)
            up_bytes = kept_up * self._up_row
            if self.kind == "dglu":
                h = a * F.relu(u)
                # dReLU's second zero set: neurons whose up is <= 0 skip their down row too.
                nz = h != 0
                kept_h = nz.sum(1)
                sel = _union(nz)
                if sel.numel() < idx.numel():
                    idx, h = idx.index_select(0, sel), h.index_select(1, sel)
            else:
                h = a * u
                kept_h = kept_up
        down = self.down_proj if idx.numel() == n_ff else self.down_proj.index_select(1, idx)
        out = F.linear(h, down)
        self.stats.record({"up": kept_up, "h": kept_h}, self._gate_bytes + up_bytes + kept_h * self._down_row)
        return out.reshape(*lead, out.shape[-1])
