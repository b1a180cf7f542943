"""One engine thread and a bounded FIFO queue in front of it.

The `LLM` owns one KV cache, so one generation runs at a time (reference/serving.md 2.3, 5: a second request
must neither interrupt the first, as llama-cpp-python's old default did, #867, nor run on the same context).
Requests wait in arrival order; beyond `max_queue` waiting ones the server answers 503 with retry-after
(Ollama's OLLAMA_MAX_QUEUE). A job's output crosses to the event loop through an asyncio queue; the async side
cancels a job by setting its event, which the engine checks between prompt chunks and between tokens, so a client
that disconnects frees the engine within one chunk or one token (llama.cpp #11720, #24496).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable, Iterator

log = logging.getLogger("powerinfer.server")

END = object()  # a job's last item


class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    pass


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


class Job:
    """One request's work: `run(cancelled)` is called on the engine thread and yields items for the client."""

    def __init__(self, run: Callable[[Callable[[], bool]], Iterator], loop: asyncio.AbstractEventLoop):
        self.run = run
        self.loop = loop
        self.items: asyncio.Queue = asyncio.Queue()
        self.cancel_event = threading.Event()
        self.started = False
        self.shutdown = False  # cancelled because the server is stopping (the client is told so)

    def cancel(self) -> None:
        self.cancel_event.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def _put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.items.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancel()

    async def next(self, timeout: float | None = None):
        """The job's next item, `END` when it is done; TimeoutError after `timeout` seconds without one (the job
        goes on). A failure on the engine thread is raised here."""
        if not self.items.empty():
            item = self.items.get_nowait()
        else:  # asyncio.timeout, not wait_for: no task per token
            async with asyncio.timeout(timeout):
                item = await self.items.get()
        if isinstance(item, _Failed):
            raise item.exc
        return item

    async def all(self) -> list:
        out = []
        while (item := await self.next()) is not END:
            out.append(item)
        return out


class EngineWorker:
    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._waiting: list[Job] = []
        self.running: Job | None = None
        self.closing = False
        self._thread = threading.Thread(target=self._loop, name="powerinfer-engine", daemon=True)
        self._thread.start()

    @property
    def n_waiting(self) -> int:
        return len(self._waiting)

    def submit(self, run: Callable[[Callable[[], bool]], Iterator]) -> Job:
        """Queue `run`; QueueFull when `max_queue` jobs already wait, ShuttingDown once the server is stopping."""
        job = Job(run, asyncio.get_running_loop())
        with self._lock:
            if self.closing:
                raise ShuttingDown()
            if len(self._waiting) + (self.running is not None) > self.max_queue:
                raise QueueFull()
            self._waiting.append(job)
        self._queue.put(job)
        return job

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                self._waiting.remove(job)
                self.running = job
            try:
                if not job.cancelled:
                    job.started = True
                    # run to its end: a cancelled generation ends itself (the engine checks between chunks and
                    # tokens) with a last item that says so, which is what metrics and the client's stream need
                    for item in job.run(job.cancel_event.is_set):
                        job._put(item)
            except Exception as e:  # reported to the client as an error; the engine stays usable
                job._put(_Failed(e))
            finally:
                with self._lock:
                    self.running = None
                job._put(END)

    def shutdown(self) -> None:
        """Refuse new jobs and cancel the running and waiting ones. Called on the event loop, never from a signal
        handler directly (the handler may have interrupted `submit` holding the lock)."""
        with self._lock:
            self.closing = True
            jobs = self._waiting + ([self.running] if self.running is not None else [])
        for job in jobs:
            job.shutdown = True
            job.cancel()
        self._queue.put(None)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
