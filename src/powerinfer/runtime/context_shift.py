"""Context shift: a generation that goes on when the KV cache is full, as llama-cli's does.

llama-cli (examples/main/main.cpp) keeps the first `n_keep` tokens, discards half of the rest (the older half),
and continues; it shifts the cached keys' RoPE positions in place. Here the kept tail is evaluated again instead
(the runner's prefix reuse keeps the first `n_keep` positions): exact, and the same for every runner, at the cost
of one prefill of half the context per shift (~2k tokens, 4 s for SmolLM2-135M on 2 cores at -c 4096; one shift
per ~2k generated tokens).

`stream_shifting` wraps any `stream(ids, n_predict) -> Iterator[Response]` (`LLM.stream` with its settings
bound), so the CLI's chat and a server can use it alike.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

from ..errors import PowerInferError
from .engine import Response


def fit(ids: list[int], n_keep: int, n_ctx: int) -> list[int]:
    """`ids` shortened the way llama-cli shifts a full context, until one more token fits after it: keep
    `n_keep`, drop the older half of the rest, repeat."""
    if n_keep + 2 >= n_ctx:
        raise PowerInferError(f"--keep {n_keep} leaves no room in a context of {n_ctx} tokens; lower --keep or "
                              f"raise -c")
    while len(ids) + 1 >= n_ctx:  # the engine stops a generation at n_past + 1 >= n_ctx ("context")
        n_discard = max(1, (len(ids) - n_keep) // 2)
        ids = ids[:n_keep] + ids[n_keep + n_discard:]
    return ids


def stream_shifting(stream: Callable[[list[int], int], Iterator[Response]], ids: list[int], n_ctx: int,
                    n_keep: int, n_predict: int = -1,
                    on_shift: Callable[[int], None] | None = None) -> Iterator[Response]:
    """Responses of one generation from the tokens `ids` that shifts the context instead of stopping at
    finish_reason "context". `ids` is updated in place: shifted, and extended by every token generated, so after
    the generation it is what the KV cache holds (plus the last token). `on_shift(n_dropped)` is told of each
    shift. The finish chunk of a segment that ended in a shift is passed on without its finish_reason."""
    done = 0
    while True:
        shifted = fit(ids, n_keep, n_ctx)
        if len(shifted) != len(ids):
            dropped = len(ids) - len(shifted)
            ids[:] = shifted
            if on_shift is not None:
                on_shift(dropped)
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
