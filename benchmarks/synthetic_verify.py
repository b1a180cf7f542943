"""Calibration and verification of benchmarks/make_synthetic.py's files with the torch reference model (one layer
in memory at a time), the exact predictors of its low-rank gates, a run of the compiled decoder, and the designed
firing rates written as activation counts."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFReader

from synthetic_blocks import exact_predictor

def _embed_rows(qt, ids):
    from powerinfer.core.tensor import QTensor

    rows = np.asarray(qt.data)[np.asarray(ids)]
    return QTensor(qt.name, qt.qtype, (len(ids), qt.cols), rows).dequantize()


@dataclass
class LayerStats:
    zero_fraction: float  # of relu(gate) == 0 over all tokens
    per_token: list[float]  # the same per token
    fired: np.ndarray  # [n_ff] tokens on which each neuron fired
    recall: float | None = None  # predictor vs the quantized gate (None: no predictor)
    precision: float | None = None


def open_model(path: Path):
    """The file as the loader sees it, without load_model's NaN/inf scan (it reads every block scale of a model
    that may be larger than RAM; the file was written from finite values)."""
    from powerinfer.formats.gguf import load_gguf
    from powerinfer.formats.loader import LoadedModel

    m = load_gguf(path)
    return LoadedModel(m.config, m.weights, m.metadata, path, m.file_type, m.conversion_report, m.powerinfer_gguf,
                       m.extra_tensors)


def calibrate_gamma(g_rest, w0, unit0, target: float) -> float:
    """gamma with a `target` fraction of gate_j = g_rest[t, j] + w0[j] gamma unit0[t] <= 0 over (token, neuron), by
    bisection on the measured fraction (hot neurons have w0 > 0, so no single zero crossing orders them)."""
    import torch

    def zeros(gamma):
        return float((g_rest + w0[None, :] * (gamma * unit0)[:, None] <= 0).float().mean())

    lo, hi = 0.0, 1.0
    while zeros(hi) < target:
        hi *= 2
        if hi > 1e6:
            raise SystemExit(f"error: no gamma reaches sparsity {target} (the gate has too few negative "
                             "channel-0 weights)")
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if zeros(mid) < target else (lo, mid)
    return torch.tensor(hi, dtype=torch.float32).item()


def run_layers(path: Path, calib_ids: list[int] | None, eval_ids: list[int] | None, sparsity: float | None,
               n_layers: int | None, gates: list | None = None) -> list[LayerStats]:
    """Push the calibration and the evaluation tokens (two sequences, each with its own KV cache) through the
    reference layers of the file in one pass, one layer in memory at a time. With calibration tokens and a
    sparsity S, each layer's ffn_norm[0] is first set (and patched into the file) so that S of the gates are <= 0
    on them. Returns a LayerStats per layer measured on the evaluation tokens (none without them); with `gates`
    (the LowRankGate of every layer) the exact predictors' recall and precision against the file's gate too."""
    import torch
    import torch.nn.functional as F

    from powerinfer.model.kvcache import KVCache
    from powerinfer.model.llama import Block
    from powerinfer.model.rope import rope_tables
    from powerinfer.sparse.ffn import make_ffn
    from powerinfer.sparse.predictor import PredictorSet

    loaded = open_model(path)
    cfg = loaded.config
    n = cfg.n_layer if n_layers is None else min(cfg.n_layer, n_layers)
    calibrate = sparsity is not None and bool(calib_ids)
    patch = GGUFReader(str(path), "r+") if calibrate else None
    norms = {t.name: t for t in patch.tensors} if patch is not None else {}
    streams = {}  # name -> [x, cache, cos, sin]
    for name, ids in (("calib", calib_ids if calibrate else None), ("eval", eval_ids)):
        if ids:
            cos, sin = map(torch.from_numpy, rope_tables(cfg, len(ids)))
            streams[name] = [_embed_rows(loaded.weights.embed_tokens, ids),
                             KVCache.allocate(cfg.n_layer, len(ids), cfg.n_head_kv * cfg.head_dim), cos, sin]
    out = []
    with torch.inference_mode():
        for i in range(n):
            lw = loaded.weights.layers[i]
            block = Block(lw, cfg, i, make_ffn("dense", lw, cfg), torch.float32)
            h = {k: x + block.attn(block.input_layernorm(x), 0, cache, cos, sin)
                 for k, (x, cache, cos, sin) in streams.items()}
            gate_w = block.ffn.gate_proj
            norm = block.post_attention_layernorm
            if calibrate:
                norm.weight[0] = 1.0
                unit = norm(h["calib"])  # channel 0: C / rms per token; rest: the normalized random part
                g_rest = F.linear(unit[:, 1:], gate_w[:, 1:])
                gamma = calibrate_gamma(g_rest, gate_w[:, 0], unit[:, 0], sparsity)
                norm.weight[0] = gamma
                norms[f"blk.{i}.ffn_norm.weight"].data[0] = gamma
            u = {k: norm(v) for k, v in h.items()}
            if "eval" in streams:
                fires = F.linear(u["eval"], gate_w) > 0  # relu(gate) != 0
                zero = (~fires).float()
                st = LayerStats(float(zero.mean()), zero.mean(1).tolist(), fires.sum(0).numpy())
                if gates is not None:
                    fc1, fc2 = exact_predictor(*gates[i].factors(), norm.weight.numpy())
                    pred = PredictorSet([torch_of(fc1)], [torch_of(fc2)]).predict(0, h["eval"])  # pre-norm input
                    tp = float((pred & fires).sum())
                    st.recall = tp / max(1.0, float(fires.sum()))
                    st.precision = tp / max(1.0, float(pred.sum()))
                out.append(st)
            for k, s in streams.items():
                s[0] = h[k] + block.ffn(u[k])
            del block
    if patch is not None:
        patch.data.flush()
        del patch
    return out


def write_predictors(gates: list, path: Path, out: Path):
    """The exact predictors of a --gate-rank model (make_synthetic's docstring) from its LowRankGate per layer,
    bound to the finished file's fingerprint (so written after the calibration patched ffn_norm)."""
    from powerinfer.sparse.artifacts import model_fingerprint
    from powerinfer.sparse.predictor import PredictorSet

    loaded = open_model(path)
    fc1, fc2 = [], []
    for i, gate in enumerate(gates):
        a, b = gate.factors()
        w = np.asarray(loaded.weights.layers[i].post_attention_layernorm.dequantize(), np.float32).reshape(-1)
        f1, f2 = exact_predictor(a, b, w)
        fc1.append(torch_of(f1))
        fc2.append(torch_of(f2))
    meta = {"fingerprint": model_fingerprint(loaded), "source": f"make_synthetic.py --gate-rank {gates[0].rank}: "
            "exact predictors of the low-rank gates (fc1 = [B'w; -B'w], fc2 = [A', -A'])", "model": path.name}
    preds = PredictorSet(fc1, fc2, 0.0, meta)
    preds.save(out)
    return preds


def torch_of(a: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(a, np.float32))


def engine_smoke(path: Path, text: str) -> str:
    """The compiled decoder loads the file and computes finite logits for a few tokens of `text`."""
    import powerinfer

    llm = powerinfer.load(str(path), n_ctx=64, n_threads=1)
    ids = llm.tokenizer.encode(text)[:16]
    logits = llm.runner.eval(ids)
    if not np.isfinite(logits).all():
        raise SystemExit("error: the engine produced non-finite logits for the synthetic model")
    return f"engine ({llm.runner.compute}) ran {len(ids)} tokens, logits finite"


DESIGN_TOKENS = 1_000_000  # the rates are written as counts over this many (virtual) tokens


def write_activation_counts(rates: list[np.ndarray], path: Path, directory: str) -> Path:
    """Per layer round(p_k * DESIGN_TOKENS) of the designed firing rates as activation_N.pt (a 1-D int64 tensor,
    upstream's layout), in `directory` or, when empty, the finished file's default profile directory."""
    import torch

    from powerinfer.prepare.profile import default_profile_dir
    from powerinfer.sparse.artifacts import model_fingerprint

    out = Path(directory) if directory else default_profile_dir(model_fingerprint(open_model(path))) / "activation"
    out.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(rates):
        torch.save(torch.from_numpy(np.rint(p * DESIGN_TOKENS).astype(np.int64)), out / f"activation_{i}.pt")
    return out


def mem_available() -> int:
    """MemAvailable (free memory plus what the kernel can reclaim), in bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
