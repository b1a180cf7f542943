"""Attention over a KV cache with the C kernels (csrc/attn.h), outside the decoder: the decode split-K path
(one query position; past 256 positions the sequence is cut into chunks whose softmax states are merged) and the
prefill FlashAttention tiles (a run of query positions, causal). The decoder runs the same code on its own cache;
these wrappers exist for the parity tests against `reference.attention_ref` and for timing. Caches are [n_ctx] rows
of n_head_kv*head_dim values (model/kvcache.py): float32 (k_type "f32"), float16 ("f16") or uint8 q8_0 blocks
("q8_0", 34 bytes per 32 values); queries float32 and already roped."""
from __future__ import annotations

import torch

from .. import _C

CHUNK = 256  # PI_ATTN_CHUNK: positions per decode chunk (one partial softmax state per chunk and head)
# cache type -> (GGML id, storage dtype)
KV_FORMATS = {"f32": (0, torch.float32), "f16": (1, torch.float16), "q8_0": (8, torch.uint8)}


def _values(t: torch.Tensor, kind: str) -> int:
    return t.shape[1] // 34 * 32 if kind == "q8_0" else t.shape[1]


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, n_head: int, n_head_kv: int,
           k_type: str, v_type: str) -> int:
    for t, kind in ((k_cache, k_type), (v_cache, v_type)):
        if kind not in KV_FORMATS or t.dtype != KV_FORMATS[kind][1] or not t.is_contiguous() or t.dim() != 2:
            raise ValueError(f"KV caches must be contiguous [n_ctx, row] of their type's storage ({kind})")
    kv_dim = _values(k_cache, k_type)
    if _values(v_cache, v_type) != kv_dim or k_cache.shape[0] != v_cache.shape[0] or n_head % n_head_kv or \
            kv_dim % n_head_kv:
        raise ValueError("K and V caches differ in shape, or the head counts do not divide")
    hd = kv_dim // n_head_kv
    if q.dtype != torch.float32 or not q.is_contiguous() or q.shape[-1] != n_head * hd:
        raise ValueError(f"q must be contiguous float32 [..., n_head*head_dim = {n_head * hd}]")
    return hd


def attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int, n_head: int,
                     n_head_kv: int, n_threads: int = 1, iters: int = 1, softcap: float = 0.0,
                     window: int = 0, k_type: str = "f16", v_type: str = "f16") -> tuple[torch.Tensor, float]:
    """(out [n_head*head_dim], ns per call): the query at position `pos` against cache rows 0..pos (the last
    `window` of them when window > 0), scores soft-capped to softcap*tanh(s/softcap) when softcap > 0 (Gemma 2);
    k_type / v_type: the caches' formats (KV_FORMATS)."""
    hd = _check(q, k_cache, v_cache, n_head, n_head_kv, k_type, v_type)
    out = torch.empty(n_head * hd, dtype=torch.float32)
    ns = _C.attention(0, q.data_ptr(), 1, pos, n_head, n_head_kv, hd, k_cache.data_ptr(), v_cache.data_ptr(),
                      k_cache.shape[0], out.data_ptr(), n_threads, iters, float(softcap), int(window),
                      KV_FORMATS[k_type][0], KV_FORMATS[v_type][0])
    return out, ns


def attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos0: int, n_head: int,
                      n_head_kv: int, n_threads: int = 1, iters: int = 1, softcap: float = 0.0,
                      window: int = 0, k_type: str = "f16", v_type: str = "f16") -> tuple[torch.Tensor, float]:
    """(out [n_tok, n_head*head_dim], ns per call): queries q [n_tok, n_head*head_dim] at positions pos0.., each
    against cache rows 0..its own position (causal; the last `window` of them when window > 0), softcap as in
    attention_decode."""
    hd = _check(q, k_cache, v_cache, n_head, n_head_kv, k_type, v_type)
    n = q.shape[0]
    out = torch.empty(n, n_head * hd, dtype=torch.float32)
    ns = _C.attention(1, q.data_ptr(), n, pos0, n_head, n_head_kv, hd, k_cache.data_ptr(), v_cache.data_ptr(),
                      k_cache.shape[0], out.data_ptr(), n_threads, iters, float(softcap), int(window),
                      KV_FORMATS[k_type][0], KV_FORMATS[v_type][0])
    return out, ns
