"""FFN backends chosen by name (STYLE 2, like transformers' `attn_implementation`).

The transformer block only calls `self.ffn(x)`. A backend is an nn.Module built from one layer's weights:
`make_ffn("dense", layer_weights, config)`. Sparse backends (relu, threshold, predictor, hybrid) register
themselves here under their own names and are tested against "dense".
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import ModelConfig
from ..core.weights import LayerWeights

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_ffn(name: str):
    """Class decorator: make the backend available to `make_ffn(name, ...)`."""

    def decorate(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"FFN backend {name!r} is already registered")
        _REGISTRY[name] = cls
        return cls

    return decorate


def ffn_names() -> list[str]:
    return sorted(_REGISTRY)


def make_ffn(name: str, layer_weights: LayerWeights, config: ModelConfig, **options) -> nn.Module:
    """Build backend `name` for one layer. `options` (dtype, layer index, thresholds, ...) go to its constructor."""
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown FFN backend {name!r} (available: {', '.join(ffn_names())})") from None
    return cls(layer_weights, config, **options)


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name == "silu":
        return F.silu
    if name == "relu":
        return F.relu
    if name == "gelu":  # erf form (HF "gelu")
        return F.gelu
    if name == "gelu_tanh":  # tanh approximation (ggml_gelu, HF "gelu_pytorch_tanh")
        return lambda x: F.gelu(x, approximate="tanh")
    raise ValueError(f"unknown activation {name!r}")


def ffn_hidden(kind: str, act, x: torch.Tensor, gate_proj: torch.Tensor | None, up_proj: torch.Tensor) -> torch.Tensor:
    """The FFN's hidden activations: act(gate x) * up x (glu), act(gate x) * act(up x) (dglu: dReLU, Bamboo),
    act(up x) (mlp). Every torch backend computes h with this, in this order, so they agree bit for bit."""
    u = F.linear(x, up_proj)
    if kind == "mlp":
        return act(u)
    g = F.linear(x, gate_proj)
    return act(g) * act(u) if kind == "dglu" else act(g) * u


@register_ffn("dense")
class DenseFFN(nn.Module):
    """Every neuron, every token: down(act(gate(x)) * up(x)) for glu, act(gate)*act(up) for dglu
    (dReLU, Bamboo), down(act(up(x))) for mlp."""

    def __init__(self, lw: LayerWeights, config: ModelConfig, dtype=torch.float32, layer: int = 0):
        super().__init__()
        self.kind = config.ffn_kind
        self.act = activation_fn(config.activation)
        self.register_buffer("gate_proj", lw.gate_proj.dequantize().to(dtype) if lw.gate_proj is not None else None)
        self.register_buffer("up_proj", lw.up_proj.dequantize().to(dtype))
        self.register_buffer("down_proj", lw.down_proj.dequantize().to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(ffn_hidden(self.kind, self.act, x, self.gate_proj, self.up_proj), self.down_proj)


# Sparse backends register themselves on import; imported last because they use the helpers above.
from . import relu, threshold  # noqa: E402,F401
from .predictor import _register_backend  # noqa: E402

PredictorFFN = _register_backend()
