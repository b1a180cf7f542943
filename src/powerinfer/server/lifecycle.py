"""Start, load, stop: the listening socket is bound first (a busy port is a one-line error, --port 0 picks a free
one), uvicorn serves while the model loads on a thread (/health says 503 "Loading model" meanwhile, llama-server's
behaviour), and SIGINT/SIGTERM stop it cleanly: new requests are refused, running and queued generations are
cancelled (their streams end with an error event), connections drain, the process exits 0 (llama.cpp PR #6348,
#11795; uvicorn alone re-raises the signal after its shutdown, which ends the process with the signal's status).
"""
from __future__ import annotations

import ipaddress
import logging
import signal
import socket
import sys
import threading
import time

import uvicorn
from uvicorn.logging import DefaultFormatter

from ..errors import PowerInferError
from .app import ServerState, build_app
from .worker import EngineWorker

log = logging.getLogger("powerinfer.server")

GRACE_SECONDS = 5  # after the engine was cancelled, how long open connections get to finish their last bytes


def _bind(host: str, port: int) -> socket.socket:
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
        sock = socket.socket(infos[0][0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(infos[0][4])
    except OSError as e:
        raise PowerInferError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _Server(uvicorn.Server):
    def __init__(self, config, state: ServerState):
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig, frame) -> None:
        # Not recorded for re-raising (see the module docstring); the engine is cancelled on the event loop, since
        # this handler may have interrupted the worker's bookkeeping on this thread.
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True
        worker, loop = self.state.worker, getattr(self, "_event_loop", None)
        if worker is not None and loop is not None:
            loop.call_soon_threadsafe(worker.shutdown)

    async def startup(self, sockets=None) -> None:
        import asyncio

        self._event_loop = asyncio.get_running_loop()
        await super().startup(sockets)


def _setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(DefaultFormatter("%(levelprefix)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def run_server(opts, alias: str, load, fingerprint: str = "powerinfer") -> int:
    """Serve until a signal; `load()` returns the `LLM` (run on a thread while the socket already answers)."""
    sock = _bind(opts.host, opts.port)
    host, port = sock.getsockname()[:2]
    _setup_logging()
    state = ServerState(opts=opts, alias=alias, fingerprint=fingerprint)
    config = uvicorn.Config(build_app(state), log_level="info", lifespan="off",
                            timeout_graceful_shutdown=GRACE_SECONDS, timeout_keep_alive=5)
    server = _Server(config, state)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    print(f"powerinfer serve: listening on {url} (OpenAI API at {url}/v1"
          f"{'' if opts.no_webui else f', chat page at {url}/'})", file=sys.stderr, flush=True)
    if not _is_loopback(opts.host) and not opts.api_key:
        log.warning("listening on %s without --api-key: anyone who can reach this address can use the model", host)
    failure: list[BaseException] = []

    def load_model():
        t0 = time.perf_counter()
        try:
            llm = load()
            worker = EngineWorker(opts.max_queue)
        except BaseException as e:  # reported by the main thread after the server stopped
            failure.append(e)
            server.should_exit = True
            return
        state.llm = llm
        state.metrics.watch(worker)
        state.worker = worker
        log.info("model loaded in %.1f s: %s, context %d, %s; ready", time.perf_counter() - t0, alias,
                 llm.runner.n_ctx, llm.sparsity)

    threading.Thread(target=load_model, name="powerinfer-load", daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        if state.worker is not None:
            state.worker.shutdown()
            state.worker.join(GRACE_SECONDS)
    if failure:
        raise failure[0]
    return 0
