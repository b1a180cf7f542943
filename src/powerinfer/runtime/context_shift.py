"""Context shift: a generation that goes on when the KV cache is full, as llama-cli's does.

llama-cli (examples/main/main.cpp) keeps the first `n_keep` tokens, discards half of the rest (the older half),
and continues; the kept half stays in the cache with its keys rotated back to their new positions (K-shift). Here
`Runner.shift` does the same when given the runner whose cache holds the tokens: measured on SmolLM2-135M at -c 4096
on a loaded 2-core host, 0.4-1.9 s for the 2k kept tokens against 4.1-5.6 s to evaluate them again, which is what
happens otherwise (the runner's prefix reuse keeps the first `n_keep` positions and the rest is a new prefill). The two differ in the kept
half's keys and values: shifted, they were computed with the dropped tokens in view (llama.cpp's behaviour);
evaluated again, without them.

`stream_shifting` wraps any `stream(ids, n_predict) -> Iterator[Response]` (`LLM.stream` with its settings
bound), so the CLI's chat and a server can use it alike. It shifts the runner between generations, outside
`LLM`'s lock: the caller must be the runner's only user.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

from ..errors import PowerInferError
from .engine import Response
from .runner import Runner


def discards(n_tokens: int, n_keep: int, n_ctx: int) -> list[int]:
    """How many tokens each shift drops (after the first `n_keep`) until one more token fits after `n_tokens`:
    llama-cli's rule, the older half of what follows `n_keep`, repeated."""
    if n_keep + 2 >= n_ctx:
        raise PowerInferError(f"--keep {n_keep} leaves no room in a context of {n_ctx} tokens; lower --keep or "
                              f"raise -c")
    out = []
    while n_tokens + 1 >= n_ctx:  # the engine stops a generation at n_past + 1 >= n_ctx ("context")
        n_discard = max(1, (n_tokens - n_keep) // 2)
        out.append(n_discard)
        n_tokens -= n_discard
    return out


def fit(ids: list[int], n_keep: int, n_ctx: int) -> list[int]:
    """`ids` shortened the way llama-cli shifts a full context, until one more token fits after it."""
    for d in discards(len(ids), n_keep, n_ctx):
        ids = ids[:n_keep] + ids[n_keep + d:]
    return ids


def stream_shifting(stream: Callable[[list[int], int], Iterator[Response]], ids: list[int], n_ctx: int,
                    n_keep: int, n_predict: int = -1, on_shift: Callable[[int], None] | None = None,
                    runner: Runner | None = None) -> Iterator[Response]:
    """Responses of one generation from the tokens `ids` that shifts the context instead of stopping at
    finish_reason "context". `ids` is updated in place: shifted, and extended by every token generated, so after
    the generation it is what the KV cache holds (plus the last token). `on_shift(n_dropped)` is told of each
    shift; `runner`, when its cache holds a prefix of `ids`, is shifted with them (`Runner.shift`). The finish
    chunk of a segment that ended in a shift is passed on without its finish_reason."""
    done = 0
    while True:
        for d in discards(len(ids), n_keep, n_ctx):
            if runner is not None and runner.n_past >= n_keep + d and runner.tokens == ids[:runner.n_past]:
                runner.shift(n_keep, d)
            ids[:] = ids[:n_keep] + ids[n_keep + d:]
            if on_shift is not None:
                on_shift(d)
        want = -1 if n_predict < 0 else n_predict - done
        responses = stream(list(ids), want)
        last = None
        try:
            for r in responses:
                if r.token is not None:
                    ids.append(r.token)
                    done += 1
                if r.finish_reason is None:
                    yield r
                else:
                    last = r
        finally:
            responses.close()
        if last.finish_reason != "context":
            yield last
            return
        if last.text:
            yield replace(last, finish_reason=None)
