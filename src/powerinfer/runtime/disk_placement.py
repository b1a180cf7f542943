"""The RAM tier's placement under `--ram-budget` (DESIGN "Tiers and placement"; reference/hybrid.md 4-6): what
stays in memory, and which FFN neurons live in the neuron-bundle file and are read when they fire.

Resident, in this order (PowerInfer's priority: attention -> predictors -> norms -> head -> KV, reference/
powerinfer.md 6.1):
  dense parts   attention (q, k, v, o, biases), norms, the output head (packed copies), predictors (f16), the KV
                cache for -c tokens and the RoPE tables. The token embeddings are not resident: a step reads one row
                of the table from the model file.
  activity test the inputs that decide which neurons fire. With the exact ReLU rule and no predictors that is the
                whole gate matrix (a disk neuron's activity is known only from its gate row, and reading every gate
                row per token would read a third of the FFN); with predictors the gate rows live in the bundles.
  neuron cache  CACHE_FRACTION of what the budget has left for neurons (at least MIN_CACHE_SLOTS bundles: a 7B
                Q4_0 at 40% of its file has ~0.1 GiB left after attention, so a share of the whole budget would
                leave no hot neurons) for recently fired disk neurons
                (2Q: a FIFO for neurons read once, an LRU for neurons read again within 5 tokens, kernels/csrc/
                disk.c; a layer that fires more disk neurons than the cache holds reads the rest
                into overflow slots it gives back after the layer).
  hot neurons   the most often firing neurons (the profile's counts via the injected solver, prepare/solve.py; with
                no profile an even share of every layer, its first neurons), as many bundles as the rest holds.
Everything else is a disk neuron. Neurons are kept as bundles (gate, up and down_t rows, kernels/csrc/disk.h) in
RAM too: the kernels read resident and cached neurons through one slot map with one stride, which is what makes
the sums the all-RAM path's sums (same neurons in the same order); the cost is the I/O padding of each resident
bundle (7B Q4_0: 8960 bytes of rows in a 9216-byte slot at 512-byte blocks, 12288 at 4 KiB).
"""
from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..core.tensor import row_bytes
from ..errors import PowerInferError
from ..formats.quants import transposed_qtype

GIB = 1 << 30
KV_BYTES = 2  # f16 KV cache
# O_DIRECT wants offsets, lengths and buffers aligned to the device's logical block: 4 KiB where it is not known (many
# NVMe drives), the block itself where the bundle file's device says (512 B here: a 7B Q4_0 bundle's 8960 bytes of
# rows take 9216 bytes instead of 12288, a quarter fewer bytes read per token and a third more resident neurons)
ALIGN_IO = 4096
ALIGN_ROW = 64  # rows inside a bundle start on cache lines (the kernels' loads)
# LLM in a flash keeps the neurons of the last k = 5 tokens (about 10% of the FFN at its 2.4% loaded per token,
# reference/hybrid.md 4.2); a larger cache takes budget from the hot set, which serves every token, and mlx-lm
# #1438 measured a resident cache past its optimum running slower.
CACHE_FRACTION = 0.10
MIN_CACHE_SLOTS = 256

# solve(loaded, neuron_bytes, budget, align, log) -> (ids per layer, where they came from)
Solve = Callable[..., tuple[list[np.ndarray], str]]


@dataclass(frozen=True)
class BundleLayout:
    """One layer's bundle: three rows at 64-byte offsets, padded to the I/O alignment."""

    gate_qtype: int  # -1: no gate (act(up) MLPs)
    gate_off: int
    up_qtype: int
    up_off: int
    down_qtype: int  # down_t: the neuron-major copy (formats.quants.transposed_qtype)
    down_off: int
    bundle_bytes: int
    row_bytes: int  # bytes of the three rows themselves


def _up(n: int, a: int) -> int:
    return -(-n // a) * a


def bundle_layout(lw, d: int, align: int = ALIGN_IO) -> BundleLayout:
    gate = lw.gate_proj
    gq, gb = (int(gate.qtype), gate.row_bytes) if gate is not None else (-1, 0)
    uq, ub = int(lw.up_proj.qtype), lw.up_proj.row_bytes
    if lw.down_t is not None:
        dq = lw.down_t.qtype
    else:
        dq = transposed_qtype(lw.down_proj.qtype, lw.down_proj.rows)
    db = row_bytes(dq, d)
    up_off = _up(gb, ALIGN_ROW)
    down_off = _up(up_off + ub, ALIGN_ROW)
    return BundleLayout(gq, 0, uq, up_off, int(dq), down_off, _up(down_off + db, align), gb + ub + db)


@dataclass
class RamPlan:
    budget: int
    dense: dict[str, int]  # resident parts by kind, bytes
    resident: list[np.ndarray]  # per layer: ascending ids of the neurons kept in RAM
    disk: list[np.ndarray]  # per layer: ascending ids of the neurons in the bundle file
    layouts: list[BundleLayout]
    slot_bytes: int  # RAM stride of a bundle (the largest layer's)
    cache_slots: int
    gate_resident: bool
    source: str

    @property
    def resident_bytes(self) -> int:
        return sum(len(r) for r in self.resident) * self.slot_bytes

    @property
    def cache_bytes(self) -> int:
        return self.cache_slots * self.slot_bytes

    @property
    def used(self) -> int:
        return sum(self.dense.values()) + self.resident_bytes + self.cache_bytes

    @property
    def disk_bytes(self) -> int:
        """Bytes of the bundles in the file (its header aside)."""
        return sum(len(ids) * lay.bundle_bytes for ids, lay in zip(self.disk, self.layouts))

    def placement_hash(self) -> str:
        """What a bundle file is bound to: the disk neurons of every layer and their bundle layout."""
        h = hashlib.sha256(b"powerinfer-neuron-bundles-1\n")
        for ids, lay in zip(self.disk, self.layouts):
            h.update(repr(lay).encode())
            h.update(np.ascontiguousarray(ids, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]

    def describe(self, n_ff: int) -> list[str]:
        mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
        n_layer = len(self.resident)
        res = sum(len(r) for r in self.resident)
        lines = [f"placement: RAM tier {self.used / GIB:.3f} of {self.budget / GIB:.3f} GiB: "
                 f"{res / (n_layer * n_ff):.1%} of FFN neurons resident, the rest on disk; hot neurons from "
                 f"{self.source}",
                 "  resident dense parts: " + ", ".join(f"{k} {mib(v)}" for k, v in self.dense.items()),
                 f"  neuron cache: {self.cache_slots} slots of {self.slot_bytes} bytes ({mib(self.cache_bytes)}, "
                 f"2Q); resident bundles {mib(self.resident_bytes)}",
                 "  layer  resident neurons   disk neurons"]
        for il, (r, dk) in enumerate(zip(self.resident, self.disk)):
            lines.append(f"  {il:5d}  {len(r):7d} ({len(r) / n_ff:5.1%})  {len(dk):12d}")
        return lines


def ram_dense_parts(loaded, n_ctx: int, gate_resident: bool, predictors=None) -> dict[str, int]:
    """Bytes of what stays resident besides FFN neurons, by kind (in the formats the C decoder holds them)."""
    cfg, w = loaded.config, loaded.weights
    size = lambda t: 0 if t is None else t.nbytes  # noqa: E731
    vec = lambda t: 0 if t is None else t.rows * t.cols * 4  # noqa: E731  (norms and biases as f32)
    attention = sum(size(getattr(lw, n)) for lw in w.layers for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    attention += sum(vec(getattr(lw, n)) for lw in w.layers for n in ("q_bias", "k_bias", "v_bias"))
    norms = sum(vec(lw.input_layernorm) + vec(lw.post_attention_layernorm) for lw in w.layers) + vec(w.norm)
    parts = {"attention": attention, "norms": norms, "output_head": size(w.lm_head),
             "kv_cache": 2 * cfg.n_layer * n_ctx * cfg.n_head_kv * cfg.head_dim * KV_BYTES,
             "rope_tables": 2 * n_ctx * (cfg.rope_dim // 2) * 4}
    if predictors is not None:  # the f16 copies the decoder reads, and the tensors as loaded (held by the spec)
        parts["predictors"] = sum((a.numel() + b.numel()) * 2 + a.numel() * a.element_size() + b.numel() *
                                  b.element_size() for a, b in zip(predictors.fc1, predictors.fc2))
    if gate_resident:
        parts["gate"] = sum(size(lw.gate_proj) for lw in w.layers)
    return parts


def plan_ram(loaded, budget_gib: float, n_ctx: int, gate_resident: bool, predictors=None,
             solve: Solve | None = None, log=sys.stderr, align: int = ALIGN_IO) -> RamPlan:
    """The RAM/disk placement for a budget of `budget_gib`; a budget below what must stay resident is a one-line
    error naming the minimum."""
    cfg = loaded.config
    budget = int(budget_gib * GIB)
    layouts = [bundle_layout(lw, cfg.d_model, align) for lw in loaded.weights.layers]
    slot = max(lay.bundle_bytes for lay in layouts)
    dense = ram_dense_parts(loaded, n_ctx, gate_resident, predictors)
    need = sum(dense.values())
    least = need + MIN_CACHE_SLOTS * slot
    if budget < least:
        g = lambda b: f"{b / GIB:.3g} GiB"  # noqa: E731
        raise PowerInferError(
            f"--ram-budget {budget_gib:g} GiB is below the {g(least)} this model needs in RAM at -c {n_ctx} "
            f"(attention {g(dense['attention'])}, output head {g(dense['output_head'])}, KV cache {g(dense['kv_cache'])}"
            + (f", gate matrix {g(dense['gate'])}" if gate_resident else "")
            + (f", predictors {g(dense['predictors'])}" if "predictors" in dense else "")
            + f", a neuron cache of {MIN_CACHE_SLOTS} bundles)")
    cache_slots = max(MIN_CACHE_SLOTS, int(CACHE_FRACTION * (budget - need)) // slot)
    left = budget - need - cache_slots * slot
    n_hot = min(max(0, left // slot), cfg.n_layer * cfg.n_ff)
    if n_hot == cfg.n_layer * cfg.n_ff:
        hot, source = [np.arange(cfg.n_ff) for _ in range(cfg.n_layer)], "the budget (every neuron fits)"
    elif solve is not None and n_hot:
        hot, source = solve(loaded, [slot] * cfg.n_layer, n_hot * slot, 1, log)
    else:
        share = n_hot // cfg.n_layer
        hot = [np.arange(share + (1 if il < n_hot % cfg.n_layer else 0)) for il in range(cfg.n_layer)]
        source = "no profile: an even share of every layer"
    resident = [np.sort(np.asarray(h, dtype=np.int64)) for h in hot]
    disk = [np.setdiff1d(np.arange(cfg.n_ff), r) for r in resident]
    return RamPlan(budget, dense, resident, disk, layouts, slot, cache_slots, gate_resident, source)
