"""`powerinfer perplexity`: perplexity scored exactly like llama.cpp's `llama-perplexity` (tools/perplexity,
default mode, `perplexity()`), so numbers are comparable with the ones llama.cpp users quote.

Convention:
  * the whole text is tokenized once, special-token text left as text (llama.cpp's `common_tokenize(ctx, text,
    add_special=true, parse_special=false)`), with a BOS first when the model adds one;
  * n_chunk = min(--chunks, n_tokens // n_ctx); chunk i is tokens[i*n_ctx : (i+1)*n_ctx], evaluated from an
    empty KV cache; when the model adds BOS, the chunk's first token is replaced by BOS for the evaluation
    (the original id stays the target, though position 0 is never scored);
  * only the second half is scored: with first = n_ctx // 2, the tokens at positions first .. n_ctx-1 are
    predicted from the logits at first-1 .. n_ctx-2, i.e. n_ctx - first predictions per chunk (256 for -c 512).
    Checked against llama.cpp: its own logits (llama-cpp-python 0.3.36, SmolLM2 Q4_1, eval split, -c 512,
    8 chunks) scored this way give 13.9437, and `llama-perplexity` reports 13.9418 on the same text
    (reference/baselines.md 3.3); scoring one position fewer per chunk (255) gives 13.9219, 0.14% off;
  * PPL = exp(mean NLL) over all scored tokens; the running value after each chunk is printed as
    `[1]17.1700,[2]14.4300,...`; the final line is `PPL = x +/- err` with err = PPL * sqrt((E[nll^2] - E[nll]^2)
    / (count - 1)), llama.cpp's first-order error of the mean.
Differences from llama.cpp: it refuses texts shorter than 2 * n_ctx tokens, this tool needs one chunk
(n_ctx tokens); llama.cpp packs several chunks into one batch when -b > -c, here chunks run one after another
(the scores do not depend on it).

Positions 0..first-1 only fill the cache (one prefill, no logits); the scored positions are evaluated with
all logits kept. `--logits-out FILE.npy` saves those rows (float32 [n_scored, n_vocab]) and the target ids
(FILE.tokens.npy) for `powerinfer compare-logits` (measure/logits.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..errors import PowerInferError
from .logits import LogitsWriter, ppl_with_error, target_nll

def n_chunks_for(n_tokens: int, n_ctx: int, max_chunks: int = -1) -> int:
    """llama.cpp's n_chunk: whole chunks of n_ctx tokens in the text, capped by --chunks when >= 0."""
    n = n_tokens // n_ctx
    return n if max_chunks < 0 else min(max_chunks, n)


def scored_per_chunk(n_ctx: int) -> int:
    """Predictions scored per chunk: the tokens at positions n_ctx//2 .. n_ctx-1."""
    return n_ctx - n_ctx // 2


@dataclass
class PerplexityResult:
    ppl: float
    ppl_err: float
    nll_mean: float
    n_tokens_scored: int
    n_chunks: int
    n_ctx: int
    n_tokens: int  # tokens in the whole text (some may be left over after the last whole chunk)
    seconds: float
    running: list[float] = field(default_factory=list)  # PPL after each chunk, as llama.cpp prints it


def perplexity(runner, tokens: list[int], n_ctx: int, *, bos_id: int | None = None, max_chunks: int = -1,
               logits_out: str | None = None,
               on_chunk: Callable[[int, int, float], None] | None = None) -> PerplexityResult:
    """Score `tokens` llama-perplexity style on `runner` (runtime.runner.Runner or anything with its
    truncate/eval API). `bos_id` (None: no replacement) is put at each chunk's position 0 for evaluation.
    `on_chunk(i, n_chunk, running_ppl)` is called after every chunk (progress, running output)."""
    if n_ctx < 3:
        raise PowerInferError(f"--ctx-size must be >= 3 to score anything (the second half is scored), got {n_ctx}")
    if n_ctx > runner.n_ctx:
        raise PowerInferError(f"-c {n_ctx} is larger than the runner's context of {runner.n_ctx}")
    n_chunk = n_chunks_for(len(tokens), n_ctx, max_chunks)
    if n_chunk <= 0:
        raise PowerInferError(f"the text has {len(tokens)} tokens; one chunk needs {n_ctx} "
                              f"(use a longer text or a smaller -c)")
    first = n_ctx // 2
    per_chunk = scored_per_chunk(n_ctx)
    writer = LogitsWriter(logits_out, n_chunk * per_chunk, runner.config.n_vocab) if logits_out else None
    nll = np.empty(n_chunk * per_chunk, dtype=np.float64)
    running = []
    t0 = time.perf_counter()
    try:
        for i in range(n_chunk):
            chunk = list(tokens[i * n_ctx:(i + 1) * n_ctx])
            targets = torch.tensor(chunk[first:], dtype=torch.long)
            if bos_id is not None:
                chunk[0] = bos_id
            runner.truncate(0)  # every chunk starts from an empty context, like llama_memory_clear
            if first > 1:
                runner.eval(chunk[:first - 1])  # positions 0..first-2 only fill the cache; no logits needed
            logits = runner.eval(chunk[first - 1:n_ctx - 1], all_logits=True)  # row k predicts chunk[first + k]
            nll[i * per_chunk:(i + 1) * per_chunk] = target_nll(logits, targets).numpy()
            if writer is not None:
                writer.add(logits, targets.numpy())
            running.append(float(np.exp(nll[:(i + 1) * per_chunk].mean())))
            if on_chunk is not None:
                on_chunk(i, n_chunk, running[-1])
    finally:
        if writer is not None:
            writer.close()
    seconds = time.perf_counter() - t0
    ppl, err = ppl_with_error(nll)
    return PerplexityResult(ppl, err, float(nll.mean()), nll.size, n_chunk, n_ctx, len(tokens), seconds, running)
