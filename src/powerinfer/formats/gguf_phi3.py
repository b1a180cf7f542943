"""GGUF `phi3` (Phi-3, Phi-3.5, Phi-4-mini) as llama.cpp's converter writes it, in the llama roles of core/weights.py.

`blk.N.attn_qkv` holds the q | k | v rows and `blk.N.ffn_up` the gate | up rows (2 * n_ff of them: llama.cpp's
build_phi3 runs it through ggml_swiglu, which applies silu to the first half); both are read as row views of the
one mapped tensor, so the model is in memory once and the sparse FFN reads gate and up rows as it does for llama.
llama.cpp also reads separate attn_q/attn_k/attn_v when a file has no attn_qkv. The 128k models carry LongRoPE
factors (`rope_factors_long`, `rope_factors_short`, [rope_dim/2] each) and `rope.scaling.attn_factor`. Their
`attention.sliding_window` is written by the converter and ignored by llama.cpp (hparams: "Phi SWA is currently
disabled"), so here too.
"""
from __future__ import annotations

from pathlib import Path

from ..core.config import ModelConfig, RopeScaling
from ..core.tensor import QTensor
from ..errors import ModelFormatError
from . import quants
from .names import GGUF_QKV


def split_rows(t: QTensor, roles: tuple[str, ...], sizes: tuple[int, ...], todo: list) -> dict[str, QTensor]:
    """Consecutive row blocks of `t` as views named after their roles; a tensor queued for type conversion is
    converted as its parts instead (each part then stands alone)."""
    todo[:] = [x for x in todo if x is not t]
    out, start = {}, 0
    for role, n in zip(roles, sizes):
        part = QTensor(f"{t.name}[{role}]", t.qtype, (n, *t.shape[1:]), t.data[start:start + n])
        if quants.needs_conversion(part.qtype):
            todo.append(part)
        out[role] = part
        start += n
    return out


def phi3_layer(cfg: ModelConfig, i: int, tensors: dict[str, QTensor], get, todo: list) -> dict[str, QTensor]:
    """Layer i's fused tensors split into q/k/v and gate/up views (`get(name, shape)` checks and records them)."""
    d, hd, ff = cfg.d_model, cfg.head_dim, cfg.n_ff
    out = {}
    qkv = f"blk.{i}.{GGUF_QKV}.weight"
    if qkv in tensors:
        sizes = (cfg.n_head * hd, cfg.n_head_kv * hd, cfg.n_head_kv * hd)
        out.update(split_rows(get(qkv, (sum(sizes), d)), ("q_proj", "k_proj", "v_proj"), sizes, todo))
    up = get(f"blk.{i}.ffn_up.weight", (2 * ff, d))
    out.update(split_rows(up, ("gate_proj", "up_proj"), (ff, ff), todo))
    return out


def phi3_rope_scaling(path: Path, tensors: dict[str, QTensor], original_context: int,
                      attn_factor: float) -> RopeScaling:
    """LongRoPE from the rope_factors_long / rope_factors_short tensors (both or neither, as the converter writes)."""
    factors = []
    for name in ("rope_factors_long.weight", "rope_factors_short.weight"):
        t = tensors.get(name)
        if t is None:
            raise ModelFormatError(f"{path}: tensor {name} is missing (LongRoPE needs both factor sets)")
        quants.target_type(t.qtype, t.name, str(path))
        if len(t.shape) != 1 or t.shape[0] > 4096:
            raise ModelFormatError(f"{path}: tensor {name} has shape {list(t.shape)}, expected [rope_dim/2]")
        factors.append(tuple(float(x) for x in t.dequantize().tolist()))
    return RopeScaling(kind="longrope", original_context=original_context, long_factors=factors[0],
                       short_factors=factors[1], attn_factor=attn_factor)
