"""Request lifecycle as a stack of generators (STYLE 4, after mlx-lm):

    generate_step   prompt ids -> (token, logits) forever, sampling with a closure built once
    stream_generate text in -> Response chunks out: detokenization safe at UTF-8 boundaries, stop strings,
                    end-of-generation, length limits, timing, optional logprobs and per-layer FFN counts
    generate        the whole completion as one string; `collect` makes a `Completion` of the chunks

Cancellation: `cancel()` (a callable) is checked before every prompt chunk of `runner.n_batch` tokens and before
every decode step, so a request that is abandoned mid-prompt stops within one chunk (llama.cpp #11720 and
ik_llama.cpp #1020: servers that kept computing for clients that had gone). Closing the generator stops it too.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import ContextOverflowError, PowerInferError
from ..formats.tokenizer import StreamDecoder, Tokenizer
from ..settings import SamplingParams
from .constrain import Constraint, make_constraint
from .runner import Runner
from .sampling import make_logits_processors, make_sampler


@dataclass
class Response:
    text: str  # the new text of this chunk (may be empty while a stop string or UTF-8 sequence is pending)
    token: int | None  # the token just generated (None on the final chunk)
    # "stop" (end-of-generation / stop string) | "length" | "context" | "cancelled" (cancel() said so)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    generation_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens reused from the KV cache of the previous request
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0
    # Neuron-sparse FFN (None when dense, and for the first token, which comes out of the dense prefill): the
    # fraction of FFN neurons the step that produced this token skipped, and the FFN weight bytes it read.
    ffn_sparsity: float | None = None
    ffn_bytes: int | None = None
    # With layer_stats=True: FFN neurons each layer computed in that step (a list of n_layer ints), and with a
    # placement active, how many of them the fast tier and the CPU tier computed (hot, cold).
    ffn_neurons: list[int] | None = None
    ffn_tiers: tuple[list[int], list[int]] | None = None
    # With logprobs=N: log-probability of `token` under the model's distribution (softmax of the raw logits, as
    # llama.cpp's n_probs: before penalties, temperature and truncation), and the N most likely tokens (id, logprob).
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None

    @property
    def prompt_tps(self) -> float:
        n = self.prompt_tokens - self.cached_tokens
        return n / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        # the first generated token comes out of the prefill; the rate counts decode steps only
        n = self.generation_tokens - 1
        return n / self.generation_seconds if self.generation_seconds > 0 and n > 0 else 0.0


def prefill(runner: Runner, ids: list[int], cancel: Callable[[], bool] | None = None) -> np.ndarray | None:
    """Evaluate `ids` in chunks of `runner.n_batch`, checking `cancel()` before each; the logits of the last token,
    or None when cancelled (the cache then holds the chunks evaluated so far)."""
    n = getattr(runner, "n_batch", 0) or len(ids)
    chunks = [ids[i:i + n] for i in range(0, len(ids), n)]
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        # One trailing token would be a decode step here but part of a prefill call in one eval(ids); merged, the
        # runner splits it exactly as before, so chunking leaves the numbers unchanged.
        chunks[-2:] = [chunks[-2] + chunks[-1]]
    logits = None
    for chunk in chunks:
        if cancel is not None and cancel():
            return None
        logits = runner.eval(chunk)
    return logits


def sample_steps(runner: Runner, prompt_ids: list[int], params: SamplingParams,
                 cancel: Callable[[], bool] | None = None,
                 constraint: Constraint | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (token, the raw logits it was sampled from) until the caller stops or `cancel()` is true; reuses the
    cached prefix of the previous request. The logits are a buffer the next step overwrites: read them before
    resuming. `constraint` (structured output, runtime/constrain.py) masks what its grammar does not allow."""
    sampler = make_sampler(params.temp, params.top_k, params.top_p, params.min_p, params.seed)
    processors = make_logits_processors(params.repeat_penalty, params.presence_penalty,
                                        params.frequency_penalty, params.repeat_last_n, runner.n_ctx)
    n_cached = runner.reuse_prefix(prompt_ids)
    logits = prefill(runner, prompt_ids[n_cached:], cancel)
    history = list(prompt_ids)
    while logits is not None:
        raw = logits
        for proc in processors:
            logits = proc(logits, history)
        tok = sampler(logits)
        if constraint is not None:
            if not constraint.allows(tok):  # masked only when needed (runtime/constrain.py says why)
                tok = sampler(constraint.mask(logits))
            constraint.accept(tok)
        history.append(tok)
        yield tok, raw
        if cancel is not None and cancel():
            return
        logits = runner.eval([tok])


def generate_step(runner: Runner, prompt_ids: list[int], params: SamplingParams,
                  cancel: Callable[[], bool] | None = None) -> Iterator[int]:
    """Yield sampled tokens forever (the caller stops); reuses the cached prefix of the previous request."""
    steps = sample_steps(runner, prompt_ids, params, cancel)
    try:
        for tok, _ in steps:
            yield tok
    finally:
        steps.close()


def _layer_neurons(runner: Runner) -> list[int] | None:
    """FFN neurons each layer computed in the last decode step. The runner protocol reports totals only
    (`last_ffn`); the C runner's per-layer counts are its SparseFFN's `kept()`, read here until the protocol names
    them (`last_ffn_layers`)."""
    public = getattr(runner, "last_ffn_layers", None)
    if public is not None:
        return public()
    kept = getattr(getattr(runner, "_sparse", None), "kept", None)
    return kept().neurons.tolist() if kept is not None else None


class _StopMatcher:
    """Holds back text that could be the start of a stop string, so a stop string is never emitted."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        self.pending += text
        # the earliest match wins when several stop strings occur in the pending text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out, False


def stream_generate(runner: Runner, tokenizer: Tokenizer, prompt: str | list[int],
                    params: SamplingParams, add_bos: bool | None = None, *, logprobs: int | None = None,
                    layer_stats: bool = False, cancel: Callable[[], bool] | None = None) -> Iterator[Response]:
    """Response chunks of one generation; the last has `finish_reason` set and the text still held back.

    logprobs: None, or N >= 0 to fill each chunk's `logprob` and its N most likely tokens (`top_logprobs`);
    layer_stats: fill `ffn_neurons` on sparse decode steps; cancel: checked between prompt chunks and tokens."""
    prompt_ids = tokenizer.encode(prompt, add_bos=add_bos) if isinstance(prompt, str) else list(prompt)
    if not prompt_ids:
        raise PowerInferError("the prompt is empty (and the model adds no BOS token); give some text")
    if len(prompt_ids) >= runner.n_ctx:
        raise ContextOverflowError(f"the prompt has {len(prompt_ids)} tokens but the context holds "
                                   f"{runner.n_ctx}; raise -c/--ctx-size or shorten the prompt")
    limit = params.n_predict if params.n_predict >= 0 else runner.n_ctx
    stream = StreamDecoder(tokenizer)
    stops = _StopMatcher(params.stop)
    eog = set() if params.ignore_eos else set(tokenizer.eog_ids)
    resp = Response(text="", token=None, prompt_tokens=len(prompt_ids))
    if limit == 0:
        resp.finish_reason = "length"
        yield resp
        return
    t0 = time.perf_counter()
    runner.reset_ffn_stats()
    resp.cached_tokens = runner.reuse_prefix(prompt_ids)
    steps = sample_steps(runner, prompt_ids, params, cancel, make_constraint(tokenizer, runner.config.n_vocab, params))
    t_first = None
    finish, stop_hit = None, False
    for tok, logits in steps:
        now = time.perf_counter()
        if t_first is None:
            t_first = now
            resp.prompt_seconds = now - t0
        resp.generation_tokens += 1
        resp.generation_seconds = now - t_first
        if tok in eog:
            finish = "stop"
            break
        text, stop_hit = stops.push(stream.push(tok))
        ffn = runner.last_ffn() if resp.generation_tokens > 1 else None
        extra = {}
        if logprobs is not None:  # before the next step overwrites the logits
            lp = _log_softmax(logits)
            extra["logprob"] = float(lp[tok])
            if logprobs > 0:
                k = min(logprobs, lp.shape[0])
                top = np.argpartition(lp, lp.shape[0] - k)[lp.shape[0] - k:]
                top = top[np.argsort(-lp[top], kind="stable")]
                extra["top_logprobs"] = list(zip(top.tolist(), lp[top].tolist()))
        if ffn and layer_stats:
            extra["ffn_neurons"] = _layer_neurons(runner)
            tiers = getattr(runner, "last_ffn_tiers", None)  # runners with a placement
            if tiers is not None:
                extra["ffn_tiers"] = tiers()
        yield Response(**{**resp.__dict__, "text": text, "token": tok,
                          "ffn_sparsity": ffn[0] if ffn else None, "ffn_bytes": ffn[1] if ffn else None, **extra})
        if stop_hit:
            finish = "stop"
            break
        if resp.generation_tokens >= limit:
            finish = "length"
            break
        if runner.n_past + 1 >= runner.n_ctx:
            finish = "context"
            break
    steps.close()
    if finish is None:  # the steps ended on their own: cancel() said so
        finish = "cancelled"
    tail = ""
    if not stop_hit:
        tail, stop_hit = stops.push(stream.flush())
        if not stop_hit:
            tail += stops.pending
    resp.text, resp.token, resp.finish_reason = tail, None, finish
    yield resp


@dataclass
class Completion:
    """A whole generation (`collect`, `LLM.generate(..., details=True)`): the text and what produced it."""

    text: str
    tokens: list[int]  # the generated ids whose text is `text` (an end-of-generation token is not included)
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int  # tokens sampled, an end-of-generation token included
    cached_tokens: int
    prompt_seconds: float
    generation_seconds: float
    logprobs: list[float] | None = None  # per token of `tokens`, when asked for
    top_logprobs: list[list[tuple[int, float]]] | None = None
    ffn_sparsity: float | None = None  # mean fraction of FFN neurons skipped per sparse decode step

    def __str__(self) -> str:
        return self.text

    @property
    def prompt_tps(self) -> float:
        n = self.prompt_tokens - self.cached_tokens
        return n / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        n = self.completion_tokens - 1
        return n / self.generation_seconds if self.generation_seconds > 0 and n > 0 else 0.0


def collect(responses: Iterator[Response]) -> Completion:
    chunks = list(responses)
    last = chunks[-1]
    steps = [r for r in chunks if r.token is not None]
    sparse = [r.ffn_sparsity for r in steps if r.ffn_sparsity is not None]
    with_lp = bool(steps) and steps[0].logprob is not None
    return Completion(
        text="".join(r.text for r in chunks), tokens=[r.token for r in steps], finish_reason=last.finish_reason,
        prompt_tokens=last.prompt_tokens, completion_tokens=last.generation_tokens, cached_tokens=last.cached_tokens,
        prompt_seconds=last.prompt_seconds, generation_seconds=last.generation_seconds,
        logprobs=[r.logprob for r in steps] if with_lp else None,
        top_logprobs=[r.top_logprobs or [] for r in steps] if with_lp else None,
        ffn_sparsity=sum(sparse) / len(sparse) if sparse else None)


def generate(runner: Runner, tokenizer: Tokenizer, prompt: str | list[int], params: SamplingParams) -> str:
    return "".join(r.text for r in stream_generate(runner, tokenizer, prompt, params))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float32)
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum(dtype=np.float64)).astype(np.float32))


def score(runner: Runner, ids: list[int]) -> np.ndarray:
    """Logits at every position of `ids`, evaluated from an empty cache ([len(ids), n_vocab])."""
    runner.truncate(0)
    return runner.eval(ids, all_logits=True)
