"""The KV cache: one f16 K and one f16 V tensor per layer, [n_ctx, n_head_kv*head_dim], row = position.

f16 like llama.cpp's default cache type. Owned by the runner; the torch model and the C decoder both read
and write the same tensors (the C side receives their data pointers once).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    n_ctx: int

    @classmethod
    def allocate(cls, n_layer: int, n_ctx: int, kv_dim: int, device="cpu", dtype=torch.float16) -> "KVCache":
        # Uninitialized on purpose: every reader stops at the last written position, and untouched pages cost
        # neither RAM nor load time (zeroing a 7B model's 2 GiB cache at n_ctx 4096 took 1.9 s of a 15.6 s load).
        k = [torch.empty(n_ctx, kv_dim, dtype=dtype, device=device) for _ in range(n_layer)]
        v = [torch.empty(n_ctx, kv_dim, dtype=dtype, device=device) for _ in range(n_layer)]
        return cls(k, v, n_ctx)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
