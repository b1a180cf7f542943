"""Token sampling: a sampler closure built once per request, plus logits processors (penalties).

The order follows llama.cpp's default sampler chain: penalties -> top-k -> top-p -> min-p -> temperature
-> draw. temp <= 0 is greedy (argmax), which ignores every truncation (as llama.cpp's greedy sampler does).
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch

Sampler = Callable[[torch.Tensor], int]
LogitsProcessor = Callable[[torch.Tensor, Sequence[int]], torch.Tensor]


def _argmax(logits: torch.Tensor) -> int:
    # numpy's SIMD argmax: 5 us over a 49k vocabulary where torch.argmax takes 48 us (one thread), about 1.5% of a
    # 3 ms decode step; logits on a GPU, in a dtype numpy lacks or part of a graph stay with torch
    if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float16, torch.float64) \
            and not logits.requires_grad:
        return int(logits.numpy().argmax())
    return int(torch.argmax(logits))


def make_sampler(temp: float = 0.8, top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
                 seed: int = -1) -> Sampler:
    if temp <= 0:
        return _argmax
    gen = torch.Generator().manual_seed(seed if seed >= 0 else random.SystemRandom().randrange(2**63))

    def sample(logits: torch.Tensor) -> int:
        logits = logits.float()
        # top-k first: it shrinks 50k-150k logits to a few dozen, so everything after is cheap.
        k = top_k if 0 < top_k < logits.numel() else logits.numel()
        vals, idx = torch.topk(logits, k)  # sorted, descending
        probs = torch.softmax(vals, dim=-1)
        keep = vals.numel()
        if top_p < 1.0:
            cum = torch.cumsum(probs, dim=-1)
            # smallest prefix whose mass reaches top_p (always at least one token)
            keep = min(keep, int(torch.searchsorted(cum, torch.tensor([top_p])).item()) + 1)
        if min_p > 0.0:
            keep = min(keep, max(1, int((probs >= min_p * probs[0]).sum().item())))
        vals, idx = vals[:keep], idx[:keep]
        p = torch.softmax(vals / temp, dim=-1)
        return int(idx[torch.multinomial(p, 1, generator=gen)].item())

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

    def penalize(logits: torch.Tensor, history: Sequence[int]) -> torch.Tensor:
        recent = history[-window:]
        if not recent:
            return logits
        ids, counts = torch.unique(torch.tensor(recent, dtype=torch.long), return_counts=True)
        sel = logits[ids]
        if repeat_penalty != 1.0:
            # CTRL-style (Keskar et al. 2019): divide positive logits, multiply negative ones.
            sel = torch.where(sel > 0, sel / repeat_penalty, sel * repeat_penalty)
        sel = sel - counts.to(sel.dtype) * frequency_penalty - presence_penalty
        logits = logits.clone()
        logits[ids] = sel
        return logits

    return [penalize]
