"""The Starlette application: routes, the checks every request passes (loading, API key, Host header, body size and
read timeout) and errors in OpenAI's JSON shape, never a traceback (reference/serving.md section 7).

Every OpenAI route is served with and without the /v1 prefix, as llama-server does. Public without a key:
/health, /v1/models, the chat page and its files (llama.cpp test_security); everything else needs the key when
one is set, compared in constant time.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..errors import PowerInferError
from ..settings import SamplingParams, field_names
from .generation import chat_completions, completions
from .metrics import Metrics
from .protocol import APIError, DetokenizeRequest, TemplateRequest, TokenizeRequest, parse

log = logging.getLogger("powerinfer.server")

STATIC = Path(__file__).parent / "static"
MAX_BODY = 8 << 20  # 8 MiB, far beyond any context; bounds what one request can make us buffer (Rapid-MLX PR #706)
DRAIN_LIMIT = 64 << 20  # bodies up to this size are read to the end (not kept) before the 413, so the client sees it
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
# The page's own files only: no inline script, no remote fetches or images (a model's markdown image is an
# exfiltration channel, OWASP LLM05), nothing may frame it.
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@dataclass
class ServerState:
    opts: object  # options.ServeOptions
    alias: str
    llm: object = None  # api.LLM once loaded
    worker: object = None  # worker.EngineWorker once loaded
    metrics: Metrics = field(default_factory=Metrics)
    fingerprint: str = "powerinfer"
    started: float = field(default_factory=time.time)
    # Constrained decoding (response_format json_object/json_schema, grammar) needs the engine's grammar hook, the
    # json_schema/grammar sampling settings; without them the server answers those with 400, not free text.
    constrained: bool = field(default_factory=lambda: {"json_schema", "grammar"} <= field_names(SamplingParams))

    @property
    def ready(self) -> bool:
        return self.worker is not None


def _allowed_hosts(opts) -> set[str] | None:
    """Host names a browser may use to reach us, or None for any. With no key on a loopback address, a Host
    header check is what stops DNS rebinding (a web page's own domain resolving to 127.0.0.1; Ollama's
    allowedHostsMiddleware)."""
    if opts.api_key or opts.host not in LOOPBACK:
        return None
    return LOOPBACK | {opts.host}


def _host_name(header: str) -> str:
    if header.startswith("["):
        return header[:header.find("]") + 1]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _check(request: Request, state: ServerState, public: bool) -> None:
    hosts = _allowed_hosts(state.opts)
    if hosts is not None and _host_name(request.headers.get("host", "")) not in hosts:
        raise APIError(403, f"Host {request.headers.get('host', '')!r} is not allowed: use localhost or "
                            "127.0.0.1, or start the server with --api-key")
    if public or not state.opts.api_key:
        return
    auth = request.headers.get("authorization", "")
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
    if not hmac.compare_digest(given.encode(), state.opts.api_key.encode()):
        raise APIError(401, "invalid API key: send it as Authorization: Bearer KEY" if given else
                       "this server needs an API key: send it as Authorization: Bearer KEY",
                       code="invalid_api_key")


async def _json_body(request: Request, timeout: float):
    body = bytearray()
    over = False

    async def read():
        nonlocal over
        async for chunk in request.stream():
            if not over:
                body.extend(chunk)
                over = len(body) > MAX_BODY
            elif len(body) + len(chunk) > DRAIN_LIMIT:
                return
            else:
                del body[:]  # read and dropped: a client still sending gets the 413 instead of a reset connection

    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > DRAIN_LIMIT:
        raise APIError(413, f"the request body is {int(length)} bytes; the limit is {MAX_BODY}",
                       code="request_too_large")
    try:
        await asyncio.wait_for(read(), timeout)
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout:g} s") from None
    if over:
        raise APIError(413, f"the request body is over the limit of {MAX_BODY} bytes", code="request_too_large")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None


def _route(state: ServerState, handler, public: bool = False, needs_model: bool = True, body: bool = False):
    """Wrap `handler(request, state[, body])` with the checks and the error shape."""
    async def endpoint(request: Request) -> Response:
        try:
            _check(request, state, public)
            if needs_model and not state.ready:
                raise APIError(503, "Loading model", headers={"retry-after": "1"})
            if body:
                return await handler(request, state, await _json_body(request, state.opts.timeout))
            return await handler(request, state)
        except APIError as e:
            return JSONResponse(e.body(), status_code=e.status, headers=e.headers)
        except PowerInferError as e:
            return JSONResponse(APIError(400, str(e)).body(), status_code=400)
        except Exception:  # a bug: the client gets a short message, the log the traceback
            log.exception("%s %s failed", request.method, request.url.path)
            return JSONResponse(APIError(500, "internal server error (see the server log)").body(), status_code=500)
    return endpoint


# -- utility routes --------------------------------------------------------------------------------------------

async def health(request, state):
    if not state.ready:
        raise APIError(503, "Loading model", headers={"retry-after": "1"})
    return JSONResponse({"status": "ok"})


async def models(request, state):
    data = {"id": state.alias, "object": "model", "created": int(state.started), "owned_by": "powerinfer"}
    if state.ready:
        cfg = state.llm.config
        data["meta"] = {"n_ctx": state.llm.runner.n_ctx, "n_ctx_train": cfg.context_length, "n_vocab": cfg.n_vocab,
                        "n_layer": cfg.n_layer, "n_ff": cfg.n_ff, "ffn": state.llm.sparsity}
    return JSONResponse({"object": "list", "data": [data]})


async def props(request, state):
    llm = state.llm
    cfg = llm.config
    return JSONResponse({
        "default_generation_settings": {"n_ctx": llm.runner.n_ctx, "params": asdict(llm.defaults)},
        "total_slots": 1, "model_path": str(llm.loaded.path), "model_alias": state.alias,
        "chat_template": llm.loaded.metadata.get("tokenizer.chat_template") or "",
        "build_info": state.fingerprint, "modalities": {"vision": False, "audio": False},
        "ffn": {"mode": llm.sparsity, "sparse": bool(llm.runner.sparse), "n_layer": cfg.n_layer, "n_ff": cfg.n_ff},
        "api_key_required": bool(state.opts.api_key)})


async def tokenize(request, state, body):
    req = parse(TokenizeRequest, body)
    tok = state.llm.tokenizer
    ids = await run_in_threadpool(tok.encode, req.content, add_bos=None if req.add_special else False,
                                  parse_special=req.parse_special)
    if not req.with_pieces:
        return JSONResponse({"tokens": ids})
    pieces = []
    for i in ids:
        raw = tok.token_bytes(i)
        try:
            piece = raw.decode("utf-8")
        except UnicodeDecodeError:  # part of a multi-byte character: llama-server gives the bytes
            piece = list(raw)
        pieces.append({"id": i, "piece": piece})
    return JSONResponse({"tokens": pieces})


async def detokenize(request, state, body):
    req = parse(DetokenizeRequest, body)
    n_vocab = state.llm.config.n_vocab
    bad = [t for t in req.tokens if not 0 <= t < n_vocab]
    if bad:
        raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{n_vocab - 1})", param="tokens")
    return JSONResponse({"content": state.llm.detokenize(req.tokens)})


async def apply_template(request, state, body):
    req = parse(TemplateRequest, body)
    messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()} for m in req.messages]
    return JSONResponse({"prompt": state.llm.chat_prompt(messages)})


async def metrics(request, state):
    return Response(state.metrics.render(), media_type=state.metrics.content_type)


async def page(request, state):
    return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_CSP,
                                                         "Cache-Control": "no-cache"})


def _not_found(request: Request, exc: HTTPException) -> JSONResponse:
    status = exc.status_code
    msg = (f"no route {request.method} {request.url.path}" if status == 404 else
           f"{request.method} is not allowed on {request.url.path}" if status == 405 else str(exc.detail))
    return JSONResponse(APIError(status, msg).body(), status_code=status)


def build_app(state: ServerState) -> Starlette:
    r = lambda handler, **kw: _route(state, handler, **kw)  # noqa: E731
    routes = []
    for prefix in ("/v1", ""):
        routes += [Route(f"{prefix}/chat/completions", r(chat_completions, body=True), methods=["POST"]),
                   Route(f"{prefix}/completions", r(completions, body=True), methods=["POST"]),
                   Route(f"{prefix}/models", r(models, public=True, needs_model=False), methods=["GET"]),
                   Route(f"{prefix}/health", r(health, public=True, needs_model=False), methods=["GET"])]
    routes += [Route("/tokenize", r(tokenize, body=True), methods=["POST"]),
               Route("/detokenize", r(detokenize, body=True), methods=["POST"]),
               Route("/apply-template", r(apply_template, body=True), methods=["POST"]),
               Route("/props", r(props), methods=["GET"]),
               Route("/metrics", r(metrics, needs_model=False), methods=["GET"])]
    if not state.opts.no_webui:
        routes += [Route("/", r(page, public=True, needs_model=False), methods=["GET"]),
                   Mount("/static", StaticFiles(directory=STATIC), name="static")]
    return Starlette(routes=routes, exception_handlers={HTTPException: _not_found})
