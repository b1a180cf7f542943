"""Architecture hyper-parameters, built from GGUF metadata or an HF config.json by formats/."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RopeScaling:
    """RoPE frequency scaling. kind: none | linear | llama3 | yarn (as in GGUF `rope.scaling.*`)."""

    kind: str = "none"
    factor: float = 1.0
    original_context: int = 0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    # Per-frequency divisors of the inverse frequencies (GGUF `rope_freqs.weight`, where llama.cpp's converter
    # bakes llama3 scaling); when set they replace the llama3 formula. Length rope_dim/2.
    freq_factors: tuple[float, ...] | None = None


@dataclass
class ModelConfig:
    arch: str  # "llama" | "qwen2"
    n_vocab: int
    d_model: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_dim: int = 0  # rotary dims per head; 0 means head_dim
    # "norm": rotate adjacent pairs (x[2i], x[2i+1]) - GGUF llama, whose q/k rows llama.cpp's converter permutes;
    # "neox": rotate halves (x[i], x[i+d/2]) - HF layout, qwen2.
    rope_style: str = "norm"
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    context_length: int = 4096  # trained context
    activation: str = "silu"  # silu | relu | gelu (erf, HF "gelu") | gelu_tanh (ggml_gelu, HF "gelu_pytorch_tanh")
    ffn_kind: str = "glu"  # glu: act(gate)*up ; dglu: act(gate)*act(up) (dReLU) ; mlp: act(up)
    tie_embeddings: bool = False
    attn_bias: bool = False  # q/k/v biases (qwen2)
    name: str = ""

    def __post_init__(self):
        if not self.rope_dim:
            self.rope_dim = self.head_dim
