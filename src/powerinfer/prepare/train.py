"""`powerinfer train-predictors`: per-layer activation predictors fc2 · relu(fc1 · x) (no biases; PowerInfer's layout,
reference/powerinfer.md 4) trained on a profile's samples (prepare/profile.py).

Per layer: the profile's (residual, firing mask) samples, the last HELD_OUT of them held out. Loss: binary cross
entropy on the logits with each entry weighted y (1 - w) + w, w = mean(y) + 0.005, which raises the weight of the
(rarer) firings so training favours recall (the ProSparse team's recipe, reference/powerinfer.md 4.3); Adam. Per
layer the logit threshold is set to keep --recall of the held-out firings, and the rank (from RANKS, up to the
layer's share of the budget) is the one with the highest predicted sparsity at that recall. The total predictor size
stays within --budget of the model's parameters (default 10 %, the paper's bound) by capping every layer's rank at
the same value. Per-layer results are written as they finish (resumable: a rerun skips finished layers of the same
profile).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..core.files import artifact_dir, atomic_write, write_text
from ..options import TrainOptions
from ..sparse.artifacts import model_fingerprint
from ..sparse.predictor import PredictorSet
from .profile import Profile, default_profile_dir, load_profile

RANKS = (16, 32, 64, 128, 256, 512, 1024)
TRAIN_SCHEME = 3  # bump when training changes, so resumed runs do not mix layers from two schemes
HELD_OUT = 0.1
BATCH = 512
LR = 3e-3


def _train_one(x: torch.Tensor, y: torch.Tensor, rank: int, epochs: int, seed: int) -> tuple[torch.Tensor, ...]:
    """fc1 [rank, d], fc2 [n_ff, rank] for inputs x (already standardized) and firing masks y."""
    g = torch.Generator().manual_seed(seed)
    d, n_ff = x.shape[1], y.shape[1]
    fc1 = (torch.randn(rank, d, generator=g) / d ** 0.5).requires_grad_()
    fc2 = (torch.randn(n_ff, rank, generator=g) / rank ** 0.5).requires_grad_()
    opt = torch.optim.Adam([fc1, fc2], lr=LR)
    w = y.float().mean().item() + 0.005
    n = x.shape[0]
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, BATCH):
            b = perm[i:i + BATCH]
            xb, yb = x[b], y[b].float()
            logits = torch.relu(xb @ fc1.T) @ fc2.T
            loss = F.binary_cross_entropy_with_logits(logits, yb, weight=yb * (1 - w) + w)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return fc1.detach(), fc2.detach()


def evaluate(fc1: torch.Tensor, fc2: torch.Tensor, x: torch.Tensor, y: torch.Tensor, threshold: float = 0.0) -> dict:
    """Recall (firings predicted), precision, predicted sparsity and true sparsity on (x, y)."""
    with torch.no_grad():
        pred = (torch.relu(x @ fc1.T) @ fc2.T) >= threshold
    tp = (pred & y).sum().item()
    return {"recall": tp / max(1, y.sum().item()), "precision": tp / max(1, pred.sum().item()),
            "predicted_sparsity": 1 - pred.float().mean().item(), "true_sparsity": 1 - y.float().mean().item(),
            "threshold": threshold}


def recall_threshold(fc1, fc2, x, y, recall: float) -> float:
    """The largest logit threshold that keeps `recall` of the firings in (x, y)."""
    with torch.no_grad():
        logits = torch.relu(x @ fc1.T) @ fc2.T
    pos = logits[y].float()
    if pos.numel() == 0:
        return 0.0
    k = int((1 - recall) * pos.numel())  # at most this many firings fall below the threshold
    return float(pos.kthvalue(k + 1).values) if k < pos.numel() else float(pos.max())


def train_layer(profile: Profile, layer: int, recall: float, max_rank: int, epochs: int = TrainOptions.epochs,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Ranks in increasing order; each gets the logit threshold that keeps `recall` of the held-out firings, and
    the rank with the highest predicted sparsity at that recall wins (larger ranks stop once they gain < 1 %).
    Inputs are scaled per channel to unit RMS for training (residual streams have outlier channels) and the scale is
    folded back into fc1, so the predictor reads the raw residual as the runtime gives it."""
    xs, ys = profile.samples(layer)
    x, y = torch.from_numpy(np.asarray(xs)).float(), torch.from_numpy(ys)
    n_held = max(1, int(len(x) * HELD_OUT))
    scale = x[:-n_held].pow(2).mean(0).sqrt().clamp_min(1e-6)  # per-channel RMS (a constant channel has std 0)
    xt, yt, xh, yh = x[:-n_held] / scale, y[:-n_held], x[-n_held:], y[-n_held:]
    best = None
    for rank in [r for r in RANKS if r <= max_rank] or [max_rank]:
        fc1, fc2 = _train_one(xt, yt, rank, epochs, seed + layer)
        fc1 = fc1 / scale[None, :]
        t = recall_threshold(fc1, fc2, xh, yh, recall)
        ev = evaluate(fc1, fc2, xh, yh, t)
        ev["rank"] = rank
        if best is not None and ev["predicted_sparsity"] < best[2]["predicted_sparsity"] + 0.01:
            if ev["predicted_sparsity"] > best[2]["predicted_sparsity"]:
                best = (fc1, fc2, ev)
            break
        best = (fc1, fc2, ev)
    return best


def train_predictors(loaded, profile: Profile, out: Path, recall: float = TrainOptions.recall,
                     budget: float = TrainOptions.budget, epochs: int = TrainOptions.epochs,
                     progress: bool | None = None, log=sys.stderr) -> PredictorSet:
    from tqdm import tqdm

    cfg = loaded.config
    profile.check(cfg)
    n_params = sum(t.rows * t.cols for lw in loaded.weights.layers for t in vars(lw).values()
                   if t is not None and len(t.shape) == 2)
    per_layer = budget * n_params / cfg.n_layer
    max_rank = max(1, int(per_layer // (cfg.d_model + cfg.n_ff)))
    # the parts directory is ours: never follow a link planted there (core/files.py); each part is renamed in
    work = artifact_dir(out.with_suffix(".parts"))
    key = {"scheme": TRAIN_SCHEME, "profile": profile.meta["fingerprint"], "n_samples": profile.meta["n_samples"],
           "text": profile.meta["calibration"].get("text_sha256"), "recall": recall, "max_rank": max_rank,
           "epochs": epochs}
    fc1s, fc2s, report = [], [], []
    show = sys.stderr.isatty() if progress is None else progress
    for i in tqdm(range(cfg.n_layer), desc="train-predictors", unit="layer", disable=not show, file=sys.stderr):
        part, meta_path = work / f"layer_{i}.pt", work / f"layer_{i}.json"
        done = _finished_part(part, meta_path, key, cfg)
        if done is not None:
            fc1, fc2, ev = done
        else:
            fc1, fc2, ev = train_layer(profile, i, recall, max_rank, epochs)
            with atomic_write(part) as fh:
                torch.save({"fc1": fc1, "fc2": fc2}, fh)
            write_text(meta_path, json.dumps({"key": key, "eval": ev}))
        fc1s.append(fc1)
        fc2s.append(fc2)
        report.append({"layer": i, **ev})
    ps = PredictorSet(fc1s, fc2s, 0.0, thresholds=[r["threshold"] for r in report], meta={
        "fingerprint": model_fingerprint(loaded), "profile": str(profile.directory),
        "calibration": profile.meta["calibration"], "criterion": profile.meta.get("criterion"),
        "recall_target": recall, "budget": budget, "report": report})
    ps.save(out)
    frac = ps.n_params() / n_params
    print(f"train-predictors: {ps.n_params() / 1e6:.2f} M parameters ({frac:.1%} of the model's matrices); "
          f"wrote {out}", file=log)
    return ps


def _finished_part(part: Path, meta_path: Path, key: dict, cfg):
    """(fc1, fc2, eval) of a layer finished by an earlier run with the same `key`, or None to train it (again).
    A part that is unreadable, not tensors, or of the wrong shape is retrained, never trusted (weights_only)."""
    if not (part.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_bytes().decode("utf-8"))
        t = torch.load(part, map_location="cpu", weights_only=True)
    except Exception:  # truncated, tampered or foreign files: train the layer again
        return None
    if not (isinstance(meta, dict) and meta.get("key") == key and isinstance(meta.get("eval"), dict)
            and isinstance(meta["eval"].get("threshold"), (int, float)) and isinstance(t, dict)):
        return None
    fc1, fc2 = t.get("fc1"), t.get("fc2")
    if not (isinstance(fc1, torch.Tensor) and isinstance(fc2, torch.Tensor) and fc1.dim() == 2 and fc2.dim() == 2
            and fc1.shape[0] >= 1 and fc1.shape[1] == cfg.d_model and list(fc2.shape) == [cfg.n_ff, fc1.shape[0]]
            and fc1.is_floating_point() and fc2.is_floating_point()):
        return None
    return fc1.float(), fc2.float(), meta["eval"]


def default_predictors_path(fingerprint: str, cache_dir=None) -> Path:
    return default_profile_dir(fingerprint, cache_dir).parent / "predictors.safetensors"


def train_model(loaded, opts: TrainOptions, log=sys.stderr) -> tuple[PredictorSet, Path]:
    """`powerinfer train-predictors`: predictors from opts.profile (default: the model's cached profile), written to
    opts.output (default: beside the profile). Returns them and where they went."""
    fp = model_fingerprint(loaded)
    profile = load_profile(opts.profile or default_profile_dir(fp), fp)
    out = Path(opts.output).expanduser() if opts.output else default_predictors_path(fp)
    return train_predictors(loaded, profile, out, opts.recall, opts.budget, opts.epochs, log=log), out
