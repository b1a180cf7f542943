"""The KV cache: one K and one V array per layer, [n_ctx] rows of n_head_kv*head_dim values, row = position.

Data types as llama.cpp's -ctk/-ctv: f16 (its default), f32, or q8_0 (32-value blocks of an f16 scale and 32
int8, 34 bytes: stored as uint8 rows [n_ctx, kv_dim/32*34]). Owned by the runner. The C decoder binds numpy
arrays in host memory (`allocate_arrays`: every type, its data pointers bound once, kernels/csrc/attn.h), so a
C-only process never imports torch (#17: torch's import is 0.9 s and 177 MiB of a 0.4 GB start-up); the torch model
reads and writes f32/f16 torch tensors on its device (`allocate`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..errors import PowerInferError

# type name -> (GGML type id, storage dtype: numpy's, and torch's of the same name)
KV_TYPES = {"f32": (0, np.dtype(np.float32)), "f16": (1, np.dtype(np.float16)), "q8_0": (8, np.dtype(np.uint8))}
Q8_0_BLOCK_BYTES = 34  # ggml block_q8_0: f16 d, int8 qs[32]


def row_width(type_name: str, kv_dim: int) -> int:
    """Elements of a cache row of kv_dim values in its storage dtype."""
    return kv_dim // 32 * Q8_0_BLOCK_BYTES if type_name == "q8_0" else kv_dim


@dataclass
class KVCache:
    k: list  # numpy arrays (allocate_arrays) or torch tensors (allocate), [n_ctx, row_width]
    v: list
    n_ctx: int
    type_k: str = "f16"
    type_v: str = "f16"

    @classmethod
    def allocate_arrays(cls, n_layer: int, n_ctx: int, kv_dim: int, type_k: str = "f16",
                        type_v: str = "f16") -> KVCache:
        """numpy arrays in host memory, the C decoder's cache."""
        widths, dtypes, need = _layout(n_layer, n_ctx, kv_dim, type_k, type_v)
        _check_fits(need, n_ctx)
        try:
            # Uninitialized on purpose: every reader stops at the last written position, and untouched pages cost
            # neither RAM nor load time (zeroing a 7B model's 2 GiB cache at n_ctx 4096 took 1.9 s of a 15.6 s load).
            k = [np.empty((n_ctx, widths[0]), dtype=dtypes[0]) for _ in range(n_layer)]
            v = [np.empty((n_ctx, widths[1]), dtype=dtypes[1]) for _ in range(n_layer)]
        except MemoryError:
            raise _unallocatable(need, n_ctx, "cpu") from None
        return cls(k, v, n_ctx, type_k, type_v)

    @classmethod
    def allocate(cls, n_layer: int, n_ctx: int, kv_dim: int, device="cpu", type_k: str = "f16",
                 type_v: str = "f16", dtype=None) -> KVCache:
        """torch tensors on `device`, the torch model's cache. dtype, when given, is both types' torch dtype (the
        torch model's callers): float32 or float16, or float64 for a float64 reference model (plain float rows like
        f32's, twice the bytes)."""
        import torch

        if dtype is not None:
            if dtype not in (torch.float32, torch.float16, torch.float64):
                raise ValueError(f"a KV cache of {dtype} rows: float32, float16 or float64")
            type_k = type_v = "f16" if dtype == torch.float16 else "f32"
        widths, dtypes, need = _layout(n_layer, n_ctx, kv_dim, type_k, type_v)
        dtypes = [getattr(torch, d.name) for d in dtypes]  # float32, float16, uint8: the same names in torch
        if dtype is not None:
            need = need // dtypes[0].itemsize * dtype.itemsize
            dtypes = [dtype, dtype]
        if torch.device(device).type == "cpu":
            _check_fits(need, n_ctx)
        try:
            k = [torch.empty(n_ctx, widths[0], dtype=dtypes[0], device=device) for _ in range(n_layer)]
            v = [torch.empty(n_ctx, widths[1], dtype=dtypes[1], device=device) for _ in range(n_layer)]
        except (RuntimeError, MemoryError):  # torch's "can't allocate memory" (CPU) / out of memory (CUDA)
            raise _unallocatable(need, n_ctx, device) from None
        return cls(k, v, n_ctx, type_k, type_v)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.k + self.v)

    @property
    def ggml_types(self) -> tuple[int, int]:
        return KV_TYPES[self.type_k][0], KV_TYPES[self.type_v][0]


def _layout(n_layer: int, n_ctx: int, kv_dim: int, type_k: str, type_v: str):
    """(row widths, numpy dtypes, total bytes) of a cache, or a one-line error for a type it cannot hold."""
    for name in (type_k, type_v):
        if name not in KV_TYPES:
            raise PowerInferError(f"unknown KV cache type {name!r} ({', '.join(KV_TYPES)})")
        if name == "q8_0" and kv_dim % 32:
            raise PowerInferError(f"a q8_0 KV cache needs rows of a multiple of 32 values, this model's are {kv_dim}")
    widths = [row_width(t, kv_dim) for t in (type_k, type_v)]
    dtypes = [KV_TYPES[t][1] for t in (type_k, type_v)]
    return widths, dtypes, n_layer * n_ctx * sum(w * d.itemsize for w, d in zip(widths, dtypes))


def _check_fits(need: int, n_ctx: int) -> None:
    # Linux overcommits: the allocation would succeed and the process be killed when the pages are used
    if need > _physical_memory():
        raise PowerInferError(f"the KV cache for a context of {n_ctx} tokens needs {need / 2**30:.1f} GiB, "
                              f"more than this machine's {_physical_memory() / 2**30:.1f} GiB of memory; "
                              f"lower -c/--ctx-size")


def _unallocatable(need: int, n_ctx: int, device) -> PowerInferError:
    return PowerInferError(f"the KV cache for a context of {n_ctx} tokens needs {need / 2**30:.1f} GiB "
                           f"on {device}, which could not be allocated; lower -c/--ctx-size")


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX: no bound
        return 1 << 62
