"""The offline pipeline's subcommands: `calibrate`, `profile`, `train-predictors`, `solve`, `convert`, and `prepare`,
which runs the first four with the same option dataclasses."""
from __future__ import annotations

import json
import math
import sys
import time

import numpy as np

from ..formats.loader import load_model
from ..options import (CalibrateOptions, ConvertOptions, PrepareOptions, ProfileOptions, SolveOptions,
                       TrainOptions)
from ..prepare import solve
from ..prepare.calibrate import Calibration, calibrate_thresholds
from ..prepare.convert import convert_model
from ..prepare.pipeline import prepare_model
from ..prepare.profile import Profile, coverage_curve, profile_model
from ..prepare.train import train_model
from ..settings import ModelSettings, from_namespace
from ..sparse.artifacts import target_label
from ..sparse.predictor import PredictorSet
from . import load_model_noted


def _torch_threads(args) -> None:
    """-t for the tools that compute with torch: set when given, torch's own default otherwise."""
    if args.n_threads and args.n_threads > 0:
        import torch

        torch.set_num_threads(args.n_threads)


# -- calibrate -----------------------------------------------------------------------------------------------------

def cmd_calibrate(args) -> int:
    """Per-layer thresholds for the 'threshold' FFN backend: entries of the chosen criterion below a layer's
    threshold are skipped. Thresholds are the S-quantile of the criterion's magnitudes on calibration text, layer
    by layer; with --max-ppl-increase, S is searched (bisection on a 0.05 grid) by llama-perplexity PPL on
    evaluation text against the dense model. Writes a JSON artifact tied to the model's fingerprint."""
    opts = from_namespace(CalibrateOptions, args)
    _torch_threads(args)
    result = calibrate_thresholds(load_model_noted(args.model), opts, log=sys.stderr)
    _print_calibration(result, opts.json)
    return 0


def _print_calibration(c: Calibration, as_json: bool) -> None:
    th, summary, ev = c.thresholds, c.summary, c.thresholds.evaluation
    if as_json:
        print(json.dumps({"path": str(c.path), "method": th.method, "target_sparsity": th.target_sparsity,
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
    print(f"wrote {c.path}")


# -- profile -------------------------------------------------------------------------------------------------------

def cmd_profile(args) -> int:
    """Run the model over calibration text and count, per layer and neuron, the tokens for which the neuron fires
    (ReLU models: h != 0; SwiGLU models: |h| above the calibrated threshold). Writes counts, upstream's
    activation/*.pt, predictor training samples and plots."""
    opts = from_namespace(ProfileOptions, args)
    _torch_threads(args)
    _print_profile(profile_model(load_model(args.model), opts, log=sys.stderr))
    return 0


def _print_profile(profile: Profile) -> None:
    c = profile.counts
    print("layer  sparsity  top10%-covers  top25%-covers")
    for i in range(c.shape[0]):
        xs, ys = coverage_curve(c[i])
        print(f"{i:5d}  {profile.meta['sparsity_per_layer'][i]:8.1%}  {ys[10]:13.1%}  {ys[25]:13.1%}")


# -- train-predictors ----------------------------------------------------------------------------------------------

def cmd_train_predictors(args) -> int:
    """Train fc2 relu(fc1 x) per layer on `powerinfer profile`'s samples: the smallest rank reaching --recall on
    held-out tokens, within --budget of the model's parameters. Resumable; prints per-layer recall, precision and
    predicted sparsity."""
    opts = from_namespace(TrainOptions, args)
    _torch_threads(args)
    ps, _ = train_model(load_model(args.model), opts, log=sys.stderr)
    _print_predictors(ps)
    return 0


def _print_predictors(ps: PredictorSet) -> None:
    print("layer  rank  recall  precision  predicted-sparsity  true-sparsity   (held-out tokens; threshold and "
          "rank chosen on them)")
    rs = ps.meta["report"]
    for r in rs:
        print(f"{r['layer']:5d}  {r['rank']:4d}  {r['recall']:6.1%}  {r['precision']:9.1%}  "
              f"{r['predicted_sparsity']:18.1%}  {r['true_sparsity']:13.1%}")
    print(f"mean   {'':4}  {np.mean([r['recall'] for r in rs]):6.1%}  {np.mean([r['precision'] for r in rs]):9.1%}  "
          f"{np.mean([r['predicted_sparsity'] for r in rs]):18.1%}  {np.mean([r['true_sparsity'] for r in rs]):13.1%}")


# -- solve ---------------------------------------------------------------------------------------------------------

def cmd_solve(args) -> int:
    """Fill the fast tier in upstream's priority order (attention, predictors, norms, output head, KV cache, then
    hot FFN neurons by profiled firing frequency); write an upstream-compatible <model>.generated.gpuidx and our
    placement file."""
    opts = from_namespace(SolveOptions, args)
    settings = from_namespace(ModelSettings, args)
    solve.check_options(opts)
    _print_solution(solve.solve_model(load_model(settings.model), opts, settings, settings.n_ctx, log=sys.stderr))
    return 0


def _print_solution(r: solve.SolveResult) -> None:
    p = r.placement
    if r.disabled:
        _print_parts(p, r.parts)
        print(f"FFN neurons: none on the fast tier (--disable-gpu-index); {r.gpuidx} not touched; "
              f"wrote {r.placement_path}")
        return
    _print_hot(p, r.upstream, r.counts)
    _print_parts(p, r.parts)
    bw = r.bandwidths
    print(f"fast tier: {p.used:,} of {p.budget:,} bytes used ({p.ffn_bytes / 2**20:.2f} MiB hot FFN neurons); "
          f"expected FFN read time saved {1e3 * r.saving:.4f} ms/token vs upstream's rule "
          f"{1e3 * r.upstream_saving:.4f} ms/token (fast tier {bw['fast_bytes_per_s'] / 1e9:.0f} GB/s {bw['fast']}, "
          f"slow tier {bw['slow_bytes_per_s'] / 1e9:.1f} GB/s {bw['slow']}; {r.n_tokens} profiled tokens)")
    if r.written:
        print(f"wrote {r.gpuidx} and {r.placement_path}")


def _print_hot(ours: solve.Placement, upstream: solve.Placement, counts: list[np.ndarray]) -> None:
    print("layer  hot neurons  hot MiB  firings covered  | upstream: hot  covered")
    for i, (h, u, c) in enumerate(zip(ours.hot, upstream.hot, counts)):
        total = max(1e-300, c.sum())
        print(f"{i:5d}  {len(h):11d}  {len(h) * ours.neuron_bytes[i] / 2**20:7.2f}  {c[h].sum() / total:15.1%}  "
              f"| {len(u):13d}  {c[u].sum() / total:7.1%}")
    total = max(1e-300, math.fsum(c.sum() for c in counts))
    print(f"total  {sum(map(len, ours.hot)):11d}  {ours.ffn_bytes / 2**20:7.2f}  "
          f"{solve.firings_served(ours, counts) / total:15.1%}  | {sum(map(len, upstream.hot)):13d}  "
          f"{solve.firings_served(upstream, counts) / total:7.1%}")


def _print_parts(p: solve.Placement, parts: list[tuple[str, int]]) -> None:
    """Non-FFN parts placed per category, in fill order."""
    cats: dict[str, list[int]] = {}
    for name, nbytes in parts:
        row = cats.setdefault(name.split(".")[0], [0, 0, 0, 0])  # tensors placed, tensors, bytes placed, bytes
        on = name in p.parts
        row[:] = [a + b for a, b in zip(row, (on, 1, nbytes * on, nbytes))]
    print("non-FFN parts on the fast tier, in fill order:")
    for k, (n, of, b, total) in cats.items():
        print(f"  {k:10s} {n:5d} of {of:5d} tensors  {b / 2**20:9.2f} of {total / 2**20:9.2f} MiB")


# -- convert -------------------------------------------------------------------------------------------------------

def cmd_convert(args) -> int:
    """Convert a GGUF model plus predictors (ours from `powerinfer train-predictors`, or an upstream predictor
    directory of model_N.pt files) into PowerInfer's GGUF layout, readable by upstream PowerInfer and by
    powerinfer."""
    opts = from_namespace(ConvertOptions, args)
    settings = from_namespace(ModelSettings, args)
    out, preds = convert_model(settings.model, opts.output, settings.predictors, opts.outtype, log=sys.stderr)
    ranks = "none" if preds is None else f"{preds.n_layer} layers, ranks {min(preds.ranks())}..{max(preds.ranks())}"
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB; predictors: {ranks})")
    return 0


# -- prepare -------------------------------------------------------------------------------------------------------

def cmd_prepare(args) -> int:
    """Run the offline pipeline for one model: thresholds (SwiGLU/GeGLU models: hu at --target-sparsity, what
    counts as firing), profile, train-predictors, and solve when --vram-budget is given, each with the defaults
    of its own subcommand. Each step reuses a cached result made for the same model and settings; --force redoes
    them. Artifacts go to ~/.cache/powerinfer/<fingerprint>/."""
    profile, train = from_namespace(ProfileOptions, args), from_namespace(TrainOptions, args)
    solve_opts, opts = from_namespace(SolveOptions, args), from_namespace(PrepareOptions, args)
    settings = from_namespace(ModelSettings, args)
    if settings.vram_budget is not None:
        solve.check_options(solve_opts)
    _torch_threads(args)
    t0 = time.perf_counter()
    r = prepare_model(load_model(settings.model), profile, train, solve_opts, settings, settings.n_ctx, opts.force,
                      log=sys.stderr)
    _print_profile(r.profile)
    _print_predictors(r.predictors)
    if r.placement is not None:
        _print_solution(r.placement)
    prof_dir = r.profile.directory
    print(f"prepare: done in {time.perf_counter() - t0:.0f} s; predictors {r.predictors_path}; plots "
          f"{prof_dir}/power_law.png, {prof_dir}/sparsity.png. Use them with: powerinfer run --sparsity "
          f"{profile.target_sparsity if r.thresholds else 'auto'} --predictors {r.predictors_path}",
          file=sys.stderr)
    return 0
