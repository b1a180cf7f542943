"""`powerinfer prepare`: the whole offline pipeline with defaults, for one model.

  1. thresholds (SwiGLU/GeGLU models only): `hu` at --target-sparsity, what counts as firing (prepare/calibrate.py)
  2. profile: firing counts, upstream's activation/*.pt, predictor samples, plots (prepare/profile.py)
  3. train-predictors (prepare/train.py)
  4. solve, when --vram-budget is given (prepare/solve.py)
Each step reuses a cached result made for the same model (fingerprint) and settings; --force redoes them. The steps
take the same option dataclasses as their own subcommands, so their defaults are theirs.
"""
from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import PowerInferError
from ..options import ProfileOptions, SolveOptions, TrainOptions
from ..settings import ModelSettings, PlacementSettings
from ..sparse.artifacts import Thresholds, model_fingerprint
from ..sparse.predictor import PredictorSet
from .calibration_text import token_text
from .profile import Profile, load_profile, profile_dir, run_profile, thresholds_for
from .solve import SolveResult, solve_model
from .train import default_predictors_path, train_predictors


@dataclass
class Prepared:
    thresholds: Thresholds | None  # what defines firing (None: a ReLU-family model, exact zeros)
    profile: Profile
    predictors: PredictorSet
    predictors_path: Path
    placement: SolveResult | None  # None without --vram-budget


def prepare_model(loaded, profile: ProfileOptions, train: TrainOptions, solve: SolveOptions,
                  placement: PlacementSettings | None = None, n_ctx: int = ModelSettings.n_ctx, force: bool = False,
                  log=sys.stderr) -> Prepared:
    """Thresholds, profile, predictors and (with placement.vram_budget) the placement of `loaded`, reusing cached
    results unless `force`. The solver places the trained predictors as f16."""
    from ..formats.loader import load_tokenizer

    fp = model_fingerprint(loaded)
    print(f"prepare: {loaded.path.name} (fingerprint {fp}), {loaded.config.n_layer} layers", file=log)
    th = thresholds_for(loaded, profile.target_sparsity, log)
    prof_dir = profile_dir(loaded, profile)
    text = token_text(load_tokenizer(loaded), profile.text)
    prof = None
    if not force and (prof_dir / "profile.json").is_file():
        try:
            prof = load_profile(prof_dir, fp)
            if prof.meta["calibration"].get("text_sha256") != text.sha256 or \
                    prof.meta["n_samples"] < min(profile.tokens, len(text.tokens)) // 2:
                prof = None  # another text or fewer tokens: profile again
            else:
                print(f"prepare: reusing the profile in {prof_dir}", file=log)
        except PowerInferError:
            prof = None
    if prof is None:
        if prof_dir.exists():
            shutil.rmtree(prof_dir)
        prof = run_profile(loaded, text.tokens, text.info, prof_dir, profile.tokens, profile.n_ctx, text.bos_id, th,
                           log=log)
    out = Path(train.output).expanduser() if train.output else default_predictors_path(fp)
    if force and out.with_suffix(".parts").exists():
        shutil.rmtree(out.with_suffix(".parts"))
    ps = train_predictors(loaded, prof, out, train.recall, train.budget, train.epochs, log=log)
    solved = None
    if placement is not None and placement.vram_budget is not None:
        solve = replace(solve, predictor_bytes=ps.n_params() * 2)
        placement = replace(placement, reset_gpu_index=placement.reset_gpu_index or force)
        solved = solve_model(loaded, solve, placement, n_ctx, log)
    return Prepared(th, prof, ps, out, solved)
