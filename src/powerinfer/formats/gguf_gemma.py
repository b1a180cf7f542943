"""Gemma 2 and Gemma 3 GGUF metadata (llama.cpp's `gemma2` / `gemma3`) -> the ModelConfig options of core/config.py.

What llama.cpp reads (llama-model.cpp load_hparams, the build_gemma2_iswa / build_gemma3 graphs):
  - embeddings times sqrt(n_embd); GeGLU FFN with ggml_gelu (tanh form); RoPE on halves (NEOX; the converter does
    not permute Gemma's q/k rows);
  - the converter stores every RMSNorm weight as 1 + w (Gemma's RMSNorm multiplies by 1 + w), so the file's norms
    are plain RMSNorms; attn_post_norm / ffn_post_norm normalise the attention and FFN outputs;
  - q is scaled by f_attention_scale = 1/sqrt(head_dim), or 1/sqrt(n_embd / n_head) for the 27B models (46 layers
    for gemma2, 62 for gemma3), which is query_pre_attn_scalar^-0.5 of each released model. llama.cpp has no key
    for it; this package also reads `{arch}.attention.scale` (its converter writes it where
    query_pre_attn_scalar differs from that rule);
  - gemma2: attention logits soft-capped (`attn_logit_softcapping`, default 50) and final logits
    (`final_logit_softcapping`, default 30); a sliding window (`attention.sliding_window`, default 4096) on every
    other layer from layer 0 (set_swa_pattern(2));
  - gemma3: no attention soft-capping; the window (`attention.sliding_window`; absent: every layer global) on 5 of
    every 6 layers (set_swa_pattern(6)), whose RoPE base is 10000 unscaled (rope_freq_base_train_swa), the global
    layers using the file's base and scaling; final soft-capping where the file states it (the HF config's
    final_logit_softcapping; none of the released models sets it).
"""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

from ..core.config import ModelConfig
from ..errors import ModelFormatError, one_line

GEMMA_ARCHS = ("gemma2", "gemma3")
LAYERS_27B = {"gemma2": 46, "gemma3": 62}  # llama.cpp's LLM_TYPE_27B, the models whose q scale is 1/sqrt(d/n_head)
SWA_PATTERN = {"gemma2": 2, "gemma3": 6}
GEMMA3_LOCAL_ROPE_THETA = 10000.0


def default_attn_scale(arch: str, n_layer: int, d_model: int, n_head: int, head_dim: int) -> float:
    """llama.cpp's f_attention_scale for a Gemma of this shape."""
    return 1.0 / math.sqrt(d_model // n_head if n_layer == LAYERS_27B[arch] else head_dim)


def gemma_config(path: Path, config: ModelConfig, md: dict) -> ModelConfig:
    """The llama-shaped config _config built from a gemma2/gemma3 header, with Gemma's options."""
    arch = md["general.architecture"]

    def number(name: str, default, kind=float):
        v = md.get(f"{arch}.{name}", default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int):
            raise ModelFormatError(f"{path}: metadata key {arch}.{name} is {one_line(repr(v), 60)}, expected a number")
        return kind(v)

    c = config
    scale = number("attention.scale", None) or default_attn_scale(arch, c.n_layer, c.d_model, c.n_head, c.head_dim)
    window = number("attention.sliding_window", 4096 if arch == "gemma2" else 0, int)
    return replace(
        c, arch=arch, rope_style="neox",
        activation=c.activation if "powerinfer.ffn_activation" in md else "gelu_tanh",
        embed_scale=float(math.sqrt(c.d_model)), attn_scale=float(scale),
        attn_softcap=number("attn_logit_softcapping", 50.0) if arch == "gemma2" else 0.0,
        final_softcap=number("final_logit_softcapping", 30.0 if arch == "gemma2" else 0.0) or 0.0,
        post_norms=True, sliding_window=window, swa_pattern=SWA_PATTERN[arch],
        rope_local_theta=GEMMA3_LOCAL_ROPE_THETA if arch == "gemma3" and window else 0.0)
