"""`SparseFFN`: the neuron-sparse FFN of a bound `_C.Decoder` (which neurons and input channels a decode step
reads, the neuron-major copies it reads them from, and the bytes that costs)."""
from __future__ import annotations

import torch

from .. import _C
from ..core.tensor import QTensor, row_bytes
from .ops import _weight, transposed, transposed_qtype


class SparseFFN:
    """The neuron-sparse FFN of a bound Decoder (decode steps, and prompts of up to 8 tokens): per layer a
    neuron-major down_t (the model's own `down_t` when the file has one, else a transposed copy) and thresholds
    {"h": t_h, "x": t_x} (0 = off; with t_h = t_x = 0 only exact zeros are skipped, which is the exact ReLU
    path). Input-major gate/up copies are made only for layers with t_x > 0. Copies are cached, so changing
    thresholds is cheap; `off()` returns the decoder to the dense FFN."""

    def __init__(self, dec: "_C.Decoder", config, weights):
        self.dec, self.config, self.weights = dec, config, weights
        self._copies: dict[tuple[int, str], QTensor] = {}
        self.thresholds: list[dict[str, float]] | None = None
        self.predictors = None
        self._pred_keep: list[torch.Tensor] = []  # the f16 predictor matrices the decoder reads
        self._pred_bytes: list[int] = []
        self._row_bytes: torch.Tensor | None = None  # [n_layer, 5], see bytes_per_layer
        self._kept = torch.zeros(3, config.n_layer, dtype=torch.int32)

    def _copy(self, il: int, role: str) -> QTensor:
        key = (il, role)
        if key not in self._copies:
            lw = self.weights.layers[il]
            own = lw.down_t if role == "down" else None
            src = {"down": lw.down_proj, "gate": lw.gate_proj, "up": lw.up_proj}[role]
            self._copies[key] = own if own is not None else transposed(src, f"blk.{il}.{role}_t")
        return self._copies[key]

    @staticmethod
    def _mat(t: QTensor | None):
        if t is None:
            return None
        data, addr, qtype = _weight(t)
        return (addr, qtype)

    def on(self, thresholds: list[dict[str, float]] | None = None, predictors=None) -> None:
        """`predictors`: a sparse.predictor.PredictorSet (its fc1/fc2 are bound as f16) or None."""
        n = self.config.n_layer
        thresholds = thresholds or [{} for _ in range(n)]
        if len(thresholds) != n:
            raise ValueError(f"{len(thresholds)} layers of thresholds for a {n}-layer model")
        if predictors is not None and predictors.n_layer != n:
            raise ValueError(f"{predictors.n_layer} predictor layers for a {n}-layer model")
        self._pred_keep, self._pred_bytes = [], [0] * n
        for il in range(n):
            if predictors is None:
                self.dec.set_predictor(il, None, None, 1, 0.0)
                continue
            fc1, fc2 = (t.detach().to(torch.float16).contiguous() for t in (predictors.fc1[il], predictors.fc2[il]))
            self._pred_keep += [fc1, fc2]
            self._pred_bytes[il] = (fc1.numel() + fc2.numel()) * 2
            self.dec.set_predictor(il, (fc1.data_ptr(), 1), (fc2.data_ptr(), 1), fc1.shape[0],
                                   float(predictors.threshold_of(il)))
        self.predictors = predictors
        for il, th in enumerate(thresholds):
            t_h, t_x = float(th.get("h", 0.0)), float(th.get("x", 0.0))
            lw = self.weights.layers[il]
            gate_t = self._copy(il, "gate") if t_x > 0 and lw.gate_proj is not None else None
            up_t = self._copy(il, "up") if t_x > 0 else None
            self.dec.set_sparse(il, self._mat(self._copy(il, "down")), self._mat(gate_t), self._mat(up_t), t_h, t_x)
        self.thresholds = [dict(t) for t in thresholds]

    def off(self) -> None:
        for il in range(self.config.n_layer):
            self.dec.set_sparse(il, None, None, None, 0.0, 0.0)
            self.dec.set_predictor(il, None, None, 1, 0.0)
        self.thresholds, self.predictors = None, None

    def kept(self) -> torch.Tensor:
        """int32 [3, n_layer] of the last decode step: neurons kept (down rows read), FFN input channels kept, up
        rows read (a buffer the next call overwrites)."""
        self.dec.kept(self._kept.data_ptr())
        return self._kept

    def bytes_per_layer(self, kept: torch.Tensor) -> torch.Tensor:
        """FFN weight bytes each layer read in a step with these `kept` counts (int64 [n_layer])."""
        if self._row_bytes is None:  # per layer: dense gate, input-major column, up row, down_t row, gate row
            self._row_bytes = torch.tensor([self._layer_bytes(il) for il in range(self.config.n_layer)],
                                           dtype=torch.int64)
        th = self.thresholds or [{}] * self.config.n_layer
        x_on = torch.tensor([t.get("x", 0.0) > 0 for t in th])
        rb = self._row_bytes
        k = kept.to(torch.int64)
        if self.predictors is not None:  # predictor + the candidates' gate and up rows
            in_bytes = torch.tensor(self._pred_bytes, dtype=torch.int64) + k[2] * (rb[:, 2] + rb[:, 4])
        else:
            in_bytes = torch.where(x_on, k[1] * rb[:, 1], rb[:, 0] + k[2] * rb[:, 2])
        return in_bytes + k[0] * rb[:, 3]

    def _layer_bytes(self, il: int) -> list[int]:
        lw, n_ff = self.weights.layers[il], self.config.n_ff
        gate = lw.gate_proj.nbytes if lw.gate_proj is not None else 0
        col = sum(row_bytes(transposed_qtype(t), n_ff) for t in (lw.gate_proj, lw.up_proj) if t is not None)
        gate_row = lw.gate_proj.row_bytes if lw.gate_proj is not None else 0
        return [gate, col, lw.up_proj.row_bytes, self._copy(il, "down").row_bytes, gate_row]
