"""Artifacts the sparse backends read, and the checks that keep a stale one from being used (DESIGN,
"Sparsity" / "Artifacts"): each carries the model fingerprint, the calibration text's hash and token count and
a format version, and loading refuses a mismatch with a PowerInferError instead of using it silently.

Thresholds are a small JSON file (a few floats per layer; JSON keeps them readable and diffable, and Python's
float repr round-trips every float32 exactly):

    {"format": "powerinfer.thresholds", "version": 1, "fingerprint": "...", "method": "hu",
     "target_sparsity": 0.5, "values": {"h": [t_0, ..., t_{L-1}]}, "achieved": {"h": [...]},
     "calibration": {"text": "...", "text_sha256": "...", "n_tokens": 8192, "n_ctx": 512}, ...}

Default location: ~/.cache/powerinfer/<fingerprint>/thresholds-<method>-<S>.json (never next to the user's model
file); every API takes an explicit path or cache_dir instead, and no environment variable changes it.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import PowerInferError
from ..formats.artifact import read_json_artifact, write_json_artifact

THRESHOLDS_FORMAT = "powerinfer.thresholds"
THRESHOLDS_VERSION = 1
FINGERPRINT_VERSION = 1
DEFAULT_CACHE_DIR = Path("~/.cache/powerinfer")

# Threshold methods -> the sites they threshold (sparse/threshold.py): "h" = |act(gate)*up| per neuron (down
# rows skipped; TEAL/CATS applied to h, reference/baselines.md section 5), "x" = |x| per FFN input channel
# (gate/up columns skipped; TEAL, arXiv 2408.14690). "teal-hu" is TEAL's full FFN recipe: both inputs.
METHODS: dict[str, tuple[str, ...]] = {"hu": ("h",), "teal": ("x",), "teal-hu": ("x", "h")}
# teal-hu under a PPL bound searches S for the neuron site with the input site at S/2. Measured on SmolLM2
# (16x512 eval tokens, llama-perplexity convention): at 76.6 % of the FFN bytes, x/h = 0.15/0.4 costs +1.2 % PPL,
# 0.2/0.3 +1.5 %, 0.1/0.5 +2.7 %; at 73.3 %, 0.2/0.4 costs +2.0 %; at 69.9 %, 0.2/0.5 +3.7 % and 0.25/0.4 +3.5 %.
TEAL_HU_X_PER_H = 0.5


# -- model fingerprint -------------------------------------------------------------------------------------

# Bytes of each tensor's first row folded into the fingerprint. The header and tensor table alone do not tell
# a fine-tune exported with the same metadata from its base model; the first 256 bytes of every weight do, at
# the cost of reading ~70 KB (SmolLM2: 272 tensors) instead of the whole file.
_SAMPLE_BYTES = 256


def model_fingerprint(loaded) -> str:
    """16 hex digits identifying a model's parameters: sha256 of its header key/values (GGUF metadata, or the HF
    config), its tensor table (name, type, shape of every tensor) and the first bytes of every tensor.

    `loaded` is a formats.loader.LoadedModel. Computed from the parsed file, so GGUF, PowerInfer GGUF and HF
    directories are handled alike and nothing is read twice."""
    h = hashlib.sha256(f"powerinfer-fingerprint-{FINGERPRINT_VERSION}\n".encode())
    h.update(json.dumps(loaded.metadata, sort_keys=True, default=str).encode())
    w = loaded.weights
    tensors = list(w.named_tensors())
    tensors += sorted(loaded.extra_tensors.items())
    from ..formats.pages import release_mapped

    for role, t in tensors:
        h.update(f"\n{role} {t.name} {t.qtype.name} {list(t.shape)}\n".encode())
        head = np.ascontiguousarray(np.asarray(t.data).reshape(-1)[:_SAMPLE_BYTES])  # <= 256 elements
        h.update(head.view(np.uint8)[:_SAMPLE_BYTES].tobytes())
        # one sample maps a whole page-cache folio (large folios: ~0.8 MB a tensor, 228 MB of a 7B's file mapped
        # into the process), which a --ram-budget run must not carry: give the mapping back
        release_mapped(t.data)
    return h.hexdigest()[:16]


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def target_label(target: float | dict[str, float]) -> str:
    """0.5 -> "0.50", 0.225 -> "0.225"; per-site targets {"x": 0.2, "h": 0.4} -> "x0.20-h0.40"."""
    if isinstance(target, dict):
        return "-".join(f"{site}{target_label(t)}" for site, t in target.items())
    return f"{target:.2f}" if float(f"{target:.2f}") == target else f"{target:g}"


def default_thresholds_path(fingerprint: str, method: str, target: float | dict[str, float],
                            cache_dir: str | Path | None = None) -> Path:
    """<cache_dir or ~/.cache/powerinfer>/<fingerprint>/thresholds-<method>-<S>.json (S as target_label)."""
    root = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
    return root / fingerprint / f"thresholds-{method}-{target_label(target)}.json"


# -- thresholds ----------------------------------------------------------------------------------------------

@dataclass
class Thresholds:
    """Per-layer thresholds of one method for one model.

    values[site][layer]: entries with |value| < threshold are zeroed (0 keeps everything).
    achieved[site][layer]: the sparsity those thresholds give on the calibration tokens.
    calibration: {"text": description, "text_sha256", "n_tokens", "n_ctx"} of the text they came from.
    evaluation: perplexity against dense on held-out text: the bound (when S was searched), every probe, the
        chosen point.
    """

    method: str
    target_sparsity: float | dict[str, float]  # one S for every site, or {site: S}
    values: dict[str, list[float]]
    fingerprint: str
    calibration: dict
    achieved: dict[str, list[float]] = field(default_factory=dict)
    evaluation: dict | None = None
    model: dict = field(default_factory=dict)  # informational: file name, architecture, model name

    def __post_init__(self):
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise PowerInferError(f"unknown threshold method {self.method!r} (known: {', '.join(METHODS)})")
        if not isinstance(self.values, dict) or not self.values:
            raise PowerInferError(f"thresholds: `values` must map sites ({', '.join(METHODS[self.method])}) to "
                                  f"per-layer lists, got {type(self.values).__name__}")
        for site, vs in self.values.items():
            if site not in METHODS[self.method]:
                raise PowerInferError(f"thresholds: site {site!r} is not one of method {self.method}'s "
                                      f"({', '.join(METHODS[self.method])})")
            if not isinstance(vs, list) or not all(_is_number(t) for t in vs):
                raise PowerInferError(f"thresholds for {site!r} must be a list of numbers, one per layer")
            if any(not (math.isfinite(t) and t >= 0) for t in vs):
                raise PowerInferError(f"thresholds for {site!r} must be finite and >= 0")
        lengths = {len(v) for v in self.values.values()}
        if len(lengths) > 1:
            raise PowerInferError(f"threshold lists of different lengths {sorted(lengths)}")
        if not isinstance(self.calibration, dict) or not isinstance(self.achieved, dict):
            raise PowerInferError("thresholds: `calibration` and `achieved` must be JSON objects")

    @property
    def n_layer(self) -> int:
        return len(next(iter(self.values.values()), []))

    def for_layer(self, layer: int) -> dict[str, float]:
        if not 0 <= layer < self.n_layer:
            raise PowerInferError(f"the thresholds cover {self.n_layer} layers; the model has layer {layer}")
        return {site: v[layer] for site, v in self.values.items()}

    def to_json(self) -> dict:
        return {"format": THRESHOLDS_FORMAT, "version": THRESHOLDS_VERSION, **asdict(self)}

    def save(self, path: str | Path) -> Path:
        return write_json_artifact(path, self.to_json(), indent=1)


def load_thresholds(path: str | Path, fingerprint: str) -> Thresholds:
    """Read a thresholds artifact made for the model with `fingerprint` (model_fingerprint(loaded)).

    PowerInferError for a missing or malformed file, another format version, or another model."""
    d = read_json_artifact(path, kind="thresholds", fmt=THRESHOLDS_FORMAT, version=THRESHOLDS_VERSION,
                           fingerprint=fingerprint, made="calibrated for model", remake="powerinfer calibrate")
    fields = {k: d[k] for k in ("method", "target_sparsity", "values", "fingerprint", "calibration", "achieved",
                                "evaluation", "model") if k in d}
    try:
        return Thresholds(**fields)
    except TypeError as e:  # a required key missing
        raise PowerInferError(f"{path}: malformed thresholds file ({e})") from None
    except PowerInferError as e:
        raise PowerInferError(f"{path}: malformed thresholds file ({e})") from None


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
