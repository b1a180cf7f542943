"""The KV cache: one f16 K and one f16 V tensor per layer, [n_ctx, n_head_kv*head_dim], row = position.

f16 like llama.cpp's default cache type. Owned by the runner; the torch model and the C decoder both read
and write the same tensors (the C side receives their data pointers once).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import PowerInferError


@dataclass
class KVCache:
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    n_ctx: int

    @classmethod
    def allocate(cls, n_layer: int, n_ctx: int, kv_dim: int, device="cpu", dtype=torch.float16) -> "KVCache":
        # Uninitialized on purpose: every reader stops at the last written position, and untouched pages cost
        # neither RAM nor load time (zeroing a 7B model's 2 GiB cache at n_ctx 4096 took 1.9 s of a 15.6 s load).
        need = 2 * n_layer * n_ctx * kv_dim * torch.empty(0, dtype=dtype).element_size()
        if torch.device(device).type == "cpu" and need > _physical_memory():
            # Linux overcommits: the allocation would succeed and the process be killed when the pages are used
            raise PowerInferError(f"the KV cache for a context of {n_ctx} tokens needs {need / 2**30:.1f} GiB, "
                                  f"more than this machine's {_physical_memory() / 2**30:.1f} GiB of memory; "
                                  f"lower -c/--ctx-size")
        try:
            k = [torch.empty(n_ctx, kv_dim, dtype=dtype, device=device) for _ in range(n_layer)]
            v = [torch.empty(n_ctx, kv_dim, dtype=dtype, device=device) for _ in range(n_layer)]
        except (RuntimeError, MemoryError):  # torch's "can't allocate memory" (CPU) / out of memory (CUDA)
            raise PowerInferError(f"the KV cache for a context of {n_ctx} tokens needs {need / 2**30:.1f} GiB "
                                  f"on {device}, which could not be allocated; lower -c/--ctx-size") from None
        return cls(k, v, n_ctx)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX: no bound
        return 1 << 62
