"""`powerinfer solve`: which weights get a copy on the fast tier (GPU) under a byte budget (reference/powerinfer.md
5, 6.1, 2.6-2.7).

Fill order, as upstream's allocator (6.1): attention tensors of every layer (q, k, v, o, biases, attention norm)
-> predictors (fc1, fc2) -> FFN norms -> output head and final norm -> KV cache (V, then K) -> hot FFN neurons.
Each non-FFN tensor goes to the fast tier whole; the fill stops at the first one that does not fit.

Cost model for FFN neurons (explicit, per token of decode):
  bytes   b_l = the neuron's gate row + up row + down_t row in their stored formats (the same in every row of a layer)
  value   f_i * b_l * (1/B_slow - 1/B_fast) seconds saved per token: a neuron is read only when it fires (f_i, its
          profiled firing frequency), and then from the tier it lives on (B_fast, B_slow: read bandwidths).
  not modelled: the per-layer CPU/GPU synchronisation (the paper's communication constraint; upstream's solver
          drops it too) and compute time (decode FFNs are bound by weight reads).
The value per byte is f_i * (1/B_slow - 1/B_fast): the bandwidths scale the score but do not change which
neurons win (as long as the fast tier is faster), so the fill is a 0-1 knapsack solved greedily by frequency.
Neurons go in groups of `align` (1 = each on its own; 32 keeps every layer's count a multiple of 32, which
upstream's CUDA transpose-GEMM asserts); a group that no longer fits is skipped for smaller later ones.

Upstream's rule (5.2, `upstream_placement`): per layer, neurons sorted by count and cut into groups of 256; the
groups with the largest summed counts across all layers are taken, top-K, with K the most that fit (upstream sizes
K with a neuron-count heuristic; here it is held to the same byte budget); no FFN split at all unless every
non-FFN part fit. With equal bytes per neuron in every layer and 256 % align == 0, our greedy takes the top
groups of a finer partition, which dominates. For other inputs (layers in different formats), a greedy knapsack
can lose to a lucky fixed grouping, so `solve_placement` also scores upstream's groups on the same remaining
budget and keeps them when they score higher: ours never scores below upstream's.
Layers are identified by their number (upstream's export sorted activation_N.pt names as strings, so layer 10
read layer 2's statistics; reference 3).
"""
from __future__ import annotations

import hashlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ..errors import PowerInferError
from ..formats.gpuidx import GPUIDX_SUFFIX, read_gpuidx, read_placement, write_gpuidx, write_placement
from ..options import SolveOptions
from ..settings import ModelSettings, PlacementSettings
from ..sparse.artifacts import DEFAULT_CACHE_DIR, model_fingerprint

UPSTREAM_GROUP = 256  # upstream solver's --batch default, never overridden by its loader (reference 5.2)
GIB = 1 << 30
KV_BYTES = 2  # f16 KV cache, llama.cpp's default type
DEFAULT_GPU_BW = 900e9  # assumed when no CUDA device can be measured (an A100/4090-class card reads ~0.9-1 TB/s)


@dataclass
class Placement:
    hot: list[np.ndarray]  # per layer: ascending ids of the FFN neurons copied to the fast tier
    neuron_bytes: list[int]  # per layer: bytes of one neuron's gate + up + down_t rows
    parts: dict[str, int] = field(default_factory=dict)  # non-FFN parts placed: name -> bytes, in fill order
    budget: int = 0
    rule: str = ""

    @property
    def ffn_bytes(self) -> int:
        return sum(len(h) * b for h, b in zip(self.hot, self.neuron_bytes))

    @property
    def used(self) -> int:
        return sum(self.parts.values()) + self.ffn_bytes


class Solution(NamedTuple):
    ours: Placement
    upstream: Placement


# -- scoring ------------------------------------------------------------------------------------------------

def _bytes_weighted_firings(hot: list[np.ndarray], counts: list[np.ndarray], neuron_bytes: list[int]) -> float:
    """sum over hot neurons of count * bytes, correctly rounded (math.fsum), so equal sets score equal and a
    larger true sum never scores lower."""
    terms = [np.asarray(c, dtype=np.float64)[h] * b for c, h, b in zip(counts, hot, neuron_bytes) if len(h)]
    return math.fsum(np.concatenate(terms)) if terms else 0.0


def score(placement: Placement, counts: list[np.ndarray], n_tokens: int, fast_bw: float = DEFAULT_GPU_BW,
          slow_bw: float = 30e9) -> float:
    """Expected seconds per token saved by the placement's FFN neurons (the module's cost model)."""
    per_byte = 1.0 / slow_bw - 1.0 / fast_bw
    return _bytes_weighted_firings(placement.hot, counts, placement.neuron_bytes) / max(1, n_tokens) * per_byte


def firings_served(placement: Placement, counts: list[np.ndarray]) -> float:
    """Expected firings (profiled counts) served by the fast tier, correctly rounded."""
    return _bytes_weighted_firings(placement.hot, counts, [1] * len(counts))


# -- the fills ----------------------------------------------------------------------------------------------

def place_parts(parts: list[tuple[str, int]], budget: int) -> tuple[dict[str, int], int, bool]:
    """Non-FFN parts in priority order, each whole, stopping at the first that does not fit (upstream's
    allocator). Returns (placed name -> bytes, bytes left, whether every part fit)."""
    placed, left = {}, budget
    for name, nbytes in parts:
        if nbytes > left:
            return placed, left, False
        placed[name] = nbytes
        left -= nbytes
    return placed, left, True


def _hottest_first(c: np.ndarray) -> np.ndarray:
    """Neuron ids by descending count, ties by ascending id (torch.topk leaves ties unspecified)."""
    return np.lexsort((np.arange(len(c)), -c))


def _take_in_order(cost: np.ndarray, budget: int) -> np.ndarray:
    """Walk the items in order, taking each one that still fits (a mask). Vectorised: take the longest prefix
    that fits, skip the item after it, drop every item costlier than what is left, repeat."""
    take = np.zeros(len(cost), dtype=bool)
    left = int(budget)
    idx = np.arange(len(cost))
    while len(idx):
        csum = np.cumsum(cost[idx])
        n = int(np.searchsorted(csum, left, side="right"))
        take[idx[:n]] = True
        if n:
            left -= int(csum[n - 1])
        idx = idx[n + 1:]
        idx = idx[cost[idx] <= left]
    return take


def _fill_by_frequency(counts: list[np.ndarray], neuron_bytes: list[int], budget: int,
                       align: int) -> list[np.ndarray]:
    """Groups of `align` neurons (a layer's hottest first; its last group may be smaller) by descending mean
    count, i.e. value per byte, each taken if it still fits."""
    orders, dens, cost, lay, grp = [], [], [], [], []
    for l, c in enumerate(counts):
        order = _hottest_first(c)
        orders.append(order)
        if not len(c):
            continue
        starts = np.arange(0, len(c), align)
        size = np.diff(np.append(starts, len(c)))
        dens.append(np.add.reduceat(c[order], starts) / size)
        cost.append(size.astype(np.int64) * neuron_bytes[l])
        lay.append(np.full(len(starts), l))
        grp.append(np.arange(len(starts)))
    if not dens:
        return [np.zeros(0, dtype=np.int64) for _ in counts]
    dens, cost, lay, grp = map(np.concatenate, (dens, cost, lay, grp))
    order = np.lexsort((grp, lay, -dens))
    take = _take_in_order(cost[order], budget)
    chosen = order[take]
    by_layer = np.split(grp[chosen][np.argsort(lay[chosen], kind="stable")],
                        np.cumsum(np.bincount(lay[chosen], minlength=len(counts)))[:-1])
    hot = []
    for o, gs in zip(orders, by_layer):
        taken = np.zeros(-(-len(o) // align), dtype=bool)
        taken[gs] = True
        hot.append(np.sort(o[taken[np.arange(len(o)) // align]]))  # a neuron is in group rank // align
    return hot


def _upstream_neurons(counts: list[np.ndarray], neuron_bytes: list[int], budget: int,
                      group: int = UPSTREAM_GROUP) -> list[np.ndarray]:
    """Upstream's FFN rule on `budget` bytes: global top-K groups of `group` by summed count (module doc).
    Where n_ff is not a multiple of `group` (upstream's view(-1, 256) fails), the coldest remainder forms no group."""
    if not counts:
        return []
    orders, sums, lay, grp = [], [], [], []
    for l, c in enumerate(counts):
        order = _hottest_first(c)
        orders.append(order)
        n = len(c) // group
        sums.append(c[order[:n * group]].reshape(n, group).sum(1))
        lay.append(np.full(n, l))
        grp.append(np.arange(n))
    sums, lay, grp = map(np.concatenate, (sums, lay, grp))
    order = np.lexsort((grp, lay, -sums))  # layers by number on ties
    cost = np.asarray(neuron_bytes, dtype=np.int64)[lay[order]] * group
    k = int(np.searchsorted(np.cumsum(cost), budget, side="right"))  # the top-K that fit
    per_layer = np.bincount(lay[order[:k]], minlength=len(counts))
    return [np.sort(o[:per_layer[l] * group]) for l, o in enumerate(orders)]


def _checked(counts, neuron_bytes: list[int], budget: int) -> list[np.ndarray]:
    """The counts as float64 arrays, after checking every input."""
    counts = [np.asarray(c, dtype=np.float64).reshape(-1) for c in counts]
    if any(len(c) and not (np.isfinite(c).all() and c.min() >= 0) for c in counts):
        raise PowerInferError("firing counts must be finite and >= 0")
    if len(neuron_bytes) != len(counts):
        raise PowerInferError(f"{len(counts)} layers of counts but {len(neuron_bytes)} neuron sizes")
    if any(int(b) != b or b <= 0 for b in neuron_bytes):
        raise PowerInferError("bytes per neuron must be positive integers")
    if budget < 0:
        raise PowerInferError(f"the budget must be >= 0 bytes, got {budget}")
    return counts


def upstream_placement(counts: list[np.ndarray], neuron_bytes: list[int], parts: list[tuple[str, int]],
                       budget: int, group: int = UPSTREAM_GROUP) -> Placement:
    """Upstream PowerInfer's placement (reference 5.2, 6.1): the non-FFN parts, then, only if all of them fit,
    the global top-K groups of `group` neurons by summed count, layers in numeric order."""
    counts = _checked(counts, neuron_bytes, budget)
    placed, left, complete = place_parts(parts, budget)
    hot = _upstream_neurons(counts, neuron_bytes, left, group) if complete else \
        [np.zeros(0, dtype=np.int64) for _ in counts]
    return Placement(hot, list(neuron_bytes), placed, budget, f"upstream (top-K groups of {group})")


def solve_placement(counts: list[np.ndarray], n_tokens: int, neuron_bytes: list[int], parts: list[tuple[str, int]],
                    budget: int, fast_bw: float = DEFAULT_GPU_BW, slow_bw: float = 30e9,
                    align: int = 1) -> Solution:
    """Our placement and upstream's on the same inputs. `parts`: the non-FFN parts in priority order as
    (name, bytes); `counts[l]`: layer l's per-neuron firing counts over `n_tokens` tokens."""
    if align < 1 or UPSTREAM_GROUP % align:
        raise PowerInferError(f"align must divide {UPSTREAM_GROUP}, got {align}")
    counts = _checked(counts, neuron_bytes, budget)
    upstream = upstream_placement(counts, neuron_bytes, parts, budget)
    placed, left, _ = place_parts(parts, budget)
    if not 1.0 / slow_bw - 1.0 / fast_bw > 0:  # the "fast" tier is not faster: every neuron costs time there
        hot = [np.zeros(0, dtype=np.int64) for _ in counts]
        return Solution(Placement(hot, list(neuron_bytes), placed, budget, "none (fast tier not faster)"), upstream)
    # Unlike upstream, neurons also use what is left when a non-FFN part did not fit: it is still budget.
    hot = _fill_by_frequency(counts, neuron_bytes, left, align)
    rule = f"ours (groups of {align} by firing frequency)"
    theirs = _upstream_neurons(counts, neuron_bytes, left)
    if _bytes_weighted_firings(theirs, counts, neuron_bytes) > _bytes_weighted_firings(hot, counts, neuron_bytes):
        hot, rule = theirs, "ours (upstream's groups of 256 scored higher on these inputs)"
    return Solution(Placement(hot, list(neuron_bytes), placed, budget, rule), upstream)


# -- the model's parts ------------------------------------------------------------------------------------------

def model_parts(loaded, n_ctx: int, predictor_bytes: int | None = None) -> tuple[list[tuple[str, int]], list[int]]:
    """Non-FFN parts in upstream's priority order as (category.layer.tensor, bytes), and the bytes per FFN neuron
    of each layer. Predictors: `predictor_bytes` as one part (0: none), or by default the file's fc1/fc2 if any."""
    cfg, w = loaded.config, loaded.weights
    parts = []
    for i, lw in enumerate(w.layers):
        for name in ("input_layernorm", "q_proj", "k_proj", "v_proj", "o_proj", "q_bias", "k_bias", "v_bias"):
            t = getattr(lw, name)
            if t is not None:
                parts.append((f"attention.{i}.{name}", t.nbytes))
    if predictor_bytes is not None:
        parts += [("predictors", int(predictor_bytes))] if predictor_bytes > 0 else []
    else:
        for i in range(cfg.n_layer):
            for name in ("fc1", "fc2"):
                t = loaded.extra_tensors.get(f"blk.{i}.{name}.weight")
                if t is not None:
                    parts.append((f"predictors.{i}.{name}", t.nbytes))
    parts += [(f"norms.{i}.post_attention_layernorm", lw.post_attention_layernorm.nbytes)
              for i, lw in enumerate(w.layers)]
    parts += [("output.lm_head", w.lm_head.nbytes), ("output.norm", w.norm.nbytes)]
    kv = n_ctx * cfg.n_head_kv * cfg.head_dim * KV_BYTES
    parts += [(f"kv_cache.v.{i}", kv) for i in range(cfg.n_layer)]  # upstream places V before K
    parts += [(f"kv_cache.k.{i}", kv) for i in range(cfg.n_layer)]
    per_neuron = []
    for lw in w.layers:
        # A down row is one neuron's column of down_proj; in a block format it costs nbytes / n_ff (rounded up).
        down = lw.down_t.row_bytes if lw.down_t is not None else -(-lw.down_proj.nbytes // lw.down_proj.cols)
        per_neuron.append(lw.up_proj.row_bytes + (lw.gate_proj.row_bytes if lw.gate_proj is not None else 0) + down)
    return parts, per_neuron


# -- inputs ---------------------------------------------------------------------------------------------------

def load_activation_dir(directory, n_layer: int, n_ff: int | None = None) -> list[np.ndarray]:
    """Upstream's activation_0.pt .. activation_{L-1}.pt, by layer number (tensors only: weights_only=True)."""
    directory = Path(directory).expanduser()
    hint = "run `powerinfer profile -m MODEL` first (it writes activation/activation_N.pt)"
    if not directory.is_dir():
        raise PowerInferError(f"{directory}: no activation counts here; {hint}")
    if (directory / f"activation_{n_layer}.pt").exists():
        raise PowerInferError(f"{directory}: has activation_{n_layer}.pt, but the model has {n_layer} layers "
                              "(counts of another model?)")
    out = []
    for i in range(n_layer):
        p = directory / f"activation_{i}.pt"
        if not p.is_file():
            raise PowerInferError(f"{p}: missing; {hint}")
        try:
            t = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # a pickle with code in it, or not a torch file at all
            raise PowerInferError(f"{p}: not a tensor file ({e.__class__.__name__})") from None
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or (n_ff is not None and t.numel() != n_ff):
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise PowerInferError(f"{p}: expected a 1-D tensor of {n_ff or 'n_ff'} counts, got {shape}")
        c = t.double().numpy()
        if not (np.isfinite(c).all() and (c >= 0).all()):
            raise PowerInferError(f"{p}: counts must be finite and >= 0")
        out.append(c)
    return out


def counts_sha256(counts: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for c in counts:
        h.update(np.ascontiguousarray(c, dtype=np.float64).tobytes())
        h.update(b"\n")
    return h.hexdigest()


def measure_read_bandwidth(device: str = "cpu", nbytes: int = 256 << 20, repeats: int = 3) -> float:
    """Bytes per second of one streaming read over a buffer larger than the caches: on the CPU the kernels' probe
    with decode's default thread count, on CUDA a torch reduction (best of `repeats`)."""
    if device == "cpu":
        from ..kernels import read_bandwidth
        from ..settings import default_threads

        return read_bandwidth(default_threads(), nbytes, repeats)
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    sync = torch.cuda.synchronize
    best = math.inf
    for _ in range(repeats + 1):  # the first pass faults the pages in
        sync()
        t = time.perf_counter()
        x.sum()
        sync()
        best = min(best, time.perf_counter() - t)
    return nbytes / best


# -- the command -----------------------------------------------------------------------------------------------

def _cached_predictor_bytes(fp: str) -> int:
    from .train import default_predictors_path

    path = default_predictors_path(fp)
    if not path.is_file():
        return 0
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:  # shapes only, no tensor data
            return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()) * 2  # as f16 on the fast tier
    except Exception as e:
        raise PowerInferError(f"{path}: unreadable predictors ({e.__class__.__name__}); retrain them or give "
                              "--predictor-bytes") from None


def _profile_tokens(act_dir: Path, fp: str) -> int | None:
    """n_tokens of the profile that wrote act_dir (profile.json beside it; upstream's directories have none),
    refusing another model's profile."""
    from .profile import read_profile_meta

    meta_path = act_dir.parent / "profile.json"
    if not meta_path.is_file():
        return None
    meta = read_profile_meta(meta_path, fp)
    return int(meta["n_tokens"]) if meta.get("n_tokens") else None


def _reuse(gpuidx: Path, placement: Path, fp: str, key: dict, cfg) -> tuple[list[np.ndarray] | None, str]:
    """The cached hot sets if both files exist and were solved from exactly `key`; else (None, why not)."""
    if not gpuidx.is_file():
        return None, ""
    try:
        idx = read_gpuidx(gpuidx, cfg.n_layer, cfg.n_ff)
        doc = read_placement(placement, fp)
    except PowerInferError as e:
        return None, f"{e}: solving again"
    if idx.vram_capacity != key["budget_bytes"]:
        return None, (f"{gpuidx} was solved for {idx.vram_capacity / GIB:.4g} GiB, not "
                      f"{key['budget_bytes'] / GIB:.4g} GiB: solving again")
    changed = [k for k, v in key.items() if doc.get("inputs", {}).get(k) != v]
    if changed or any(not np.array_equal(a, b) for a, b in zip(idx.hot_index, doc["hot_index"])):
        return None, f"{placement}: solved from other inputs ({', '.join(changed) or 'hot sets'}): solving again"
    return idx.hot_index, f"{gpuidx} is up to date; reusing it (--reset-gpu-index solves again)"


def _bandwidths(opts: SolveOptions) -> tuple[dict, tuple[float, float]]:
    """Fast and slow tier read bandwidths in bytes/s: given, else measured, else (no CUDA) assumed."""
    slow_bw = opts.cpu_bandwidth * 1e9 if opts.cpu_bandwidth else measure_read_bandwidth("cpu")
    slow_note = "given" if opts.cpu_bandwidth else "measured"
    if opts.gpu_bandwidth:
        fast_bw, fast_note = opts.gpu_bandwidth * 1e9, "given"
    elif torch.cuda.is_available():
        fast_bw, fast_note = measure_read_bandwidth("cuda"), "measured"
    else:
        fast_bw, fast_note = DEFAULT_GPU_BW, "assumed: no CUDA device"
    record = {"fast_bytes_per_s": fast_bw, "slow_bytes_per_s": slow_bw, "fast": fast_note, "slow": slow_note}
    return record, (fast_bw, slow_bw)


def check_options(opts: SolveOptions) -> None:
    """The solver's limit on its flags, checked before a model is loaded (SolveOptions checks the rest)."""
    if opts.align < 1 or UPSTREAM_GROUP % opts.align:
        raise PowerInferError(f"--align must divide {UPSTREAM_GROUP}, got {opts.align}")


@dataclass
class SolveResult:
    placement: Placement  # ours: the hot sets written (or found up to date)
    upstream: Placement | None  # upstream's rule on the same inputs; None with --disable-gpu-index
    parts: list[tuple[str, int]]  # the non-FFN parts in fill order
    counts: list[np.ndarray]  # the firing counts solved from ([] with --disable-gpu-index)
    n_tokens: int | None  # profiled tokens the counts are over
    bandwidths: dict  # fast/slow bytes per s and whether each was given, measured or assumed
    gpuidx: Path
    placement_path: Path
    saving: float = 0.0  # expected FFN read time saved per token (s): ours
    upstream_saving: float = 0.0  # the same for upstream's rule
    written: bool = False  # False: the index was up to date (reused), or --disable-gpu-index

    @property
    def disabled(self) -> bool:
        return self.upstream is None


def solve_model(loaded, opts: SolveOptions, placement: PlacementSettings, n_ctx: int = ModelSettings.n_ctx,
                log=sys.stderr) -> SolveResult:
    """`powerinfer solve`: place `loaded`'s parts and hot FFN neurons (profiled counts from opts.activation or the
    model's cached profile) within placement.vram_budget GiB, with the KV cache sized for n_ctx tokens (0: the model's
    trained context); write the .gpuidx and the placement file unless they are up to date."""
    from .profile import default_profile_dir

    check_options(opts)
    if placement.vram_budget is None:
        raise PowerInferError("solve needs --vram-budget GiB")
    cfg, fp = loaded.config, model_fingerprint(loaded)
    n_ctx = n_ctx or cfg.context_length
    if n_ctx < 1:
        raise PowerInferError(f"--ctx-size must be >= 1, got {n_ctx} (the model does not say its trained context)")
    budget = int(placement.vram_budget * GIB)
    pred = opts.predictor_bytes if opts.predictor_bytes is not None else \
        (None if loaded.has_predictors else _cached_predictor_bytes(fp))
    parts, per_neuron = model_parts(loaded, n_ctx, pred)
    out = Path(opts.output).expanduser() if opts.output else \
        DEFAULT_CACHE_DIR.expanduser() / fp / (loaded.path.name + GPUIDX_SUFFIX)
    placement_path = out.with_name(out.name.removesuffix(GPUIDX_SUFFIX).removesuffix(".gpuidx") + ".placement.json")

    if placement.disable_gpu_index:  # upstream: no solve, no index file; every FFN neuron stays on the slow tier
        bandwidths, _ = _bandwidths(opts)
        placed, _, _ = place_parts(parts, budget)
        p = Placement([np.zeros(0, dtype=np.int64) for _ in range(cfg.n_layer)], per_neuron, placed, budget,
                      "disabled (--disable-gpu-index)")
        write_placement(placement_path, fp, p.hot, {"inputs": {"budget_bytes": budget, "ffn": "disabled"},
                                                    "parts": p.parts, "bandwidths": bandwidths, "rule": p.rule})
        return SolveResult(p, None, parts, [], None, bandwidths, out, placement_path)

    act_dir = Path(opts.activation).expanduser() if opts.activation else default_profile_dir(fp) / "activation"
    counts = load_activation_dir(act_dir, cfg.n_layer, cfg.n_ff)
    n_tokens = _profile_tokens(act_dir, fp)
    if n_tokens is None:
        n_tokens = max(1, int(math.ceil(max(c.max() for c in counts))))
        print(f"solve: no profile.json beside {act_dir}: frequencies taken relative to the largest count "
              f"({n_tokens}); this scales the reported times only", file=log)
    bandwidths, (fast_bw, slow_bw) = _bandwidths(opts)
    key = {"budget_bytes": budget, "n_ctx": n_ctx, "align": opts.align, "parts": [list(p) for p in parts],
           "neuron_bytes": per_neuron, "counts_sha256": counts_sha256(counts), "fast_faster": fast_bw > slow_bw}
    sol = solve_placement(counts, n_tokens, per_neuron, parts, budget, fast_bw, slow_bw, opts.align)
    ours = sol.ours
    cached, why = (None, "") if placement.reset_gpu_index else _reuse(out, placement_path, fp, key, cfg)
    if why:
        print(f"solve: {why}", file=log)
    if cached is not None:
        ours = Placement(cached, per_neuron, ours.parts, budget, ours.rule)
    s_ours = score(ours, counts, n_tokens, fast_bw, slow_bw)
    s_up = score(sol.upstream, counts, n_tokens, fast_bw, slow_bw)
    if cached is None:
        write_gpuidx(out, ours.hot, cfg.n_ff, budget)  # creates the directory (user-only) if needed
        record = {"inputs": key, "activation": str(act_dir), "n_tokens": n_tokens, "bandwidths": bandwidths,
                  "rule": ours.rule, "parts": ours.parts, "ffn_bytes": ours.ffn_bytes, "used_bytes": ours.used,
                  "saving_s_per_token": s_ours, "upstream_saving_s_per_token": s_up, "gpuidx": str(out)}
        write_placement(placement_path, fp, ours.hot, record)
    return SolveResult(ours, sol.upstream, parts, counts, n_tokens, bandwidths, out, placement_path, s_ours, s_up,
                       written=cached is None)


# -- the runtime's hot sets ----------------------------------------------------------------------------------------

def solve_hot_sets(loaded, neuron_bytes: list[int], budget: int, align: int = 32,
                   log=sys.stderr) -> tuple[list[np.ndarray], str]:
    """The FFN neurons a fast tier of `budget` bytes holds (runtime/placement.py injects this): the most often
    firing ones by the model's cached profile, at `neuron_bytes` per neuron in the fast tier's format. Without a
    profile, every layer gets an even share (its first neurons): a placement without activation locality, said
    so in the returned description."""
    from .profile import default_profile_dir

    cfg = loaded.config
    act_dir = default_profile_dir(model_fingerprint(loaded)) / "activation"
    try:
        counts, source = load_activation_dir(act_dir, cfg.n_layer, cfg.n_ff), f"profile {act_dir}"
    except PowerInferError:
        # Decreasing within a layer, equal across layers: the greedy takes group g of every layer before g + 1.
        counts = [np.arange(cfg.n_ff, 0, -1, dtype=np.float64) for _ in range(cfg.n_layer)]
        source = "no profile: an even share of every layer (run `powerinfer profile` for activation locality)"
    return _fill_by_frequency(counts, neuron_bytes, budget, align), source
