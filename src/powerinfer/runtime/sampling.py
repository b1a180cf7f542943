"""Token sampling: a sampler closure built once per request, plus logits processors (penalties).

The order follows llama.cpp's default sampler chain: penalties -> top-k -> top-p -> min-p -> temperature
-> draw. temp <= 0 is greedy (argmax), which ignores every truncation (as llama.cpp's greedy sampler does).
Logits are numpy float32 [n_vocab] (what every runner's `eval` returns): numpy's single-threaded SIMD argmax takes
5 us over a 49k vocabulary where torch.argmax took 48 us, and a C-decoder process never imports torch (#17).
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import numpy as np

Sampler = Callable[[np.ndarray], int]
LogitsProcessor = Callable[[np.ndarray, Sequence[int]], np.ndarray]


def _argmax(logits: np.ndarray) -> int:
    return int(np.argmax(logits))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max())
    return e / e.sum()


def make_sampler(temp: float = 0.8, top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
                 seed: int = -1) -> Sampler:
    if temp <= 0:
        return _argmax
    rng = np.random.default_rng(seed if seed >= 0 else random.SystemRandom().randrange(2**63))

    def sample(logits: np.ndarray) -> int:
        logits = np.asarray(logits, dtype=np.float32)
        n, top = logits.shape[0], logits.max()
        # top-k first: it shrinks 50k-150k logits to a few dozen, so everything after is cheap.
        k = top_k if 0 < top_k < n else n
        if k < n:
            idx = np.argpartition(logits, n - k)[n - k:]
            kept = logits[idx]
        else:
            kept = logits
            # Without top-k, min-p keeps a prefix of the sorted order (p >= min_p * p_max), so only a superset of
            # it is sorted, and top-p's sums over that prefix are the same numbers (a full sort of 49k logits
            # took 4 ms a token).
            idx = np.flatnonzero(logits >= top + np.log(min_p) - 1e-3) if min_p > 0.0 else np.arange(n)
        idx = idx[np.argsort(-logits[idx], kind="stable")]  # descending
        vals = logits[idx]
        probs = np.exp(vals.astype(np.float64) - top) / np.exp(kept.astype(np.float64) - top).sum()
        keep = len(vals)
        if top_p < 1.0:
            # smallest prefix whose mass reaches top_p (always at least one token)
            keep = min(keep, int(np.searchsorted(np.cumsum(probs), top_p)) + 1)
        if min_p > 0.0:
            keep = min(keep, max(1, int((probs >= min_p * probs[0]).sum())))
        cdf = np.cumsum(_softmax(vals[:keep] / temp))
        return int(idx[min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), keep - 1)])

    return sample


def make_logits_processors(repeat_penalty: float = 1.0, presence_penalty: float = 0.0,
                           frequency_penalty: float = 0.0, repeat_last_n: int = 64,
                           n_ctx: int = 0) -> list[LogitsProcessor]:
    """Penalties over the last `repeat_last_n` tokens (prompt included, as llama.cpp does)."""
    if repeat_penalty == 1.0 and presence_penalty == 0.0 and frequency_penalty == 0.0:
        return []
    window = n_ctx if repeat_last_n < 0 else repeat_last_n
    if window == 0:
        return []

    def penalize(logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        recent = history[-window:]
        if not recent:
            return logits
        ids, counts = np.unique(np.asarray(recent, dtype=np.int64), return_counts=True)
        logits = np.array(logits, dtype=np.float32)  # a copy: the runner's buffer stays the raw logits
        sel = logits[ids]
        if repeat_penalty != 1.0:
            # CTRL-style (Keskar et al. 2019): divide positive logits, multiply negative ones.
            sel = np.where(sel > 0, sel / repeat_penalty, sel * repeat_penalty)
        logits[ids] = sel - counts.astype(np.float32) * frequency_penalty - presence_penalty
        return logits

    return [penalize]
