"""The model families benchmarks/make_synthetic.py writes: each family's hyperparameter keys and per-layer tensors
named as llama.cpp's converter (convert_hf_to_gguf.py) writes them, so that llama.cpp and this project's reader
(formats/gguf.py) load the file as that family.

* llama (LlamaModel): rope.dimension_count, attention.layer_norm_rms_epsilon; attn_norm, attn_q/k/v/output, ffn_norm,
  ffn_gate/up/down per layer.
* qwen3 (Qwen3Model): the llama layer plus attn_q_norm / attn_k_norm ([head_dim] RMSNorm weights applied to every
  query and key head before RoPE); attention.key_length / value_length (the config's head_dim) and no
  rope.dimension_count; NeoX RoPE is implied by the family. Qwen3-8B: rope base 1e6, eps 1e-6, untied head,
  context 40960.
* falcon (FalconModel, the 7B layout): one LayerNorm with bias (attn_norm.weight/.bias) feeding attention and the MLP,
  which run in parallel from it; one fused attn_qkv (rows q | k | v; Falcon-7B is multi-query, one K/V head); an
  ungated MLP (ffn_up, ffn_down: no ffn_norm, no ffn_gate); output_norm with bias; no projection biases (Falcon-7B
  has none). Keys: attention.layer_norm_epsilon, context_length 2048 and tensor_data_layout "jploski" (the
  converter writes both as constants), no RoPE keys (base 10000).
"""
from __future__ import annotations

import numpy as np

ARCHS = ("llama", "qwen3", "falcon")
GATED = ("llama", "qwen3")  # families with an ffn_gate (the sparsity construction steers the gate)


def write_hparams(w, spec) -> None:
    """The family's hyperparameter keys (GGUFWriter prefixes them with its architecture)."""
    w.add_context_length(spec.ctx)
    w.add_embedding_length(spec.d_model)
    w.add_block_count(spec.n_layer)
    w.add_feed_forward_length(spec.n_ff)
    w.add_head_count(spec.n_head)
    w.add_head_count_kv(spec.n_head_kv)
    if spec.arch == "falcon":
        w.add_tensor_data_layout("jploski")
        w.add_layer_norm_eps(spec.eps)
        return
    if spec.arch == "qwen3":
        w.add_key_length(spec.head_dim)
        w.add_value_length(spec.head_dim)
    else:
        w.add_rope_dimension_count(spec.head_dim)
    w.add_rope_freq_base(spec.rope_theta)
    w.add_layer_norm_rms_eps(spec.eps)


def layer_tensors(spec, p: str, llama: dict, blocks) -> list:
    """Layer `p` ("blk.i.") of the family from the llama layer `llama` (GGUF name -> tensor, llama.cpp's names);
    `blocks(rows, cols, std)` makes a new random matrix (falcon's fused attn_qkv)."""
    if spec.arch == "llama":
        return list(llama.items())
    hd, d = spec.head_dim, spec.d_model
    if spec.arch == "qwen3":
        out = []
        for name, t in llama.items():
            out.append((name, t))
            if name.endswith(("attn_q.weight", "attn_k.weight")):
                out.append((name.replace(".weight", "_norm.weight"), np.ones(hd, np.float32)))
        return out
    ones = llama[p + "attn_norm.weight"]
    return [(p + "attn_norm.weight", ones), (p + "attn_norm.bias", np.zeros(d, np.float32)),
            (p + "attn_qkv.weight", blocks((spec.n_head + 2 * spec.n_head_kv) * hd, d, d ** -0.5)),
            *((p + n, llama[p + n]) for n in ("attn_output.weight", "ffn_up.weight", "ffn_down.weight"))]


def head_tensors(spec, norm) -> list:
    """The final norm (falcon's has a bias)."""
    out = [("output_norm.weight", norm)]
    if spec.arch == "falcon":
        out.append(("output_norm.bias", np.zeros(spec.d_model, np.float32)))
    return out
