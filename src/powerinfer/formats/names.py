"""One table of tensor names: each weight's role (HF module names, STYLE 9: core/weights.py's fields) with its
GGUF name as llama.cpp writes it and its HF safetensors name. The GGUF reader and writer, the HF reader and the
test fixtures all read it, so a name is spelled once."""
from __future__ import annotations

# role -> (GGUF name after "blk.N.", HF name after "model.layers.N.")
LAYER_NAMES: dict[str, tuple[str, str]] = {
    "input_layernorm": ("attn_norm.weight", "input_layernorm.weight"),
    "q_proj": ("attn_q.weight", "self_attn.q_proj.weight"),
    "k_proj": ("attn_k.weight", "self_attn.k_proj.weight"),
    "v_proj": ("attn_v.weight", "self_attn.v_proj.weight"),
    "o_proj": ("attn_output.weight", "self_attn.o_proj.weight"),
    "post_attention_layernorm": ("ffn_norm.weight", "post_attention_layernorm.weight"),
    "gate_proj": ("ffn_gate.weight", "mlp.gate_proj.weight"),
    "up_proj": ("ffn_up.weight", "mlp.up_proj.weight"),
    "down_proj": ("ffn_down.weight", "mlp.down_proj.weight"),
    "q_bias": ("attn_q.bias", "self_attn.q_proj.bias"),
    "k_bias": ("attn_k.bias", "self_attn.k_proj.bias"),
    "v_bias": ("attn_v.bias", "self_attn.v_proj.bias"),
    "q_norm": ("attn_q_norm.weight", "self_attn.q_norm.weight"),
    "k_norm": ("attn_k_norm.weight", "self_attn.k_norm.weight"),
    # LayerNorm biases and projection biases (falcon, opt; HF names of the llama layout, for the name table only)
    "input_layernorm_bias": ("attn_norm.bias", "input_layernorm.bias"),
    "post_attention_layernorm_bias": ("ffn_norm.bias", "post_attention_layernorm.bias"),
    "o_bias": ("attn_output.bias", "self_attn.o_proj.bias"),
    "up_bias": ("ffn_up.bias", "mlp.up_proj.bias"),
    "down_bias": ("ffn_down.bias", "mlp.down_proj.bias"),
    # Gemma's norms of the attention and FFN outputs (llama.cpp: attn_post_norm, ffn_post_norm). HF Gemma calls the
    # first post_attention_layernorm, llama's name for the FFN input norm: formats/hf_gemma.py maps Gemma's names
    "post_attn_norm": ("post_attention_norm.weight", "post_attn_norm.weight"),
    "post_ffn_norm": ("post_ffw_norm.weight", "post_feedforward_layernorm.weight"),
}
# PowerInfer GGUF: down_proj stored neuron-major (one row per neuron).
GGUF_DOWN_T = "ffn_down_t.weight"
# role -> (GGUF name, HF name) of the tensors outside the layers
MODEL_NAMES: dict[str, tuple[str, str]] = {
    "embed_tokens": ("token_embd.weight", "model.embed_tokens.weight"),
    "norm": ("output_norm.weight", "model.norm.weight"),
    "lm_head": ("output.weight", "lm_head.weight"),
    "norm_bias": ("output_norm.bias", "model.norm.bias"),
    "pos_embd": ("position_embd.weight", "model.embed_positions.weight"),
}
# falcon's fused attention input (rows q | k | v) and the 40B layout's second norm: llama.cpp's falcon names
GGUF_QKV = "attn_qkv"
GGUF_ATTN_NORM_2 = "attn_norm_2"


def gguf_name(role: str, layer: int | None = None) -> str:
    """'q_proj', 3 -> 'blk.3.attn_q.weight'; 'norm' -> 'output_norm.weight'."""
    if layer is None:
        return MODEL_NAMES[role][0]
    return f"blk.{layer}.{GGUF_DOWN_T if role == 'down_t' else LAYER_NAMES[role][0]}"


def hf_name(role: str, layer: int | None = None) -> str:
    """'q_proj', 3 -> 'model.layers.3.self_attn.q_proj.weight'; 'norm' -> 'model.norm.weight'."""
    if layer is None:
        return MODEL_NAMES[role][1]
    return f"model.layers.{layer}.{LAYER_NAMES[role][1]}"


_HF_TO_GGUF = {hf: gguf for gguf, hf in LAYER_NAMES.values()}
_HF_MODEL_TO_GGUF = {hf: gguf for gguf, hf in MODEL_NAMES.values()}


def hf_to_gguf(name: str) -> str:
    """An HF safetensors tensor name -> its GGUF name ('model.layers.3.mlp.up_proj.weight' -> 'blk.3.ffn_up.weight')."""
    if name.startswith("model.layers."):
        _, _, i, rest = name.split(".", 3)
        return f"blk.{i}.{_HF_TO_GGUF[rest]}"
    return _HF_MODEL_TO_GGUF[name]
