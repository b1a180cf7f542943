"""Activation predictors (PowerInfer format): per layer logits = fc2 · relu(fc1 · x), no biases; neuron i is
predicted active iff logit_i >= threshold (default 0, i.e. sigmoid >= 0.5). x is the residual stream after
attention, before the FFN norm (the layer input for Falcon-style parallel blocks). Reference:
reference/powerinfer.md section 4.

`PredictorSet` is the in-memory form every producer and consumer shares: the trainer (prepare/), the
upstream predictor-directory importer, PowerInfer GGUF files (`blk.N.fc1` / `blk.N.fc2`), `powerinfer convert`
and the `predictor` FFN backend.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import PowerInferError

PREDICTORS_FORMAT = "powerinfer.predictors"
PREDICTORS_VERSION = 1


@dataclass
class PredictorSet:
    fc1: list[torch.Tensor]  # per layer [r_i, d] float32 (ranks may differ per layer)
    fc2: list[torch.Tensor]  # per layer [n_ff, r_i] float32
    threshold: float = 0.0   # logit threshold (PowerInfer GGUF: powerinfer.sparse_threshold)
    meta: dict = field(default_factory=dict)  # fingerprint, calibration text hash, training report, ...
    thresholds: list[float] | None = None  # per-layer logit thresholds (ours); None = `threshold` everywhere

    def threshold_of(self, layer: int) -> float:
        return self.thresholds[layer] if self.thresholds is not None else self.threshold

    def __post_init__(self):
        if len(self.fc1) != len(self.fc2):
            raise PowerInferError(f"{len(self.fc1)} fc1 but {len(self.fc2)} fc2 predictor matrices")
        for i, (a, b) in enumerate(zip(self.fc1, self.fc2)):
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                raise PowerInferError(f"predictor {i}: fc1 {tuple(a.shape)} and fc2 {tuple(b.shape)} do not chain "
                                      "(expected fc1 [r, d], fc2 [n_ff, r])")

    @property
    def n_layer(self) -> int:
        return len(self.fc1)

    def ranks(self) -> list[int]:
        return [int(a.shape[0]) for a in self.fc1]

    def n_params(self) -> int:
        return sum(a.numel() + b.numel() for a, b in zip(self.fc1, self.fc2))

    def logits(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """[T, d] -> [T, n_ff] raw logits of layer `layer`."""
        fc1, fc2 = self.fc1[layer], self.fc2[layer]
        return torch.relu(x.to(fc1.dtype) @ fc1.T) @ fc2.T

    def predict(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """[T, d] -> bool [T, n_ff]: the neurons predicted active."""
        return self.logits(layer, x) >= self.threshold_of(layer)

    def save(self, path: str | Path) -> Path:
        """One safetensors file: tensors `layers.N.fc1.weight` / `layers.N.fc2.weight`, the rest as JSON metadata."""
        from safetensors.torch import save_file

        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for i, (a, b) in enumerate(zip(self.fc1, self.fc2)):
            tensors[f"layers.{i}.fc1.weight"] = a.detach().contiguous()
            tensors[f"layers.{i}.fc2.weight"] = b.detach().contiguous()
        header = {"format": PREDICTORS_FORMAT, "version": PREDICTORS_VERSION, "threshold": self.threshold,
                  "thresholds": self.thresholds, "meta": self.meta}
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"powerinfer": json.dumps(header)})
        tmp.replace(path)
        return path

    @classmethod
    def from_upstream_dir(cls, path: str | Path) -> "PredictorSet":
        """An upstream predictor directory: model_0.pt .. model_{L-1}.pt (state dicts with fc1.weight [r, d] and
        fc2.weight [n_ff, r]) and an optional config.json with sparse_threshold. Tensors only: weights_only=True."""
        path = Path(path).expanduser()
        files = {}
        for p in path.glob("model_*.pt"):
            stem = p.stem[len("model_"):]
            if stem.isdigit():
                files[int(stem)] = p
        if not files:
            raise PowerInferError(f"{path}: no model_N.pt predictor files")
        if sorted(files) != list(range(len(files))):
            raise PowerInferError(f"{path}: predictor files are not model_0.pt .. model_{len(files) - 1}.pt")
        fc1, fc2 = [], []
        for i in range(len(files)):  # by layer number, never by file-name order
            try:
                sd = torch.load(files[i], map_location="cpu", weights_only=True)
                fc1.append(sd["fc1.weight"].float())
                fc2.append(sd["fc2.weight"].float())
            except KeyError as e:
                raise PowerInferError(f"{files[i]}: no {e} in the state dict") from None
            except Exception as e:
                raise PowerInferError(f"{files[i]}: not a tensor-only state dict ({e.__class__.__name__})") from None
        threshold = 0.0
        if (path / "config.json").is_file():
            threshold = float(json.loads((path / "config.json").read_text()).get("sparse_threshold", 0.0))
        return cls(fc1, fc2, threshold, {"source": f"{path} (upstream predictor directory)"})

    @classmethod
    def load(cls, path: str | Path, fingerprint: str | None = None) -> "PredictorSet":
        """Read a file written by `save`. With `fingerprint`, refuse predictors trained for another model."""
        from safetensors import SafetensorError, safe_open

        path = Path(path).expanduser()
        if not path.is_file():
            raise PowerInferError(f"{path}: no such predictor file")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = json.loads((f.metadata() or {}).get("powerinfer", "{}"))
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, json.JSONDecodeError, OSError) as e:
            raise PowerInferError(f"{path}: not a predictor file ({e})") from None
        if header.get("format") != PREDICTORS_FORMAT:
            raise PowerInferError(f"{path}: not a predictor file (format {header.get('format')!r})")
        if header.get("version") != PREDICTORS_VERSION:
            raise PowerInferError(f"{path}: predictor format version {header.get('version')!r}; this powerinfer "
                                  f"reads version {PREDICTORS_VERSION} (retrain with `powerinfer train-predictors`)")
        meta = header.get("meta") or {}
        if fingerprint is not None and meta.get("fingerprint") != fingerprint:
            raise PowerInferError(f"{path}: trained for model {meta.get('fingerprint')}, but this model is "
                                  f"{fingerprint} (retrain with `powerinfer train-predictors -m MODEL`)")
        n = len([k for k in tensors if k.endswith(".fc1.weight")])
        try:
            fc1 = [tensors[f"layers.{i}.fc1.weight"].float() for i in range(n)]
            fc2 = [tensors[f"layers.{i}.fc2.weight"].float() for i in range(n)]
        except KeyError as e:
            raise PowerInferError(f"{path}: predictor tensor {e} is missing") from None
        return cls(fc1, fc2, float(header.get("threshold", 0.0)), meta, header.get("thresholds"))


def predictors_from_gguf(loaded) -> PredictorSet | None:
    """The predictors a PowerInfer GGUF carries (`blk.N.fc1.weight` [r, d], `blk.N.fc2.weight` [n_ff, r], the
    logit threshold `powerinfer.sparse_threshold`, default 0), or None when the file has none."""
    extra = loaded.extra_tensors
    n = loaded.config.n_layer
    if "blk.0.fc1.weight" not in extra:
        return None
    fc1, fc2 = [], []
    for i in range(n):
        try:
            a, b = extra[f"blk.{i}.fc1.weight"], extra[f"blk.{i}.fc2.weight"]
        except KeyError as e:
            raise PowerInferError(f"{loaded.path}: predictor tensor {e} is missing (layer {i} of {n})") from None
        fc1.append(a.dequantize().float().reshape(a.shape))
        fc2.append(b.dequantize().float().reshape(b.shape))
    threshold = float(loaded.metadata.get("powerinfer.sparse_threshold", 0.0))
    per_layer = loaded.metadata.get("powerinfer.sparse_thresholds")  # ours: per-layer logit thresholds
    return PredictorSet(fc1, fc2, threshold, {"source": f"{loaded.path.name} (PowerInfer GGUF)"},
                        [float(t) for t in per_layer] if per_layer is not None else None)
