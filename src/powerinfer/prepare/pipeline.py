"""`powerinfer prepare`: the whole offline pipeline with defaults, for one model.

  1. thresholds (SwiGLU/GeGLU models only): `hu` at --target-sparsity, what counts as firing (prepare/calibrate.py)
  2. profile: firing counts, upstream's activation/*.pt, predictor samples, plots (prepare/profile.py)
  3. train-predictors (prepare/train.py)
  4. solve, when --vram-budget is given (prepare/solve.py)
Each step reuses a cached result made for the same model (fingerprint) and settings; --force redoes them.
"""
from __future__ import annotations

import shutil
import sys
import time

import torch

from ..errors import PowerInferError
from ..sparse.artifacts import model_fingerprint


def add_parser(sub) -> None:
    p = sub.add_parser("prepare", help="run the offline pipeline: thresholds, profile, predictors, placement",
                       description=__doc__.split("\n\n")[0] + ". Artifacts go to ~/.cache/powerinfer/<fingerprint>/.")
    p.add_argument("-m", "--model", metavar="PATH", help="GGUF file or HF directory (default: the bundled model)")
    p.add_argument("--text", nargs="+", metavar="FILE", help="calibration text (default: the built-in one)")
    p.add_argument("--tokens", type=int, default=16384, metavar="N", help="tokens to profile (default: 16384)")
    p.add_argument("--target-sparsity", type=float, default=0.5, metavar="S",
                   help="SwiGLU models: the hu thresholds that define firing (default: 0.5)")
    p.add_argument("--recall", type=float, default=0.9, help="predictor recall target per layer (default: 0.9)")
    p.add_argument("--budget", type=float, default=0.10, help="predictor size bound, fraction of the model")
    p.add_argument("--vram-budget", type=float, metavar="GiB", help="also solve the placement for this budget")
    p.add_argument("-t", "--threads", dest="n_threads", type=int, default=None, metavar="N", help="torch threads")
    p.add_argument("--force", action="store_true", help="redo every step")
    p.set_defaults(func=func)


def func(args) -> int:
    from ..formats.loader import load_model
    from .profile import default_profile_dir, load_profile, model_text, print_table, run_profile, thresholds_for
    from .train import default_predictors_path, print_report, train_predictors

    if args.n_threads:
        torch.set_num_threads(args.n_threads)
    t0 = time.perf_counter()
    loaded = load_model(args.model)
    fp = model_fingerprint(loaded)
    log = sys.stderr
    print(f"prepare: {loaded.path.name} (fingerprint {fp}), {loaded.config.n_layer} layers", file=log)
    th = thresholds_for(loaded, args.target_sparsity, log)
    prof_dir = default_profile_dir(fp)
    tokens, bos, info = model_text(loaded, args.text)
    prof = None
    if not args.force and (prof_dir / "profile.json").is_file():
        try:
            prof = load_profile(prof_dir, fp)
            if prof.meta["calibration"].get("text_sha256") != info["text_sha256"] or \
                    prof.meta["n_samples"] < min(args.tokens, len(tokens)) // 2:
                prof = None  # another text or fewer tokens: profile again
            else:
                print(f"prepare: reusing the profile in {prof_dir}", file=log)
        except PowerInferError:
            prof = None
    if prof is None:
        if prof_dir.exists():
            shutil.rmtree(prof_dir)
        prof = run_profile(loaded, tokens, info, prof_dir, args.tokens, 512, bos, th, log=log)
    print_table(prof)
    out = default_predictors_path(fp)
    if args.force and out.with_suffix(".parts").exists():
        shutil.rmtree(out.with_suffix(".parts"))
    ps = train_predictors(loaded, prof, out, args.recall, args.budget, log=log)
    print_report(ps)
    if args.vram_budget is not None:
        from . import solve

        argv = ["--vram-budget", str(args.vram_budget), "--gpu-bandwidth", "900", "--cpu-bandwidth", "30",
                "--predictor-bytes", str(ps.n_params() * 2)]
        argv += ["-m", args.model] if args.model else []
        argv += ["--reset-gpu-index"] if args.force else []
        solve.func(solve.parse_args(argv))
    print(f"prepare: done in {time.perf_counter() - t0:.0f} s; predictors {out}; plots {prof_dir}/power_law.png, "
          f"{prof_dir}/sparsity.png. Use them with: powerinfer run --sparsity {args.target_sparsity if th else 'auto'} "
          f"--predictors {out}", file=log)
    return 0
