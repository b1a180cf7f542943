"""Hugging Face model directories (`config.json` + `*.safetensors`, sharded or not) -> ModelConfig + ModelWeights.

LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM here; FalconForCausalLM,
OPTForCausalLM and Phi3ForCausalLM in formats/hf_families.py. HF keeps q/k rows in their
original order, so RoPE rotates halves ("neox" style). Weights stay F32/F16/BF16 and memory-mapped.
Reads both config spellings: transformers >= 5 (`rope_parameters`) and earlier (`rope_theta` +
`rope_scaling`). The tokenizer files are left to formats/tokenizer.py; `LoadedModel.path` points at them.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q
from safetensors import SafetensorError, safe_open

from ..errors import ModelFormatError, one_line
from .artifact import MAX_JSON_BYTES
from ..core.config import ModelConfig, RopeScaling
from ..core.weights import LayerWeights, ModelWeights
from ..core.tensor import QTensor
from .hf_families import family_config, family_of, family_weights
from .hf_gemma import gemma_config, gemma_of, gemma_weights
from .names import hf_name

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
_DTYPES = {"F32": (Q.F32, np.float32), "F16": (Q.F16, np.float16), "BF16": (Q.BF16, np.uint16)}
# HF hidden_act -> ModelConfig.activation. "gelu" is erf-exact in HF; the tanh forms are a separate name.
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "relu": "relu", "gelu": "gelu",
                "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def read_config(path: Path) -> tuple[ModelConfig, dict]:
    """(ModelConfig, raw config.json dict) of an HF model directory."""
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ModelFormatError(f"{path}: directory has no config.json (expected an HF model directory)")
    raw = _read_json(cfg_path)
    if not isinstance(raw, dict):
        raise ModelFormatError(f"{cfg_path}: expected a JSON object, got {type(raw).__name__}")
    try:
        return _config(path, cfg_path, raw).check(str(cfg_path)), raw
    except (TypeError, ValueError, AttributeError, ArithmeticError) as e:  # a value of the wrong JSON type
        raise ModelFormatError(f"{cfg_path}: malformed config ({type(e).__name__}: {one_line(e)})") from None


def _read_json(path: Path):
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise ModelFormatError(f"{path}: too large for a JSON config ({path.stat().st_size:,} bytes)")
        return json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, digit limits
        raise ModelFormatError(f"{path}: not valid JSON ({one_line(e)})") from None
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot read ({e.strerror})") from None


def _config(path: Path, cfg_path: Path, raw: dict) -> ModelConfig:
    if gemma_of(raw):
        try:
            return gemma_config(path, cfg_path, raw, gemma_of(raw))
        except KeyError as e:
            raise ModelFormatError(f"{cfg_path}: missing key {e.args[0]!r}") from None
    family = family_of(raw)
    if family is not None:
        try:
            return family_config(path, cfg_path, raw, family)
        except KeyError as e:
            raise ModelFormatError(f"{cfg_path}: missing key {e.args[0]!r}") from None
    archs = raw.get("architectures") or []
    model_type = raw.get("model_type")
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs) and model_type not in ("llama", "mistral", "qwen2", "qwen3"):
        raise ModelFormatError(f"{cfg_path}: unsupported architecture {archs or model_type!r} "
                               f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)}, FalconForCausalLM, "
                               "OPTForCausalLM, Phi3ForCausalLM)")
    act = raw.get("hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise ModelFormatError(f"{cfg_path}: unsupported hidden_act {act!r} (supported: {', '.join(_ACTIVATIONS)})")
    try:
        d_model, n_head = int(raw["hidden_size"]), int(raw["num_attention_heads"])
        head_dim = int(raw.get("head_dim") or d_model // n_head)
        config = ModelConfig(
            arch=("qwen3" if model_type == "qwen3" or "Qwen3ForCausalLM" in archs else
                  "qwen2" if model_type == "qwen2" or "Qwen2ForCausalLM" in archs else "llama"),
            n_vocab=int(raw["vocab_size"]),
            d_model=d_model,
            n_layer=int(raw["num_hidden_layers"]),
            n_head=n_head,
            n_head_kv=int(raw.get("num_key_value_heads") or n_head),
            head_dim=head_dim,
            n_ff=int(raw["intermediate_size"]),
            norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(_rope_params(raw).get("rope_theta", 10000.0)),
            rope_dim=int(head_dim * float(raw.get("partial_rotary_factor", 1.0))),
            rope_style="neox",
            rope_scaling=_rope_scaling(raw, cfg_path),
            context_length=int(raw.get("max_position_embeddings", 4096)),
            activation=_ACTIVATIONS[act],
            ffn_kind="glu",
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attn_bias=model_type == "qwen2" or bool(raw.get("attention_bias", False)),
            qk_norm=model_type == "qwen3" or "Qwen3ForCausalLM" in archs,
            name=str(raw.get("_name_or_path") or path.name),
        )
    except KeyError as e:
        raise ModelFormatError(f"{cfg_path}: missing key {e.args[0]!r}") from None
    return config


def _rope_params(raw: dict) -> dict:
    # transformers 5 folds rope_theta and rope_scaling into rope_parameters.
    params = dict(raw.get("rope_scaling") or {})
    params.update(raw.get("rope_parameters") or {})
    if "rope_theta" in raw:
        params.setdefault("rope_theta", raw["rope_theta"])
    return params


def _rope_scaling(raw: dict, cfg_path: Path) -> RopeScaling:
    p = _rope_params(raw)
    kind = p.get("rope_type", p.get("type", "default"))
    if kind in ("default", None):
        return RopeScaling()
    if kind not in ("linear", "llama3", "yarn"):
        raise ModelFormatError(f"{cfg_path}: unsupported rope scaling {kind!r} (supported: linear, llama3, yarn)")
    return RopeScaling(
        kind=kind,
        factor=float(p.get("factor", 1.0)),
        original_context=int(p.get("original_max_position_embeddings") or 0),
        low_freq_factor=float(p.get("low_freq_factor", 1.0)),
        high_freq_factor=float(p.get("high_freq_factor", 4.0)),
    )


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        doc = _read_json(index)
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) and "/" not in v and v not in ("", ".", "..")
                                                       for v in weight_map.values()):
            raise ModelFormatError(f"{index}: weight_map must map tensor names to shard file names")
        shards = sorted(set(weight_map.values()))
        files = [path / s for s in shards]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelFormatError(f"{index}: shard {missing[0]} is missing")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelFormatError(f"{path}: no *.safetensors files (only safetensors HF checkpoints are supported)")
    return files


def _map_file(file: Path) -> dict[str, QTensor]:
    """Memory-map every tensor of one safetensors file.

    safe_open validates the file and gives dtypes and shapes, but its numpy framework copies each tensor
    and has no bfloat16; the format is an 8-byte header length, a JSON header with byte offsets, then the
    data, so the data section is mapped directly (zero-copy like GGUF, bf16 kept as raw uint16).
    """
    try:
        with safe_open(file, framework="numpy") as f:
            names = list(f.keys())
            infos = {n: (f.get_slice(n).get_dtype(), tuple(f.get_slice(n).get_shape())) for n in names}
    except (SafetensorError, OSError) as e:
        raise ModelFormatError(f"{file}: not a valid safetensors file ({e})") from None
    # safe_open has already checked the header (its size, the offsets against the file, the dtype sizes)
    with open(file, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(header_len))
    mm = np.memmap(file, dtype=np.uint8, mode="r")
    base = 8 + header_len
    out = {}
    for name, (dtype, shape) in infos.items():
        if dtype not in _DTYPES:
            continue  # e.g. int64 buffers; a weight we need in another dtype fails below as missing
        qtype, np_dtype = _DTYPES[dtype]
        start, end = header[name]["data_offsets"]
        if not 0 <= start <= end <= len(mm) - base or end - start != math.prod(shape) * np.dtype(np_dtype).itemsize:
            raise ModelFormatError(f"{file}: tensor {name} has data offsets {start}..{end}, which do not hold "
                                   f"{list(shape)} {dtype} values inside the file")
        out[name] = QTensor(name, qtype, shape, mm[base + start:base + end].view(np_dtype).reshape(shape))
    return out


def load_hf(path: str | Path) -> tuple[ModelConfig, ModelWeights, dict]:
    """(config, weights, metadata) of an HF directory. metadata has GGUF-style keys where they exist plus the
    raw config under "hf.config"."""
    path = Path(path)
    config, raw = read_config(path)
    tensors: dict[str, QTensor] = {}
    for file in _safetensors_files(path):
        tensors.update(_map_file(file))

    def get(name, shape, optional=False):
        t = tensors.get(name)
        if t is None:
            if optional:
                return None
            raise ModelFormatError(f"{path}: missing tensor {name} (F32/F16/BF16)")
        if t.shape != shape:
            raise ModelFormatError(f"{path}: tensor {name} has shape {list(t.shape)}, expected {list(shape)}")
        return t

    c = config
    if gemma_of(raw):
        weights = gemma_weights(c, tensors, get)
    elif c.arch in ("falcon", "opt", "phi3"):
        weights = family_weights(path, c, raw, tensors, get)
    elif any(n.endswith(("o_proj.bias", "mlp.down_proj.bias", "mlp.up_proj.bias")) for n in tensors):
        raise ModelFormatError(f"{path}: o_proj / MLP biases are not supported (attention_bias or mlp_bias in a llama)")
    else:
        weights = _llama_weights(c, tensors, get)
    metadata = {"general.architecture": c.arch, "general.name": c.name, "hf.config": raw}
    tok_cfg = path / "tokenizer_config.json"
    if tok_cfg.is_file():
        doc = _read_json(tok_cfg)
        template = doc.get("chat_template") if isinstance(doc, dict) else None
        if isinstance(template, str):
            metadata["tokenizer.chat_template"] = template
    return config, weights, metadata


def _llama_weights(c: ModelConfig, tensors: dict[str, QTensor], get) -> ModelWeights:
    d, ff, v = c.d_model, c.n_ff, c.n_vocab
    q_dim, kv_dim = c.n_head * c.head_dim, c.n_head_kv * c.head_dim
    shapes = dict(input_layernorm=(d,), q_proj=(q_dim, d), k_proj=(kv_dim, d), v_proj=(kv_dim, d),
                  o_proj=(d, q_dim), post_attention_layernorm=(d,), gate_proj=(ff, d), up_proj=(ff, d),
                  down_proj=(d, ff), q_bias=(q_dim,), k_bias=(kv_dim,), v_bias=(kv_dim,), q_norm=(c.head_dim,),
                  k_norm=(c.head_dim,))
    optional = {"q_bias": not c.attn_bias, "k_bias": not c.attn_bias, "v_bias": not c.attn_bias,
                "q_norm": not c.qk_norm, "k_norm": not c.qk_norm}
    layers = [LayerWeights(**{role: get(hf_name(role, i), shape, optional=optional.get(role, False))
                              for role, shape in shapes.items()}) for i in range(c.n_layer)]
    embed = get(hf_name("embed_tokens"), (v, d))
    if not c.tie_embeddings and hf_name("lm_head") not in tensors:
        c.tie_embeddings = True  # some checkpoints drop the duplicate head without setting the flag
    return ModelWeights(embed_tokens=embed, layers=layers, norm=get(hf_name("norm"), (d,)),
                        lm_head=embed if c.tie_embeddings else get(hf_name("lm_head"), (v, d)))


def describe_dtypes(weights: ModelWeights) -> str:
    counts: dict[str, int] = {}
    for _, t in weights.named_tensors(distinct=True):
        counts[t.qtype.name] = counts.get(t.qtype.name, 0) + 1
    return "HF safetensors (" + ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1])) + ")"
