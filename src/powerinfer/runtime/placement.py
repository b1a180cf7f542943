"""Which tier each part of a model lives on (DESIGN, "Tiers and placement"; upstream's allocator,
reference/powerinfer.md 2.6-2.7 and 6.1).

The fast tier is torch on a device: CUDA when present, or the CPU with `--hot-device cpu` (the same code, which
is how it is tested without a GPU). Its weights are dense copies in the format the device computes well: f16 on
CUDA (cuBLAS GEMV streams f16 at memory speed and torch has no 4-bit matmul; the cost is 64 bytes per 32 weights
against Q4_0's 18, so a 4-bit model's hot neurons take 3.6x their file size in VRAM), f32 on the CPU (exact
against the reference; the CPU fast tier exists for testing).

Fill order: the dense parts first, all or nothing (attention and its KV cache for -c tokens, norms, predictors,
embeddings and output head: the torch model runs them together, and attention must sit where its KV cache is;
upstream fills attention -> predictors -> norms -> head -> KV and can leave KV on the host, which ggml's
scheduler copies per token), then the FFN neurons that fire most often, as many as the rest of the budget holds.
A budget too small for the dense parts runs everything on the CPU, with one line saying so.

Hot sets come, in this order, from an upstream-layout `<model>.generated.gpuidx` beside the model or in the cache
that was solved for exactly this budget (upstream reuses an index solved for a smaller budget; here a different
budget solves again), or from the solver (prepare/solve.py `solve_hot_sets`, injected by the caller like
calibration is), whose result is cached as a `.gpuidx` under ~/.cache/powerinfer/<fingerprint>/.
`--reset-gpu-index` ignores cached indexes; `--disable-gpu-index` places no neurons and touches no index file.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import PowerInferError
from ..formats.gpuidx import GPUIDX_SUFFIX, gpuidx_path, read_gpuidx, write_gpuidx
from ..settings import PlacementSettings
from ..sparse.artifacts import DEFAULT_CACHE_DIR, model_fingerprint

GIB = 1 << 30
CUDA_MARGIN = 256 << 20  # upstream's default budget is the free VRAM minus 256 MiB (reference/powerinfer.md 2.7)
KV_BYTES = 2  # the KV cache is f16 on every tier
ALIGN = 32  # neurons per placement group (upstream's CUDA path wants multiples of 32 per layer)

# solve(loaded, neuron_bytes, budget, align, log) -> (hot ids per layer, a description of their source)
Solve = Callable[..., tuple[list[np.ndarray], str]]


@dataclass
class TierPlan:
    device: torch.device
    dtype: torch.dtype  # the fast tier's weight format
    hot: list[np.ndarray]  # per layer: ascending ids of the FFN neurons on the fast tier
    neuron_bytes: list[int]  # per layer: fast-tier bytes of one neuron (gate row + up row + down column)
    dense_bytes: dict[str, int]  # the dense parts on the fast tier, by kind
    budget: int
    source: str  # where the hot sets came from

    @property
    def hot_bytes(self) -> int:
        return sum(len(h) * b for h, b in zip(self.hot, self.neuron_bytes))

    def hot_fraction(self, n_ff: int) -> float:
        return sum(len(h) for h in self.hot) / (len(self.hot) * n_ff) if self.hot else 0.0

    def describe(self, n_ff: int) -> list[str]:
        """The placement, for --verbose: budget, dense parts, and per layer the hot neurons and bytes per tier."""
        used = sum(self.dense_bytes.values()) + self.hot_bytes
        lines = [f"placement: fast tier {self.device} ({str(self.dtype).removeprefix('torch.')}), "
                 f"{used / GIB:.3f} of {self.budget / GIB:.3f} GiB; hot neurons from {self.source}",
                 "  dense parts on the fast tier: " + ", ".join(f"{k} {v / 2**20:.1f} MiB"
                                                               for k, v in self.dense_bytes.items()),
                 "  layer  hot neurons      fast-tier MiB"]
        for il, (h, b) in enumerate(zip(self.hot, self.neuron_bytes)):
            lines.append(f"  {il:5d}  {len(h):6d} ({len(h) / n_ff:5.1%})  {len(h) * b / 2**20:10.2f}")
        return lines


def fast_device(settings: PlacementSettings) -> torch.device | None:
    """The fast tier's device: --hot-device, else CUDA when present, else none (everything on the CPU)."""
    if settings.hot_device:
        dev = torch.device(settings.hot_device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise PowerInferError(f"--hot-device {settings.hot_device}: no CUDA device is available")
        return dev
    return torch.device("cuda") if torch.cuda.is_available() else None


def fast_budget(settings: PlacementSettings, device: torch.device) -> int:
    if settings.vram_budget is not None:
        return int(settings.vram_budget * GIB)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(0, free - CUDA_MARGIN)
    return 0


def dense_parts(loaded, n_ctx: int, value_bytes: int) -> dict[str, int]:
    """Fast-tier bytes of everything but the FFN matrices, by kind."""
    cfg, w = loaded.config, loaded.weights
    size = lambda t: 0 if t is None else t.rows * t.cols * value_bytes  # noqa: E731
    attention = sum(size(getattr(lw, n)) for lw in w.layers for n in ("input_layernorm", "q_proj", "k_proj",
                                                                      "v_proj", "o_proj", "q_bias", "k_bias",
                                                                      "v_bias"))
    kv = 2 * cfg.n_layer * n_ctx * cfg.n_head_kv * cfg.head_dim * KV_BYTES
    predictors = sum(size(t) for name, t in loaded.extra_tensors.items() if name.endswith((".fc1.weight",
                                                                                          ".fc2.weight")))
    norms = sum(size(lw.post_attention_layernorm) for lw in w.layers) + size(w.norm)
    head = size(w.embed_tokens) + (0 if w.lm_head is w.embed_tokens else size(w.lm_head))
    return {"attention": attention, "kv_cache": kv, "predictors": predictors, "norms": norms,
            "embeddings_and_head": head}


def neuron_bytes(loaded, value_bytes: int) -> list[int]:
    d = loaded.config.d_model
    return [((d if lw.gate_proj is not None else 0) + 2 * d) * value_bytes for lw in loaded.weights.layers]


def _cached_index(path: Path, loaded, budget: int) -> list[np.ndarray] | None:
    if not path.is_file():
        return None
    idx = read_gpuidx(path, loaded.config.n_layer, loaded.config.n_ff)
    return idx.hot_index if idx.vram_capacity == budget else None


def plan_tiers(loaded, settings: PlacementSettings, n_ctx: int, solve: Solve | None = None,
               log=sys.stderr) -> TierPlan | None:
    """The placement for `settings`, or None when everything runs on the CPU (no fast device, or a budget too
    small for the dense parts: said on `log`)."""
    device = fast_device(settings)
    if device is None:
        if settings.vram_budget:
            print("note: --vram-budget is ignored: no CUDA device (--hot-device cpu runs the hybrid path with the "
                  "fast tier on the CPU)", file=log)
        return None
    budget = fast_budget(settings, device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    vb = torch.finfo(dtype).bits // 8
    dense = dense_parts(loaded, n_ctx, vb)
    need = sum(dense.values())
    if budget < need:
        print(f"note: the fast tier's budget of {budget / GIB:.3f} GiB is below the {need / GIB:.3f} GiB its dense "
              f"parts need (attention and its KV cache for {n_ctx} tokens {(dense['attention'] + dense['kv_cache']) / GIB:.3f} "
              f"GiB, embeddings and head, norms, predictors); running everything on the CPU", file=log)
        return None
    per_neuron = neuron_bytes(loaded, vb)
    left = budget - need
    cfg = loaded.config
    if settings.disable_gpu_index:
        return TierPlan(device, dtype, [np.zeros(0, dtype=np.int64) for _ in range(cfg.n_layer)], per_neuron, dense,
                        budget, "nowhere (--disable-gpu-index)")
    cache = DEFAULT_CACHE_DIR.expanduser() / model_fingerprint(loaded) / (loaded.path.name + GPUIDX_SUFFIX)
    if not settings.reset_gpu_index:
        for path in (gpuidx_path(loaded.path), cache):
            hot = _cached_index(path, loaded, budget)
            if hot is not None:
                return TierPlan(device, dtype, hot, per_neuron, dense, budget, f"index {path}")
    if solve is None:
        raise PowerInferError(f"no placement index for a budget of {budget} bytes (run `powerinfer solve "
                              f"--vram-budget {budget / GIB:g}`)")
    hot, source = solve(loaded, per_neuron, left, ALIGN, log)
    write_gpuidx(cache, hot, cfg.n_ff, budget)  # creates the cache's directories user-only (core/files.py)
    return TierPlan(device, dtype, hot, per_neuron, dense, budget, f"{source}, solved now (cached {cache})")
