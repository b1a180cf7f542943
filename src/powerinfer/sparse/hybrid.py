"""The hybrid FFN: a layer's hot neurons on the fast tier (torch on a device), its cold neurons on the CPU (the
C decoder's FFN over that tier's share, `Decoder.ffn`), partial outputs summed (PowerInfer, arXiv 2312.12456,
section 4; reference/hybrid.md 3.1 and 3.4).

Per token and layer only activations cross the tier boundary: one copy to the host (the FFN's input residual,
and with predictors the cold neurons' predicted mask) and one back (the CPU's partial output). The copy to the
host is the join with the fast tier's attention; the hot neurons' kernels are queued after it, and on CUDA they
run while the CPU computes the cold ones (the C call releases the GIL). A layer with no cold neurons skips the
CPU, one with no hot neurons skips the fast tier's FFN. A neuron is active by the same rule on both tiers (exact
ReLU zero, the SparseSpec's thresholds, or the predictor), so any placement computes what the CPU-only engine
computes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..core.sparse_spec import LayerThresholds, SparseSpec
from ..formats.pages import release_rows
from ..model.ffn import activation_fn, dense, ffn_hidden


@dataclass
class TierTimes:
    """Seconds spent per tier since the last reset (summed over layers and tokens)."""

    copies: float = 0.0  # host <-> fast-tier copies (on CUDA the copy to the host also waits for attention)
    cpu: float = 0.0  # the C calls for the cold neurons
    fast_ffn: float = 0.0  # queueing (CUDA) or running (CPU fast tier) the hot neurons' torch ops


class CpuTier:
    """The CPU tier of a placement: an FFN-only C decoder (kernels.bind_ffn_decoder) over every layer's cold
    neurons, reading their rows in place; host buffers for the activations that cross (pinned on CUDA)."""

    def __init__(self, config, weights, hot: list[np.ndarray], n_threads: int, device: torch.device,
                 max_tokens: int):
        self.config = config
        self.dec = kernels.bind_ffn_decoder(config, weights, n_threads)
        self.ffn = kernels.SparseFFN(self.dec, config, weights, gathers=True)
        self.cold = []
        for h in hot:
            m = torch.ones(config.n_ff, dtype=torch.uint8)
            m[torch.as_tensor(np.asarray(h, dtype=np.int64))] = 0
            self.cold.append(m)
        self.n_cold = [int(m.sum()) for m in self.cold]
        pin = device.type != "cpu"
        self.x = torch.empty(max_tokens, config.d_model, pin_memory=pin)
        self.y = torch.empty(max_tokens, config.d_model, pin_memory=pin)
        self.mask = torch.empty(max_tokens, config.n_ff, dtype=torch.uint8, pin_memory=pin)
        self.times = TierTimes()
        self.last_kept = torch.zeros(config.n_layer, dtype=torch.int64)  # neurons computed, last token per layer
        self.kept_total = torch.zeros(config.n_layer, dtype=torch.int64)  # and summed since reset
        self.last_bytes = torch.zeros(config.n_layer, dtype=torch.int64)
        self.set_spec(None)
        # The neuron-major down_t copies hold every neuron; the hot ones are never read on this tier.
        self.released = sum(release_rows(np.asarray(t.data), h) for (il, role), t in self.ffn._copies.items()
                            if role == "down" and t is not weights.layers[il].down_t
                            for h in [np.asarray(hot[il], dtype=np.int64)])

    def set_spec(self, spec: SparseSpec | None) -> None:
        """The rule's thresholds on the C side (dense = only exact zeros skipped); predictors run on the fast
        tier, which sends the cold neurons' predicted mask."""
        spec = spec or SparseSpec.uniform(self.config.n_layer)
        self.ffn.on(replace(spec, predictors=None))

    def run(self, il: int, n_tok: int, masked: bool) -> torch.Tensor:
        """y[:n_tok] = the cold neurons' FFN output for x[:n_tok] (masks from self.mask when `masked`)."""
        t0 = time.perf_counter()
        y = self.y[:n_tok]
        y.zero_()
        for t in range(n_tok):
            cand = self.mask[t] if masked else self.cold[il]
            self.dec.ffn(il, self.x[t].data_ptr(), y[t].data_ptr(), cand.data_ptr())
            kept = self.ffn.kept()
            self.last_kept[il] = n = int(kept.neurons[il])
            self.kept_total[il] += n
        self.last_bytes[il] = int(self.ffn.bytes_per_layer(kept)[il])
        self.times.cpu += time.perf_counter() - t0
        return y


class HybridFFN(nn.Module):
    """One layer's FFN split over the tiers. The hot neurons' gate/up rows and down columns are gathered once
    into compact dense matrices of the fast tier's dtype; the cold ones stay in the model file for the CPU."""

    takes_residual = True  # predictors and the C side read the residual before the FFN norm

    def __init__(self, lw, config, hot: np.ndarray, cpu: CpuTier | None, dtype=torch.float32, layer: int = 0):
        super().__init__()
        self.kind, self.layer, self.act = config.ffn_kind, layer, activation_fn(config.activation)
        idx = torch.as_tensor(np.asarray(hot, dtype=np.int64))
        self.n_hot = len(idx)
        self.cpu = cpu if cpu is not None and cpu.n_cold[layer] else None
        gate = lw.gate_proj if self.kind != "mlp" else None
        rows = lambda t: dense(t).index_select(0, idx).to(dtype) if t is not None and self.n_hot else None  # noqa
        self.register_buffer("gate_proj", rows(gate))
        self.register_buffer("up_proj", rows(lw.up_proj))
        self.register_buffer("down_proj", dense(lw.down_proj).index_select(1, idx).to(dtype).contiguous()
                             if self.n_hot else None)
        self.register_buffer("hot_index", idx)
        self.register_buffer("cold_mask", cpu.cold[layer].bool() if cpu is not None else None)
        self.register_buffer("fc1", None)
        self.register_buffer("fc2", None)
        # hot neurons computed (h kept): the last token's count and the sum since reset, on the fast tier's
        # device so counting adds no synchronisation
        self.register_buffer("last_kept", torch.zeros((), dtype=torch.int64), persistent=False)
        self.register_buffer("kept_total", torch.zeros((), dtype=torch.int64), persistent=False)
        self.thresholds, self.t_pred = LayerThresholds(), 0.0

    def set_rule(self, thresholds: LayerThresholds, predictors=None) -> None:
        """The activation rule of this layer: thresholds (h, x) and, optionally, the predictor (both tiers)."""
        self.thresholds = thresholds
        dev, dt = self.hot_index.device, (self.up_proj.dtype if self.up_proj is not None else torch.float32)
        if predictors is None:
            self.fc1 = self.fc2 = None
        else:
            self.fc1 = predictors.fc1[self.layer].to(dev, dt)
            self.fc2 = predictors.fc2[self.layer].to(dev, dt)
            self.t_pred = float(predictors.threshold_of(self.layer))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        lead, d = x.shape[:-1], x.shape[-1]
        x = x.reshape(-1, d)
        r = (residual if residual is not None else x).reshape(-1, d)
        n_tok = x.shape[0]
        cpu = self.cpu
        predicted = None
        if self.fc1 is not None:  # PowerInfer's predictor on the pre-norm residual, for both tiers' neurons
            predicted = (F.relu(r @ self.fc1.T) @ self.fc2.T) >= self.t_pred
        if cpu is not None:  # the one copy to the host: it also joins the fast tier's attention
            t0 = time.perf_counter()
            cpu.x[:n_tok].copy_(r)
            if predicted is not None:
                cpu.mask[:n_tok].copy_(predicted & self.cold_mask)
            cpu.times.copies += time.perf_counter() - t0
        y = None
        if self.n_hot:
            t0 = time.perf_counter()
            th = self.thresholds
            xs = x * (x.abs() >= th.x) if th.x > 0 else x  # the input site: small channels dropped
            h = ffn_hidden(self.kind, self.act, xs, self.gate_proj, self.up_proj)
            keep = (h != 0) & (h.abs() >= th.h) if th.h > 0 else None
            if predicted is not None:
                p = predicted.index_select(1, self.hot_index)
                keep = p if keep is None else keep & p
            kept = (h != 0) if keep is None else keep & (h != 0)
            counts = kept.sum(1)
            self.last_kept.copy_(counts[-1])
            self.kept_total.add_(counts.sum())
            y = F.linear(h * keep if keep is not None else h, self.down_proj)
            if cpu is not None:
                cpu.times.fast_ffn += time.perf_counter() - t0
        if cpu is not None:
            cold = cpu.run(self.layer, n_tok, predicted is not None)
            t0 = time.perf_counter()
            cold = cold.to(x.device, x.dtype, non_blocking=True)  # the one copy back
            y = cold if y is None else y + cold
            cpu.times.copies += time.perf_counter() - t0
        if y is None:
            y = torch.zeros_like(x)
        return y.reshape(*lead, d)
