"""`powerinfer profile`: per-layer, per-neuron firing counts over calibration text, the samples predictors are
trained on, and plots (PowerInfer, arXiv 2312.12456, section 3: activation locality; reference/powerinfer.md 3).

A neuron fires for a token when its FFN activation counts as active:
  ReLU family (ReGLU, dReLU, ReLU MLPs): h = act(gate)*up != 0 (exact zeros are what the sparse FFN skips);
  SwiGLU/GeGLU: |h| >= the layer's calibrated threshold (`hu` thresholds, sparse/threshold.py), the neurons the
  threshold backend would compute. The profile records which thresholds it used.
The text is tokenized and chunked as calibration is (llama-perplexity style, every chunk from an empty context
with BOS); every token of every chunk counts (prompt-like, batched).

Output directory (default ~/.cache/powerinfer/<fingerprint>/profile):
  profile.json                 format, version, fingerprint, criterion, text hash, tokens, per-layer sparsity
  counts.npy                   int64 [n_layer, n_ff]
  activation/activation_N.pt   upstream's layout: a 1-D int64 tensor [n_ff] per layer (torch.save)
  samples/x_N.npy              float16 [n_samples, d_model]: the residual before the FFN norm (the predictor
                               input, reference/powerinfer.md 4.1); memory-mapped, written as produced
  samples/active_N.npy         uint8 [n_samples, n_ff/8]: np.packbits of the firing mask
  power_law.png, sparsity.png  share of firings covered by the top x% of neurons per layer; per-layer sparsity
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PowerInferError
from ..formats.artifact import read_json_artifact, write_json_artifact
from ..model.llama import Transformer, dense
from ..options import ProfileOptions
from ..sparse.artifacts import DEFAULT_CACHE_DIR, model_fingerprint
from ..sparse.ffn import activation_fn, ffn_hidden
from .calibration_text import chunks_of, token_text

PROFILE_FORMAT = "powerinfer.profile"
PROFILE_VERSION = 1


class RecordingFFN(nn.Module):
    """The dense FFN, counting per-neuron firings and keeping (residual, firing mask) samples."""

    takes_residual = True

    def __init__(self, lw, config, dtype=torch.float32, layer: int = 0, t_h: float = 0.0, samples=None):
        super().__init__()
        self.kind, self.layer, self.t_h = config.ffn_kind, layer, t_h
        self.act = activation_fn(config.activation)
        self.register_buffer("gate_proj", dense(lw.gate_proj if self.kind != "mlp" else None, dtype))
        self.register_buffer("up_proj", dense(lw.up_proj, dtype))
        self.register_buffer("down_proj", dense(lw.down_proj, dtype))
        self.counts = torch.zeros(lw.up_proj.rows, dtype=torch.int64)
        self.tokens = 0
        self.samples = samples  # SampleWriter or None

    def forward(self, x, residual=None):
        h = ffn_hidden(self.kind, self.act, x, self.gate_proj, self.up_proj)
        fired = (h != 0) & (h.abs() >= self.t_h)
        flat = fired.reshape(-1, fired.shape[-1])
        self.counts += flat.sum(0)
        self.tokens += flat.shape[0]
        if self.samples is not None:
            self.samples.add(self.layer, residual.reshape(-1, residual.shape[-1]), flat)
        return F.linear(h, self.down_proj)


class SampleWriter:
    """Per layer, up to `capacity` (residual, mask) rows in memory-mapped .npy files."""

    def __init__(self, directory: Path, n_layer: int, d: int, n_ff: int, capacity: int):
        directory.mkdir(parents=True, exist_ok=True)
        self.x = [np.lib.format.open_memmap(directory / f"x_{i}.npy", "w+", np.float16, (capacity, d))
                  for i in range(n_layer)]
        self.active = [np.lib.format.open_memmap(directory / f"active_{i}.npy", "w+", np.uint8,
                                                 (capacity, (n_ff + 7) // 8)) for i in range(n_layer)]
        self.n = [0] * n_layer
        self.capacity = capacity

    def add(self, layer: int, x: torch.Tensor, fired: torch.Tensor) -> None:
        k = min(self.capacity - self.n[layer], x.shape[0])
        if k <= 0:
            return
        i = self.n[layer]
        self.x[layer][i:i + k] = x[:k].to(torch.float16).numpy()
        self.active[layer][i:i + k] = np.packbits(fired[:k].numpy(), axis=1)
        self.n[layer] += k

    def close(self) -> None:
        for a in self.x + self.active:
            a.flush()


@dataclass
class Profile:
    directory: Path
    meta: dict
    counts: np.ndarray  # int64 [n_layer, n_ff]

    @property
    def n_tokens(self) -> int:
        return int(self.meta["n_tokens"])

    def frequency(self) -> np.ndarray:
        return self.counts / max(1, self.n_tokens)

    def samples(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(x float16 [n, d], fired bool [n, n_ff]) of one layer."""
        n = int(self.meta["n_samples"])
        x = np.load(self.directory / "samples" / f"x_{layer}.npy", mmap_mode="r")[:n]
        bits = np.load(self.directory / "samples" / f"active_{layer}.npy", mmap_mode="r")[:n]
        return x, np.unpackbits(bits, axis=1, count=self.counts.shape[1]).astype(bool)


def default_profile_dir(fingerprint: str, cache_dir=None) -> Path:
    return Path(cache_dir or DEFAULT_CACHE_DIR).expanduser() / fingerprint / "profile"


def load_profile(directory, fingerprint: str | None = None) -> Profile:
    directory = Path(directory).expanduser()
    path = directory / "profile.json"
    if not path.is_file():
        raise PowerInferError(f"{directory}: no profile here (run `powerinfer profile -m MODEL` first)")
    return Profile(directory, read_profile_meta(path, fingerprint), np.load(directory / "counts.npy"))


def read_profile_meta(path, fingerprint: str | None = None) -> dict:
    """profile.json, checked (format, version and, when given, the model fingerprint)."""
    return read_json_artifact(path, kind="profile", fmt=PROFILE_FORMAT, version=PROFILE_VERSION,
                              fingerprint=fingerprint, made="profiled model", remake="powerinfer profile")


def coverage_curve(counts: np.ndarray, points: int = 101) -> tuple[np.ndarray, np.ndarray]:
    """(fraction of neurons, fraction of firings they cover), neurons taken hottest first."""
    c = np.sort(counts)[::-1].astype(np.float64)
    cum = np.concatenate([[0.0], np.cumsum(c)]) / max(c.sum(), 1.0)
    xs = np.linspace(0, 1, points)
    return xs, cum[np.round(xs * len(c)).astype(int)]


def plot(profile_counts: np.ndarray, n_tokens: int, directory: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_layer = profile_counts.shape[0]
    fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    cmap = plt.get_cmap("viridis")
    for i in range(n_layer):
        xs, ys = coverage_curve(profile_counts[i])
        ax.plot(100 * xs, 100 * ys, color=cmap(i / max(1, n_layer - 1)), lw=1.2,
                label=f"layer {i}" if i in (0, n_layer // 2, n_layer - 1) else None)
    ax.plot([0, 100], [0, 100], "k:", lw=0.8, label="uniform")
    ax.set_xlabel("hottest neurons (% of the layer)")
    ax.set_ylabel("share of firings covered (%)")
    ax.set_title(f"{title}: activation locality ({n_tokens} tokens)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, n_layer - 1))
    fig.colorbar(sm, ax=ax, label="layer")
    p1 = directory / "power_law.png"
    fig.tight_layout()
    fig.savefig(p1)
    plt.close(fig)

    sparsity = 1 - profile_counts.sum(1) / (max(1, n_tokens) * profile_counts.shape[1])
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    ax.bar(range(n_layer), 100 * sparsity, color="tab:blue")
    ax.set_xlabel("layer")
    ax.set_ylabel("neurons silent per token (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{title}: per-layer sparsity")
    ax.grid(axis="y", alpha=0.3)
    p2 = directory / "sparsity.png"
    fig.tight_layout()
    fig.savefig(p2)
    plt.close(fig)
    return [p1, p2]


def run_profile(loaded, tokens: list[int], text_info: dict, out_dir: Path, n_tokens: int = ProfileOptions.tokens,
                n_ctx: int = ProfileOptions.n_ctx, bos_id: int | None = None, thresholds=None,
                progress: bool | None = None, log=sys.stderr) -> Profile:
    """Profile `loaded` on the first n_tokens of `tokens`; write everything into out_dir (see the module doc)."""
    from tqdm import tqdm

    from ..model.kvcache import KVCache

    cfg = loaded.config
    relu = cfg.activation == "relu"
    if not relu and thresholds is None:
        raise PowerInferError("profiling a SwiGLU/GeGLU model needs calibrated thresholds (what counts as firing)")
    t_h = [0.0] * cfg.n_layer if thresholds is None else [thresholds.for_layer(i).get("h", 0.0)
                                                          for i in range(cfg.n_layer)]
    chunks = chunks_of(tokens, n_tokens, n_ctx, bos_id)
    n_used = sum(len(c) for c in chunks)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = SampleWriter(out_dir / "samples", cfg.n_layer, cfg.d_model, cfg.n_ff, n_used)
    model = Transformer(cfg, loaded.weights, ffn=lambda lw, c, dtype, layer: RecordingFFN(
        lw, c, dtype, layer, t_h[layer], samples))
    ffns = [b.ffn for b in model.layers]
    kv = KVCache.allocate(cfg.n_layer, len(chunks[0]), cfg.n_head_kv * cfg.head_dim, dtype=torch.float32)
    show = sys.stderr.isatty() if progress is None else progress
    with torch.inference_mode():
        for chunk in tqdm(chunks, desc="profile", unit="chunk", disable=not show, file=sys.stderr):
            model(torch.tensor(chunk), 0, kv)
    samples.close()
    counts = torch.stack([f.counts for f in ffns]).numpy()
    n_tok = ffns[0].tokens
    sparsity = (1 - counts.sum(1) / (n_tok * cfg.n_ff)).tolist()
    criterion = ("relu: h != 0" if relu else
                 f"|act(gate)*up| >= per-layer threshold ({thresholds.method} S={thresholds.target_sparsity})")
    meta = {"format": PROFILE_FORMAT, "version": PROFILE_VERSION, "fingerprint": model_fingerprint(loaded),
            "criterion": criterion, "thresholds_h": t_h, "n_tokens": n_tok, "n_samples": samples.n[0],
            "n_ctx": len(chunks[0]), "n_chunks": len(chunks), "calibration": text_info,
            "sparsity_per_layer": sparsity, "model": {"file": loaded.path.name, "arch": cfg.arch}}
    np.save(out_dir / "counts.npy", counts)
    act_dir = out_dir / "activation"
    act_dir.mkdir(exist_ok=True)
    for i in range(cfg.n_layer):  # upstream's layout, unpadded names
        torch.save(torch.from_numpy(counts[i].copy()), act_dir / f"activation_{i}.pt")
    write_json_artifact(out_dir / "profile.json", meta, indent=1)
    plots = plot(counts, n_tok, out_dir, loaded.path.name)
    print(f"profile: {n_tok} tokens, criterion {criterion}; wrote {out_dir} ({', '.join(p.name for p in plots)})",
          file=log)
    return Profile(out_dir, meta, counts)


def thresholds_for(loaded, target: float, log=sys.stderr):
    """The cached hu thresholds at `target` (calibrated now if missing); None for ReLU models."""
    if loaded.config.activation == "relu":
        return None
    from ..sparse.artifacts import default_thresholds_path, load_thresholds
    from .calibrate import calibrate_default

    fp = model_fingerprint(loaded)
    path = default_thresholds_path(fp, "hu", target)
    return load_thresholds(path, fp) if path.is_file() else calibrate_default(loaded, "hu", target, log=log)


def profile_model(loaded, opts: ProfileOptions, log=sys.stderr) -> Profile:
    """`powerinfer profile`: the calibration text as calibrate reads it, firing defined by the hu thresholds at
    opts.target_sparsity (SwiGLU models), written to opts.output or the model's cached profile directory."""
    from ..formats.loader import load_tokenizer

    text = token_text(load_tokenizer(loaded), opts.text)
    th = thresholds_for(loaded, opts.target_sparsity, log)
    return run_profile(loaded, text.tokens, text.info, profile_dir(loaded, opts), opts.tokens, opts.n_ctx,
                       text.bos_id, th, log=log)


def profile_dir(loaded, opts: ProfileOptions) -> Path:
    """opts.output, else the model's cached profile directory."""
    return Path(opts.output).expanduser() if opts.output else default_profile_dir(model_fingerprint(loaded))
