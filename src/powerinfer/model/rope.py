"""Rotary position embeddings (RoFormer, arXiv 2104.09864) with the frequency scalings llama.cpp applies.

inv_freq[i] = theta^(-2i/rope_dim), i < rope_dim/2, then
  linear: divided by `factor` (llama.cpp freq_scale = 1/factor);
  llama3: divided by per-frequency factors (GGUF `rope_freqs.weight`, or the Llama 3.1 formula that
          llama.cpp's converter uses to build that tensor: 1 for short wavelengths, `factor` for long,
          smooth in between);
  yarn:   "lite" YaRN (arXiv 2309.00071) as ggml's rope_yarn: per dimension a ramp mixes interpolated
          (inv_freq/factor) and extrapolated (inv_freq) angles, beta_fast=32 and beta_slow=1 (llama.cpp
          defaults), and cos/sin are scaled by mscale = 1 + 0.1*ln(factor);
  longrope: Phi-3's LongRoPE (arXiv 2402.13753), divided by per-frequency factors: the long set when the context
          is longer than the original one, else the short set (llama.cpp's get_rope_factors decides by the
          context size, so every position of one context uses the same set).
cos/sin are also scaled by the file's attention factor (GGUF rope.scaling.attn_factor, LongRoPE's
sqrt(1 + ln(s)/ln(original)); llama.cpp's attn_factor argument of ggml_rope_ext).
Angles are computed in float64 and the tables stored as float32, so the torch model and the C decoder
(which reads `rope_tables`) rotate with the same numbers. The tables are numpy (the C decoder's process need not
import torch); the torch model's rotation is model/llama.py's `apply_rope`, `rotate` here its numpy twin for the
KV cache's key shift.
"""
from __future__ import annotations

import math

import numpy as np

from ..core.config import ModelConfig

YARN_BETA_FAST = 32.0
YARN_BETA_SLOW = 1.0


def rope_inv_freq(config: ModelConfig, n_ctx: int | None = None) -> np.ndarray:
    """float64 [rope_dim/2] inverse frequencies, scaling included (yarn's mscale is applied by rope_tables).
    n_ctx: the context size, which picks LongRoPE's long or short factors (None: short)."""
    dim = config.rope_dim
    inv_freq = config.rope_theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    s = config.rope_scaling
    if s.kind == "longrope":
        long = n_ctx is not None and n_ctx > (s.original_context or config.context_length)
        return inv_freq / np.asarray(s.long_factors if long else s.short_factors, dtype=np.float64)
    if s.freq_factors is not None:
        return inv_freq / np.asarray(s.freq_factors, dtype=np.float64)
    if s.kind == "linear":
        return inv_freq / s.factor
    if s.kind == "llama3":
        return inv_freq / _llama3_factors(inv_freq, s.factor, s.low_freq_factor, s.high_freq_factor,
                                          s.original_context or config.context_length)
    if s.kind == "yarn":
        orig = s.original_context or config.context_length
        ramp = _yarn_ramp(dim, config.rope_theta, orig)  # 1 = keep (extrapolate), 0 = interpolate
        return inv_freq * (ramp + (1.0 - ramp) / s.factor)
    return inv_freq


def rope_mscale(config: ModelConfig) -> float:
    """Magnitude scale of cos/sin: the file's attention factor, times YaRN's attention temperature."""
    s = config.rope_scaling
    if s.kind == "yarn" and s.factor > 1.0:
        return s.attn_factor * (1.0 + 0.1 * math.log(s.factor))
    return s.attn_factor


def rope_angles(config: ModelConfig, positions, n_ctx: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) float32 [len(positions), rope_dim/2] for the given absolute positions in a context of n_ctx."""
    angles = np.asarray(positions, dtype=np.float64)[:, None] * rope_inv_freq(config, n_ctx)[None, :]
    m = rope_mscale(config)
    return (np.cos(angles) * m).astype(np.float32), (np.sin(angles) * m).astype(np.float32)


def rope_tables(config: ModelConfig, n_ctx: int) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) float32 [n_ctx, rope_dim/2], row = position. Column i rotates the pair (2i, 2i+1) for
    rope_style "norm" and (i, i + rope_dim/2) for "neox"."""
    return rope_angles(config, np.arange(n_ctx), n_ctx)


def rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, style: str) -> np.ndarray:
    """numpy twin of model/llama.py's apply_rope: the first rope_dim features of each head rotated.
    x float32 [T, H, head_dim]; cos/sin [T, rope_dim/2]."""
    half = cos.shape[-1]
    out = x.copy()
    cos, sin = cos[:, None, :], sin[:, None, :]
    if style == "norm":  # adjacent pairs (x[2i], x[2i+1])
        a, b = x[..., 0:2 * half:2], x[..., 1:2 * half:2]
        out[..., 0:2 * half:2], out[..., 1:2 * half:2] = a * cos - b * sin, a * sin + b * cos
    elif style == "neox":  # halves (x[i], x[i+half])
        a, b = x[..., :half], x[..., half:2 * half]
        out[..., :half], out[..., half:2 * half] = a * cos - b * sin, a * sin + b * cos
    else:
        raise ValueError(f"unknown rope_style {style!r}")
    return out


def _llama3_factors(inv_freq, factor, low_freq_factor, high_freq_factor, original_context):
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = original_context / low_freq_factor
    high_freq_wavelen = original_context / high_freq_factor
    smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    mid = 1.0 / ((1.0 - smooth) / factor + smooth)
    return np.where(wavelen < high_freq_wavelen, 1.0, np.where(wavelen > low_freq_wavelen, factor, mid))


def _yarn_ramp(dim: int, theta: float, original_context: int) -> np.ndarray:
    # ggml_rope_yarn_corr_dims: the dimension whose wavelength completes `n_rot` turns in the original context.
    def corr_dim(n_rot):
        return dim * math.log(original_context / (n_rot * 2 * math.pi)) / (2 * math.log(theta))

    low = max(0.0, math.floor(corr_dim(YARN_BETA_FAST)))
    high = min(dim - 1.0, math.ceil(corr_dim(YARN_BETA_SLOW)))
    i = np.arange(dim // 2, dtype=np.float64)
    y = (i - low) / max(0.001, high - low)
    return 1.0 - np.clip(y, 0.0, 1.0)
