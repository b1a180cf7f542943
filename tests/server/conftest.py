"""A real `powerinfer serve` subprocess on 127.0.0.1 (any free port, --port 0), waited for on /health, stopped with
SIGTERM (llama.cpp's tests/utils.py ServerProcess does the same).

  serve(*args)       factory: start a server with these CLI args -> Server (stopped after the module)
  tiny_model         a ReLU tiny GGUF with a byte-level vocabulary (tests/fixtures/tiny.py): fast, and `--sparsity
                     auto` skips its zero activations exactly, so the FFN view has real sparsity
  tiny_server        `serve -m tiny --sparsity auto -c 8192 --temp 0 --ignore-eos`, one for the whole session
  bundled_server     the bundled SmolLM2-135M-Instruct, -b 64 (small prompt chunks: a cancel lands between them),
                     an SSE ping after 0.2 s without a token; one for the whole session
"""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

TINY = dict(activation="relu", tokenizer=True, n_vocab=272, n_layer=6, n_ff=256, context_length=8192)


class Server:
    def __init__(self, args: list[str]):
        self.args = args
        self.proc = subprocess.Popen([sys.executable, "-m", "powerinfer", "serve", "--port", "0", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._url = threading.Event()
        self.url = None
        threading.Thread(target=self._drain, daemon=True).start()
        if not self._url.wait(60):
            self.stop()
            raise RuntimeError("the server printed no address:\n" + self.log())
        self.wait_ready()

    def _drain(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            m = re.search(r"listening on (http://\S+) ", line)
            if m:
                self.url = m.group(1)
                self._url.set()

    def log(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.1)
        raise RuntimeError("the server did not become ready:\n" + self.log())

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def client(self, **kw):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "sk-no-key-required"), max_retries=0,
                      timeout=120, **kw)

    def request(self, method: str, path: str, body=None, headers: dict | None = None, raw: bytes | None = None):
        """(status, headers, parsed JSON or text) of one request, errors included."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                status, hdrs, payload = r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            status, hdrs, payload = e.code, dict(e.headers), e.read()
        text = payload.decode()
        try:
            return status, hdrs, json.loads(text)
        except ValueError:
            return status, hdrs, text

    def metrics(self) -> dict[str, float]:
        status, _, text = self.request("GET", "/metrics")
        assert status == 200, text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def wait_idle(self, timeout: float) -> float:
        """Seconds until no generation runs and none waits; fails after `timeout`."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            m = self.metrics()
            if m["powerinfer_requests_processing"] == 0 and m["powerinfer_requests_deferred"] == 0:
                return time.monotonic() - t0
            time.sleep(0.05)
        raise AssertionError(f"the engine is still busy after {timeout} s:\n{self.log()[-2000:]}")

    def stop(self, sig=signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def serve():
    started = []

    def start(*args: str) -> Server:
        s = Server(list(args))
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


@pytest.fixture(scope="session")
def tiny_model(tiny_gguf):
    return tiny_gguf(**TINY)


@pytest.fixture(scope="session")
def tiny_server(tiny_model):
    # --ignore-eos: a random model's end-of-turn token means nothing; replies run to max_tokens (or a stop string)
    s = Server(["-m", str(tiny_model.path), "--sparsity", "auto", "-c", "8192", "-t", "2", "--temp", "0",
                "--ignore-eos"])
    yield s
    s.stop()


@pytest.fixture(scope="session")
def bundled_server(bundled_model_path):
    s = Server(["-c", "4096", "-b", "64", "-t", "2", "--sse-ping-interval", "0.2"])
    yield s
    s.stop()
