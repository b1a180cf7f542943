"""`powerinfer solve`: which weights live on the fast tier (GPU) under a byte budget (reference/powerinfer.md 5).

Fill order, as upstream's allocator: attention (layer by layer) -> predictors -> norms -> output head -> KV cache
-> hot FFN neurons; each non-FFN part goes to the fast tier whole if it still fits.
FFN neurons, cost model: neuron i of layer l costs b_l bytes (its gate row + up row + down_t row in their stored
formats) and, when it sits on the fast tier, saves f_i * b_l * (1/B_slow - 1/B_fast) seconds per token, f_i its
profiled firing frequency (a silent neuron is never read, a firing one is read from the tier it lives on). The
saving per byte is f_i * const, so the best fill takes neurons by frequency, individually (not in groups),
skipping one that no longer fits for smaller ones. Upstream's solver (global top-K groups of 256 neurons by
summed count, reference 5.2) is computed on the same inputs, and the placement with the larger saving is kept,
so ours never scores below it; the budget is respected to the byte.
Layers are always identified by their number (upstream's export sorts activation_N.pt names as strings, so
layer 10 read layer 2's statistics; reference 3).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import PowerInferError
from ..sparse.artifacts import DEFAULT_CACHE_DIR, model_fingerprint

PLACEMENT_FORMAT = "powerinfer.placement"
PLACEMENT_VERSION = 1
UPSTREAM_GROUP = 256
GIB = 1 << 30


@dataclass
class Placement:
    hot: list[np.ndarray]  # per layer: sorted ids of the FFN neurons on the fast tier
    parts: dict[str, int] = field(default_factory=dict)  # non-FFN parts placed: name -> bytes
    budget: int = 0
    ffn_bytes: int = 0
    rule: str = "ours"

    @property
    def used(self) -> int:
        return sum(self.parts.values()) + self.ffn_bytes


def saving(hot: list[np.ndarray], freq: list[np.ndarray], neuron_bytes: list[int], fast_bw: float,
           slow_bw: float) -> float:
    """Seconds per token saved by serving these neurons from the fast tier (the cost model above)."""
    k = 1.0 / slow_bw - 1.0 / fast_bw
    return float(sum(freq[l][h].sum() * neuron_bytes[l] for l, h in enumerate(hot)) * k)


def fill_neurons(freq: list[np.ndarray], neuron_bytes: list[int], budget: int) -> tuple[list[np.ndarray], int]:
    """Neurons by descending frequency (ties: lower layer, lower id), each taken if it still fits."""
    lay = np.concatenate([np.full(len(f), l, dtype=np.int64) for l, f in enumerate(freq)])
    ids = np.concatenate([np.arange(len(f), dtype=np.int64) for f in freq])
    fr = np.concatenate(freq)
    order = np.lexsort((ids, lay, -fr))
    cost = np.asarray(neuron_bytes, dtype=np.int64)[lay[order]]
    take = np.zeros(len(order), dtype=bool)
    if len(set(neuron_bytes)) == 1:  # equal costs: a prefix
        n = min(len(order), budget // max(1, neuron_bytes[0]))
        take[:n] = True
    else:
        left = budget
        for j in range(len(order)):
            if cost[j] <= left:
                take[j] = True
                left -= cost[j]
    chosen = order[take]
    hot = [np.sort(ids[chosen][lay[chosen] == l]) for l in range(len(freq))]
    return hot, int(cost[take].sum())


def upstream_neurons(counts: list[np.ndarray], neuron_bytes: list[int], budget: int,
                     group: int = UPSTREAM_GROUP) -> tuple[list[np.ndarray], int]:
    """Upstream's rule: per layer, neurons sorted by count cut into groups of `group`; the groups with the
    largest summed counts across all layers are taken while they fit; a layer's k groups are its top k*group
    neurons (ties: lower id). Layers by number."""
    groups = []  # (summed count, layer, index within layer)
    for l, c in enumerate(counts):
        s = np.sort(c)[::-1]
        for g in range(len(c) // group):
            groups.append((float(s[g * group:(g + 1) * group].sum()), l, g))
    groups.sort(key=lambda t: (-t[0], t[1], t[2]))
    k = [0] * len(counts)
    left = budget
    for _, l, g in groups:
        size = group * neuron_bytes[l]
        if size <= left and g == k[l]:  # a layer's groups come in order (they are sorted within the layer)
            k[l] += 1
            left -= size
    hot = []
    for l, c in enumerate(counts):
        order = np.lexsort((np.arange(len(c)), -c))
        hot.append(np.sort(order[:k[l] * group]))
    return hot, budget - left


def solve_placement(counts: list[np.ndarray], n_tokens: int, neuron_bytes: list[int], parts: list[tuple[str, int]],
                    budget: int, fast_bw: float = 900e9, slow_bw: float = 30e9) -> tuple[Placement, Placement]:
    """(ours, upstream's) placements. `parts`: the non-FFN parts in priority order as (name, bytes)."""
    if budget < 0:
        raise PowerInferError("the budget must be >= 0")
    placed, left = {}, budget
    for name, nbytes in parts:
        if nbytes <= left:
            placed[name] = nbytes
            left -= nbytes
    freq = [np.asarray(c, dtype=np.float64) / max(1, n_tokens) for c in counts]
    hot, used = fill_neurons(freq, neuron_bytes, left)
    up_hot, up_used = upstream_neurons([np.asarray(c, dtype=np.float64) for c in counts], neuron_bytes, left)
    ours = Placement(hot, dict(placed), budget, used, "ours")
    theirs = Placement(up_hot, dict(placed), budget, up_used, "upstream (top-K groups of 256)")
    if saving(up_hot, freq, neuron_bytes, fast_bw, slow_bw) > saving(hot, freq, neuron_bytes, fast_bw, slow_bw):
        ours = Placement(up_hot, dict(placed), budget, up_used, "ours (upstream's groups scored higher)")
    return ours, theirs


def model_parts(loaded, n_ctx: int, predictor_bytes: int = 0) -> tuple[list[tuple[str, int]], list[int]]:
    """Non-FFN parts in upstream's priority order, and FFN bytes per neuron per layer (gate + up + down_t rows)."""
    cfg, w = loaded.config, loaded.weights
    parts = [(f"attention.{i}", sum(t.nbytes for t in (lw.q_proj, lw.k_proj, lw.v_proj, lw.o_proj, lw.q_bias,
                                                        lw.k_bias, lw.v_bias) if t is not None))
             for i, lw in enumerate(w.layers)]
    if predictor_bytes:
        parts.append(("predictors", predictor_bytes))
    parts.append(("norms", sum(t.nbytes for lw in w.layers for t in (lw.input_layernorm,
                                                                       lw.post_attention_layernorm)) + w.norm.nbytes))
    parts.append(("output", w.lm_head.nbytes))
    parts.append(("kv_cache", 2 * cfg.n_layer * n_ctx * cfg.n_head_kv * cfg.head_dim * 2))
    per_neuron = []
    for lw in w.layers:
        down = lw.down_t.row_bytes if lw.down_t is not None else lw.down_proj.nbytes // cfg.n_ff
        per_neuron.append(lw.up_proj.row_bytes + (lw.gate_proj.row_bytes if lw.gate_proj is not None else 0) + down)
    return parts, per_neuron


# -- upstream's activation files and .gpuidx ------------------------------------------------------------------

def load_activation_dir(directory, n_layer: int) -> list[np.ndarray]:
    """activation_0.pt .. activation_{L-1}.pt by layer number (tensors only: weights_only=True)."""
    directory = Path(directory).expanduser()
    out = []
    for i in range(n_layer):
        p = directory / f"activation_{i}.pt"
        if not p.is_file():
            raise PowerInferError(f"{p}: missing (run `powerinfer profile -m MODEL`, which writes "
                                  f"activation/activation_N.pt)")
        try:
            t = torch.load(p, weights_only=True)
        except Exception as e:  # a pickle with code, or not a torch file at all
            raise PowerInferError(f"{p}: not a tensor file ({e.__class__.__name__})") from None
        out.append(np.asarray(t, dtype=np.float64).reshape(-1))
    return out


def write_gpuidx(path, hot: list[np.ndarray], n_ff: int, vram_capacity: int) -> Path:
    """Upstream's `<model>.generated.gpuidx`: a GGUF (arch generic.gpu_index) with per layer blk.N.gpu_idx (I32
    [n_ff] 0/1) then blk.N.gpu_bucket (I32 sorted ids), split.vram_capacity, and the PWRI magic."""
    from gguf import GGUFWriter

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    wr = GGUFWriter(str(tmp), "generic.gpu_index")
    wr.add_uint32("generic.gpu_index.block_count", len(hot))
    wr.add_uint64("split.vram_capacity", int(vram_capacity))
    for i, h in enumerate(hot):
        idx = np.zeros(n_ff, dtype=np.int32)
        idx[h] = 1
        wr.add_tensor(f"blk.{i}.gpu_idx", idx)
        bucket = np.sort(h).astype(np.int32)
        wr.add_tensor(f"blk.{i}.gpu_bucket", bucket if len(bucket) else np.zeros(0, dtype=np.int32))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    with open(tmp, "r+b") as fh:
        fh.write(b"PWRI")
    tmp.replace(path)
    return path


def read_gpuidx(path) -> tuple[list[np.ndarray], int]:
    """(per-layer hot neuron ids, split.vram_capacity) of a .gpuidx; tensors read by position like upstream."""
    from ..formats.gguf import open_gguf

    reader, _ = open_gguf(path)
    fields = {f.name: f for f in reader.fields.values()}
    cap = int(fields["split.vram_capacity"].parts[-1][0]) if "split.vram_capacity" in fields else 0
    ts = reader.tensors
    if len(ts) % 2:
        raise PowerInferError(f"{path}: {len(ts)} tensors; a .gpuidx has two per layer")
    hot = []
    for i in range(len(ts) // 2):
        idx, bucket = ts[2 * i], ts[2 * i + 1]
        b = np.asarray(bucket.data, dtype=np.int64).reshape(-1)
        if not np.array_equal(np.flatnonzero(np.asarray(idx.data).reshape(-1)), np.sort(b)):
            raise PowerInferError(f"{path}: layer {i}: gpu_idx and gpu_bucket disagree")
        hot.append(b)
    return hot, cap


# -- CLI -------------------------------------------------------------------------------------------------------

def add_parser(sub) -> None:
    p = sub.add_parser("solve", help="place hot FFN neurons on the fast tier (GPU) under a VRAM budget",
                       description="Fill the fast tier in upstream's priority order (attention, predictors, norms, "
                                   "output head, KV cache, then hot FFN neurons by profiled firing frequency) and "
                                   "write the placement plus an upstream-compatible <model>.generated.gpuidx.")
    p.add_argument("-m", "--model", metavar="PATH", help="GGUF file or HF directory (default: the bundled model)")
    p.add_argument("--vram-budget", type=float, required=True, metavar="GiB", help="fast-tier budget in GiB")
    p.add_argument("--activation", metavar="DIR", help="directory of activation_N.pt (default: the model's "
                   "cached profile, ~/.cache/powerinfer/<fingerprint>/profile/activation)")
    p.add_argument("-c", "--ctx-size", dest="n_ctx", type=int, default=4096, metavar="N",
                   help="context the KV cache is sized for (default: 4096)")
    p.add_argument("--gpu-bandwidth", type=float, default=900.0, metavar="GB/s",
                   help="fast-tier read bandwidth (default: 900)")
    p.add_argument("--cpu-bandwidth", type=float, default=30.0, metavar="GB/s",
                   help="slow-tier read bandwidth (default: 30, one Zen 4 core from DRAM)")
    p.add_argument("--predictor-bytes", type=int, default=0, metavar="N", help="bytes of predictors to place")
    p.add_argument("--reset-gpu-index", action="store_true", help="re-solve even if the output exists")
    p.add_argument("--disable-gpu-index", action="store_true",
                   help="place no FFN neurons (all stay on the CPU); the other parts are still placed")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="the .gpuidx to write (default: ~/.cache/powerinfer/<fingerprint>/<model>.generated.gpuidx; "
                        "the placement JSON goes beside it)")
    p.set_defaults(func=func)


def func(args) -> int:
    from ..formats.loader import load_model

    if not args.vram_budget >= 0:
        raise PowerInferError(f"--vram-budget must be >= 0 GiB, got {args.vram_budget}")
    if args.gpu_bandwidth <= 0 or args.cpu_bandwidth <= 0:
        raise PowerInferError("bandwidths must be > 0")
    loaded = load_model(args.model)
    cfg = loaded.config
    fp = model_fingerprint(loaded)
    budget = int(args.vram_budget * GIB)
    out = Path(args.output).expanduser() if args.output else \
        DEFAULT_CACHE_DIR.expanduser() / fp / f"{loaded.path.name}.generated.gpuidx"
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_file() and not args.reset_gpu_index and not args.disable_gpu_index:
        _, cap = read_gpuidx(out)
        if cap == budget:
            print(f"solve: {out} was solved for this budget ({cap} bytes); reusing it (--reset-gpu-index re-solves)",
                  file=sys.stderr)
            return 0
        print(f"solve: {out} was solved for {cap / GIB:.2f} GiB, not {args.vram_budget:g} GiB: re-solving",
              file=sys.stderr)
    act_dir = Path(args.activation).expanduser() if args.activation else \
        DEFAULT_CACHE_DIR.expanduser() / fp / "profile" / "activation"
    counts = load_activation_dir(act_dir, cfg.n_layer)
    profile_json = act_dir.parent / "profile.json"
    n_tokens = json.loads(profile_json.read_text())["n_tokens"] if profile_json.is_file() else \
        int(max(c.max() for c in counts)) or 1
    parts, per_neuron = model_parts(loaded, args.n_ctx, args.predictor_bytes)
    ours, up = solve_placement(counts, n_tokens, per_neuron, parts, budget,
                               args.gpu_bandwidth * 1e9, args.cpu_bandwidth * 1e9)
    if args.disable_gpu_index:
        ours = Placement([np.zeros(0, dtype=np.int64) for _ in range(cfg.n_layer)], ours.parts, budget, 0,
                         "disabled")
    freq = [c / n_tokens for c in counts]
    s_ours = saving(ours.hot, freq, per_neuron, args.gpu_bandwidth * 1e9, args.cpu_bandwidth * 1e9)
    s_up = saving(up.hot, freq, per_neuron, args.gpu_bandwidth * 1e9, args.cpu_bandwidth * 1e9)
    write_gpuidx(out, ours.hot, cfg.n_ff, budget)
    doc = {"format": PLACEMENT_FORMAT, "version": PLACEMENT_VERSION, "fingerprint": fp, "budget_bytes": budget,
           "gpu_bandwidth": args.gpu_bandwidth, "cpu_bandwidth": args.cpu_bandwidth, "n_ctx": args.n_ctx,
           "rule": ours.rule, "parts": ours.parts, "ffn_bytes": ours.ffn_bytes, "used_bytes": ours.used,
           "hot": [h.tolist() for h in ours.hot], "saving_s_per_token": s_ours,
           "upstream_saving_s_per_token": s_up, "activation": str(act_dir), "gpuidx": str(out)}
    meta_path = out.with_suffix(".placement.json")
    meta_path.write_text(json.dumps(doc) + "\n")
    total = [c.sum() for c in counts]
    print("layer  hot neurons  hot MiB  firings covered")
    for i, h in enumerate(ours.hot):
        cov = counts[i][h].sum() / max(1.0, total[i])
        print(f"{i:5d}  {len(h):11d}  {len(h) * per_neuron[i] / 2**20:7.2f}  {cov:15.1%}")
    print(f"fast tier: {ours.used / GIB:.3f} of {args.vram_budget:g} GiB used ({ours.ffn_bytes / 2**20:.1f} MiB hot "
          f"FFN neurons; non-FFN parts placed: {len(ours.parts)}); expected saving {1e3 * s_ours:.3f} ms/token vs "
          f"upstream's rule {1e3 * s_up:.3f} ms/token")
    print(f"wrote {out} and {meta_path}")
    return 0
