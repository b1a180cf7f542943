"""The llama family as pure math (STYLE 1; gpt-fast model.py, mlx-lm models/llama.py): Llama-2/3, Mistral,
SmolLM2, Qwen2 (q/k/v biases), Qwen3 (q/k norms), ReLU-family variants (ReluLLaMA, ProSparse, Bamboo's dReLU),
and the options Falcon and OPT need: LayerNorm with bias, biases on every projection, a parallel residual
(falcon: x + attn(norm(x)) + ffn(norm'(x))) and learned position embeddings instead of RoPE (opt), and Gemma 2/3's
(HF Gemma2/Gemma3ForCausalLM): embeddings times sqrt(d), norms of the attention and FFN outputs, q scaled by
query_pre_attn_scalar^-0.5, attention and final logits soft-capped (c*tanh(s/c)), sliding-window layers with their
own RoPE base (gemma3).

This is the reference path (and the prefill / GPU path): weights are dequantized once to `dtype`, the FFN
is injected as a factory (model/ffn.py's DenseFFN by default), the KV cache is the shared KVCache (f16 or f32
here). No I/O, no sampling.
  x = embed[tokens]
  per layer: h = x + o_proj(attention(rope(q), rope(k), v))   on input_layernorm(x), causal over the cache
             x = h + ffn(post_attention_layernorm(h))
  logits = lm_head(norm(x))
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import ModelConfig
from .ffn import DenseFFN, dense
from .kvcache import KVCache
from .rope import rope_tables
from ..core.tensor import QTensor
from ..core.weights import LayerWeights, ModelWeights


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """Rotate the first rope_dim features of each head (RoFormer; model/rope.py makes the tables, `rotate` there
    is the numpy twin). x [T, H, head_dim]; cos/sin [T, rope_dim/2]."""
    half = cos.shape[-1]
    rot, rest = x[..., :2 * half], x[..., 2 * half:]
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    if style == "norm":  # adjacent pairs (x[2i], x[2i+1]), GGUF llama's permuted q/k
        a, b = rot[..., 0::2], rot[..., 1::2]
        rot = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    elif style == "neox":  # halves (x[i], x[i+half]), HF layout
        a, b = rot[..., :half], rot[..., half:]
        rot = torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)
    else:
        raise ValueError(f"unknown rope_style {style!r}")
    return torch.cat((rot, rest), dim=-1) if rest.shape[-1] else rot


class RMSNorm(nn.Module):
    """x / rms(x) * weight (Zhang & Sennrich 2019), computed in float32 like llama.cpp and HF."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.register_buffer("weight", weight)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class LayerNorm(nn.Module):
    """(x - mean) / sqrt(var + eps) * weight + bias (falcon, opt), in float32 like llama.cpp's ggml_norm."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, eps: float):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), x.shape[-1:], self.weight.float(), None if self.bias is None else
                            self.bias.float(), self.eps).to(x.dtype)


def make_norm(config: ModelConfig, weight: QTensor, bias: QTensor | None, dtype) -> nn.Module:
    if config.norm == "layer":
        return LayerNorm(dense(weight, dtype), dense(bias, dtype), config.norm_eps)
    return RMSNorm(dense(weight, dtype), config.norm_eps)


class Attention(nn.Module):
    def __init__(self, lw: LayerWeights, config: ModelConfig, layer: int, dtype):
        super().__init__()
        self.config, self.layer = config, layer
        self.n_head, self.n_head_kv, self.head_dim = config.n_head, config.n_head_kv, config.head_dim
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_bias", "k_bias", "v_bias", "o_bias"):
            self.register_buffer(name, dense(getattr(lw, name), dtype))
        # qwen3: each head's q and k RMS-normalised over head_dim before RoPE
        self.q_norm = RMSNorm(dense(lw.q_norm, dtype), config.norm_eps) if lw.q_norm is not None else None
        self.k_norm = RMSNorm(dense(lw.k_norm, dtype), config.norm_eps) if lw.k_norm is not None else None
        # Gemma: a sliding window on local layers (rotated with the local RoPE tables when the model has them)
        self.window = config.sliding_window if config.is_local(layer) else 0
        self.local_rope = bool(self.window) and config.local_rope() is not None

    def forward(self, x: torch.Tensor, start_pos: int, cache: KVCache, cos: torch.Tensor, sin: torch.Tensor):
        """x [T, d] at positions start_pos..; cos/sin [T, rope_dim/2] for those positions."""
        T = x.shape[0]
        q = F.linear(x, self.q_proj, self.q_bias).view(T, self.n_head, self.head_dim)
        k = F.linear(x, self.k_proj, self.k_bias).view(T, self.n_head_kv, self.head_dim)
        v = F.linear(x, self.v_proj, self.v_bias)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)

        if self.config.positions == "rope":
            q = apply_rope(q, cos, sin, self.config.rope_style)
            k = apply_rope(k, cos, sin, self.config.rope_style)

        # Append this step's K/V rows (in the cache's dtype, f16 like llama.cpp) and attend over everything so far.
        end = start_pos + T
        k_cache, v_cache = cache.k[self.layer], cache.v[self.layer]
        k_cache[start_pos:end] = k.reshape(T, -1).to(k_cache.dtype)
        v_cache[start_pos:end] = v.to(v_cache.dtype)
        keys = k_cache[:end].to(x.dtype).view(end, self.n_head_kv, self.head_dim)
        values = v_cache[:end].to(x.dtype).view(end, self.n_head_kv, self.head_dim)

        # GQA: query head h reads kv head h // (n_head / n_head_kv).
        group = self.n_head // self.n_head_kv
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)

        c = self.config
        if c.attn_scale:  # Gemma: query_pre_attn_scalar^-0.5
            scores = torch.einsum("thd,shd->hts", q, keys) * c.attn_scale
        else:
            scores = torch.einsum("thd,shd->hts", q, keys) / math.sqrt(self.head_dim)
        if c.attn_softcap:  # Gemma 2: attention logit soft-capping
            scores = torch.tanh(scores / c.attn_softcap) * c.attn_softcap
        # Causal: the query at position start_pos+t sees cache positions 0..start_pos+t (the last `window` of them).
        q_pos = torch.arange(start_pos, end, device=x.device)[:, None]
        k_pos = torch.arange(end, device=x.device)[None, :]
        hidden = (k_pos > q_pos) | (k_pos <= q_pos - self.window) if self.window else k_pos > q_pos
        scores = scores.masked_fill(hidden, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(x.dtype)
        out = torch.einsum("hts,shd->thd", probs, values).reshape(T, self.n_head * self.head_dim)
        return F.linear(out, self.o_proj, self.o_bias)


class Block(nn.Module):
    def __init__(self, lw: LayerWeights, config: ModelConfig, layer: int, ffn: nn.Module, dtype):
        super().__init__()
        self.input_layernorm = make_norm(config, lw.input_layernorm, lw.input_layernorm_bias, dtype)
        self.attn = Attention(lw, config, layer, dtype)
        self.post_attention_layernorm = make_norm(config, lw.post_attention_layernorm,
                                                  lw.post_attention_layernorm_bias, dtype)
        self.ffn = ffn
        self.parallel = config.parallel_residual
        # Gemma: the attention and FFN outputs are RMS-normalised before they join the residual
        self.post_attn_norm = make_norm(config, lw.post_attn_norm, None, dtype) if lw.post_attn_norm is not None \
            else None
        self.post_ffn_norm = make_norm(config, lw.post_ffn_norm, None, dtype) if lw.post_ffn_norm is not None else None

    def forward(self, x: torch.Tensor, start_pos: int, cache: KVCache, cos: torch.Tensor, sin: torch.Tensor):
        if self.post_attn_norm is not None:
            h = x + self.post_attn_norm(self.attn(self.input_layernorm(x), start_pos, cache, cos, sin))
            hn = self.post_attention_layernorm(h)
            y = self.ffn(hn, residual=h) if getattr(self.ffn, "takes_residual", False) else self.ffn(hn)
            return h + self.post_ffn_norm(y)
        h = x + self.attn(self.input_layernorm(x), start_pos, cache, cos, sin)
        if self.parallel:  # falcon: the FFN reads the layer input too, both outputs join the residual
            if getattr(self.ffn, "takes_residual", False):
                return h + self.ffn(self.post_attention_layernorm(x), residual=x)
            return h + self.ffn(self.post_attention_layernorm(x))
        if getattr(self.ffn, "takes_residual", False):  # predictors and profilers also see the pre-norm residual
            return h + self.ffn(self.post_attention_layernorm(h), residual=h)
        return h + self.ffn(self.post_attention_layernorm(h))


class Transformer(nn.Module):
    """`ffn` is a factory `(layer_weights, config, dtype=..., layer=i) -> nn.Module` (default: the dense FFN);
    the runner builds sparse ones by name from sparse/ffn.py's registry (STYLE 2)."""

    def __init__(self, config: ModelConfig, weights: ModelWeights, ffn: Callable[..., nn.Module] = DenseFFN,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if not callable(ffn):
            raise TypeError(f"ffn must be a factory (layer_weights, config, dtype=, layer=), not {ffn!r}")
        self.config = config
        self.register_buffer("embed_tokens", dense(weights.embed_tokens, dtype))
        self.layers = nn.ModuleList(
            Block(lw, config, i, ffn(lw, config, dtype=dtype, layer=i), dtype)
            for i, lw in enumerate(weights.layers))
        self.norm = make_norm(config, weights.norm, weights.norm_bias, dtype)
        self.register_buffer("pos_embd", dense(weights.pos_embd, dtype))  # opt: learned positions
        # Tied head: reuse the embedding tensor instead of dequantizing (and moving) the same matrix twice.
        self.tied = weights.lm_head is weights.embed_tokens
        self.register_buffer("lm_head", None if self.tied else dense(weights.lm_head, dtype))
        # The same float32 tables the C decoder reads (model/rope.py), grown to the cache size on first use.
        self.register_buffer("rope_cos", torch.empty(0, config.rope_dim // 2), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0, config.rope_dim // 2), persistent=False)
        self.local_rope = config.local_rope()  # gemma3's local layers' tables, grown with the global ones
        self.register_buffer("rope_cos_local", torch.empty(0, config.rope_dim // 2), persistent=False)
        self.register_buffer("rope_sin_local", torch.empty(0, config.rope_dim // 2), persistent=False)

    def forward(self, tokens: torch.Tensor, start_pos: int, cache: KVCache) -> torch.Tensor:
        """tokens LongTensor [T] at positions start_pos.. -> logits [T, n_vocab] (in `dtype`)."""
        end = start_pos + tokens.shape[0]
        if end > cache.n_ctx:
            raise ValueError(f"positions up to {end} exceed the cache's {cache.n_ctx}")
        if self.rope_cos.shape[0] < end:
            dev = self.rope_cos.device
            cos, sin = (torch.from_numpy(t).to(dev) for t in rope_tables(self.config, max(cache.n_ctx, end)))
            self.rope_cos, self.rope_sin = cos, sin
            if self.local_rope is not None:
                cos, sin = (torch.from_numpy(t).to(dev) for t in rope_tables(self.local_rope, max(cache.n_ctx, end)))
                self.rope_cos_local, self.rope_sin_local = cos, sin
        cos, sin = self.rope_cos[start_pos:end], self.rope_sin[start_pos:end]
        local = (self.rope_cos_local[start_pos:end], self.rope_sin_local[start_pos:end]) if self.local_rope else None
        x = F.embedding(tokens, self.embed_tokens)
        if self.config.embed_scale != 1.0:  # Gemma: sqrt(d) in the activations' dtype, as HF's normalizer
            x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype)
        if self.pos_embd is not None:
            if end > self.pos_embd.shape[0]:
                raise ValueError(f"positions up to {end} exceed the model's {self.pos_embd.shape[0]} learned positions")
            x = x + self.pos_embd[start_pos:end]
        for block in self.layers:
            x = block(x, start_pos, cache, *(local if block.attn.local_rope else (cos, sin)))
        logits = F.linear(self.norm(x), self.embed_tokens if self.tied else self.lm_head)
        if self.config.final_softcap:  # Gemma 2: final logit soft-capping
            logits = torch.tanh(logits / self.config.final_softcap) * self.config.final_softcap
        return logits
