"""`SparsityStats`: the per-layer counters every torch sparse backend keeps (kept neurons / input channels per
token, and the weight bytes a sparse kernel would touch), and helpers to read them off a model."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class SparsityStats:
    """Running per-layer counters of one sparse FFN.

    Sites: "h" = FFN neurons whose down row is read (n_ff per token), "up" = neurons whose up row is read
    (differs from "h" only for dReLU), "x" = FFN input channels whose gate/up columns are read (d_model).
    `bytes` is the weight bytes a sparse kernel reads for the tokens seen, computed per token from the
    tensors' stored (usually quantized) layout; `dense_bytes` is what a dense FFN reads per token.
    """

    sizes: dict[str, int]
    dense_bytes: int
    tokens: int = 0
    kept: dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    last_kept: dict[str, torch.Tensor] = field(default_factory=dict)  # per-token counts of the last call [T]
    last_bytes: torch.Tensor | None = None  # per-token bytes of the last call [T]

    def record(self, kept: dict[str, torch.Tensor], nbytes: torch.Tensor) -> None:
        self.tokens += int(nbytes.shape[0])
        for site, counts in kept.items():
            self.kept[site] = self.kept.get(site, 0) + int(counts.sum())
        self.bytes += int(nbytes.sum())
        self.last_kept, self.last_bytes = kept, nbytes

    def reset(self) -> None:
        self.tokens, self.bytes, self.kept, self.last_kept, self.last_bytes = 0, 0, {}, {}, None

    def sparsity(self, site: str = "h") -> float:
        """Fraction of `site`'s entries skipped, over all tokens seen (0 when nothing was seen)."""
        if not self.tokens:
            return 0.0
        return 1.0 - self.kept.get(site, self.tokens * self.sizes[site]) / (self.tokens * self.sizes[site])

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens if self.tokens else float(self.dense_bytes)

    @property
    def bytes_fraction(self) -> float:
        """Weight bytes touched per token as a fraction of the dense FFN's."""
        return self.bytes_per_token / self.dense_bytes


def ffn_stats(model: nn.Module) -> list[SparsityStats]:
    """The SparsityStats of every sparse FFN in `model`, in layer order (empty for a dense model)."""
    return [m.stats for m in model.modules() if isinstance(getattr(m, "stats", None), SparsityStats)]


def reset_ffn_stats(model: nn.Module) -> None:
    for s in ffn_stats(model):
        s.reset()


def summarize_stats(stats: list[SparsityStats]) -> dict:
    """Model-level summary: per-site mean/min/max sparsity over layers, FFN weight bytes per token (touched
    and dense, summed over layers) and their ratio."""
    out: dict = {"layers": len(stats)}
    if not stats:
        return out
    for site in stats[0].sizes:
        values = [s.sparsity(site) for s in stats]
        out[f"sparsity_{site}"] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values),
                                   "per_layer": values}
    touched = sum(s.bytes_per_token for s in stats)
    dense_total = sum(s.dense_bytes for s in stats)
    out.update(bytes_per_token=touched, dense_bytes_per_token=dense_total, bytes_fraction=touched / dense_total,
               tokens=stats[0].tokens)
    return out
