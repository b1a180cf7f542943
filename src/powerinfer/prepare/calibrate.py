"""`powerinfer calibrate`: per-layer thresholds for the `threshold` FFN backend (sparse/threshold.py; TEAL,
arXiv 2408.14690; CATS, arXiv 2404.08763), to a target sparsity S or to a perplexity bound.

Calibration, layer by layer:
  * the calibration text is tokenized as llama-perplexity does (BOS per the model, special-token text left as
    text), its first N tokens cut into chunks of n_ctx, each run from an empty context with BOS replacing the
    chunk's first token when the model adds one (calibration_text.py);
  * for layer L every chunk runs through the block with the FFN capturing its input; each site's threshold is
    the S-quantile of the criterion's magnitudes over all (token, entry) pairs of the layer (site "x" first,
    then "h" computed behind the thresholded input); then the chunks continue through the thresholded FFN.
  Each layer is calibrated on the activations of the already-sparse layers before it, so the thresholds give S
  on the calibration tokens exactly (reference/baselines.md 5.1 took quantiles on the dense model and measured
  0.504 [0.499..0.510] on eval for a 0.5 target).
Search (--max-ppl-increase P): bisection over S on a 0.05 grid in [0, 0.9]; each probe is calibrated and scored
  llama-perplexity style (measure/perplexity.py) on the first --eval-tokens of the evaluation text, against the
  dense model on the same tokens; the largest probe within the bound is chosen. PPL grows with S (monotone in
  every measurement of baselines.md 5.1), which is what makes bisection valid.

Thresholds are written as a `Thresholds` artifact (sparse/artifacts.py) carrying the model fingerprint and the
calibration text's hash and token count.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import PowerInferError
from ..model.kvcache import KVCache
from ..model.llama import Transformer
from ..model.rope import rope_tables
from ..options import CalibrateOptions
from ..runtime.sparsity import site_targets
from ..sparse.artifacts import METHODS, Thresholds, default_thresholds_path, model_fingerprint, target_label
from ..sparse.ffn import ffn_factory
from ..sparse.stats import ffn_stats, reset_ffn_stats, summarize_stats
from ..sparse.threshold import ThresholdFFN
from .calibration_text import TokenText, token_text

SEARCH_GRID = 0.05  # S resolution of --max-ppl-increase: ~5 probes for [0, 0.9]
SEARCH_MAX = 0.9  # beyond this SwiGLU models break (baselines.md 5.1: +164 % PPL at 90 %)


def threshold_model(loaded, thresholds: Thresholds | None = None, dtype=torch.float32) -> Transformer:
    """The torch reference model with the `threshold` FFN backend (zero thresholds: dense, bit for bit)."""
    return Transformer(loaded.config, loaded.weights, ffn=ffn_factory("threshold", thresholds=thresholds), dtype=dtype)


def _ffns(model: Transformer) -> list[ThresholdFFN]:
    ffns = [b.ffn for b in model.layers]
    if not all(isinstance(f, ThresholdFFN) for f in ffns):
        raise TypeError("calibration needs a model built with the 'threshold' FFN backend (threshold_model)")
    return ffns


def set_thresholds(model: Transformer, values: dict[str, list[float]] | None) -> None:
    """Install per-layer thresholds ({site: [value per layer]}); None or {} makes every layer dense."""
    for i, f in enumerate(_ffns(model)):
        f.set_thresholds({site: v[i] for site, v in (values or {}).items()})


def _quantile(magnitudes: torch.Tensor, q: float) -> float:
    """Threshold t with fraction q of the entries strictly below it: the value of rank round(q*n) (0-based)."""
    flat = magnitudes.reshape(-1)
    k = round(q * flat.numel())
    if k <= 0:
        return 0.0  # 0 prunes nothing, and keeps the dense code path
    if k >= flat.numel():
        return math.inf
    # kthvalue, not torch.quantile: the latter refuses inputs over 2**24 entries (16 chunks x 1536 neurons is more).
    return float(flat.float().kthvalue(k + 1).values)


def calibrate(model: Transformer, chunks: list[list[int]], method: str, target: float | dict[str, float],
              progress: bool | None = None) -> tuple[dict[str, list[float]], dict]:
    """Per-layer thresholds of `method` for sparsity `target` on `chunks`, installed into `model` as they are found.
    `target` may also be {site: S} to give the sites of "teal-hu" different sparsities.

    Returns (values {site: [per layer]}, summarize_stats of the calibration tokens run through the result)."""
    from tqdm import tqdm

    if method not in METHODS:
        raise PowerInferError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
    sites = METHODS[method]
    targets = dict(target) if isinstance(target, dict) else {site: float(target) for site in sites}
    if set(targets) != set(sites):
        raise PowerInferError(f"method {method!r} thresholds {', '.join(sites)}; targets given for {sorted(targets)}")
    if not all(0.0 <= t < 1.0 for t in targets.values()):
        raise PowerInferError(f"target sparsity must be in [0, 1), got {target}")
    ffns = _ffns(model)
    set_thresholds(model, None)
    cfg = model.config
    n_ctx = max(len(c) for c in chunks)
    device = model.embed_tokens.device
    # The runner's cache type (f16, model/kvcache.py), so calibration sees the activations inference will.
    cache = KVCache.allocate(cfg.n_layer, n_ctx, cfg.n_head_kv * cfg.head_dim, device=device)
    cos, sin = (torch.from_numpy(t).to(device) for t in rope_tables(cfg, n_ctx))
    values: dict[str, list[float]] = {site: [] for site in sites}
    shown = "/".join(f"{t:.2f}" for t in targets.values())
    bar = tqdm(total=cfg.n_layer, unit="layer", desc=f"calibrate {method} S={shown}", file=sys.stderr,
               disable=None if progress is None else not progress)
    with torch.inference_mode():
        xs = [F.embedding(torch.tensor(c, dtype=torch.long, device=device), model.embed_tokens) for c in chunks]
        for block, ffn in zip(model.layers, ffns):
            ys: list[torch.Tensor] = []
            ffn.capture = ys
            try:  # with the FFN returning zeros the block's output is its residual stream before the FFN
                resid = [block(x, 0, cache, cos[:x.shape[0]], sin[:x.shape[0]]) for x in xs]
            finally:
                ffn.capture = None
            found: dict[str, float] = {}
            if "x" in sites:
                found["x"] = _quantile(torch.cat([y.abs() for y in ys]), targets["x"])
                ffn.set_thresholds(found)
            if "h" in sites:
                found["h"] = _quantile(torch.cat([ffn.hidden(y)[0].abs() for y in ys]), targets["h"])
                ffn.set_thresholds(found)
            for site, t in found.items():
                values[site].append(t)
            ffn.stats.reset()
            xs = [r + ffn(y) for r, y in zip(resid, ys)]
            bar.update(1)
            bar.set_postfix({f"sparsity_{s}": f"{ffn.stats.sparsity(s):.3f}" for s in sites})
    bar.close()
    summary = summarize_stats(ffn_stats(model))
    reset_ffn_stats(model)
    return values, summary


# -- perplexity against dense -----------------------------------------------------------------------------

def torch_runner(loaded, model: Transformer, n_ctx: int):
    """A runtime Runner (compute="torch") that runs `model`. Runner has no FFN-backend option yet, so its dense
    reference model is replaced; the runner owns the KV cache and the llama-perplexity driver needs its API."""
    from ..runtime.runner import make_runner

    runner = make_runner(loaded, n_ctx, torch.get_num_threads(), n_batch=n_ctx, compute="torch")
    runner.model = model
    return runner


def score(runner, model: Transformer, tokens: list[int], n_ctx: int, bos_id: int | None,
          progress: bool | None = None, desc: str = "perplexity") -> dict:
    """llama-perplexity PPL of `tokens` (whole chunks of n_ctx) with the sparsity statistics of that run."""
    from tqdm import tqdm

    from ..measure.perplexity import perplexity

    n_chunk = len(tokens) // n_ctx
    bar = tqdm(total=n_chunk, unit="chunk", desc=desc, file=sys.stderr,
               disable=None if progress is None else not progress)
    reset_ffn_stats(model)
    try:
        r = perplexity(runner, tokens, n_ctx, bos_id=bos_id, on_chunk=lambda i, n, p: bar.update(1))
    finally:
        bar.close()
    stats = summarize_stats(ffn_stats(model))
    reset_ffn_stats(model)
    return {"ppl": r.ppl, "ppl_err": r.ppl_err, "nll_mean": r.nll_mean, "n_scored": r.n_tokens_scored,
            "n_chunks": r.n_chunks, "stats": stats}


def _probe_record(target: float | dict[str, float], r: dict, ppl_dense: float) -> dict:
    s = r["stats"]
    rec = {"target": target, "ppl": r["ppl"], "ppl_err": r["ppl_err"], "increase": r["ppl"] / ppl_dense - 1,
           "bytes_fraction": s.get("bytes_fraction", 1.0)}
    for site in ("x", "h"):
        if f"sparsity_{site}" in s:
            rec[f"eval_sparsity_{site}"] = s[f"sparsity_{site}"]["mean"]
    return rec


def search(model: Transformer, runner, chunks: list[list[int]], eval_tokens: list[int], n_ctx: int,
           bos_id: int | None, method: str, max_increase: float, progress: bool | None = None,
           log=sys.stderr) -> tuple[float, dict[str, list[float]], dict, dict]:
    """Largest S on the SEARCH_GRID with PPL <= (1 + max_increase) * dense PPL on `eval_tokens`.

    Returns (targets at S (site_targets), thresholds, calibration summary, evaluation record {ppl_dense, probes,
    chosen, ...})."""
    set_thresholds(model, None)
    dense = score(runner, model, eval_tokens, n_ctx, bos_id, progress, desc="perplexity dense")
    ppl_dense = dense["ppl"]
    print(f"calibrate: dense PPL {ppl_dense:.4f} +/- {dense['ppl_err']:.4f} on {dense['n_scored']} scored tokens",
          file=log)
    steps = round(SEARCH_MAX / SEARCH_GRID)
    lo, hi = 0, steps + 1  # lo: largest grid step known within the bound (0 = dense); hi: smallest known outside
    best = (site_targets(method, 0.0), {}, {}, None)
    probes = []
    while hi - lo > 1:
        mid = (lo + hi) // 2
        s = site_targets(method, round(mid * SEARCH_GRID, 4))
        values, summary = calibrate(model, chunks, method, s, progress)
        r = score(runner, model, eval_tokens, n_ctx, bos_id, progress, desc=f"perplexity S={target_label(s)}")
        rec = _probe_record(s, r, ppl_dense)
        rec["ok"] = rec["increase"] <= max_increase
        probes.append(rec)
        print(f"calibrate: S={target_label(s)}: PPL {r['ppl']:.4f} ({rec['increase']:+.2%}), FFN weight bytes per "
              f"token {rec['bytes_fraction']:.1%} of dense -> {'within' if rec['ok'] else 'outside'} the bound",
              file=log)
        if rec["ok"]:
            lo, best = mid, (s, values, summary, rec)
        else:
            hi = mid
    s, values, summary, rec = best
    if rec is None:  # nothing but dense is within the bound
        set_thresholds(model, None)
    evaluation = {"max_ppl_increase": max_increase, "ppl_dense": ppl_dense, "ppl_dense_err": dense["ppl_err"],
                  "n_scored": dense["n_scored"], "n_chunks": dense["n_chunks"], "n_ctx": n_ctx,
                  "convention": "llama-perplexity (second half of each chunk scored)", "probes": probes,
                  "chosen": s, "ppl": rec["ppl"] if rec else ppl_dense}
    return s, values, summary, evaluation


# -- the command ---------------------------------------------------------------------------------------------

@dataclass
class Calibration:
    thresholds: Thresholds
    summary: dict  # summarize_stats of the calibration tokens through the thresholds
    path: Path  # where the artifact was written


def calibrate_thresholds(loaded, opts: CalibrateOptions, log=sys.stderr) -> Calibration:
    """`powerinfer calibrate`: thresholds of opts.method for opts.target on the calibration text, or the largest
    S within opts.max_increase (search); written to opts.output or the default cached path."""
    from ..formats.loader import load_tokenizer

    if loaded.config.activation == "relu":
        print("note: a ReLU-family model: the 'relu' backend already skips its zero activations exactly; "
              "thresholds below its natural sparsity come out as 0 (no pruning)", file=log)
    tok = load_tokenizer(loaded)
    calib = token_text(tok, opts.text, "calib")
    chunks = calib.chunks(opts.tokens, opts.n_ctx)
    n_used = sum(len(c) for c in chunks)
    fingerprint = model_fingerprint(loaded)
    print(f"calibrate: model {loaded.path} (fingerprint {fingerprint}), method {opts.method}", file=log)
    print(f"calibrate: text: {calib.source} ({calib.description}), {len(calib.tokens)} tokens; using the first "
          f"{n_used} in {len(chunks)} chunk(s) of {len(chunks[0])}", file=log)
    if n_used < opts.tokens:
        print(f"warning: the calibration text has only {n_used} usable tokens (asked for {opts.tokens})", file=log)

    model = threshold_model(loaded)
    target, evaluation = opts.target, None
    if opts.evaluate:
        n_ctx = opts.n_ctx
        ev = token_text(tok, [opts.eval_file] if opts.eval_file else None, "eval")
        n_eval = min(opts.eval_tokens, len(ev.tokens)) // n_ctx * n_ctx
        if n_eval == 0:
            raise PowerInferError(f"the evaluation text has {len(ev.tokens)} tokens; one chunk needs {n_ctx}")
        eval_tokens = ev.tokens[:n_eval]
        print(f"calibrate: evaluation text: {ev.source} ({ev.description}), first {n_eval} tokens in "
              f"{n_eval // n_ctx} chunks of {n_ctx}, llama-perplexity convention", file=log)
        runner = torch_runner(loaded, model, n_ctx)
        eval_info = {"text": ev.info["text"], "text_sha256": ev.sha256, "n_tokens": n_eval}
        if opts.max_increase is not None:
            target, values, summary, evaluation = search(model, runner, chunks, eval_tokens, n_ctx, calib.bos_id,
                                                         opts.method, opts.max_increase, log=log)
        else:
            dense = score(runner, model, eval_tokens, n_ctx, calib.bos_id, desc="perplexity dense")
            values, summary = calibrate(model, chunks, opts.method, target)
            r = score(runner, model, eval_tokens, n_ctx, calib.bos_id, desc=f"perplexity S={target_label(target)}")
            rec = _probe_record(target, r, dense["ppl"])
            evaluation = {"max_ppl_increase": None, "ppl_dense": dense["ppl"], "ppl_dense_err": dense["ppl_err"],
                          "n_scored": dense["n_scored"], "n_chunks": dense["n_chunks"], "n_ctx": n_ctx,
                          "convention": "llama-perplexity (second half of each chunk scored)", "probes": [rec],
                          "chosen": target, "ppl": r["ppl"]}
        evaluation.update(eval_info)
    else:
        values, summary = calibrate(model, chunks, opts.method, target)

    th = _artifact(loaded, fingerprint, opts.method, target, values, summary, calib, chunks, evaluation)
    path = th.save(opts.output or default_thresholds_path(fingerprint, opts.method, target, opts.cache_dir))
    return Calibration(th, summary, path)


def _artifact(loaded, fingerprint, method, target, values, summary, calib: TokenText, chunks, evaluation):
    if not values:  # the search kept the dense model: store explicit zeros
        values = {site: [0.0] * loaded.config.n_layer for site in METHODS[method]}
    achieved = {site: summary[f"sparsity_{site}"]["per_layer"] for site in METHODS[method]
                if f"sparsity_{site}" in summary}
    return Thresholds(
        method=method, target_sparsity=target, values=values, fingerprint=fingerprint,
        calibration={**calib.info, "n_tokens": sum(len(c) for c in chunks), "n_chunks": len(chunks),
                     "n_ctx": len(chunks[0]), "bos": calib.bos_id is not None},
        achieved=achieved, evaluation=evaluation,
        model={"file": loaded.path.name, "arch": loaded.config.arch, "name": loaded.config.name})


def calibrate_default(loaded, method: str, target: float | dict[str, float], cache_dir=None,
                      log=sys.stderr) -> Thresholds:
    """Thresholds of `method` at `target` on the built-in calibration text with `powerinfer calibrate`'s default
    token count and chunk, saved at the default cached path (what `--sparsity auto|S` uses on first run)."""
    from ..formats.loader import load_tokenizer

    calib = token_text(load_tokenizer(loaded))
    chunks = calib.chunks(CalibrateOptions.tokens, CalibrateOptions.n_ctx)
    fingerprint = model_fingerprint(loaded)
    print(f"calibrate: {method} thresholds for S={target_label(target)} on {sum(len(c) for c in chunks)} tokens of "
          f"the {calib.source} (once; cached)", file=log)
    values, summary = calibrate(threshold_model(loaded), chunks, method, target)
    th = _artifact(loaded, fingerprint, method, target, values, summary, calib, chunks, None)
    path = th.save(default_thresholds_path(fingerprint, method, target, cache_dir))
    print(f"calibrate: wrote {path}", file=log)
    return th
