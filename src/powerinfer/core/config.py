"""Architecture hyper-parameters, built from GGUF metadata or an HF config.json by formats/."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from ..errors import ModelFormatError

# Bounds no released model comes near (Llama-3.1-405B: 126 layers, width 16384, FFN 53248, 128 heads, 128k context;
# vocabularies up to ~256k), far below what would overflow the C decoder's int arithmetic.
MAX_LAYERS = 4096
MAX_WIDTH = 1 << 20
MAX_HEADS = 4096
MAX_HEAD_DIM = 512  # the C decoder's PI_MAX_HEAD_DIM (kernels/csrc/decoder.h)
MAX_VOCAB = 1 << 24
MAX_CONTEXT = 1 << 24


@dataclass
class RopeScaling:
    """RoPE frequency scaling. kind: none | linear | llama3 | yarn (as in GGUF `rope.scaling.*`) | longrope
    (Phi-3's LongRoPE / SuScaled: GGUF `rope_factors_long` / `rope_factors_short`)."""

    kind: str = "none"
    factor: float = 1.0
    original_context: int = 0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    # Per-frequency divisors of the inverse frequencies (GGUF `rope_freqs.weight`, where llama.cpp's converter
    # bakes llama3 scaling); when set they replace the llama3 formula. Length rope_dim/2.
    freq_factors: tuple[float, ...] | None = None
    # longrope: per-frequency divisors for a context past original_context (long) or within it (short); llama.cpp
    # picks one set for the whole context by its size (llama_model::get_rope_factors), as does transformers by the
    # sequence length. Length rope_dim/2 each.
    long_factors: tuple[float, ...] | None = None
    short_factors: tuple[float, ...] | None = None
    # cos/sin magnitude (GGUF rope.scaling.attn_factor; llama.cpp multiplies its yarn_attn_factor by it): LongRoPE's
    # sqrt(1 + ln(context / original) / ln(original))
    attn_factor: float = 1.0


@dataclass
class ModelConfig:
    arch: str  # "llama" | "qwen2" | "qwen3" | "falcon" | "opt" | "phi3"
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
    qk_norm: bool = False  # RMSNorm over each q and k head before RoPE (qwen3)
    norm: str = "rms"  # rms: x / rms(x) * w ; layer: LayerNorm (x - mean) / std * w + b (falcon, opt)
    # x + attn(norm(x)) + ffn(norm'(x)): attention and FFN read the same layer input (falcon)
    parallel_residual: bool = False
    # rope: rotary q/k; learned: a [n_pos, d] table added to the token embeddings, no RoPE (opt)
    positions: str = "rope"
    # Gemma 2/3 (llama.cpp's build_gemma2_iswa / build_gemma3): the embeddings times embed_scale (sqrt(d_model)); q
    # times attn_scale before attention (query_pre_attn_scalar^-0.5; 0: 1/sqrt(head_dim)); attention scores and
    # final logits soft-capped to c*tanh(s/c) (0: off); RMSNorms of the attention and FFN outputs (post_norms);
    # local layers (is_local) attend to the last sliding_window positions and rotate with rope_local_theta
    # (gemma3: 10000, unscaled; 0: the global tables)
    embed_scale: float = 1.0
    attn_scale: float = 0.0
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    post_norms: bool = False
    sliding_window: int = 0
    swa_pattern: int = 0  # llama.cpp's set_swa_pattern: layer i is local iff i % swa_pattern < swa_pattern - 1
    rope_local_theta: float = 0.0
    name: str = ""

    def __post_init__(self):
        if not self.rope_dim:
            self.rope_dim = self.head_dim

    def local_rope(self) -> "ModelConfig | None":
        """The config whose RoPE tables the local layers read (gemma3: base rope_local_theta, no scaling), or None
        when they read the global ones."""
        if not self.rope_local_theta or not self.sliding_window:
            return None
        return replace(self, rope_theta=self.rope_local_theta, rope_scaling=RopeScaling(), rope_local_theta=0.0)

    def is_local(self, layer: int) -> bool:
        """Whether `layer` is a sliding-window layer (gemma2: every other one from 0; gemma3: 5 of every 6)."""
        p = self.swa_pattern
        return self.sliding_window > 0 and p > 0 and layer % p < p - 1

    @property
    def trained_context(self) -> int:
        """The context the model was trained to handle: context_length, or for linear/YaRN RoPE scaling the
        original context times the factor when the file states the pre-scaling context (as HF configs of YaRN
        models do); llama3 scaling's files already state the extended one."""
        rs = self.rope_scaling
        if rs.kind in ("linear", "yarn") and rs.factor > 1:
            return max(self.context_length, int((rs.original_context or self.context_length) * rs.factor))
        return self.context_length

    def check(self, source: str) -> "ModelConfig":
        """Refuse hyper-parameters no model has before anything sizes a buffer from them (a hostile header's
        n_head = 0, head_dim = 10^6, context = 2^40, NaN epsilon): ModelFormatError naming the field."""
        ints = dict(n_vocab=(1, MAX_VOCAB), d_model=(1, MAX_WIDTH), n_layer=(1, MAX_LAYERS), n_head=(1, MAX_HEADS),
                    n_head_kv=(1, MAX_HEADS), head_dim=(1, MAX_HEAD_DIM), n_ff=(1, MAX_WIDTH),
                    rope_dim=(0, MAX_HEAD_DIM), context_length=(1, MAX_CONTEXT), sliding_window=(0, MAX_CONTEXT),
                    swa_pattern=(0, MAX_LAYERS))
        for name, (lo, hi) in ints.items():
            v = getattr(self, name)
            if not isinstance(v, int) or not lo <= v <= hi:
                raise ModelFormatError(f"{source}: {name} = {v!r} is outside [{lo}, {hi:,}]")
        for name, choices in (("norm", ("rms", "layer")), ("positions", ("rope", "learned"))):
            if getattr(self, name) not in choices:
                raise ModelFormatError(f"{source}: {name} = {getattr(self, name)!r} (supported: {', '.join(choices)})")
        if self.n_head % self.n_head_kv:
            raise ModelFormatError(f"{source}: {self.n_head} attention heads are not a multiple of "
                                   f"{self.n_head_kv} KV heads")
        if self.rope_dim % 2 or self.rope_dim > self.head_dim:
            raise ModelFormatError(f"{source}: rope dimension {self.rope_dim} must be even and at most the head "
                                   f"dimension {self.head_dim}")
        for name, lo in (("norm_eps", 0.0), ("rope_theta", None), ("embed_scale", None), ("attn_scale", 0.0),
                         ("attn_softcap", 0.0), ("final_softcap", 0.0), ("rope_local_theta", 0.0)):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and (v >= lo if lo is not None else v > 0)):
                raise ModelFormatError(f"{source}: {name} = {v!r} must be a finite number "
                                       f"{'>= 0' if lo is not None else '> 0'}")
        rs = self.rope_scaling
        scale = (rs.factor, rs.low_freq_factor, rs.high_freq_factor, rs.attn_factor, *(rs.freq_factors or ()),
                 *(rs.long_factors or ()), *(rs.short_factors or ()))
        if not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in scale):
            raise ModelFormatError(f"{source}: RoPE scaling factors must be finite and > 0")
        if not isinstance(rs.original_context, int) or not 0 <= rs.original_context <= MAX_CONTEXT:
            raise ModelFormatError(f"{source}: RoPE original context {rs.original_context!r} is outside "
                                   f"[0, {MAX_CONTEXT:,}]")
        for factors in (rs.freq_factors, rs.long_factors, rs.short_factors):
            if factors is not None and len(factors) != self.rope_dim // 2:
                raise ModelFormatError(f"{source}: {len(factors)} RoPE frequency factors for rope dimension "
                                       f"{self.rope_dim} (expected {self.rope_dim // 2})")
        if rs.kind == "longrope" and (rs.long_factors is None or rs.short_factors is None):
            raise ModelFormatError(f"{source}: LongRoPE scaling needs both long and short frequency factors")
        return self
