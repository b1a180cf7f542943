"""Server overhead: decode tokens/s streamed through `powerinfer serve` to one client against `powerinfer bench`'s
tg test on the same model and settings, measured in one run; and the time to the first streamed token of a 5-token
prompt.

    python benchmarks/serve_bench.py                    # the bundled model, 128 tokens, 5 repetitions, all cores
    python benchmarks/serve_bench.py -m model.gguf -n 256 -t 2 --sparsity auto

The baseline is `powerinfer bench -p 0 -n N -r 1 --json` (N decode steps from an empty cache, wall-clock around
runner.eval), run R times, taking turns with the server's repetitions; the ratio is reported both as the ratio of the
means and as the median of per-repetition ratios (the robust one on a machine that other work also uses).

Through the server: /v1/completions, stream=true, temperature 0, ignore_eos, max_tokens N, a 5-token prompt, read by
the lightest client (http.client, `data:` lines JSON-decoded, as the chat page does) and by the official `openai`
client (whose per-chunk parsing competes for the CPU on small machines); tokens/s = (N - 1) / (arrival of the last
token - arrival of the first), so it counts decode steps only, like tg. Time to first token: from sending the
request to the arrival of the first token's chunk, each repetition with a different first prompt token so nothing
is reused from the cache. Also printed: the CPU time of the server's event loop thread per streamed token (Linux
/proc), the server's own cost beside the engine's.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.request


def _start_server(model_args: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "powerinfer", "serve", "--port", "0", *model_args],
                            stderr=subprocess.PIPE, text=True)
    url = None
    for line in proc.stderr:
        m = re.search(r"listening on (http://\S+) ", line)
        if m:
            url = m.group(1)
        if "ready" in line and url:
            break
    else:
        raise SystemExit(f"the server exited: {proc.wait()}")
    # keep draining its log so it never blocks on a full pipe
    import threading

    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    return proc, url


def _loop_cpu(pid: int) -> float:
    """CPU seconds of the server's main thread (the event loop: HTTP, SSE; the engine runs on its own thread)."""
    fields = open(f"/proc/{pid}/task/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stream_openai(client, prompt: list[int], n: int) -> tuple[float, list[float], dict | None]:
    t0 = time.perf_counter()
    arrivals, timings = [], None
    stream = client.completions.create(model="m", prompt=prompt, max_tokens=n, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            arrivals.append(time.perf_counter())
        timings = getattr(chunk, "timings", None) or timings
    return t0, arrivals, timings


def _stream_http(url: str, prompt: list[int], n: int) -> tuple[float, list[float], dict | None]:
    """The lightest client: one HTTP connection, `data:` lines JSON-decoded (what the chat page does)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port))
    body = json.dumps({"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True, "ignore_eos": True})
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    arrivals, timings = [], None
    for line in resp:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        chunk = json.loads(line[6:])
        if chunk["choices"] and chunk["choices"][0]["text"]:
            arrivals.append(time.perf_counter())
        timings = chunk.get("timings") or timings
    conn.close()
    return t0, arrivals, timings


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", help="GGUF file (default: the bundled model)")
    ap.add_argument("-n", type=int, default=128, help="tokens to generate (default: 128)")
    ap.add_argument("-r", type=int, default=5, help="repetitions (default: 5)")
    ap.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all)")
    ap.add_argument("--sparsity", default="off")
    args = ap.parse_args()
    from openai import OpenAI

    model_args = (["-m", args.model] if args.model else []) + (["-t", str(args.threads)] if args.threads else [])
    model_args += ["--sparsity", args.sparsity]
    proc, url = _start_server(model_args)
    tg_rates, n_threads = [], None
    rates = {"http": [], "openai": []}
    engine_rates, ttft = [], []
    loop_cpu = {"http": [], "openai": []}
    try:
        client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        tok = json.loads(urllib.request.urlopen(urllib.request.Request(
            url + "/tokenize", data=json.dumps({"content": "The quick brown fox jumps"}).encode(),
            headers={"Content-Type": "application/json"})).read())["tokens"]
        prompt = tok[:5]
        assert len(prompt) == 5, prompt
        _stream_http(url, prompt, 16)  # warm-up
        def bench_once():
            out = subprocess.run([sys.executable, "-m", "powerinfer", "bench", "-p", "0", "-n", str(args.n),
                                  "-r", "1", "--json", *model_args], capture_output=True, text=True, check=True)
            return json.loads(out.stdout)["results"][0]

        for i in range(args.r):
            # bench and the two clients take turns, in a rotating order, so load from elsewhere on the machine
            # and any drift fall on all three alike; ratios are taken per repetition
            runs = [("bench", None), ("http", lambda p: _stream_http(url, p, args.n)),
                    ("openai", lambda p: _stream_openai(client, p, args.n))]
            runs = runs[i % 3:] + runs[:i % 3]
            for j, (name, run) in enumerate(runs):
                if name == "bench":
                    result = bench_once()
                    tg_rates.append(result["avg_ts"])
                    n_threads = result["n_threads"]
                    continue
                p = [prompt[0] + 1 + 3 * i + j] + prompt[1:]  # a new first token: nothing reused from the cache
                cpu0 = _loop_cpu(proc.pid)
                t0, arrivals, timings = run(p)
                loop_cpu[name].append((_loop_cpu(proc.pid) - cpu0) / len(arrivals))
                if len(arrivals) < 2:
                    raise SystemExit(f"only {len(arrivals)} tokens streamed")
                rates[name].append((len(arrivals) - 1) / (arrivals[-1] - arrivals[0]))
                if name == "http":
                    ttft.append(arrivals[0] - t0)
                    engine_rates.append(timings["predicted_per_second"])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    base = statistics.mean(tg_rates)
    sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
    print(f"model: {args.model or 'bundled SmolLM2-135M-Instruct Q4_1'}, threads {n_threads}, sparsity "
          f"{args.sparsity}, {os.cpu_count()} CPUs, {args.r} rotating repetitions of {args.n} tokens")
    print(f"powerinfer bench -p 0 -n {args.n}:                      {base:8.1f} ± {sd(tg_rates):.1f} tok/s")
    for name, label in (("http", "streamed to one SSE reader (http.client)"),
                        ("openai", "streamed to the openai client")):
        r = statistics.mean(rates[name])
        ratios = [x / b for x, b in zip(rates[name], tg_rates)]
        print(f"serve, {label:<42} {r:8.1f} ± {sd(rates[name]):.1f} tok/s   ratio of means {r / base:.3f}, "
              f"median of per-repetition ratios {statistics.median(ratios):.3f}")
        print("    per repetition: " + " ".join(f"{x:.2f}" for x in ratios))
    per_token = statistics.mean(loop_cpu["http"] + loop_cpu["openai"])
    print(f"serve, event loop CPU per streamed token: {per_token * 1e3:.3f} ms (the engine thread's work excluded)")
    e = statistics.mean(engine_rates)
    print(f"serve, the engine's own rate (timings, SSE reader):     {e:8.1f} tok/s   ratio {e / base:.3f}")
    print(f"time to first streamed token, 5-token prompt: median {statistics.median(ttft) * 1e3:.1f} ms "
          f"(min {min(ttft) * 1e3:.1f}, max {max(ttft) * 1e3:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
