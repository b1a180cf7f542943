"""Request lifecycle as a stack of generators (STYLE 4, after mlx-lm):

    generate_step   prompt ids -> (token, logits) forever, sampling with a closure built once
    stream_generate text in -> Response chunks out: detokenization safe at UTF-8 boundaries, stop strings,
                    end-of-generation, length limits, timing
    generate        the whole completion as one string
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..errors import ContextOverflowError, PowerInferError
from ..formats.tokenizer import StreamDecoder, Tokenizer
from ..settings import SamplingParams
from .runner import Runner
from .sampling import make_logits_processors, make_sampler


@dataclass
class Response:
    text: str  # the new text of this chunk (may be empty while a stop string or UTF-8 sequence is pending)
    token: int | None  # the token just generated (None on the final chunk)
    finish_reason: str | None = None  # "stop" (end-of-generation / stop string) | "length" | "context"
    prompt_tokens: int = 0
    generation_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens reused from the KV cache of the previous request
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0
    # Neuron-sparse FFN (None when dense, and for the first token, which comes out of the dense prefill): the
    # fraction of FFN neurons the step that produced this token skipped, and the FFN weight bytes it read.
    ffn_sparsity: float | None = None
    ffn_bytes: int | None = None

    @property
    def prompt_tps(self) -> float:
        n = self.prompt_tokens - self.cached_tokens
        return n / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        # the first generated token comes out of the prefill; the rate counts decode steps only
        n = self.generation_tokens - 1
        return n / self.generation_seconds if self.generation_seconds > 0 and n > 0 else 0.0


def generate_step(runner: Runner, prompt_ids: list[int], params: SamplingParams) -> Iterator[int]:
    """Yield sampled tokens forever (the caller stops); reuses the cached prefix of the previous request."""
    sampler = make_sampler(params.temp, params.top_k, params.top_p, params.min_p, params.seed)
    processors = make_logits_processors(params.repeat_penalty, params.presence_penalty,
                                        params.frequency_penalty, params.repeat_last_n, runner.n_ctx)
    n_cached = runner.reuse_prefix(prompt_ids)
    logits = runner.eval(prompt_ids[n_cached:])
    history = list(prompt_ids)
    while True:
        for proc in processors:
            logits = proc(logits, history)
        tok = sampler(logits)
        history.append(tok)
        yield tok
        logits = runner.eval([tok])


class _StopMatcher:
    """Holds back text that could be the start of a stop string, so a stop string is never emitted."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        self.pending += text
        for s in self.stops:
            i = self.pending.find(s)
            if i >= 0:
                out, self.pending = self.pending[:i], ""
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
                    params: SamplingParams, add_bos: bool | None = None) -> Iterator[Response]:
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
    steps = generate_step(runner, prompt_ids, params)
    t_first = None
    finish, stop_hit = None, False
    for tok in steps:
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
        yield Response(**{**resp.__dict__, "text": text, "token": tok,
                          "ffn_sparsity": ffn[0] if ffn else None, "ffn_bytes": ffn[1] if ffn else None})
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
    tail = ""
    if not stop_hit:
        tail, stop_hit = stops.push(stream.flush())
        if not stop_hit:
            tail += stops.pending
    resp.text, resp.token, resp.finish_reason = tail, None, finish
    yield resp


def generate(runner: Runner, tokenizer: Tokenizer, prompt: str | list[int], params: SamplingParams) -> str:
    return "".join(r.text for r in stream_generate(runner, tokenizer, prompt, params))


def score(runner: Runner, ids: list[int]) -> torch.Tensor:
    """Logits at every position of `ids`, evaluated from an empty cache ([len(ids), n_vocab])."""
    runner.truncate(0)
    return runner.eval(ids, all_logits=True)
