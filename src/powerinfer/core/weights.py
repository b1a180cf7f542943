"""Model weights by role, in HF module names (STYLE 9). Built by formats/, read by model/ and runtime/."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from .tensor import QTensor


@dataclass
class LayerWeights:
    input_layernorm: QTensor  # f32 [d]
    q_proj: QTensor  # [n_head*head_dim, d]
    k_proj: QTensor  # [n_head_kv*head_dim, d]
    v_proj: QTensor  # [n_head_kv*head_dim, d]
    o_proj: QTensor  # [d, n_head*head_dim]
    post_attention_layernorm: QTensor  # f32 [d]
    gate_proj: QTensor | None  # [n_ff, d]; None for act(up) MLPs
    up_proj: QTensor  # [n_ff, d]
    down_proj: QTensor  # [d, n_ff]
    q_bias: QTensor | None = None
    k_bias: QTensor | None = None
    v_bias: QTensor | None = None
    q_norm: QTensor | None = None  # f32 [head_dim]: RMSNorm of every query head before RoPE (qwen3)
    k_norm: QTensor | None = None  # f32 [head_dim]: and of every key head
    # LayerNorm biases (config.norm == "layer") and the projection biases of falcon/opt, f32 [d] / [n_ff]
    input_layernorm_bias: QTensor | None = None
    post_attention_layernorm_bias: QTensor | None = None
    o_bias: QTensor | None = None
    up_bias: QTensor | None = None
    down_bias: QTensor | None = None
    # Gemma: RMSNorms of the attention output and of the FFN output before each joins the residual, f32 [d]
    post_attn_norm: QTensor | None = None
    post_ffn_norm: QTensor | None = None
    # The file's own neuron-major down projection [n_ff, d] (PowerInfer GGUF `ffn_down_t`), kept as stored so the
    # sparse FFN reads it directly; down_proj is then its transpose, made at load for the dense paths.
    down_t: QTensor | None = None


@dataclass
class ModelWeights:
    embed_tokens: QTensor  # [n_vocab, d]
    layers: list[LayerWeights]
    norm: QTensor  # f32 [d]
    lm_head: QTensor  # [n_vocab, d]; the same object as embed_tokens when tied
    norm_bias: QTensor | None = None  # f32 [d]: the final LayerNorm's bias (config.norm == "layer")
    pos_embd: QTensor | None = None  # [n_pos, d]: learned positions (config.positions == "learned"), row p = position p

    def named_tensors(self, distinct: bool = False) -> Iterator[tuple[str, QTensor]]:
        """The one walk over a model's tensors: ("embed_tokens", t), ("norm", t), ("lm_head", t), then
        ("layers.{i}.{role}", t) for every tensor a layer has. distinct=True yields a tensor that fills two roles
        (a tied head) once."""
        seen: set[int] = set()
        top = [("embed_tokens", self.embed_tokens), ("norm", self.norm), ("lm_head", self.lm_head),
               ("norm_bias", self.norm_bias), ("pos_embd", self.pos_embd)]
        layer_items = ((f"layers.{i}.{role}", t) for i, lw in enumerate(self.layers) for role, t in vars(lw).items())
        for name, t in (*top, *layer_items):
            if t is None or distinct and id(t) in seen:
                continue
            seen.add(id(t))
            yield name, t
