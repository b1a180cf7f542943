"""`powerinfer calibrate`: per-layer thresholds for the `threshold` FFN backend (sparse/threshold.py; TEAL,
arXiv 2408.14690; CATS, arXiv 2404.08763), to a target sparsity S or to a perplexity bound.

Calibration, layer by layer:
  * the calibration text is tokenized as llama-perplexity does (BOS per the model, special-token text left as
    text), its first N tokens cut into chunks of n_ctx, each run from an empty context with BOS replacing the
    chunk's first token when the model adds one;
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

import torch
import torch.nn.functional as F

from ..errors import PowerInferError
from ..model.kvcache import KVCache
from ..model.llama import Transformer
from ..model.rope import rope_tables
from ..sparse.artifacts import (METHODS, Thresholds, default_thresholds_path, model_fingerprint, target_label,
                                text_sha256)
from ..runtime.sparsity import site_targets
from ..textdata import read_texts
from ..sparse.ffn import ffn_factory
from ..sparse.stats import ffn_stats, reset_ffn_stats, summarize_stats
from ..sparse.threshold import ThresholdFFN

DEFAULT_TOKENS = 8192  # 16 chunks of 512; quantiles over 8192 x 1536 entries per layer are stable to < 0.001
DEFAULT_CTX = 512  # llama-perplexity's customary chunk, so calibration sees the contexts PPL is scored in
DEFAULT_EVAL_TOKENS = 4096  # 8 chunks of 512 = 2048 scored predictions per probe
SEARCH_GRID = 0.05  # S resolution of --max-ppl-increase: ~5 probes for [0, 0.9]
SEARCH_MAX = 0.9  # beyond this SwiGLU models break (baselines.md 5.1: +164 % PPL at 90 %)


@dataclass
class TokenText:
    """Tokens of a text with their provenance (DESIGN: report which text and how many tokens)."""

    tokens: list[int]
    source: str  # "default calibration text (...)" or the file names
    description: str  # textdata.describe(text): size and sha256 prefix
    sha256: str


def chunks_of(tokens: list[int], n_tokens: int, n_ctx: int, bos_id: int | None = None) -> list[list[int]]:
    """The first n_tokens tokens in chunks of n_ctx (whole chunks; one shorter chunk if n_tokens < n_ctx), with
    BOS replacing each chunk's first token when `bos_id` is given (llama-perplexity's convention)."""
    n_tokens = min(n_tokens, len(tokens))
    if n_tokens <= 0:
        raise PowerInferError("no calibration tokens")
    if n_tokens < n_ctx:
        out = [list(tokens[:n_tokens])]
    else:
        out = [list(tokens[i * n_ctx:(i + 1) * n_ctx]) for i in range(n_tokens // n_ctx)]
    if bos_id is not None:
        for c in out:
            c[0] = bos_id
    return out


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
    cos, sin = (t.to(device) for t in rope_tables(cfg, n_ctx))
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


def parse_target(text: str, method: str) -> float | dict[str, float]:
    """--target-sparsity: "S" for every site, or "SX,SH" for teal-hu's input and neuron sites."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise PowerInferError(f"--target-sparsity: expected a number such as 0.5 (or SX,SH for teal-hu), "
                              f"got {text!r}") from None
    if not all(0 <= v < 1 for v in values):
        raise PowerInferError(f"--target-sparsity must be in [0, 1), got {text}")
    if len(values) == 1:
        return values[0]
    if method != "teal-hu" or len(values) != 2:
        raise PowerInferError(f"--target-sparsity {text}: two values (input site, neuron site) need --method teal-hu")
    return {"x": values[0], "h": values[1]}


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


# -- CLI -----------------------------------------------------------------------------------------------------

def _fraction(text: str) -> float:
    """'0.03' or '3%' -> 0.03; a bare number above 1 is refused as ambiguous."""
    t = text.strip()
    try:
        v = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise PowerInferError(f"--max-ppl-increase: expected a fraction such as 0.03 or a percentage such as 3%, "
                              f"got {text!r}") from None
    if not t.endswith("%") and v > 1:
        raise PowerInferError(f"--max-ppl-increase {text}: a fraction (0.03) or a percentage with % (3%)")
    if v < 0:
        raise PowerInferError(f"--max-ppl-increase must be >= 0, got {text}")
    return v


def add_parser(sub) -> None:
    p = sub.add_parser(
        "calibrate", help="calibrate per-layer activation thresholds for the sparse FFN (SwiGLU/GeGLU models)",
        description="Per-layer thresholds for the 'threshold' FFN backend: entries of the chosen criterion below a "
                    "layer's threshold are skipped. Thresholds are the S-quantile of the criterion's magnitudes on "
                    "calibration text, layer by layer; with --max-ppl-increase, S is searched (bisection on a 0.05 "
                    "grid) by llama-perplexity PPL on evaluation text against the dense model. Writes a JSON "
                    "artifact tied to the model's fingerprint.")
    p.add_argument("-m", "--model", metavar="PATH", help="GGUF file or HF directory (default: the bundled model)")
    goal = p.add_mutually_exclusive_group(required=True)
    goal.add_argument("--target-sparsity", metavar="S",
                      help="fraction of entries to skip per layer, e.g. 0.5; for teal-hu also SX,SH (input site, "
                           "neuron site), e.g. 0.2,0.4")
    goal.add_argument("--max-ppl-increase", metavar="P",
                      help="largest S whose PPL is at most (1+P) x dense PPL; P as 0.03 or 3%%. For teal-hu S is "
                           "the neuron site's sparsity, the input site's is S/2")
    p.add_argument("--method", choices=list(METHODS), default="hu",
                   help="hu: |act(gate)*up| per neuron, skips down rows (default); teal: |x| per FFN input channel, "
                        "skips gate/up columns; teal-hu: both")
    p.add_argument("--text", nargs="+", metavar="FILE",
                   help="UTF-8 calibration text(s), joined by blank lines (default: the built-in calibration text, "
                        "pydoc_data.topics calib split)")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, metavar="N",
                   help=f"calibrate on the first N tokens of the text (default: {DEFAULT_TOKENS})")
    p.add_argument("-c", "--ctx-size", dest="n_ctx", type=int, default=DEFAULT_CTX, metavar="N",
                   help=f"tokens per chunk, each from an empty context (default: {DEFAULT_CTX})")
    p.add_argument("--eval-file", metavar="FILE",
                   help="evaluation text for --max-ppl-increase / --eval-ppl (default: the built-in evaluation text, "
                        "pydoc_data.topics eval split, disjoint from the calibration text)")
    p.add_argument("--eval-tokens", type=int, default=DEFAULT_EVAL_TOKENS, metavar="N",
                   help="score the first N tokens of the evaluation text, in -c chunks "
                        f"(default: {DEFAULT_EVAL_TOKENS})")
    p.add_argument("--eval-ppl", action="store_true",
                   help="with --target-sparsity: also measure PPL against dense on the evaluation text")
    p.add_argument("-t", "--threads", dest="n_threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: torch's default)")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="artifact path (default: ~/.cache/powerinfer/<fingerprint>/thresholds-<method>-<S>.json)")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="root of the default artifact path (default: ~/.cache/powerinfer)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.set_defaults(func=func)


def _token_text(tok, text: str, source: str) -> TokenText:
    from ..textdata import describe

    # As llama-perplexity: BOS per the model, special-token text in the corpus stays text.
    return TokenText(tok.encode(text, add_bos=None, parse_special=False), source, describe(text), text_sha256(text))


def func(args) -> int:
    from ..formats.loader import load_tokenizer
    from ..formats.loader import load_model
    from ..textdata import pydoc_topics

    log = sys.stderr
    if args.n_ctx < 3:
        raise PowerInferError(f"--ctx-size must be >= 3, got {args.n_ctx}")
    if args.tokens <= 0:
        raise PowerInferError(f"--tokens must be > 0, got {args.tokens}")
    target = parse_target(args.target_sparsity, args.method) if args.target_sparsity is not None else None
    max_increase = _fraction(args.max_ppl_increase) if args.max_ppl_increase is not None else None
    evaluate = max_increase is not None or args.eval_ppl
    if evaluate and args.eval_tokens < args.n_ctx:
        raise PowerInferError(f"--eval-tokens {args.eval_tokens} is less than one chunk of -c {args.n_ctx}")
    if args.n_threads is not None:
        torch.set_num_threads(max(1, args.n_threads))

    loaded = load_model(args.model)
    if loaded.conversion_report:
        print(f"note: converted at load: {loaded.conversion_report}", file=log)
    if loaded.config.activation == "relu":
        print("note: a ReLU-family model: the 'relu' backend already skips its zero activations exactly; "
              "thresholds below its natural sparsity come out as 0 (no pruning)", file=log)
    tok = load_tokenizer(loaded)
    bos = tok.bos_id if tok.add_bos else None
    if args.text:
        text, source = read_texts(args.text)
    else:
        text, source = pydoc_topics("calib"), "default calibration text (pydoc_data.topics, calib split)"
    calib = _token_text(tok, text, source)
    chunks = chunks_of(calib.tokens, args.tokens, args.n_ctx, bos)
    n_used = sum(len(c) for c in chunks)
    fingerprint = model_fingerprint(loaded)
    print(f"calibrate: model {loaded.path} (fingerprint {fingerprint}), method {args.method}", file=log)
    print(f"calibrate: text: {source} ({calib.description}), {len(calib.tokens)} tokens; using the first {n_used} "
          f"in {len(chunks)} chunk(s) of {len(chunks[0])}", file=log)
    if n_used < args.tokens:
        print(f"warning: the calibration text has only {n_used} usable tokens (asked for {args.tokens})", file=log)

    model = threshold_model(loaded)
    evaluation = None
    if evaluate:
        if args.eval_file:
            etext, esource = read_texts([args.eval_file])
        else:
            etext, esource = pydoc_topics("eval"), "default evaluation text (pydoc_data.topics, eval split)"
        ev = _token_text(tok, etext, esource)
        n_eval = min(args.eval_tokens, len(ev.tokens)) // args.n_ctx * args.n_ctx
        if n_eval == 0:
            raise PowerInferError(f"the evaluation text has {len(ev.tokens)} tokens; one chunk needs {args.n_ctx}")
        eval_tokens = ev.tokens[:n_eval]
        print(f"calibrate: evaluation text: {esource} ({ev.description}), first {n_eval} tokens in "
              f"{n_eval // args.n_ctx} chunks of {args.n_ctx}, llama-perplexity convention", file=log)
        runner = torch_runner(loaded, model, args.n_ctx)
        eval_info = {"text": f"{esource} ({ev.description})", "text_sha256": ev.sha256, "n_tokens": n_eval}
        if max_increase is not None:
            target, values, summary, evaluation = search(model, runner, chunks, eval_tokens, args.n_ctx, bos,
                                                         args.method, max_increase, log=log)
        else:
            dense = score(runner, model, eval_tokens, args.n_ctx, bos, desc="perplexity dense")
            values, summary = calibrate(model, chunks, args.method, target)
            r = score(runner, model, eval_tokens, args.n_ctx, bos, desc=f"perplexity S={target_label(target)}")
            rec = _probe_record(target, r, dense["ppl"])
            evaluation = {"max_ppl_increase": None, "ppl_dense": dense["ppl"], "ppl_dense_err": dense["ppl_err"],
                          "n_scored": dense["n_scored"], "n_chunks": dense["n_chunks"], "n_ctx": args.n_ctx,
                          "convention": "llama-perplexity (second half of each chunk scored)", "probes": [rec],
                          "chosen": target, "ppl": r["ppl"]}
        evaluation.update(eval_info)
    else:
        values, summary = calibrate(model, chunks, args.method, target)

    th = _artifact(loaded, fingerprint, args.method, target, values, summary, calib, source, chunks, bos, evaluation)
    out = th.save(args.output or default_thresholds_path(fingerprint, args.method, target, args.cache_dir))
    _print_summary(th, summary, out, args.json)
    return 0


def _artifact(loaded, fingerprint, method, target, values, summary, calib, source, chunks, bos, evaluation):
    if not values:  # the search kept the dense model: store explicit zeros
        values = {site: [0.0] * loaded.config.n_layer for site in METHODS[method]}
    achieved = {site: summary[f"sparsity_{site}"]["per_layer"] for site in METHODS[method]
                if f"sparsity_{site}" in summary}
    return Thresholds(
        method=method, target_sparsity=target, values=values, fingerprint=fingerprint,
        calibration={"text": f"{source} ({calib.description})", "text_sha256": calib.sha256,
                     "n_tokens": sum(len(c) for c in chunks), "n_chunks": len(chunks), "n_ctx": len(chunks[0]),
                     "bos": bos is not None},
        achieved=achieved, evaluation=evaluation,
        model={"file": loaded.path.name, "arch": loaded.config.arch, "name": loaded.config.name})


def calibrate_default(loaded, method: str, target: float | dict[str, float], cache_dir=None,
                      log=sys.stderr) -> Thresholds:
    """Thresholds of `method` at `target` on the built-in calibration text with the default token count and
    context, saved at the default cached path (what `--sparsity auto|S` uses on first run)."""
    from ..formats.loader import load_tokenizer
    from ..textdata import pydoc_topics

    tok = load_tokenizer(loaded)
    bos = tok.bos_id if tok.add_bos else None
    source = "default calibration text (pydoc_data.topics, calib split)"
    calib = _token_text(tok, pydoc_topics("calib"), source)
    chunks = chunks_of(calib.tokens, DEFAULT_TOKENS, DEFAULT_CTX, bos)
    fingerprint = model_fingerprint(loaded)
    print(f"calibrate: {method} thresholds for S={target_label(target)} on {sum(len(c) for c in chunks)} tokens of "
          f"the {source} (once; cached)", file=log)
    values, summary = calibrate(threshold_model(loaded), chunks, method, target)
    th = _artifact(loaded, fingerprint, method, target, values, summary, calib, source, chunks, bos, None)
    path = th.save(default_thresholds_path(fingerprint, method, target, cache_dir))
    print(f"calibrate: wrote {path}", file=log)
    return th


def _print_summary(th: Thresholds, summary: dict, path, as_json: bool) -> None:
    import json

    ev = th.evaluation
    if as_json:
        print(json.dumps({"path": str(path), "method": th.method, "target_sparsity": th.target_sparsity,
                          "fingerprint": th.fingerprint, "calibration": th.calibration,
                          "achieved_mean": {s: sum(v) / len(v) for s, v in th.achieved.items() if v},
                          "bytes_fraction": summary.get("bytes_fraction"), "evaluation": ev}))
        return
    for site, vs in th.values.items():
        a = th.achieved.get(site, [])
        print(f"site {site}: thresholds {min(vs):.4g} .. {max(vs):.4g} over {len(vs)} layers; sparsity on the "
              f"calibration tokens {sum(a) / max(1, len(a)):.3f} [{min(a, default=0):.3f}..{max(a, default=0):.3f}]")
    if "bytes_fraction" in summary:
        print(f"FFN weight bytes a sparse kernel reads per token: {summary['bytes_fraction']:.1%} of dense "
              f"({summary['bytes_per_token'] / 2**20:.2f} of {summary['dense_bytes_per_token'] / 2**20:.2f} MiB)")
    if ev:
        if ev.get("max_ppl_increase") is not None:
            print(f"chosen S = {target_label(th.target_sparsity)}: the largest probe with PPL within "
                  f"+{ev['max_ppl_increase']:.1%} of dense")
        print(f"PPL on {ev['n_scored']} scored tokens of the evaluation text: dense {ev['ppl_dense']:.4f}, "
              f"sparse {ev['ppl']:.4f} ({ev['ppl'] / ev['ppl_dense'] - 1:+.2%})")
    print(f"wrote {path}")
