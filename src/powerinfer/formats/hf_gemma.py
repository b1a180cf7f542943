"""HF Gemma 2 / Gemma 3 text directories (Gemma2ForCausalLM, Gemma3ForCausalLM, model_type gemma2 / gemma3_text) in
the roles of core/weights.py, with the options formats/gguf_gemma.py reads from a GGUF.

Gemma's RMSNorm multiplies by 1 + w: every norm weight (the four per layer, q_norm/k_norm, the final norm) is read
as 1 + w in float32, what llama.cpp's converter writes, so the model's norms are plain RMSNorms. HF's names differ
from llama's: post_attention_layernorm is the attention output's norm (post_attn_norm here), pre_feedforward_layernorm
the FFN input's (post_attention_layernorm here, llama's name), post_feedforward_layernorm the FFN output's.
Local (sliding-window) layers come from `layer_types` (transformers >= 4.53) or the sliding_window_pattern; they
must follow llama.cpp's pattern (gemma2: every other layer from 0; gemma3: 5 of every 6), the only one its GGUF can
state.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q

from ..core.config import ModelConfig, RopeScaling
from ..core.tensor import QTensor
from ..core.weights import LayerWeights, ModelWeights
from ..errors import ModelFormatError
from .gguf_gemma import GEMMA3_LOCAL_ROPE_THETA, SWA_PATTERN

ARCHITECTURES = {"Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3"}
MODEL_TYPES = {"gemma2": "gemma2", "gemma3_text": "gemma3"}
_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu"}


def gemma_of(raw: dict) -> str | None:
    for a in raw.get("architectures") or []:
        if a in ARCHITECTURES:
            return ARCHITECTURES[a]
    return MODEL_TYPES.get(raw.get("model_type"))


def _rope(raw: dict, layer_type: str, default_theta: float) -> dict:
    """(theta, scaling dict) of one layer type: transformers 5 keeps them per type in rope_parameters."""
    params = raw.get("rope_parameters") or {}
    if isinstance(params.get(layer_type), dict):
        return params[layer_type]
    if layer_type == "sliding_attention" and "rope_local_base_freq" in raw:  # transformers 4 gemma3
        return {"rope_theta": raw["rope_local_base_freq"]}
    out = {**(raw.get("rope_scaling") or {}), **params} if layer_type == "full_attention" else {}
    out.setdefault("rope_theta", raw.get("rope_theta", default_theta))
    return out


def gemma_config(path: Path, cfg_path: Path, raw: dict, arch: str) -> ModelConfig:
    get = raw.get
    d, n_head, n_layer = int(get("hidden_size")), int(get("num_attention_heads")), int(get("num_hidden_layers"))
    head_dim = int(get("head_dim") or d // n_head)
    act = get("hidden_activation") or get("hidden_act") or "gelu_pytorch_tanh"
    if act not in _ACTIVATIONS:
        raise ModelFormatError(f"{cfg_path}: unsupported hidden_activation {act!r} (supported: {', '.join(_ACTIVATIONS)})")
    pattern = SWA_PATTERN[arch]
    window = int(get("sliding_window") or 0)
    types = get("layer_types")
    if types is None:
        p = get("sliding_window_pattern") or get("_sliding_window_pattern") or pattern
        types = ["sliding_attention" if (i + 1) % p else "full_attention" for i in range(n_layer)]
    expected = ["sliding_attention" if i % pattern < pattern - 1 else "full_attention" for i in range(n_layer)]
    if window and list(types) != expected:
        raise ModelFormatError(f"{cfg_path}: layer_types {types} differ from {arch}'s pattern of sliding-window "
                               f"layers ({pattern - 1} of every {pattern}), the one its GGUF form can state")
    if not any(t == "sliding_attention" for t in types):
        window = 0
    full = _rope(raw, "full_attention", 1_000_000.0 if arch == "gemma3" else 10000.0)
    kind = full.get("rope_type", full.get("type", "default"))
    if kind not in ("default", "linear"):
        raise ModelFormatError(f"{cfg_path}: unsupported rope scaling {kind!r} for {arch} (supported: linear)")
    local = _rope(raw, "sliding_attention", GEMMA3_LOCAL_ROPE_THETA) if arch == "gemma3" else full
    qpas = get("query_pre_attn_scalar") or head_dim
    return ModelConfig(
        arch=arch, n_vocab=int(get("vocab_size")), d_model=d, n_layer=n_layer, n_head=n_head,
        n_head_kv=int(get("num_key_value_heads") or n_head), head_dim=head_dim, n_ff=int(get("intermediate_size")),
        norm_eps=float(get("rms_norm_eps", 1e-6)), rope_theta=float(full["rope_theta"]), rope_style="neox",
        rope_scaling=RopeScaling(kind="linear", factor=float(full["factor"])) if kind == "linear" else RopeScaling(),
        context_length=int(get("max_position_embeddings", 8192)), activation=_ACTIVATIONS[act], ffn_kind="glu",
        tie_embeddings=bool(get("tie_word_embeddings", True)), qk_norm=arch == "gemma3",
        embed_scale=float(math.sqrt(d)), attn_scale=float(qpas) ** -0.5,
        attn_softcap=float(get("attn_logit_softcapping") or 0.0), final_softcap=float(get("final_logit_softcapping") or 0.0),
        post_norms=True, sliding_window=window, swa_pattern=pattern,
        rope_local_theta=float(local["rope_theta"]) if arch == "gemma3" and window else 0.0,
        name=str(get("_name_or_path") or path.name))


def _plus_one(t: QTensor) -> QTensor:
    """Gemma's norm weight w as the plain RMSNorm weight 1 + w (float32, as llama.cpp's converter writes it)."""
    if t.qtype in (Q.F32, Q.F16):
        w = np.asarray(t.data, dtype=np.float32).reshape(t.shape) + np.float32(1.0)
    else:  # BF16, stored as raw uint16: its f32 value is the high half
        w = (np.asarray(t.data, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(t.shape) + np.float32(1)
    return QTensor(t.name, Q.F32, t.shape, w)


def gemma_weights(c: ModelConfig, tensors: dict[str, QTensor], get) -> ModelWeights:
    d, ff, v, hd = c.d_model, c.n_ff, c.n_vocab, c.head_dim
    q_dim, kv_dim = c.n_head * hd, c.n_head_kv * hd
    layers = []
    for i in range(c.n_layer):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        norm = dict(input_layernorm="input_layernorm", post_attn_norm="post_attention_layernorm",
                    post_attention_layernorm="pre_feedforward_layernorm", post_ffn_norm="post_feedforward_layernorm")
        qk = {}
        if c.qk_norm:
            qk = dict(q_norm=_plus_one(get(a + "q_norm.weight", (hd,))), k_norm=_plus_one(get(a + "k_norm.weight", (hd,))))
        layers.append(LayerWeights(
            **{role: _plus_one(get(f"{p}{name}.weight", (d,))) for role, name in norm.items()}, **qk,
            q_proj=get(a + "q_proj.weight", (q_dim, d)), k_proj=get(a + "k_proj.weight", (kv_dim, d)),
            v_proj=get(a + "v_proj.weight", (kv_dim, d)), o_proj=get(a + "o_proj.weight", (d, q_dim)),
            gate_proj=get(p + "mlp.gate_proj.weight", (ff, d)), up_proj=get(p + "mlp.up_proj.weight", (ff, d)),
            down_proj=get(p + "mlp.down_proj.weight", (d, ff))))
    embed = get("model.embed_tokens.weight", (v, d))
    if not c.tie_embeddings and "lm_head.weight" not in tensors:
        c.tie_embeddings = True
    return ModelWeights(embed_tokens=embed, layers=layers, norm=_plus_one(get("model.norm.weight", (d,))),
                        lm_head=embed if c.tie_embeddings else get("lm_head.weight", (v, d)))
