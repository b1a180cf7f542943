"""Attention over an f16 KV cache with the C kernels (csrc/attn.h), outside the decoder: the decode split-K path
(one query position; past 256 positions the sequence is cut into chunks whose softmax states are merged) and the
prefill FlashAttention tiles (a run of query positions, causal). The decoder runs the same code on its own cache;
these wrappers exist for the parity tests against `reference.attention_ref` and for timing. Caches are
[n_ctx, n_head_kv*head_dim] float16 (model/kvcache.py), queries float32 and already roped."""
from __future__ import annotations

import torch

from .. import _C

CHUNK = 256  # PI_ATTN_CHUNK: positions per decode chunk (one partial softmax state per chunk and head)


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, n_head: int, n_head_kv: int) -> int:
    for t in (k_cache, v_cache):
        if t.dtype != torch.float16 or not t.is_contiguous() or t.dim() != 2:
            raise ValueError("KV caches must be contiguous float16 [n_ctx, n_head_kv*head_dim]")
    if k_cache.shape != v_cache.shape or n_head % n_head_kv or k_cache.shape[1] % n_head_kv:
        raise ValueError("K and V caches differ in shape, or the head counts do not divide")
    hd = k_cache.shape[1] // n_head_kv
    if q.dtype != torch.float32 or not q.is_contiguous() or q.shape[-1] != n_head * hd:
        raise ValueError(f"q must be contiguous float32 [..., n_head*head_dim = {n_head * hd}]")
    return hd


def attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int, n_head: int,
                     n_head_kv: int, n_threads: int = 1, iters: int = 1, softcap: float = 0.0,
                     window: int = 0) -> tuple[torch.Tensor, float]:
    """(out [n_head*head_dim], ns per call): the query at position `pos` against cache rows 0..pos (the last
    `window` of them when window > 0), scores soft-capped to softcap*tanh(s/softcap) when softcap > 0 (Gemma 2)."""
    hd = _check(q, k_cache, v_cache, n_head, n_head_kv)
    out = torch.empty(n_head * hd, dtype=torch.float32)
    ns = _C.attention(0, q.data_ptr(), 1, pos, n_head, n_head_kv, hd, k_cache.data_ptr(), v_cache.data_ptr(),
                      k_cache.shape[0], out.data_ptr(), n_threads, iters, float(softcap), int(window))
    return out, ns


def attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos0: int, n_head: int,
                      n_head_kv: int, n_threads: int = 1, iters: int = 1, softcap: float = 0.0,
                      window: int = 0) -> tuple[torch.Tensor, float]:
    """(out [n_tok, n_head*head_dim], ns per call): queries q [n_tok, n_head*head_dim] at positions pos0.., each
    against cache rows 0..its own position (causal; the last `window` of them when window > 0), softcap as in
    attention_decode."""
    hd = _check(q, k_cache, v_cache, n_head, n_head_kv)
    n = q.shape[0]
    out = torch.empty(n, n_head * hd, dtype=torch.float32)
    ns = _C.attention(1, q.data_ptr(), n, pos0, n_head, n_head_kv, hd, k_cache.data_ptr(), v_cache.data_ptr(),
                      k_cache.shape[0], out.data_ptr(), n_threads, iters, float(softcap), int(window))
    return out, ns
