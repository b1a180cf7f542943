"""`SparseFFN`: the neuron-sparse FFN of a bound `_C.Decoder` (which neurons and input channels a decode step
reads, the neuron-major copies it reads them from, and the bytes that costs). numpy only, like the decoder's
binding, so an exact-ReLU model decodes sparse without importing torch (#17)."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import _C
from ..core.sparse_spec import SparseSpec
from ..core.tensor import QTensor, row_bytes
from ..errors import PowerInferError
from .arrays import PANEL_SOURCES, _weight, address, panels, transposed, transposed_qtype


class Kept(NamedTuple):
    """Per-layer counts of one decode step (int arrays [n_layer]); the C decoder writes them in this order."""

    neurons: np.ndarray  # FFN neurons kept: down_t rows read
    inputs: np.ndarray  # FFN input channels kept (the x site)
    up_rows: np.ndarray  # up rows read (differs from neurons for dReLU and for predictors' candidates)
    gate_rows: np.ndarray  # gate rows read one by one (predictor or tier candidates; 0 when the gate ran dense)


class KeptCounts:
    """The decoder's Kept counts of its last decode step, read into one buffer whose address is taken once (a decode
    step reads them: numpy's .ctypes.data costs about 1 us a call)."""

    def __init__(self, dec: "_C.Decoder", n_layer: int):
        self.dec = dec
        self.buf = np.zeros((len(Kept._fields), n_layer), dtype=np.int32)
        self._addr = address(self.buf)

    def read(self) -> Kept:
        """Views of the buffer, which the next read overwrites."""
        self.dec.kept(self._addr)
        return Kept(*self.buf)


class RowBytes(NamedTuple):
    """Per-layer byte sizes of the pieces a sparse FFN reads (int64 arrays [n_layer])."""

    dense_gate: np.ndarray  # the whole gate matrix (read when the gate is the oracle)
    input_column: np.ndarray  # one input channel of the input-major gate and up copies (x site)
    up_row: np.ndarray
    down_row: np.ndarray  # one neuron of down_t
    gate_row: np.ndarray  # one gate row (predictors' candidates)


class SparseFFN:
    """The neuron-sparse FFN of a bound Decoder (decode steps, and prompts of up to 8 tokens), driven by a
    `SparseSpec`: per layer a neuron-major down_t (the model's own `down_t` when the file has one, else a
    transposed copy) and the spec's thresholds (h = x = 0 skips only exact zeros, the exact ReLU path).
    Input-major gate/up copies are made only for layers with x > 0. Copies are cached, so changing specs is
    cheap; `off()` returns the decoder to the dense FFN."""

    def __init__(self, dec: "_C.Decoder", config, weights, gathers: bool = False, use_panels: bool = False):
        # gathers: the decoder reads every FFN row by gathers over candidates (an FFN-only tier decoder)
        # use_panels: a Q4_0/Q4_1/Q8_0 down without its own down_t is read as neuron panels (ops.PanelTensor: the
        # same bytes regrouped) instead of a requantized Q8_0 transpose (1.9x a Q4_0 down's bytes). The tiers
        # that slice or page down_t by rows (hybrid, disk) keep the row copy.
        self.dec, self.config, self.weights, self._gathers = dec, config, weights, gathers
        self._panels = use_panels
        self._copies: dict[tuple[int, str], QTensor] = {}
        self.spec: SparseSpec | None = None
        self._pred_keep: list[np.ndarray] = []  # the f16 predictor matrices the decoder reads
        self._pred_bytes = np.zeros(config.n_layer, dtype=np.int64)
        self._row_bytes: RowBytes | None = None
        self._kept = KeptCounts(dec, config.n_layer)

    def _copy(self, il: int, role: str) -> QTensor:
        key = (il, role)
        if key not in self._copies:
            lw = self.weights.layers[il]
            own = lw.down_t if role == "down" else None
            src = {"down": lw.down_proj, "gate": lw.gate_proj, "up": lw.up_proj}[role]
            if own is None and role == "down" and self._panels and src.qtype in PANEL_SOURCES and \
                    src.rows % 32 == 0 and src.cols % 32 == 0:
                own = panels(src, f"blk.{il}.down_t")
            self._copies[key] = own if own is not None else transposed(src, f"blk.{il}.{role}_t")
        return self._copies[key]

    @staticmethod
    def _mat(t: QTensor | None):
        if t is None:
            return None
        data, addr, qtype = _weight(t)
        return (addr, qtype)

    def on(self, spec: SparseSpec) -> None:
        """Bind `spec`'s thresholds and predictors (their fc1/fc2 are bound as f16)."""
        spec.check(self.config.n_layer)
        self.bind_predictors(spec.predictors)
        for il, th in enumerate(spec.layers):
            lw = self.weights.layers[il]
            gate_t = self._copy(il, "gate") if th.x > 0 and lw.gate_proj is not None else None
            up_t = self._copy(il, "up") if th.x > 0 else None
            self.dec.set_sparse(il, self._mat(self._copy(il, "down")), self._mat(gate_t), self._mat(up_t), th.h, th.x)
        self.spec = spec

    def bind_predictors(self, predictors) -> None:
        """Bind a PredictorSet's fc1/fc2 as f16 on every layer (None: no predictors)."""
        n = self.config.n_layer
        self._pred_keep = []
        self._pred_bytes[:] = 0
        for il in range(n):
            if predictors is None:
                self.dec.set_predictor(il, None, None, 1, 0.0)
                continue
            fc1, fc2 = (_f16_matrix(t) for t in (predictors.fc1[il], predictors.fc2[il]))
            r = fc1.shape[0] if fc1.ndim == 2 else 0
            if r < 1 or list(fc1.shape) != [r, self.config.d_model] or list(fc2.shape) != [self.config.n_ff, r]:
                # The C decoder reads [r, d_model] and [n_ff, r] from these pointers on trust: never hand it less.
                raise PowerInferError(f"predictor layer {il}: fc1 {list(fc1.shape)} / fc2 {list(fc2.shape)} do not "
                                      f"fit this model (expected [r, {self.config.d_model}] / "
                                      f"[{self.config.n_ff}, r])")
            self._pred_keep += [fc1, fc2]
            self._pred_bytes[il] = (fc1.size + fc2.size) * 2
            self.dec.set_predictor(il, (fc1.ctypes.data, 1), (fc2.ctypes.data, 1), fc1.shape[0],
                                   float(predictors.threshold_of(il)))

    def off(self) -> None:
        for il in range(self.config.n_layer):
            self.dec.set_sparse(il, None, None, None, 0.0, 0.0)
            self.dec.set_predictor(il, None, None, 1, 0.0)
        self.spec = None

    @property
    def gathers(self) -> bool:
        return self._gathers or (self.spec is not None and self.spec.predictors is not None)

    def kept(self) -> Kept:
        """Counts of the last decode step (views of a buffer the next call overwrites)."""
        return self._kept.read()

    def bytes_per_layer(self, kept: Kept) -> np.ndarray:
        """FFN weight bytes each layer read in a step with these `kept` counts (int64 [n_layer]; mean counts are
        truncated to whole rows)."""
        if self._row_bytes is None:
            per_layer = [self._layer_bytes(il) for il in range(self.config.n_layer)]
            self._row_bytes = RowBytes(*np.array(per_layer, dtype=np.int64).T)
        rb = self._row_bytes
        neurons, inputs, up_rows, gate_rows = (np.asarray(k).astype(np.int64) for k in kept)
        if self.gathers:  # predictor or tier candidates: their gate rows, then up rows
            in_bytes = self._pred_bytes + gate_rows * rb.gate_row + up_rows * rb.up_row
        else:
            x_on = np.array([t > 0 for t in self.spec.site("x")] if self.spec else [False] * self.config.n_layer)
            in_bytes = np.where(x_on, inputs * rb.input_column, rb.dense_gate + up_rows * rb.up_row)
        return in_bytes + neurons * rb.down_row

    def _layer_bytes(self, il: int) -> list[int]:
        lw, n_ff = self.weights.layers[il], self.config.n_ff
        gate = lw.gate_proj.nbytes if lw.gate_proj is not None else 0
        col = sum(row_bytes(transposed_qtype(t), n_ff) for t in (lw.gate_proj, lw.up_proj) if t is not None)
        gate_row = lw.gate_proj.row_bytes if lw.gate_proj is not None else 0
        return [gate, col, lw.up_proj.row_bytes, self._copy(il, "down").row_bytes, gate_row]


def _f16_matrix(t) -> np.ndarray:
    """A predictor matrix (a torch tensor or an array) as C-contiguous float16, what the decoder reads."""
    if hasattr(t, "detach"):  # torch: rounded to f16 by torch, whatever its dtype (bf16 has no numpy twin)
        return np.ascontiguousarray(t.detach().half().cpu().numpy())
    return np.ascontiguousarray(t, dtype=np.float16)
