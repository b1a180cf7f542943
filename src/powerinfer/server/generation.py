"""`POST /v1/chat/completions` and `POST /v1/completions`: validate, queue on the engine thread, answer as one JSON
object or as Server-Sent Events (reference/serving.md 1.3-1.9).

A stream is: a role chunk (chat), content chunks, a chunk with `finish_reason` (and llama-server's `timings`), a
usage chunk with `"choices": []` only when `stream_options.include_usage` is true, then `data: [DONE]`. Everything
that can be refused is refused before the first byte, as a real HTTP error; a failure after that is a
`data: {"error": ...}` event. `: ping` comments keep the stream alive through a long prompt.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import replace

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..errors import PowerInferError
from .protocol import APIError, ChatRequest, CompletionRequest, finish_reason, parse
from .worker import END, QueueFull, ShuttingDown

log = logging.getLogger("powerinfer.server")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _dumps(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class _Exchange:
    """What one request produces, whatever the route: the choices' responses and their wire shapes."""

    def __init__(self, state, chat: bool, req, ids: list[int], n_logprobs: int | None):
        self.state, self.chat, self.req, self.ids, self.n_logprobs = state, chat, req, ids, n_logprobs
        self.llm = state.llm
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)
        self.text_offset = 0

    # -- the engine side (runs on the engine thread) ----------------------------------------------------------------
    def run(self, cancelled):
        """Yield (choice index, Response) for every choice, one after another."""
        llm, req = self.llm, self.req
        overrides = req.sampling()
        for i in range(req.n):
            if i and overrides.get("seed", llm.defaults.seed) >= 0:  # n choices from one seed would be n copies
                overrides["seed"] = overrides.get("seed", llm.defaults.seed) + i
            last, sparse, ffn_bytes = None, [], 0
            for r in llm.stream(self.ids, logprobs=self.n_logprobs, layer_stats=req.ffn_per_token,
                                cancel=cancelled, **overrides):
                if r.ffn_sparsity is not None:
                    sparse.append(r.ffn_sparsity)
                    ffn_bytes += r.ffn_bytes or 0
                last = r
                yield i, r
            evaluated = min(llm.runner.n_past, last.prompt_tokens) - last.cached_tokens
            self.state.metrics.record(last, max(0, evaluated), sum(sparse) / len(sparse) if sparse else None,
                                      ffn_bytes)
            self._log(last, sparse)
            if last.finish_reason == "cancelled":
                self.state.metrics.cancelled.inc()
                return

    def _log(self, last, sparse) -> None:
        ffn = f", FFN sparsity {sum(sparse) / len(sparse):.1%}" if sparse else ""
        log.info("%s: prompt %d tokens (%d cached) %.1f tok/s | %d generated %.1f tok/s%s | %s", self.id,
                 last.prompt_tokens, last.cached_tokens, last.prompt_tps, last.generation_tokens,
                 last.generation_tps, ffn, last.finish_reason)
        stats = self.llm.runner.ffn_stats() if self.llm.settings.verbose else None
        if stats:
            log.info("%s: per-layer FFN sparsity %s", self.id,
                     " ".join(f"{s:.0%}" for s in stats["sparsity_per_layer"]))

    # -- wire shapes --------------------------------------------------------------------------------------------
    def base(self, chunk: bool) -> dict:
        out = {"id": self.id, "object": self.object + (".chunk" if chunk and self.chat else ""),
               "created": self.created, "model": self.state.alias,
               "system_fingerprint": self.state.fingerprint}
        if chunk and self.include_usage:
            out["usage"] = None  # the spec: null on every chunk but the usage chunk
        return out

    def _piece(self, token: int) -> bytes:
        return self.llm.tokenizer.token_bytes(token)

    def chat_logprobs(self, responses) -> dict | None:
        if self.n_logprobs is None:
            return None
        content = []
        for r in responses:
            if r.logprob is None:
                continue
            piece = self._piece(r.token)
            content.append({"token": piece.decode("utf-8", "replace"), "logprob": r.logprob, "bytes": list(piece),
                            "top_logprobs": [{"token": self._piece(t).decode("utf-8", "replace"), "logprob": lp,
                                              "bytes": list(self._piece(t))} for t, lp in r.top_logprobs or []]})
        return {"content": content, "refusal": None}

    def completion_logprobs(self, responses) -> dict | None:
        if self.n_logprobs is None:
            return None
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for r in responses:
            if r.logprob is None:
                continue
            text = self._piece(r.token).decode("utf-8", "replace")
            out["tokens"].append(text)
            out["token_logprobs"].append(r.logprob)
            out["top_logprobs"].append({self._piece(t).decode("utf-8", "replace"): lp
                                        for t, lp in r.top_logprobs or []})
            out["text_offset"].append(self.text_offset)
            self.text_offset += len(text)
        return out

    def logprobs(self, responses):
        return self.chat_logprobs(responses) if self.chat else self.completion_logprobs(responses)

    def usage(self, lasts: list) -> dict:
        prompt = lasts[0].prompt_tokens
        done = sum(r.generation_tokens for r in lasts)
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done,
                "prompt_tokens_details": {"cached_tokens": lasts[0].cached_tokens}}

    @staticmethod
    def timings(last) -> dict:
        """llama-server's `timings` object (its web page and tools read tokens/s from it)."""
        prompt_n = last.prompt_tokens - last.cached_tokens
        return {"cache_n": last.cached_tokens, "prompt_n": prompt_n, "prompt_ms": last.prompt_seconds * 1e3,
                "prompt_per_second": last.prompt_tps, "predicted_n": last.generation_tokens,
                "predicted_ms": last.generation_seconds * 1e3, "predicted_per_second": last.generation_tps}

    def ffn(self, r) -> dict | None:
        """The "ffn" extension of a chunk: see server/__init__.py."""
        if r.ffn_sparsity is None:
            return None
        out = {"sparsity": r.ffn_sparsity, "bytes": r.ffn_bytes, "n_ff": self.llm.config.n_ff}
        if r.ffn_neurons is not None:
            out["neurons"] = r.ffn_neurons
        if r.ffn_tiers is not None:
            out["hot"], out["cold"] = r.ffn_tiers
        return out

    def choice(self, index: int, text: str | None, finish: str | None, responses=(), role: bool = False) -> dict:
        lp = self.logprobs(responses) if responses else None
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
            return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
        return {"index": index, "text": text or "", "logprobs": lp, "finish_reason": finish}

    # -- stream ----------------------------------------------------------------------------------------------------
    async def events(self, job, ping: float):
        try:
            if self.chat:
                yield _dumps({**self.base(True), "choices": [self.choice(0, None, None, role=True)]})
            if not self.chat and self.req.echo:
                yield _dumps({**self.base(True), "choices": [self.choice(0, self.echo_text(), None)]})
            lasts, current = [], 0
            while True:
                try:
                    item = await job.next(ping or None)
                except TimeoutError:
                    yield b": ping\n\n"
                    continue
                except (PowerInferError, APIError) as e:
                    yield _dumps(_error_body(e))
                    return
                except Exception:  # a bug: the client gets a short error event, the log the traceback
                    log.exception("%s failed", self.id)
                    yield _dumps(APIError(500, "internal server error (see the server log)").body())
                    return
                if item is END:
                    break
                index, r = item
                if index != current:
                    current = index
                    if self.chat:
                        yield _dumps({**self.base(True), "choices": [self.choice(index, None, None, role=True)]})
                if r.token is not None:
                    ffn = self.ffn(r) if self.req.ffn_per_token else None
                    if r.text or r.logprob is not None or ffn:
                        chunk = {**self.base(True), "choices": [self.choice(index, r.text, None, [r])]}
                        if ffn:
                            chunk["ffn"] = ffn
                        yield _dumps(chunk)
                    continue
                if r.finish_reason == "cancelled":
                    if job.shutdown:
                        yield _dumps({"error": {"message": "the server is shutting down", "type": "unavailable_error",
                                                "param": None, "code": None}})
                    return
                if r.text:
                    yield _dumps({**self.base(True), "choices": [self.choice(index, r.text, None)]})
                lasts.append(r)
                yield _dumps({**self.base(True), "choices": [self.choice(index, None, finish_reason(r.finish_reason))],
                              "timings": self.timings(r)})
            if self.include_usage and lasts:
                yield _dumps({**self.base(True), "choices": [], "usage": self.usage(lasts)})
            yield b"data: [DONE]\n\n"
        finally:
            job.cancel()  # a no-op when it finished; the client went away otherwise

    # -- one JSON object -----------------------------------------------------------------------------------------
    async def whole(self, job, request: Request) -> Response:
        """Wait for the job, cancelling it if the client disconnects meanwhile (vLLM's with_cancellation)."""
        collect = asyncio.ensure_future(job.all())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait([collect, gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not collect.done():
            job.cancel()
            collect.cancel()
            return Response(status_code=499)  # nobody reads it; llama.cpp/nginx's "client closed request"
        try:
            items = collect.result()
        except (PowerInferError, APIError) as e:
            return _error_response(e)
        by_choice: dict[int, list] = {}
        for index, r in items:
            by_choice.setdefault(index, []).append(r)
        if any(rs[-1].finish_reason == "cancelled" for rs in by_choice.values()):
            raise APIError(503, "the server is shutting down")
        choices, lasts = [], []
        for index, rs in sorted(by_choice.items()):
            text = "".join(r.text for r in rs)
            steps = [r for r in rs if r.token is not None]
            last = rs[-1]
            lasts.append(last)
            lp = self.logprobs(steps)
            if self.chat:
                choices.append({"index": index, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                                "finish_reason": finish_reason(last.finish_reason)})
            else:
                self.text_offset = 0
                text = (self.echo_text() if self.req.echo else "") + text
                choices.append({"index": index, "text": text, "logprobs": lp,
                                "finish_reason": finish_reason(last.finish_reason)})
        return JSONResponse({**self.base(False), "choices": choices, "usage": self.usage(lasts),
                             "timings": self.timings(lasts[0])})

    def echo_text(self) -> str:
        p = self.req.prompt_value()
        return p if isinstance(p, str) else self.llm.detokenize(p)


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _error_body(e) -> dict:
    if isinstance(e, APIError):
        return e.body()
    return APIError(400, str(e)).body()


def _error_response(e) -> JSONResponse:
    err = e if isinstance(e, APIError) else APIError(400, str(e))
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def _generate(request: Request, state, chat: bool, req, ids: list[int], n_logprobs: int | None) -> Response:
    llm = state.llm
    n_ctx = llm.runner.n_ctx
    if not ids:
        raise APIError(400, "the prompt is empty", param="messages" if chat else "prompt")
    if len(ids) >= n_ctx:
        # never truncate silently (the top Ollama complaint, reference/serving.md 3.2); llama-server's shape
        raise APIError(400, f"the prompt has {len(ids)} tokens but the context holds {n_ctx} (start the server "
                            "with a larger -c/--ctx-size or shorten the prompt)",
                       type="exceed_context_size_error", code="context_length_exceeded",
                       n_prompt_tokens=len(ids), n_ctx=n_ctx)
    bad = [t for t in ids if not 0 <= t < llm.config.n_vocab]
    if bad:
        raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{llm.config.n_vocab - 1})",
                       param="prompt")
    try:
        replace(llm.defaults, **req.sampling())  # the engine's own checks, as a 400 before anything is queued
    except PowerInferError as e:
        raise APIError(400, str(e)) from None
    ex = _Exchange(state, chat, req, ids, n_logprobs)
    try:
        job = state.worker.submit(ex.run)
    except QueueFull:
        state.metrics.rejected.inc()
        # retry-after: the client retries later instead of at once (openai-python honours it, up to 2 retries)
        raise APIError(503, f"the server is busy: {state.worker.max_queue} requests are already waiting",
                       code="queue_full", headers={"retry-after": "5"}) from None
    except ShuttingDown:
        raise APIError(503, "the server is shutting down") from None
    state.metrics.requests.labels("chat" if chat else "completions").inc()
    if req.stream:
        return StreamingResponse(ex.events(job, state.opts.sse_ping_interval), media_type="text/event-stream",
                                 headers=SSE_HEADERS)
    return await ex.whole(job, request)


async def chat_completions(request: Request, state, body) -> Response:
    req = parse(ChatRequest, body)
    req.check_supported(state.constrained)
    n_logprobs = req.n_logprobs()
    messages = req.chat_messages()
    try:
        ids = await run_in_threadpool(state.llm.chat_ids, messages)
    except PowerInferError as e:  # the template refused the conversation (e.g. roles out of order)
        raise APIError(400, str(e), param="messages") from None
    return await _generate(request, state, True, req, ids, n_logprobs)


async def completions(request: Request, state, body) -> Response:
    req = parse(CompletionRequest, body)
    req.check_supported(state.constrained)
    prompt = req.prompt_value()
    ids = prompt if isinstance(prompt, list) else await run_in_threadpool(state.llm.tokenize, prompt)
    return await _generate(request, state, False, req, ids, req.logprobs)
