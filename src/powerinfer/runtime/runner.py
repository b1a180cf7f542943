"""One forward step: the `Runner` protocol every execution strategy implements, the KV-cache bookkeeping they
share, and `make_runner`, which picks one (STYLE 5: only the runner knows devices and threads).

  CRunner      (c_runner.py)      the compiled CPU decoder: one C call per decode step, one per prompt chunk
  TorchRunner  (torch_runner.py)  the torch reference model on a device (the reference path and prefill twin)

Tiers of a placement (DESIGN "Tiers and placement") are further implementations of the same protocol:
  HybridRunner (hybrid_runner.py) a fast tier (torch on a device) over the C decoder's CPU tier (--vram-budget)
  DiskRunner   (disk_runner.py)   the C decoder with cold FFN neurons read from a neuron-bundle file (--ram-budget)
"""
from __future__ import annotations

import os
import sys
from typing import Protocol

import numpy as np

from ..core.config import ModelConfig
from ..core.sparse_spec import SparseSpec
from ..errors import ContextOverflowError, ModelFormatError, PowerInferError
from ..model.kvcache import KV_TYPES


class Runner(Protocol):
    compute: str  # "c" | "torch" | "hybrid": which implementation
    device: object  # where its fastest tier computes: "cpu" for the C decoder, a torch.device for torch ones
    config: ModelConfig
    n_ctx: int
    n_threads: int
    tokens: list[int]  # what the KV cache holds, position by position

    @property
    def n_past(self) -> int: ...
    @property
    def sparse(self) -> bool: ...
    def eval(self, ids: list[int], all_logits: bool = False) -> np.ndarray: ...
    def truncate(self, n: int) -> None: ...
    def shift(self, n_keep: int, n_discard: int) -> bool: ...
    def reuse_prefix(self, ids: list[int]) -> int: ...
    def set_sparse(self, spec: SparseSpec | None) -> None: ...
    def set_threads(self, n: int) -> None: ...
    def reset_ffn_stats(self) -> None: ...
    def ffn_sparsity(self) -> float: ...
    def ffn_stats(self) -> dict | None: ...
    def last_ffn(self) -> tuple[float, int] | None: ...
    def last_ffn_layers(self) -> list[int] | None: ...


class CachedSequence:
    """The bookkeeping every runner shares: which tokens the KV cache holds, prefix reuse, and the checks an
    `eval` makes before any compute (and after it: logits must be finite). Subclasses implement
    `_forward(ids, all_logits)`."""

    # --allow-non-finite: NaN/inf logits are replaced (NaN -> -inf) instead of being an error
    allow_non_finite: bool = False
    # -ctk/-ctv: the KV cache's K and V types (model/kvcache.py), for runners that own one
    cache_types: tuple[str, str] = ("f16", "f16")

    def __init__(self, config: ModelConfig, n_ctx: int, n_threads: int, n_batch: int):
        self.config = config
        self.n_ctx = n_ctx or config.context_length
        self.n_threads = n_threads
        self.n_batch = min(n_batch, self.n_ctx)  # as llama.cpp: a batch past the context only wastes memory
        self.tokens: list[int] = []
        self.spec: SparseSpec | None = None

    @property
    def n_past(self) -> int:
        return len(self.tokens)

    @property
    def sparse(self) -> bool:
        return self.spec is not None

    @property
    def sparse_label(self) -> str | None:
        return self.spec.label if self.spec is not None else None

    def truncate(self, n: int) -> None:
        """Forget cached positions >= n (their K/V rows are overwritten by the next eval)."""
        del self.tokens[n:]

    def shift(self, n_keep: int, n_discard: int) -> bool:
        """Drop cached positions [n_keep, n_keep + n_discard) and move the later ones down, their keys rotated back
        by n_discard positions: llama.cpp's K-shift (llama_kv_self_seq_add), so a full context goes on without
        evaluating its kept half again. Keys are stored rotated (RoPE at their position), and RoPE is a rotation
        per position, so R(-d) R(p) = R(p - d); YaRN's magnitude factor is already in the stored keys and the
        back-rotation is a pure rotation. False (nothing changed) when this runner keeps no such cache."""
        kv = getattr(self, "kv", None)
        lo, n = n_keep + n_discard, self.n_past
        if kv is None or not 0 <= n_keep < lo <= n or not kv.k or getattr(kv, "type_k", "f16") not in KV_TYPES:
            return False
        from ..model.rope import rope_inv_freq, rotate

        def rotation(angle):  # float64 angles, as rope_tables computes them, without its magnitude scale
            return np.cos(angle).astype(np.float32)[None, :], np.sin(angle).astype(np.float32)[None, :]

        cfg = self.config
        local = cfg.local_rope()  # gemma3: the local layers' keys were rotated with their own base
        back = (rotation(-n_discard * rope_inv_freq(cfg, self.n_ctx)),
                rotation(-n_discard * rope_inv_freq(local)) if local is not None else None)
        t = n - lo
        for il, (k_cache, v_cache) in enumerate(zip(kv.k, kv.v)):
            c, s = back[1] if local is not None and cfg.is_local(il) else back[0]
            keys = rotate(_key_rows(k_cache[lo:n], kv.type_k).reshape(t, cfg.n_head_kv, cfg.head_dim), c, s,
                          cfg.rope_style)
            _store_key_rows(k_cache[n_keep:n_keep + t], keys.reshape(t, -1), kv.type_k)
            # overlapping ranges: copy out first (any type: bytes)
            v_cache[n_keep:n_keep + t] = v_cache[lo:n].copy() if isinstance(v_cache, np.ndarray) \
                else v_cache[lo:n].clone()
        self.tokens = self.tokens[:n_keep] + self.tokens[lo:]
        return True

    def reuse_prefix(self, ids: list[int]) -> int:
        """Keep the longest cached prefix of `ids` (at least one token is always left to evaluate)."""
        n = 0
        limit = min(len(self.tokens), len(ids) - 1)
        while n < limit and self.tokens[n] == ids[n]:
            n += 1
        self.truncate(n)
        return n

    def eval(self, ids: list[int], all_logits: bool = False) -> np.ndarray:
        """Append `ids` at the end of the cache; float32 logits of the last token ([n_vocab]) or of all
        ([n, n_vocab]), as numpy arrays whatever the runner computes with (the sampler and every consumer are numpy).

        The last-token logits may be a buffer the next `eval` overwrites (no per-token copy of the vocabulary).
        """
        if not ids:
            raise PowerInferError("eval needs at least one token")
        if self.n_past + len(ids) > self.n_ctx:
            raise ContextOverflowError(
                f"{self.n_past + len(ids)} tokens do not fit in the context of {self.n_ctx} (raise -c/--ctx-size)")
        bad = [t for t in ids if not 0 <= t < self.config.n_vocab]
        if bad:
            raise PowerInferError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.n_vocab - 1})")
        out = self._forward(ids, all_logits)
        _check_logits(out, self.n_past, len(ids), self.allow_non_finite)
        self.tokens.extend(ids)
        return out

    def _forward(self, ids: list[int], all_logits: bool) -> np.ndarray:
        raise NotImplementedError

    def set_threads(self, n: int) -> None:
        self.n_threads = n

    # FFN statistics: only runners whose kernels count what they read report them.
    def reset_ffn_stats(self) -> None:
        pass

    def ffn_sparsity(self) -> float:
        return 0.0

    def ffn_stats(self) -> dict | None:
        return None

    def last_ffn(self) -> tuple[float, int] | None:
        return None

    def last_ffn_layers(self) -> list[int] | None:
        return None


def _key_rows(rows, kind: str) -> np.ndarray:
    """f32 values of K cache rows (numpy, or a torch model's tensors); q8_0 rows dequantized by the C kernel
    (llama.cpp's K-shift of a quantized cache casts to f32, ropes and copies back: llama-kv-cache.cpp
    build_rope_shift)."""
    if not isinstance(rows, np.ndarray):  # a torch model's cache, on its device
        rows = rows.float().cpu().numpy()
    if kind != "q8_0":
        return rows.astype(np.float32)
    from .. import _C

    rows = np.ascontiguousarray(rows)
    out = np.empty((rows.shape[0], rows.shape[1] // 34 * 32), dtype=np.float32)
    _C.dequantize(8, rows.ctypes.data, out.size, out.ctypes.data)
    return out


def _store_key_rows(dst, keys: np.ndarray, kind: str) -> None:
    """Write f32 keys into K cache rows of `kind` (q8_0: quantized as the decoder's cache writes)."""
    if kind == "q8_0":
        from .. import _C

        keys = np.ascontiguousarray(keys, dtype=np.float32)
        blocks = np.empty(dst.shape, dtype=np.uint8)
        _C.quantize_q8_0(keys.ctypes.data, keys.size, blocks.ctypes.data)
        keys = blocks
    if isinstance(dst, np.ndarray):
        dst[...] = keys  # f32 -> f16 rounds to nearest even, as torch's .to(float16)
    else:
        import torch

        dst.copy_(torch.from_numpy(keys).to(dst.device, dst.dtype))


def torch_cache_types(cache_types, what: str) -> tuple[str, str]:
    """The K/V types a torch-model runner can hold (its attention reads f32/f16 tensors), else a one-line error."""
    cache_types = tuple(cache_types or ("f16", "f16"))
    if "q8_0" in cache_types:
        raise PowerInferError(f"-ctk/-ctv q8_0: {what} keeps its KV cache as torch tensors (f32 or f16); q8_0 runs on "
                              "the C decoder (the CPU without --vram-budget)")
    return cache_types


def _check_logits(logits: np.ndarray, pos: int, n: int, allow: bool) -> None:
    """NaN or infinite logits (corrupt or overflowing weights) are a one-line error naming the position, or, when
    allowed, made samplable in place: NaN -> -inf, +inf -> the largest float, a row with nothing finite -> zeros."""
    finite = np.isfinite(logits)
    if finite.all():
        return
    rows = logits.reshape(-1, logits.shape[-1])  # a view: the fixes below write through
    if not allow:
        p = pos + int(np.flatnonzero(~finite.reshape(rows.shape).all(-1))[0]) if logits.ndim > 1 else pos + n - 1
        raise ModelFormatError(f"the model produced NaN or infinite logits at position {p} (corrupt or overflowing "
                               "weights); --allow-non-finite samples from the finite ones anyway")
    rows[np.isnan(rows)] = -np.inf
    rows[np.isposinf(rows)] = np.finfo(rows.dtype).max
    rows[np.isneginf(rows).all(-1)] = 0.0


def make_runner(loaded, n_ctx: int, n_threads: int, n_batch: int = 512, device: str = "cpu",
                compute: str = "auto", placement=None, solve=None, log=None,
                cache_types: tuple[str, str] = ("f16", "f16")) -> Runner:
    """compute: "c" (the compiled CPU decoder), "torch" (the reference model on `device`), or "auto" (C on the
    CPU, torch on any other device). `placement` (settings.PlacementSettings): with a fast tier (CUDA, or
    --hot-device), a HybridRunner over the tiers runtime/placement.py plans (`solve` finds hot neurons when no
    index is cached); without one, or when its budget cannot hold the dense parts, the CPU runner. `cache_types`:
    the KV cache's K and V types (-ctk/-ctv); the torch model (and so the fast tier) takes f32 and f16 only."""
    c = loaded.config
    # the disk tier's and the hybrid FFN's norms are RMSNorm on the post-attention residual, without biases
    llama_block = c.norm == "rms" and not c.parallel_residual and c.positions == "rope" and not c.post_norms
    unplaceable = PowerInferError(f"--ram-budget / --vram-budget placements run llama-family models; {c.arch} "
                                  "(LayerNorm, biases, parallel residual, learned positions or Gemma's post-FFN "
                                  "norm) runs on the CPU decoder without them")
    if placement is not None and getattr(placement, "ram_budget", None) is not None:
        if not llama_block:
            raise unplaceable
        from .disk_runner import DiskRunner

        # the gate stays resident unless predictors decide activity (a guess the runner corrects in set_sparse)
        preds = getattr(placement, "predictors", None) or loaded.has_predictors
        return DiskRunner(loaded, n_ctx, n_threads, n_batch, placement.ram_budget, solve=solve, log=log or sys.stderr,
                          gate_resident=not preds, cache_types=cache_types)
    if placement is not None and _fast_tier_possible(placement):
        from .placement import plan_tiers

        plan = plan_tiers(loaded, placement, n_ctx or loaded.config.context_length, solve, log or sys.stderr)
        if plan is not None:
            if not llama_block:
                raise unplaceable
            from .hybrid_runner import HybridRunner

            return HybridRunner(loaded, n_ctx, n_threads, n_batch, plan, cache_types=cache_types)
    if compute == "auto":
        compute = "c" if str(device).partition(":")[0] == "cpu" else "torch"
    if compute == "c":
        from .c_runner import CRunner

        return CRunner(loaded, n_ctx, n_threads, n_batch, cache_types=cache_types)
    if compute == "torch":
        from .torch_runner import TorchRunner

        return TorchRunner(loaded, n_ctx, n_threads, n_batch, device, cache_types=cache_types)
    raise PowerInferError(f"unknown compute {compute!r} (c | torch | auto)")


def _fast_tier_possible(placement) -> bool:
    """Whether a placement could have a fast tier: --hot-device or a --vram-budget above 0 asked for one (plan_tiers
    says when it cannot be had; -ngl 0 / --vram-budget 0 asks for none), or a GPU kernel driver is loaded (NVIDIA's,
    ROCm's /dev/kfd, WSL's /dev/dxg). Asking torch.cuda directly costs torch's import (0.9 s and 177 MiB of a 1.5 s,
    398 MiB start-up on the bundled model), and without a driver its answer is no; where the OS has no such files to
    look at, torch is asked."""
    if getattr(placement, "hot_device", None):
        return True
    budget = getattr(placement, "vram_budget", None)
    if budget is not None:
        return budget > 0
    if sys.platform != "linux":
        return True
    return any(os.path.exists(p) for p in ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/kfd", "/dev/dxg"))
