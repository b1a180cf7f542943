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
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ModelFormatError, PowerInferError

PREDICTORS_FORMAT = "powerinfer.predictors"
PREDICTORS_VERSION = 1
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


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
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[0] < 1:
                raise PowerInferError(f"predictor {i}: fc1 {list(a.shape)} and fc2 {list(b.shape)} do not chain "
                                      "(expected fc1 [r, d], fc2 [n_ff, r], r >= 1)")
        if not math.isfinite(self.threshold):
            raise PowerInferError(f"predictor logit threshold {self.threshold} is not finite")
        if self.thresholds is not None:
            if len(self.thresholds) != len(self.fc1) or not all(math.isfinite(t) for t in self.thresholds):
                raise PowerInferError(f"{len(self.thresholds)} per-layer predictor thresholds for {len(self.fc1)} "
                                      "layers (expected one finite number per layer)")

    def check(self, config, source: str = "predictors") -> "PredictorSet":
        """Refuse predictors that do not fit `config` (a ModelConfig) before anything reads them: the C decoder
        takes fc1 as [r, d_model] and fc2 as [n_ff, r] on trust, so a wrong shape would be read out of bounds.
        Non-finite weights are refused too (they would silently predict nothing or everything)."""
        if self.n_layer != config.n_layer:
            raise PowerInferError(f"{source}: {self.n_layer} predictor layers for a {config.n_layer}-layer model")
        for i, (a, b) in enumerate(zip(self.fc1, self.fc2)):
            r = a.shape[0]
            for name, t, want in (("fc1", a, [r, config.d_model]), ("fc2", b, [config.n_ff, r])):
                if list(t.shape) != want:
                    raise PowerInferError(f"{source}: layer {i} {name} has shape {list(t.shape)}, expected {want} "
                                          f"(d_model {config.d_model}, n_ff {config.n_ff}, rank {r})")
                if not torch.isfinite(t).all():
                    raise PowerInferError(f"{source}: layer {i} {name} holds NaN or infinite values")
        return self

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

        from ..core.files import atomic_path

        path = Path(path).expanduser()
        tensors = {}
        for i, (a, b) in enumerate(zip(self.fc1, self.fc2)):
            tensors[f"layers.{i}.fc1.weight"] = a.detach().contiguous()
            tensors[f"layers.{i}.fc2.weight"] = b.detach().contiguous()
        header = {"format": PREDICTORS_FORMAT, "version": PREDICTORS_VERSION, "threshold": self.threshold,
                  "thresholds": self.thresholds, "meta": self.meta}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"powerinfer": json.dumps(header)})
        return path

    @classmethod
    def from_upstream_dir(cls, path: str | Path, config=None) -> "PredictorSet":
        """An upstream predictor directory: model_0.pt .. model_{L-1}.pt (state dicts with fc1.weight [r, d] and
        fc2.weight [n_ff, r]) and an optional config.json with sparse_threshold. Tensors only: weights_only=True.
        With `config` (a ModelConfig), refuse predictors that do not fit that model (`check`)."""
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
        if config is not None and len(files) != config.n_layer:
            raise PowerInferError(f"{path}: {len(files)} predictor files for a {config.n_layer}-layer model")
        fc1, fc2 = [], []
        for i in range(len(files)):  # by layer number, never by file-name order
            try:
                sd = torch.load(files[i], map_location="cpu", weights_only=True)
            except Exception as e:  # a pickle with code in it, a truncated or foreign file
                raise PowerInferError(f"{files[i]}: not a tensor-only state dict ({e.__class__.__name__})") from None
            if not isinstance(sd, dict):
                raise PowerInferError(f"{files[i]}: not a state dict ({type(sd).__name__})")
            for key, out in (("fc1.weight", fc1), ("fc2.weight", fc2)):
                t = sd.get(key)
                if not isinstance(t, torch.Tensor) or not (t.is_floating_point() or t.dtype in _INT_DTYPES):
                    raise PowerInferError(f"{files[i]}: no {key} tensor of numbers in the state dict")
                out.append(t.float())
        threshold = 0.0
        cfg_path = path / "config.json"
        if cfg_path.exists():
            threshold = _upstream_threshold(cfg_path)
        ps = cls(fc1, fc2, threshold, {"source": f"{path} (upstream predictor directory)"})
        return ps.check(config, str(path)) if config is not None else ps

    @classmethod
    def load(cls, path: str | Path, fingerprint: str | None = None, config=None) -> "PredictorSet":
        """Read a file written by `save`. With `fingerprint`, refuse predictors trained for another model; with
        `config` (a ModelConfig), refuse predictors whose shapes do not fit it (`check`)."""
        from safetensors import SafetensorError, safe_open

        path = Path(path).expanduser()
        if not path.is_file():
            raise PowerInferError(f"{path}: no such predictor file")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = json.loads((f.metadata() or {}).get("powerinfer", "{}"))
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, ValueError, OSError, RuntimeError) as e:  # ValueError: JSONDecodeError too
            raise PowerInferError(f"{path}: not a predictor file ({' '.join(str(e).split())})") from None
        except RecursionError:
            raise PowerInferError(f"{path}: not a predictor file (metadata nested too deeply)") from None
        if not isinstance(header, dict):
            raise PowerInferError(f"{path}: not a predictor file (metadata is {type(header).__name__})")
        if header.get("format") != PREDICTORS_FORMAT:
            raise PowerInferError(f"{path}: not a predictor file (format {header.get('format')!r})")
        if header.get("version") != PREDICTORS_VERSION:
            raise PowerInferError(f"{path}: predictor format version {header.get('version')!r}; this powerinfer "
                                  f"reads version {PREDICTORS_VERSION} (retrain with `powerinfer train-predictors`)")
        meta = header.get("meta") or {}
        if not isinstance(meta, dict):
            raise PowerInferError(f"{path}: not a predictor file (meta is {type(meta).__name__})")
        if fingerprint is not None and meta.get("fingerprint") != fingerprint:
            raise PowerInferError(f"{path}: trained for model {meta.get('fingerprint')}, but this model is "
                                  f"{fingerprint} (retrain with `powerinfer train-predictors -m MODEL`)")
        n = len([k for k in tensors if k.endswith(".fc1.weight")])
        try:
            fc1 = [tensors[f"layers.{i}.fc1.weight"].float() for i in range(n)]
            fc2 = [tensors[f"layers.{i}.fc2.weight"].float() for i in range(n)]
        except KeyError as e:
            raise PowerInferError(f"{path}: predictor tensor {e} is missing") from None
        threshold, thresholds = header.get("threshold", 0.0), header.get("thresholds")
        if not _is_number(threshold) or not (thresholds is None or isinstance(thresholds, list)
                                             and all(_is_number(t) for t in thresholds)):
            raise PowerInferError(f"{path}: threshold/thresholds must be numbers")
        try:
            ps = cls(fc1, fc2, float(threshold), meta, None if thresholds is None else [float(t) for t in thresholds])
        except PowerInferError as e:
            raise PowerInferError(f"{path}: {e}") from None
        return ps.check(config, str(path)) if config is not None else ps


def predictors_from_gguf(loaded) -> PredictorSet | None:
    """The predictors a PowerInfer GGUF carries (`blk.N.fc1.weight` [r, d], `blk.N.fc2.weight` [n_ff, r], the
    logit threshold `powerinfer.sparse_threshold`, default 0), or None when the file has none. Checked against
    the model (`PredictorSet.check`): ModelFormatError names the tensor and the shape expected."""
    extra = loaded.extra_tensors
    cfg = loaded.config
    n = cfg.n_layer
    if not loaded.has_predictors:
        return None
    fc1, fc2 = [], []
    for i in range(n):
        try:
            a, b = extra[f"blk.{i}.fc1.weight"], extra[f"blk.{i}.fc2.weight"]
        except KeyError as e:
            raise ModelFormatError(f"{loaded.path}: predictor tensor {e} is missing (layer {i} of {n})") from None
        r = a.shape[0] if len(a.shape) == 2 else 0
        for t, want in ((a, (r, cfg.d_model)), (b, (cfg.n_ff, r))):
            if len(t.shape) != 2 or tuple(t.shape) != want or r < 1:
                raise ModelFormatError(f"{loaded.path}: tensor {t.name} has shape {list(t.shape)}, expected "
                                       f"{list(want) if r else '[r, d_model]'} (d_model {cfg.d_model}, n_ff "
                                       f"{cfg.n_ff})")
        fc1.append(a.dequantize().float().reshape(a.shape))
        fc2.append(b.dequantize().float().reshape(b.shape))
    md = loaded.metadata
    threshold = md.get("powerinfer.sparse_threshold", 0.0)
    per_layer = md.get("powerinfer.sparse_thresholds")  # ours: per-layer logit thresholds
    if not _is_number(threshold) or not (per_layer is None or isinstance(per_layer, list)
                                         and all(_is_number(t) for t in per_layer)):
        raise ModelFormatError(f"{loaded.path}: powerinfer.sparse_threshold(s) must be numbers")
    try:
        ps = PredictorSet(fc1, fc2, float(threshold), {"source": f"{loaded.path.name} (PowerInfer GGUF)"},
                          [float(t) for t in per_layer] if per_layer is not None else None)
        return ps.check(cfg, str(loaded.path))
    except PowerInferError as e:
        raise ModelFormatError(f"{loaded.path}: {e}" if str(loaded.path) not in str(e) else str(e)) from None


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _upstream_threshold(path: Path) -> float:
    """sparse_threshold of an upstream predictor directory's config.json (0 when absent)."""
    from ..formats.artifact import MAX_JSON_BYTES

    try:
        if not path.is_file() or path.stat().st_size > MAX_JSON_BYTES:
            raise ValueError("not a small regular file")
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, OSError, RecursionError) as e:
        raise PowerInferError(f"{path}: not a predictor config.json ({' '.join(str(e).split())[:200]})") from None
    value = doc.get("sparse_threshold", 0.0) if isinstance(doc, dict) else None
    if not _is_number(value) or not math.isfinite(value):
        raise PowerInferError(f"{path}: sparse_threshold must be a finite number, got {value!r}")
    return float(value)
