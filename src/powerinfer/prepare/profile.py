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
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.files import artifact_dir, atomic_path, atomic_write, ensure_dir
from ..errors import PowerInferError, one_line
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
        self.register_buffer("up_bias", dense(lw.up_bias, dtype))  # falcon/opt MLP biases, None elsewhere
        self.register_buffer("down_bias", dense(lw.down_bias, dtype))
        self.counts = torch.zeros(lw.up_proj.rows, dtype=torch.int64)
        self.tokens = 0
        self.samples = samples  # SampleWriter or None

    def forward(self, x, residual=None):
        h = ffn_hidden(self.kind, self.act, x, self.gate_proj, self.up_proj, self.up_bias)
        fired = (h != 0) & (h.abs() >= self.t_h)
        flat = fired.reshape(-1, fired.shape[-1])
        self.counts += flat.sum(0)
        self.tokens += flat.shape[0]
        if self.samples is not None:
            self.samples.add(self.layer, residual.reshape(-1, residual.shape[-1]), flat)
        return F.linear(h, self.down_proj, self.down_bias)


class SampleWriter:
    """Per layer, up to `capacity` (residual, mask) rows in memory-mapped .npy files, written under fresh temporary
    names and renamed into place by close() (core/files.py: never through a link planted at x_N.npy)."""

    def __init__(self, directory: Path, n_layer: int, d: int, n_ff: int, capacity: int):
        self._stack = ExitStack()
        directory = artifact_dir(directory)
        self.x, self.active = [], []
        try:
            for i in range(n_layer):
                for name, dtype, cols, out in ((f"x_{i}.npy", np.float16, d, self.x),
                                               (f"active_{i}.npy", np.uint8, (n_ff + 7) // 8, self.active)):
                    tmp = self._stack.enter_context(atomic_path(directory / name))
                    out.append(np.lib.format.open_memmap(tmp, "w+", dtype, (capacity, cols)))
        except BaseException:
            self._stack.__exit__(*sys.exc_info())
            raise
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

    def close(self, error: BaseException | None = None) -> None:
        """Flush and rename the files into place; with `error`, remove them instead."""
        for a in self.x + self.active:
            a.flush()
        self.x, self.active = [], []
        if error is None:
            self._stack.close()
        else:
            self._stack.__exit__(type(error), error, error.__traceback__)


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
        """(x float16 [n, d], fired bool [n, n_ff]) of one layer; PowerInferError for a file that is not what
        profile wrote (truncated, another dtype or shape, a pickle)."""
        n, n_ff = int(self.meta["n_samples"]), self.counts.shape[1]
        x = _load_npy(self.directory / "samples" / f"x_{layer}.npy", np.float16, mmap=True)
        bits = _load_npy(self.directory / "samples" / f"active_{layer}.npy", np.uint8, mmap=True)
        if x.ndim != 2 or bits.ndim != 2 or len(x) < n or len(bits) < n or bits.shape[1] != (n_ff + 7) // 8:
            raise PowerInferError(f"{self.directory / 'samples'}: layer {layer} samples have shapes {list(x.shape)} "
                                  f"and {list(bits.shape)}, expected [>= {n}, d_model] and [>= {n}, "
                                  f"{(n_ff + 7) // 8}]")
        return x[:n], np.unpackbits(bits[:n], axis=1, count=n_ff).astype(bool)

    def check(self, config) -> "Profile":
        """Refuse a profile made for another shape of model (its counts are indexed by layer and neuron)."""
        if self.counts.shape != (config.n_layer, config.n_ff):
            raise PowerInferError(f"{self.directory}: counts of shape {list(self.counts.shape)}, the model has "
                                  f"[{config.n_layer}, {config.n_ff}] (layers, neurons)")
        return self


def _load_npy(path: Path, dtype, mmap: bool = False) -> np.ndarray:
    """An .npy file of `dtype` (no pickles, ever), memory-mapped when `mmap`; PowerInferError if it is anything else."""
    if not path.is_file():
        raise PowerInferError(f"{path}: missing (run `powerinfer profile -m MODEL` again)")
    try:
        a = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # truncated, object arrays, not .npy at all
        raise PowerInferError(f"{path}: not a profile array ({one_line(e, 120)})") from None
    if not isinstance(a, np.ndarray) or a.dtype != np.dtype(dtype):
        raise PowerInferError(f"{path}: holds {getattr(a, 'dtype', type(a).__name__)}, expected {np.dtype(dtype)}")
    return a


def default_profile_dir(fingerprint: str, cache_dir=None) -> Path:
    return Path(cache_dir or DEFAULT_CACHE_DIR).expanduser() / fingerprint / "profile"


def load_profile(directory, fingerprint: str | None = None) -> Profile:
    directory = Path(directory).expanduser()
    path = directory / "profile.json"
    if not path.is_file():
        raise PowerInferError(f"{directory}: no profile here (run `powerinfer profile -m MODEL` first)")
    meta = read_profile_meta(path, fingerprint)
    missing = [k for k in ("n_tokens", "n_samples", "calibration") if k not in meta]
    if missing:
        raise PowerInferError(f"{path}: malformed profile (no {', '.join(missing)})")
    counts = _load_npy(directory / "counts.npy", np.int64)
    if counts.ndim != 2 or (counts < 0).any():
        raise PowerInferError(f"{directory / 'counts.npy'}: expected counts >= 0 of shape [n_layer, n_ff], got "
                              f"{list(counts.shape)}")
    return Profile(directory, meta, counts)


def read_profile_meta(path, fingerprint: str | None = None) -> dict:
    """profile.json, checked (format, version, the fields readers use and, when given, the model fingerprint)."""
    meta = read_json_artifact(path, kind="profile", fmt=PROFILE_FORMAT, version=PROFILE_VERSION,
                              fingerprint=fingerprint, made="profiled model", remake="powerinfer profile")
    ints = [meta[k] for k in ("n_tokens", "n_samples") if k in meta]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints) \
            or not isinstance(meta.get("calibration", {}), dict):
        raise PowerInferError(f"{path}: malformed profile (n_tokens and n_samples must be integers >= 0, "
                              "calibration an object)")
    return meta


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
    with atomic_write(p1) as fh:
        fig.savefig(fh, format="png")
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
    with atomic_write(p2) as fh:
        fig.savefig(fh, format="png")
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
    ensure_dir(out_dir)
    samples = SampleWriter(out_dir / "samples", cfg.n_layer, cfg.d_model, cfg.n_ff, n_used)
    model = Transformer(cfg, loaded.weights, ffn=lambda lw, c, dtype, layer: RecordingFFN(
        lw, c, dtype, layer, t_h[layer], samples))
    ffns = [b.ffn for b in model.layers]
    kv = KVCache.allocate(cfg.n_layer, len(chunks[0]), cfg.n_head_kv * cfg.head_dim, dtype=torch.float32)
    show = sys.stderr.isatty() if progress is None else progress
    try:
        with torch.inference_mode():
            for chunk in tqdm(chunks, desc="profile", unit="chunk", disable=not show, file=sys.stderr):
                model(torch.tensor(chunk), 0, kv)
    except BaseException as e:
        samples.close(error=e)
        raise
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
    with atomic_write(out_dir / "counts.npy") as fh:
        np.save(fh, counts)
    act_dir = artifact_dir(out_dir / "activation")
    for i in range(cfg.n_layer):  # upstream's layout, unpadded names
        with atomic_write(act_dir / f"activation_{i}.pt") as fh:
            torch.save(torch.from_numpy(counts[i].copy()), fh)
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
