"""Behaviour under real use: one generation at a time in arrival order, a bounded queue, cancellation when the
client goes away (between tokens and between prompt chunks), API key and Host checks, clean exits and one-line
errors (reference/serving.md 5 and 7)."""
from __future__ import annotations

import json
import signal
import socket
import threading
import time

import openai
import pytest

CHAT = [{"role": "user", "content": "Count to one hundred."}]


def _raw_post(server, path: str, body: dict) -> socket.socket:
    """Send a request on a plain socket and return it unread: the test decides when the client goes away."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_concurrent_clients_are_answered_in_order_and_unmixed(tiny_server):
    """8 clients at once: every answer equals the answer the same request gets alone (no request corrupts
    another's KV cache), and they finish in the order they arrived (FIFO, one generation at a time)."""
    client = tiny_server.client()
    prompts = [f"Request number {i}: " for i in range(8)]
    alone = [client.completions.create(model="m", prompt=p, max_tokens=150, temperature=0, extra_body={
        "ignore_eos": True}).choices[0].text for p in prompts]
    results, finished = [None] * 8, []

    def ask(i):
        results[i] = client.completions.create(model="m", prompt=prompts[i], max_tokens=150, temperature=0,
                                               extra_body={"ignore_eos": True}).choices[0].text
        finished.append(i)

    threads = []
    for i in range(8):
        threads.append(threading.Thread(target=ask, args=(i,)))
        threads[-1].start()
        time.sleep(0.15)  # a known arrival order (each answer takes longer, so the queue fills)
    for t in threads:
        t.join(120)
    assert results == alone
    assert finished == list(range(8))


def test_full_queue_is_a_503_with_retry_after(serve, tiny_model):
    s = serve("-m", str(tiny_model.path), "-c", "8192", "--max-queue", "1")
    long = {"prompt": "a", "max_tokens": 6000, "ignore_eos": True, "stream": True}
    running = _raw_post(s, "/v1/completions", long)
    time.sleep(0.3)
    waiting = _raw_post(s, "/v1/completions", long)
    time.sleep(0.3)
    status, headers, body = s.request("POST", "/v1/completions", {"prompt": "b", "max_tokens": 2})
    assert status == 503 and headers["retry-after"] == "5"
    assert body["error"]["type"] == "unavailable_error" and body["error"]["code"] == "queue_full"
    assert s.metrics()["powerinfer_requests_rejected_total"] == 1
    running.close()
    waiting.close()
    s.wait_idle(20)
    assert s.request("POST", "/v1/completions", {"prompt": "b", "max_tokens": 2})[0] == 200


def test_disconnect_mid_stream_frees_the_engine(bundled_server):
    """A client that goes away mid-stream stops its generation (3000 tokens would take half a minute); the next
    request runs at once."""
    s = bundled_server
    before = s.metrics()
    stream = s.client().chat.completions.create(model="m", messages=CHAT, max_tokens=3000, stream=True,
                                                extra_body={"ignore_eos": True})
    for i, _ in zip(range(5), stream):
        pass
    stream.close()
    s.wait_idle(10)
    after = s.metrics()
    assert after["powerinfer_requests_cancelled_total"] == before["powerinfer_requests_cancelled_total"] + 1
    assert after["powerinfer_tokens_predicted_total"] - before["powerinfer_tokens_predicted_total"] < 1000
    r = s.client().chat.completions.create(model="m", messages=CHAT, max_tokens=4)
    assert r.usage.completion_tokens == 4


def test_disconnect_during_the_prompt_stops_between_chunks(bundled_server):
    """A non-streaming request whose client leaves while its prompt is evaluated: the engine stops between prompt
    chunks (-b 64) instead of evaluating the whole prompt and generating."""
    s = bundled_server
    prompt = " ".join(f"word{i}" for i in range(800))  # several seconds of prefill
    n_prompt = len(s.request("POST", "/tokenize", {"content": prompt})[2]["tokens"])
    assert 3000 < n_prompt < 4096
    before = s.metrics()
    sock = _raw_post(s, "/v1/completions", {"prompt": prompt, "max_tokens": 50})
    time.sleep(0.5)
    sock.close()
    s.wait_idle(10)
    after = s.metrics()
    evaluated = after["powerinfer_prompt_tokens_total"] - before["powerinfer_prompt_tokens_total"]
    assert 0 < evaluated < n_prompt - 64, (evaluated, n_prompt)
    assert after["powerinfer_tokens_predicted_total"] == before["powerinfer_tokens_predicted_total"]
    assert after["powerinfer_requests_cancelled_total"] == before["powerinfer_requests_cancelled_total"] + 1


def test_sse_pings_keep_a_stream_alive_through_a_long_prompt(bundled_server):
    """`: ping` comments while the prompt is evaluated (seconds here), which SSE clients ignore."""
    s = bundled_server
    prompt = " ".join(f"token{i}" for i in range(300))  # about 1200 tokens: a second or more of prefill
    sock = _raw_post(s, "/v1/completions", {"prompt": prompt, "max_tokens": 3, "stream": True})
    data = b""
    sock.settimeout(60)
    while b"data: [DONE]" not in data:
        piece = sock.recv(65536)
        assert piece, data
        data += piece
    sock.close()
    # completions have no role chunk: the first data event is the first token
    assert b": ping\n\n" in data and data.find(b": ping") < data.find(b"data: {")


def test_api_key(serve, tiny_model):
    s = serve("-m", str(tiny_model.path), "--api-key", "s3cret")
    status, _, body = s.request("POST", "/v1/chat/completions", {"messages": CHAT})
    assert status == 401 and body["error"]["type"] == "authentication_error"
    status, _, body = s.request("POST", "/v1/chat/completions", {"messages": CHAT},
                                headers={"Authorization": "Bearer nope"})
    assert status == 401 and "invalid API key" in body["error"]["message"]
    assert s.request("GET", "/metrics")[0] == 401
    with pytest.raises(openai.AuthenticationError):
        s.client(api_key="wrong").chat.completions.create(model="m", messages=CHAT)
    r = s.client(api_key="s3cret").chat.completions.create(model="m", messages=CHAT, max_tokens=2)
    assert r.usage.completion_tokens == 2
    status, _, body = s.request("POST", "/tokenize", {"content": "x"}, headers={"X-Api-Key": "s3cret"})
    assert (status, body) == (200, {"tokens": [120]})
    # public: health, the model list, the page
    assert s.request("GET", "/health")[0] == 200 and s.request("GET", "/v1/models")[0] == 200
    status, headers, page = s.request("GET", "/")
    assert status == 200 and "<title>powerinfer chat</title>" in page
    assert "script-src 'self'" in headers["content-security-policy"]


def test_host_header_is_checked_without_a_key(tiny_server):
    """DNS rebinding: a page on evil.example whose name resolves to 127.0.0.1 must not reach the API."""
    status, _, body = tiny_server.request("GET", "/v1/models", headers={"Host": "evil.example:8080"})
    assert status == 403 and "evil.example" in body["error"]["message"]
    assert tiny_server.request("GET", "/v1/models", headers={"Host": "localhost:1234"})[0] == 200


def test_sigterm_cancels_the_stream_and_exits_cleanly(serve, tiny_model):
    s = serve("-m", str(tiny_model.path), "-c", "8192")
    stream = s.client().completions.create(model="m", prompt="a", max_tokens=6000, stream=True,
                                           extra_body={"ignore_eos": True})
    next(iter(stream))
    t0 = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    with pytest.raises(openai.APIError, match="shutting down"):
        for _ in stream:
            pass
    assert s.proc.wait(20) == 0
    assert time.monotonic() - t0 < 15
    assert "Traceback" not in s.log() and "Shutting down" in s.log()


def _serve_cli(capsys, *args) -> tuple[int, str]:
    """`powerinfer serve ARGS` through the real command line (in this process: these errors come before any
    server starts)."""
    from powerinfer.cli import main

    try:
        rc = main(["serve", *args])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    return rc, capsys.readouterr().err


def test_user_errors_are_one_line(tmp_path, capsys):
    rc, err = _serve_cli(capsys, "-m", str(tmp_path / "missing.gguf"))
    assert rc == 1 and err.splitlines() == [f"error: {tmp_path / 'missing.gguf'}: no such file or directory"]
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        rc, err = _serve_cli(capsys, "--port", str(busy.getsockname()[1]))
    finally:
        busy.close()
    assert rc == 1 and len(err.splitlines()) == 1
    assert err.startswith("error: cannot listen on 127.0.0.1:") and "in use" in err
    rc, err = _serve_cli(capsys, "--port", "70000")
    assert rc == 1 and err.strip() == "error: --port must be in 0..65535, got 70000"
    rc, err = _serve_cli(capsys, "--max-queue", "x")
    assert rc == 2 and len(err.splitlines()) == 1 and "--max-queue" in err
