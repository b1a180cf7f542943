"""The chat page in a real headless browser: Debian's chromium driven by Playwright (browsers cannot be downloaded
here; .ci/run installs the apt package). Against a real `powerinfer serve`: the page loads, streams a reply, draws
the per-layer FFN view from the stream, Stop cancels the generation on the server, model output that contains HTML
is shown as text, and the conversation survives a reload."""
from __future__ import annotations

import json
import os
import re
import shutil

import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None,
                                reason="Debian's chromium is not installed (apt-get install chromium)")

# The flags headless chromium needs as root in a container with no network (reference/serving.md 6.2).
ARGS = ["--no-sandbox", "--headless=new", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1280, "height": 820})
    pg = ctx.new_page()
    pg.problems = []
    pg.on("pageerror", lambda e: pg.problems.append(f"page error: {e}"))
    pg.on("console", lambda m: pg.problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    yield pg
    ctx.close()


def _sse_chunks(body: bytes) -> list[dict]:
    return [json.loads(line[6:]) for line in body.decode().splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


def _send(page, text: str):
    page.fill("#input", text)
    page.press("#input", "Enter")


def _canvas_pixels_drawn(page, selector: str) -> int:
    """Pixels that differ from the canvas background (#10131a)."""
    return page.evaluate("""(sel) => {
        const c = document.querySelector(sel), d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 0; i < d.length; i += 4)
          if (Math.abs(d[i] - 16) + Math.abs(d[i + 1] - 19) + Math.abs(d[i + 2] - 26) > 30) n++;
        return n; }""", selector)


def test_page_streams_a_reply_and_draws_the_neurons_that_fire(page, tiny_server, tiny_model, tmp_path):
    page.goto(tiny_server.url + "/")
    sync_api.expect(page.locator("#model")).to_have_text(tiny_model.path.stem)
    sync_api.expect(page.locator("#status")).to_contain_text("sparse FFN")
    assert _canvas_pixels_drawn(page, "#ffn-map") == 0
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "40")
    page.fill("#system", "You are a lighthouse keeper.")
    with page.expect_response("**/v1/chat/completions") as info:
        _send(page, "Tell me about the sea.")
    page.wait_for_selector("#send:not([hidden])", timeout=60_000)
    request = info.value.request.post_data_json
    assert request["messages"] == [{"role": "system", "content": "You are a lighthouse keeper."},
                                   {"role": "user", "content": "Tell me about the sea."}]
    assert (request["temperature"], request["max_tokens"], request["ffn_per_token"]) == (0, 40, True)
    chunks = _sse_chunks(info.value.body())
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    ffn = [c["ffn"] for c in chunks if c.get("ffn")]
    assert len(ffn) == 39 and text

    stored = page.evaluate("JSON.parse(localStorage.getItem('powerinfer.chat.v1')).messages")
    assert stored[-1]["content"] == text  # what the page shows is what came over the stream
    assert "40 tokens" in page.inner_text(".msg.assistant .stats") and "tok/s" in page.inner_text(".msg.assistant")
    # the view draws the stream's own numbers: the last token's per-layer counts, every token a column
    assert page.get_attribute("#ffn", "data-tokens") == "39"
    assert page.get_attribute("#ffn", "data-last") == ",".join(map(str, ffn[-1]["neurons"]))
    assert _canvas_pixels_drawn(page, "#ffn-map") > 39 * 6  # one cell per token and layer at least
    assert _canvas_pixels_drawn(page, "#ffn-bars") > 6
    summary = page.inner_text("#ffn-summary")
    assert f"{100 * ffn[-1]['sparsity']:.1f}% skipped" in summary and "6 × 256" in summary
    shot = tmp_path / "page.png"
    page.screenshot(path=str(shot))
    print(f"screenshot: {shot}")
    if os.environ.get("POWERINFER_SCREENSHOT"):
        shutil.copy(shot, os.environ["POWERINFER_SCREENSHOT"])

    page.reload()  # the conversation is kept in the browser
    page.wait_for_selector(".msg.assistant")
    assert page.inner_text(".msg.user") == "Tell me about the sea."
    assert page.evaluate("JSON.parse(localStorage.getItem('powerinfer.chat.v1')).messages.length") == 2
    assert page.input_value("#system") == "You are a lighthouse keeper."
    assert page.problems == []


def test_stop_cancels_the_generation_on_the_server(page, bundled_server):
    # the bundled model writes at a real model's pace: a tiny random model's thousands of tokens a second were done,
    # or kept the page's main thread too busy to take the click, before the test reached Stop
    server = bundled_server
    page.goto(server.url + "/")
    page.fill("#max_tokens", "3000")
    before = server.metrics()
    _send(page, "Write a very long story about a dragon, in many chapters.")
    # Stop as soon as the reply has begun
    sync_api.expect(page.locator(".msg.assistant .body")).to_have_text(re.compile(r"\S"))
    assert page.is_visible("#stop") and not page.is_visible("#send")
    # dispatched, not clicked: the button moves while the reply grows, and click() waits for it to stand still
    page.locator("#stop").dispatch_event("click")
    page.wait_for_selector("#send:not([hidden])")
    assert page.inner_text(".msg.assistant .stats").startswith("stopped after")
    server.wait_idle(10)
    after = server.metrics()
    assert after["powerinfer_requests_cancelled_total"] == before["powerinfer_requests_cancelled_total"] + 1
    assert after["powerinfer_tokens_predicted_total"] - before["powerinfer_tokens_predicted_total"] < 1500
    assert page.problems == []


def test_model_output_with_html_is_shown_as_text(page, bundled_server):
    page.goto(bundled_server.url + "/")
    sync_api.expect(page.locator("#status")).to_have_text("dense FFN")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "50")
    _send(page, "How do I include JavaScript in an HTML page? Answer with a short code example.")
    page.wait_for_selector("#send:not([hidden])", timeout=60_000)
    reply = page.inner_text(".msg.assistant .body")
    assert "<script>" in reply  # SmolLM2 at temperature 0 answers with a script tag, inline and in a code block
    assert page.locator("#messages script").count() == 0  # ... shown as text, not made an element
    assert page.locator(".msg.assistant pre code").count() >= 1  # the code block is rendered as one
    page.fill("#max_tokens", "4")
    _send(page, '<img src="x" onerror="window.__xss = 1"> <b>bold?</b>')
    page.wait_for_selector("#send:not([hidden])", timeout=60_000)
    assert page.locator("#messages img, #messages b").count() == 0
    assert page.evaluate("window.__xss") is None
    assert '<img src="x"' in page.inner_text(".msg.user >> nth=1")
    assert page.problems == []


def test_view_splits_hot_and_cold_neurons_under_a_placement(page, serve, tiny_model):
    """With a placement (the fast tier on the CPU here, --hot-device cpu, and a budget that holds a third of the
    FFN), each chunk's "ffn" also says how many of a layer's computed neurons ran on each tier, and the page draws
    the split."""
    from powerinfer.runtime import hybrid_runner

    if not hasattr(hybrid_runner.HybridRunner, "last_ffn_tiers"):
        pytest.skip("the hybrid runner reports no per-tier counts")
    s = serve("-m", str(tiny_model.path), "--sparsity", "auto", "--hot-device", "cpu", "--vram-budget", "0.0012",
              "-c", "512", "--temp", "0")
    page.goto(s.url + "/")
    page.fill("#max_tokens", "12")
    with page.expect_response("**/v1/chat/completions") as info:
        _send(page, "Tell me about the sea.")
    page.wait_for_selector("#send:not([hidden])", timeout=60_000)
    ffn = [c["ffn"] for c in _sse_chunks(info.value.body()) if c.get("ffn")]
    assert len(ffn) == 11
    for f in ffn:
        assert [h + c for h, c in zip(f["hot"], f["cold"])] == f["neurons"]
        assert sum(f["hot"]) > 0 and sum(f["cold"]) > 0
    tiers = page.inner_text("#ffn-tiers")
    hot, cold = sum(ffn[-1]["hot"]), sum(ffn[-1]["cold"])
    assert tiers == f"Fast tier (orange): {hot} neurons, CPU tier (blue): {cold} neurons."
    assert page.problems == []
