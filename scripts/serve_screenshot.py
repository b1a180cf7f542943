"""Take the README's picture of the chat page: start `powerinfer serve` with the given flags, ask one question in a
headless chromium (Playwright, Debian's chromium) and save a screenshot.

    python scripts/serve_screenshot.py -o docs/serve-chat.png -- --sparsity 0.5
"""
from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request

QUESTION = "Name the three primary colors and say one thing about each."


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--output", default="docs/serve-chat.png")
    ap.add_argument("--question", default=QUESTION)
    ap.add_argument("serve_args", nargs="*", help="flags for powerinfer serve (after --)")
    args = ap.parse_args()
    from playwright.sync_api import expect, sync_playwright

    proc = subprocess.Popen([sys.executable, "-m", "powerinfer", "serve", "--port", "0", *args.serve_args],
                            stderr=subprocess.PIPE, text=True)
    url = None
    for line in proc.stderr:
        sys.stderr.write(line)
        m = re.search(r"listening on (http://\S+) ", line)
        url = url or (m and m.group(1))
        if "ready" in line:
            break
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    try:
        while urllib.request.urlopen(url + "/health").status != 200:
            time.sleep(0.2)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"),
                                        args=["--no-sandbox", "--headless=new", "--disable-gpu", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1280, "height": 760})
            page.goto(url + "/")
            expect(page.locator("#status")).not_to_have_text("")
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "120")
            page.fill("#input", args.question)
            page.press("#input", "Enter")
            page.wait_for_selector("#send:not([hidden])", timeout=120_000)
            page.evaluate("document.getElementById('side').scrollTop = 0")
            page.screenshot(path=args.output)
            browser.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
