"""The FFN backend registry (STYLE 2, like transformers' `attn_implementation`): backends register under a
name and are built per layer with `make_ffn(name, layer_weights, config, **options)`. This module imports no
backend, so every backend can import it; sparse/ffn.py imports them all, which fills the registry."""
from __future__ import annotations

from typing import Callable

from torch import nn

from ..core.config import ModelConfig
from ..core.weights import LayerWeights
from ..model.ffn import DenseFFN

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


def ffn_factory(name: str, **options) -> Callable[..., nn.Module]:
    """The `ffn=` factory for model.llama.Transformer that builds backend `name` with `options` in every layer."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown FFN backend {name!r} (available: {', '.join(ffn_names())})")
    return lambda lw, cfg, **kw: make_ffn(name, lw, cfg, **kw, **options)


register_ffn("dense")(DenseFFN)
