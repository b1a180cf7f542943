"""HF Falcon (FalconForCausalLM), OPT (OPTForCausalLM) and Phi-3 (Phi3ForCausalLM) directories in the llama roles
of core/weights.py.

Falcon: one fused query_key_value matrix whose row order depends on the layout: new_decoder_architecture (40B/180B)
groups each KV head's queries with its key and value, multi_query (7B) stores all queries then one key and one
value, the original multi-head layout interleaves q, k, v per head. It is read as q | k | v rows (what llama.cpp's
converter writes as attn_qkv). Attention and MLP run in parallel from the layer input (parallel_attn or the new
architecture), with one shared LayerNorm (7B, num_ln_in_parallel_attn = 1) or ln_attn / ln_mlp (40B); RoPE in
halves; ALiBi models are refused.
OPT: learned positions (row p + 2 of embed_positions is position p: OPTLearnedPositionalEmbedding's offset), a
LayerNorm before attention and before the MLP (do_layer_norm_before), biases on every projection, ReLU MLP (fc1,
fc2), a final LayerNorm, head tied to the embeddings.
Phi-3: a llama with fused self_attn.qkv_proj (rows q | k | v) and mlp.gate_up_proj (rows gate | up: transformers'
Phi3MLP chunks it in that order), both read as row views; LongRoPE (rope type longrope, or su / yarn in older
configs, which transformers maps to it) with long_factor / short_factor and attention_factor (given, else
sqrt(1 + ln(factor) / ln(original)), factor = max_position_embeddings / original_max_position_embeddings).
sliding_window is not applied, as llama.cpp does not.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..core.config import ModelConfig, RopeScaling
from ..core.tensor import QTensor
from ..core.weights import LayerWeights, ModelWeights
from ..errors import ModelFormatError

ARCHITECTURES = {"FalconForCausalLM": "falcon", "OPTForCausalLM": "opt", "Phi3ForCausalLM": "phi3"}
MODEL_TYPES = {"falcon": "falcon", "RefinedWeb": "falcon", "RefinedWebModel": "falcon", "opt": "opt", "phi3": "phi3"}
_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
OPT_POSITION_OFFSET = 2


def family_of(raw: dict) -> str | None:
    for a in raw.get("architectures") or []:
        if a in ARCHITECTURES:
            return ARCHITECTURES[a]
    return MODEL_TYPES.get(raw.get("model_type"))


def _rope_theta(raw: dict) -> float:
    params = dict(raw.get("rope_parameters") or {})
    return float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))


def _activation(raw: dict, key: str, default: str, cfg_path: Path) -> str:
    act = raw.get(key, default)
    if act not in _ACTIVATIONS:
        raise ModelFormatError(f"{cfg_path}: unsupported {key} {act!r} (supported: {', '.join(_ACTIVATIONS)})")
    return _ACTIVATIONS[act]


def family_config(path: Path, cfg_path: Path, raw: dict, family: str) -> ModelConfig:
    get = raw.get
    if family == "phi3":
        return _phi3_config(path, cfg_path, raw)
    if family == "falcon":
        if get("alibi"):
            raise ModelFormatError(f"{cfg_path}: Falcon with ALiBi positions is not supported (RoPE models only)")
        d = int(get("hidden_size") or get("n_embed"))
        n_head = int(get("num_attention_heads") or get("n_head"))
        new = bool(get("new_decoder_architecture", False))
        # HF: the new architecture's num_kv_heads, one KV head for multi_query, else one per query head
        n_kv = int(get("num_kv_heads") or get("n_head_kv") or n_head) if new else 1 if get("multi_query", True) \
            else n_head
        return ModelConfig(
            arch="falcon", n_vocab=int(get("vocab_size")), d_model=d, n_layer=int(get("num_hidden_layers") or
                                                                               get("n_layer")),
            n_head=n_head, n_head_kv=n_kv, head_dim=d // n_head, n_ff=int(get("ffn_hidden_size") or 4 * d),
            norm_eps=float(get("layer_norm_epsilon", 1e-5)), rope_theta=_rope_theta(raw), rope_style="neox",
            context_length=int(get("max_position_embeddings", 2048)),
            activation=_activation(raw, "activation", "gelu", cfg_path), ffn_kind="mlp",
            tie_embeddings=bool(get("tie_word_embeddings", True)), attn_bias=bool(get("bias", False)),
            norm="layer", parallel_residual=new or bool(get("parallel_attn", True)),
            name=str(get("_name_or_path") or path.name))
    d = int(get("hidden_size"))
    if int(get("word_embed_proj_dim") or d) != d:
        raise ModelFormatError(f"{cfg_path}: OPT with word_embed_proj_dim != hidden_size (project_in/out, "
                               "opt-350m) is not supported")
    if not get("do_layer_norm_before", True) or get("_remove_final_layer_norm", False):
        raise ModelFormatError(f"{cfg_path}: OPT with layer norms after the blocks (do_layer_norm_before = false, "
                               "opt-350m) is not supported")
    if not get("layer_norm_elementwise_affine", True):
        raise ModelFormatError(f"{cfg_path}: OPT LayerNorms without weights are not supported")
    n_head = int(get("num_attention_heads"))
    return ModelConfig(
        arch="opt", n_vocab=int(get("vocab_size")), d_model=d, n_layer=int(get("num_hidden_layers")), n_head=n_head,
        n_head_kv=n_head, head_dim=d // n_head, n_ff=int(get("ffn_dim")), norm_eps=1e-5,  # nn.LayerNorm's default
        context_length=int(get("max_position_embeddings", 2048)),
        activation=_activation(raw, "activation_function", "relu", cfg_path), ffn_kind="mlp",
        tie_embeddings=bool(get("tie_word_embeddings", True)), attn_bias=bool(get("enable_bias", True)),
        norm="layer", positions="learned", name=str(get("_name_or_path") or path.name))


def _phi3_config(path: Path, cfg_path: Path, raw: dict) -> ModelConfig:
    get = raw.get
    params = dict(get("rope_scaling") or {})
    params.update(get("rope_parameters") or {})
    d, n_head = int(get("hidden_size")), int(get("num_attention_heads"))
    head_dim = d // n_head
    rope_dim = int(head_dim * float(params.get("partial_rotary_factor", get("partial_rotary_factor", 1.0))))
    n_ctx = int(get("max_position_embeddings", 4096))
    orig = int(get("original_max_position_embeddings") or params.get("original_max_position_embeddings") or n_ctx)
    kind = params.get("rope_type", params.get("type", "default"))
    scaling = RopeScaling()
    if kind in ("longrope", "su", "yarn"):
        factor = float(params.get("factor") or n_ctx / orig)
        attn = params.get("attention_factor")
        attn = float(attn) if attn is not None else \
            math.sqrt(1 + math.log(factor) / math.log(orig)) if factor > 1.0 else 1.0
        scaling = RopeScaling(kind="longrope", original_context=orig, attn_factor=attn,
                              long_factors=tuple(float(x) for x in params["long_factor"]),
                              short_factors=tuple(float(x) for x in params["short_factor"]))
    elif kind not in ("default", None):
        raise ModelFormatError(f"{cfg_path}: unsupported rope scaling {kind!r} for Phi-3 (supported: longrope)")
    if get("hidden_act", "silu") not in ("silu", "swish"):
        raise ModelFormatError(f"{cfg_path}: unsupported hidden_act {get('hidden_act')!r} for Phi-3 (supported: silu)")
    return ModelConfig(
        arch="phi3", n_vocab=int(get("vocab_size")), d_model=d, n_layer=int(get("num_hidden_layers")), n_head=n_head,
        n_head_kv=int(get("num_key_value_heads") or n_head), head_dim=head_dim, n_ff=int(get("intermediate_size")),
        norm_eps=float(get("rms_norm_eps", 1e-5)), rope_theta=_rope_theta(raw), rope_dim=rope_dim, rope_style="neox",
        rope_scaling=scaling, context_length=n_ctx, activation="silu", ffn_kind="glu",
        tie_embeddings=bool(get("tie_word_embeddings", False)), name=str(get("_name_or_path") or path.name))


def _phi3_weights(c: ModelConfig, tensors: dict[str, QTensor], get) -> ModelWeights:
    d, ff, hd = c.d_model, c.n_ff, c.head_dim
    sizes = (c.n_head * hd, c.n_head_kv * hd, c.n_head_kv * hd)
    layers = []
    for i in range(c.n_layer):
        p = f"model.layers.{i}."
        qkv = get(p + "self_attn.qkv_proj.weight", (sum(sizes), d))
        gate_up = get(p + "mlp.gate_up_proj.weight", (2 * ff, d))
        layers.append(LayerWeights(
            input_layernorm=get(p + "input_layernorm.weight", (d,)),
            q_proj=_rows(qkv, 0, sizes[0], "q"), k_proj=_rows(qkv, sizes[0], sizes[1], "k"),
            v_proj=_rows(qkv, sizes[0] + sizes[1], sizes[2], "v"),
            o_proj=get(p + "self_attn.o_proj.weight", (d, sizes[0])),
            post_attention_layernorm=get(p + "post_attention_layernorm.weight", (d,)),
            gate_proj=_rows(gate_up, 0, ff, "gate"), up_proj=_rows(gate_up, ff, ff, "up"),
            down_proj=get(p + "mlp.down_proj.weight", (d, ff))))
    embed = get("model.embed_tokens.weight", (c.n_vocab, d))
    if not c.tie_embeddings and "lm_head.weight" not in tensors:
        c.tie_embeddings = True
    return ModelWeights(embed_tokens=embed, layers=layers, norm=get("model.norm.weight", (d,)),
                        lm_head=embed if c.tie_embeddings else get("lm_head.weight", (c.n_vocab, d)))


def _rows(t: QTensor, start: int, n: int, role: str) -> QTensor:
    return QTensor(f"{t.name}[{role}]", t.qtype, (n, *t.shape[1:]), t.data[start:start + n])


def _falcon_qkv(t: QTensor, c: ModelConfig, raw: dict) -> list[QTensor]:
    """q, k, v of a fused query_key_value weight or bias, as row views (7B) or q | k | v copies."""
    hd, nh, nkv = c.head_dim, c.n_head, c.n_head_kv
    if raw.get("new_decoder_architecture") or not raw.get("multi_query", True):
        g = nh // nkv if raw.get("new_decoder_architecture") else 1
        if raw.get("new_decoder_architecture"):  # [n_kv][g queries, key, value][hd]
            a = np.asarray(t.data).reshape(nkv, g + 2, hd, *t.shape[1:])
            parts = (a[:, :g], a[:, g], a[:, g + 1])
        else:  # [n_head][q, k, v][hd]
            a = np.asarray(t.data).reshape(nh, 3, hd, *t.shape[1:])
            parts = (a[:, 0], a[:, 1], a[:, 2])
        out = []
        for role, p in zip("qkv", parts):
            p = np.ascontiguousarray(p).reshape(-1, *t.shape[1:])
            out.append(QTensor(f"{t.name}[{role}]", t.qtype, tuple(p.shape), p))
        return out
    return [_rows(t, 0, nh * hd, "q"), _rows(t, nh * hd, hd, "k"), _rows(t, nh * hd + hd, hd, "v")]


def family_weights(path: Path, c: ModelConfig, raw: dict, tensors: dict[str, QTensor], get) -> ModelWeights:
    if c.arch == "phi3":
        return _phi3_weights(c, tensors, get)
    d, ff, v = c.d_model, c.n_ff, c.n_vocab
    bias = c.attn_bias
    layers = []
    if c.arch == "falcon":
        qkv_rows = (c.n_head + 2 * c.n_head_kv) * c.head_dim
        two_norms = raw.get("new_decoder_architecture") and raw.get("num_ln_in_parallel_attn") in (None, 2)
        for i in range(c.n_layer):
            p = f"transformer.h.{i}."
            q, k, vv = _falcon_qkv(get(p + "self_attention.query_key_value.weight", (qkv_rows, d)), c, raw)
            qb = kb = vb = None
            if bias:
                qb, kb, vb = _falcon_qkv(get(p + "self_attention.query_key_value.bias", (qkv_rows,)), c, raw)
            if two_norms:
                an, fn = "ln_attn", "ln_mlp"
            else:
                an = "input_layernorm"
                fn = an if c.parallel_residual else "post_attention_layernorm"
            layers.append(LayerWeights(
                input_layernorm=get(p + an + ".weight", (d,)), input_layernorm_bias=get(p + an + ".bias", (d,)),
                q_proj=q, k_proj=k, v_proj=vv, q_bias=qb, k_bias=kb, v_bias=vb,
                o_proj=get(p + "self_attention.dense.weight", (d, d)),
                o_bias=get(p + "self_attention.dense.bias", (d,), not bias),
                post_attention_layernorm=get(p + fn + ".weight", (d,)),
                post_attention_layernorm_bias=get(p + fn + ".bias", (d,)),
                gate_proj=None, up_proj=get(p + "mlp.dense_h_to_4h.weight", (ff, d)),
                up_bias=get(p + "mlp.dense_h_to_4h.bias", (ff,), not bias),
                down_proj=get(p + "mlp.dense_4h_to_h.weight", (d, ff)),
                down_bias=get(p + "mlp.dense_4h_to_h.bias", (d,), not bias)))
        embed = get("transformer.word_embeddings.weight", (v, d))
        norm, norm_bias, pos = get("transformer.ln_f.weight", (d,)), get("transformer.ln_f.bias", (d,)), None
    else:
        qd = c.n_head * c.head_dim
        for i in range(c.n_layer):
            p = f"model.decoder.layers.{i}."
            a = p + "self_attn."
            layers.append(LayerWeights(
                input_layernorm=get(p + "self_attn_layer_norm.weight", (d,)),
                input_layernorm_bias=get(p + "self_attn_layer_norm.bias", (d,)),
                q_proj=get(a + "q_proj.weight", (qd, d)), k_proj=get(a + "k_proj.weight", (qd, d)),
                v_proj=get(a + "v_proj.weight", (qd, d)), o_proj=get(a + "out_proj.weight", (d, qd)),
                q_bias=get(a + "q_proj.bias", (qd,), not bias), k_bias=get(a + "k_proj.bias", (qd,), not bias),
                v_bias=get(a + "v_proj.bias", (qd,), not bias), o_bias=get(a + "out_proj.bias", (d,), not bias),
                post_attention_layernorm=get(p + "final_layer_norm.weight", (d,)),
                post_attention_layernorm_bias=get(p + "final_layer_norm.bias", (d,)),
                gate_proj=None, up_proj=get(p + "fc1.weight", (ff, d)), up_bias=get(p + "fc1.bias", (ff,), not bias),
                down_proj=get(p + "fc2.weight", (d, ff)), down_bias=get(p + "fc2.bias", (d,), not bias)))
        embed = get("model.decoder.embed_tokens.weight", (v, d))
        norm = get("model.decoder.final_layer_norm.weight", (d,))
        norm_bias = get("model.decoder.final_layer_norm.bias", (d,))
        n_pos = c.context_length + OPT_POSITION_OFFSET
        table = get("model.decoder.embed_positions.weight", (n_pos, d))
        pos = _rows(table, OPT_POSITION_OFFSET, c.context_length, "positions")
    if not c.tie_embeddings and "lm_head.weight" not in tensors:
        c.tie_embeddings = True
    return ModelWeights(embed_tokens=embed, layers=layers, norm=norm, norm_bias=norm_bias, pos_embd=pos,
                        lm_head=embed if c.tie_embeddings else get("lm_head.weight", (v, d)))
