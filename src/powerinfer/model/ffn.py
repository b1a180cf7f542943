"""The FFN as pure math: the dense feed-forward every backend is tested against, and the pieces the sparse
backends (sparse/) share with it, so they compute h operation for operation as it does.

  glu   down(act(gate x) * up x)         SwiGLU / GeGLU / ReGLU
  dglu  down(act(gate x) * act(up x))    dReLU (ProSparse, Bamboo)
  mlp   down(act(up x))                  ReLU / GELU MLPs (OPT, Falcon)
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import ModelConfig
from ..core.tensor import QTensor
from ..core.weights import LayerWeights


def dense(t: QTensor | None, dtype=torch.float32) -> torch.Tensor | None:
    """A weight as a dense torch tensor of `dtype`, owning its memory (not a view of the read-only file map)."""
    if t is None:
        return None
    with warnings.catch_warnings():
        # QTensor.dequantize wraps F32 memmaps without copying; torch warns they are read-only. We copy next.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        w = t.dequantize()
    return w.to(dtype=dtype, copy=True)


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


def ffn_hidden(kind: str, act, x: torch.Tensor, gate_proj: torch.Tensor | None, up_proj: torch.Tensor,
               up_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The FFN's hidden activations h for `kind` (table above). Every torch backend computes h with this, in this
    order, so they agree bit for bit. up_bias: falcon/opt MLPs' fc1 bias."""
    u = F.linear(x, up_proj, up_bias)
    if kind == "mlp":
        return act(u)
    g = F.linear(x, gate_proj)
    return act(g) * act(u) if kind == "dglu" else act(g) * u


class FFNWeights(nn.Module):
    """One layer's FFN matrices as dense tensors of `dtype` (gate_proj is None for an mlp FFN), its kind and its
    activation: the base of the dense FFN and of every torch sparse backend."""

    def __init__(self, lw: LayerWeights, config: ModelConfig, dtype=torch.float32, layer: int = 0):
        super().__init__()
        self.kind, self.layer = config.ffn_kind, layer
        self.act = activation_fn(config.activation)
        self.register_buffer("gate_proj", dense(lw.gate_proj if self.kind != "mlp" else None, dtype))
        self.register_buffer("up_proj", dense(lw.up_proj, dtype))
        self.register_buffer("down_proj", dense(lw.down_proj, dtype))
        self.register_buffer("up_bias", dense(lw.up_bias, dtype))  # falcon/opt biases, None elsewhere
        self.register_buffer("down_bias", dense(lw.down_bias, dtype))


class DenseFFN(FFNWeights):
    """Every neuron, every token."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(ffn_hidden(self.kind, self.act, x, self.gate_proj, self.up_proj, self.up_bias), self.down_proj,
                        self.down_bias)
