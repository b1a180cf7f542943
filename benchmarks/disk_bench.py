#!/usr/bin/env python
"""Decoding a model that does not fit in RAM: powerinfer with --ram-budget against llama.cpp (mmap) on the same
GGUF, each from a cold page cache, in one invocation. Needs the `bench` extra (llama-cpp-python).

    python benchmarks/disk_bench.py -m /work/models/synth-48b.gguf --ram-budget 16 -n 8 --time-limit 400
    python benchmarks/disk_bench.py -m /work/models/synth-7b.gguf --vs-ram --budget-fraction 0.4 -n 16

Default mode: (a) llama.cpp (llama-cpp-python, mmap on, --no-repack so that Q4_0 weights are read from the map
instead of copied into RAM, --threads) decodes; (b) powerinfer with --ram-budget
decodes the same prompt ids; (c) a table: tok/s each and their ratio, disk bytes per token, peak RSS, major page
faults, and our own counters (disk bytes per token, neuron-cache hit rate, I/O wait per token).
--vs-ram: powerinfer at --budget-fraction of the file size against powerinfer with everything in RAM: the same
greedy tokens (compared), peak RSS against the budget, tok/s, disk bytes per token, hit rate, and the I/O bound:
disk bytes per token / the disk's read rate (measured first with O_DIRECT reads of the file).

Protocol:
  * every run is a child process (this script with --child), so its peak RSS (ru_maxrss from wait4) and page
    faults are its own; it reports /proc/self/io read_bytes after loading, after the prompt and after every
    token, as JSON lines;
  * before every child the model's pages (and the neuron-bundle file's, when there is one) are dropped from the
    page cache with posix_fadvise(DONTNEED) and what stayed resident is measured (mincore), so the disk, not
    memory left over from the previous run, serves the reads;
  * the prompt is the first --prompt-tokens ids of the eval text (our tokenizer, the same ids to both engines),
    then -n greedy decode steps; a child still running at --time-limit seconds is killed and the table says
    how many steps it made; tok/s and bytes per token count the decode steps only (not load or prompt).
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

GIB = 1 << 30


# -- page cache ---------------------------------------------------------------------------------------------

def drop_cache(path: Path) -> None:
    """posix_fadvise(DONTNEED) over the whole file (this process maps nothing of it, so every clean page goes)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_bytes(path: Path) -> int:
    """Bytes of the file in the page cache (mincore over a fresh read-only map, as fincore does)."""
    import ctypes

    size = path.stat().st_size
    if size == 0:
        return 0
    page = mmap.PAGESIZE
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap failed")
        try:
            n = -(-size // page)
            vec = (ctypes.c_ubyte * n)()
            if libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            import numpy as np

            return int((np.frombuffer(vec, np.uint8) & 1).sum()) * page
        finally:
            libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))
    finally:
        os.close(fd)


def disk_read_rate(path: Path, total: int = 512 << 20, chunk: int = 4 << 20) -> float:
    """MB/s of O_DIRECT reads of `chunk` bytes at spread-out aligned offsets of the file (the page cache cannot
    serve them): the rate the I/O bound divides by."""
    import random

    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT needs
    try:
        n = max(1, min(total, size) // chunk)
        offsets = random.Random(0).sample(range(max(1, size // chunk - 1)), min(n, max(1, size // chunk - 1)))
        t0 = time.perf_counter()
        got = 0
        for o in offsets:
            got += os.preadv(fd, [buf], o * chunk)
        return got / (time.perf_counter() - t0) / 1e6
    finally:
        buf.close()
        os.close(fd)


# -- the child: one engine, one model, JSON lines on stdout ------------------------------------------------

def _read_bytes() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def _emit(**kv) -> None:
    kv.update(t=time.perf_counter(), read_bytes=_read_bytes())
    print(json.dumps(kv), flush=True)


def child(a) -> int:
    ids = [int(t) for t in a.ids.split(",")]
    if a.child == "idle":  # the fixed overhead: the interpreter with torch and powerinfer's extension, no model
        import powerinfer  # noqa: F401
        from powerinfer import kernels  # noqa: F401

        _emit(event="loaded")
        return 0
    if a.child == "llama":
        import llama_cpp.llama_cpp as ll
        import numpy as np
        from llama_cpp import Llama

        # llama.cpp's --no-repack: on AVX2/AVX-512 CPUs it copies every Q4_0 matrix into an interleaved layout in
        # anonymous memory (the CPU_REPACK buffer) instead of reading the mmap, and a model larger than RAM then
        # fails to load ("unable to allocate CPU_REPACK buffer", 24.9 GB for the 46b synthetic). llama-cpp-python
        # does not expose the flag; its model parameters come from this function.
        default_params = ll.llama_model_default_params

        def no_repack():
            params = default_params()
            params.use_extra_bufts = False
            return params
        ll.llama_model_default_params = no_repack

        llm = Llama(model_path=a.model, n_ctx=a.ctx, n_batch=a.ctx, n_threads=a.threads, n_threads_batch=a.threads,
                    use_mmap=True, verbose=False)
        n_vocab = llm.n_vocab()

        def step(toks):
            llm.eval(toks)
            return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))))
        stats = None
    else:
        import powerinfer

        kw = dict(n_ctx=a.ctx, n_threads=a.threads)
        if a.ram_budget is not None:
            kw["ram_budget"] = a.ram_budget
        if a.predictors:
            kw["predictors"] = a.predictors
        llm = powerinfer.load(a.model, **kw)
        runner = llm.runner

        def step(toks):
            return int(runner.eval(toks).argmax())

        def stats():
            get = getattr(runner, "disk_stats", None)
            return get() if get is not None else None
    _emit(event="loaded")
    tok = step(ids)
    if stats is not None and hasattr(runner, "reset_ffn_stats"):
        runner.reset_ffn_stats()  # our counters: decode steps only
    _emit(event="prompt", tok=tok)
    for i in range(a.n):
        tok = step([tok])
        _emit(event="token", i=i, tok=tok, disk=stats() if stats is not None else None)
    return 0


# -- the parent ---------------------------------------------------------------------------------------------

@dataclass
class Run:
    name: str
    budget: float | None = None
    steps: int = 0
    tokens: list[int] = field(default_factory=list)
    tok_s: float | None = None
    disk_per_token: float | None = None
    load_s: float | None = None
    peak_rss: int = 0
    major_faults: int = 0
    resident_before: int = 0
    disk: dict | None = None
    killed: bool = False
    error: str | None = None


def run_child(name, engine, a, ids, budget=None, files=()) -> Run:
    r = Run(name, budget)
    for f in files:
        drop_cache(f)
    r.resident_before = sum(resident_bytes(f) for f in files)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", engine, "-m", str(a.model), "-n", str(a.n),
           "--ids", ",".join(map(str, ids)), "-t", str(a.threads), "--ctx", str(a.ctx)]
    if budget is not None:
        cmd += ["--ram-budget", f"{budget:.6f}"]
    if a.predictors and engine == "ours":
        cmd += ["--predictors", str(a.predictors)]
    t_start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    events, deadline = [], t_start + a.time_limit
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            proc.send_signal(signal.SIGKILL)
            r.killed = True
            break
        if not sel.select(timeout=min(left, 1.0)):
            continue
        line = proc.stdout.readline()
        if not line:
            break
        try:
            events.append(json.loads(line))
        except ValueError:
            pass
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().strip()
    r.peak_rss, r.major_faults = usage.ru_maxrss * 1024, usage.ru_majflt
    if proc.returncode != 0 and not r.killed:
        r.error = (err.splitlines() or [f"exit status {proc.returncode}"])[-1]
    by = {e["event"]: e for e in events if e["event"] != "token"}
    toks = [e for e in events if e["event"] == "token"]
    if "loaded" in by:
        r.load_s = by["loaded"]["t"] - t_start  # includes the interpreter's start
    if "prompt" in by and toks:
        p, last = by["prompt"], toks[-1]
        r.steps = len(toks)
        r.tokens = [p["tok"]] + [e["tok"] for e in toks]
        r.tok_s = r.steps / (last["t"] - p["t"])
        r.disk_per_token = (last["read_bytes"] - p["read_bytes"]) / r.steps
        r.disk = last.get("disk")
    elif "prompt" in by:
        r.tokens = [by["prompt"]["tok"]]
    return r


def _fmt_bytes(n) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f} MiB" if n < GIB else f"{n / GIB:,.2f} GiB"


def table(runs: list[Run]) -> str:
    rows = ["| run | decode steps | tok/s | disk read / token (/proc io) | ours: disk / token, hit rate, I/O wait / "
            "token | peak RSS | major faults | cached before |",
            "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        d = r.disk
        ours = "-" if not d else (f"{_fmt_bytes(d['bytes_per_token'])}, {d['hit_rate']:.3f}, "
                                  f"{d['io_wait_ms_per_token']:.1f} ms")
        steps = f"{r.steps}" + (" (killed at the time limit)" if r.killed else "") + (f" error: {r.error}" if r.error else "")
        rows.append(f"| {r.name} | {steps} | {'-' if r.tok_s is None else f'{r.tok_s:.3f}'} | "
                    f"{_fmt_bytes(r.disk_per_token)} | {ours} | {_fmt_bytes(r.peak_rss)} | {r.major_faults:,} | "
                    f"{_fmt_bytes(r.resident_before)} |")
    return "\n".join(rows)


def bundle_files(model: Path) -> list[Path]:
    """Neuron-bundle side files of a model of this name in the cache (<cache>/<fingerprint>/<name><SUFFIX>): their
    pages are dropped before every run too."""
    from powerinfer.runtime.neuron_bundles import SUFFIX
    from powerinfer.sparse.artifacts import DEFAULT_CACHE_DIR

    return [p for p in Path(DEFAULT_CACHE_DIR).expanduser().glob(f"*/{model.name}{SUFFIX}") if p.is_file()]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + error
        print(f"disk_bench.py: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv=None) -> int:
    ap = _Parser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__[__doc__.index("Default mode"):])
    ap.add_argument("-m", "--model", required=True, metavar="FILE.gguf", help="the GGUF both engines decode")
    ap.add_argument("--ram-budget", type=float, metavar="GiB", help="our --ram-budget (default mode: required)")
    ap.add_argument("--vs-ram", action="store_true", help="ours with a budget against ours all-RAM (no llama.cpp)")
    ap.add_argument("--budget-fraction", type=float, default=0.4, metavar="F",
                    help="--vs-ram: the budget as a fraction of the file size (default: 0.4)")
    ap.add_argument("--predictors", metavar="FILE", help="our activation predictors (e.g. make_synthetic's exact ones)")
    ap.add_argument("-n", type=int, default=8, metavar="N", help="greedy decode steps per run (default: 8)")
    ap.add_argument("--prompt-tokens", type=int, default=4, metavar="N", help="prompt length (default: 4)")
    ap.add_argument("-t", "--threads", type=int, default=2, metavar="N", help="threads of both engines (default: 2)")
    ap.add_argument("--ctx", type=int, default=256, metavar="N", help="context of both engines (default: 256)")
    ap.add_argument("--time-limit", type=float, default=600, metavar="S",
                    help="seconds per run, load included; a run still going is killed (default: 600)")
    ap.add_argument("--only", choices=["llama", "ours"],
                    help="default mode: run one engine only (e.g. when the disk has no room for our bundle file)")
    ap.add_argument("--out", metavar="FILE.md", help="also append the table to this file")
    ap.add_argument("--child", choices=["llama", "ours", "idle"], help=argparse.SUPPRESS)
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        try:
            return child(a)
        except Exception as e:  # one line for the parent's table (PowerInferError, llama.cpp's ValueError, ...)
            print(f"{type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
            return 1

    problems = []
    model = Path(a.model)
    if not model.is_file():
        problems.append(f"{model}: no such file")
    if not a.vs_ram and a.ram_budget is None and a.only != "llama":
        problems.append("--ram-budget is required (or --vs-ram)")
    if a.vs_ram and a.only:
        problems.append("--only is for the default mode (--vs-ram runs ours twice)")
    if a.vs_ram and a.ram_budget is not None:
        problems.append("--vs-ram sets the budget from --budget-fraction; drop --ram-budget")
    if a.ram_budget is not None and not a.ram_budget > 0:
        problems.append(f"--ram-budget must be > 0 GiB, got {a.ram_budget:g}")
    if not 0 < a.budget_fraction < 1:
        problems.append(f"--budget-fraction must be in (0, 1), got {a.budget_fraction:g}")
    if a.predictors and not Path(a.predictors).is_file():
        problems.append(f"{a.predictors}: no such predictor file")
    for flag, v in (("-n", a.n), ("--prompt-tokens", a.prompt_tokens), ("--threads", a.threads)):
        if v < 1:
            problems.append(f"{flag} must be >= 1, got {v}")
    if a.time_limit <= 0:
        problems.append(f"--time-limit must be > 0 s, got {a.time_limit:g}")
    if a.ctx < a.prompt_tokens + a.n + 1:
        problems.append(f"--ctx {a.ctx} is too small for {a.prompt_tokens} prompt tokens + {a.n} steps")
    if problems:
        ap.error("; ".join(problems))

    from powerinfer.errors import PowerInferError
    from powerinfer.formats.tokenizer import Tokenizer
    from powerinfer.textdata import pydoc_topics

    try:
        tok = Tokenizer.from_gguf_file(model)
    except (PowerInferError, ValueError, OSError) as e:
        print(f"error: {model}: not a readable GGUF model ({' '.join(str(e).split())[:200]})", file=sys.stderr)
        return 1
    ids = tok.encode(pydoc_topics("eval"), add_bos=False)[:a.prompt_tokens]
    size = model.stat().st_size
    mem = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    files = [model, *bundle_files(model)]
    print(f"model {model} ({size / GIB:.2f} GiB; RAM {mem / GIB:.2f} GiB), prompt {len(ids)} tokens, {a.n} decode "
          f"steps, {a.threads} threads, time limit {a.time_limit:g} s per run", flush=True)

    runs = []
    if a.vs_ram:
        rate = disk_read_rate(model)
        budget = a.budget_fraction * size / GIB
        print(f"disk read rate (O_DIRECT 4 MiB reads of the file): {rate:.0f} MB/s", flush=True)
        runs.append(run_child(f"powerinfer --ram-budget {budget:.3g} GiB", "ours", a, ids, budget, files))
        runs.append(run_child("powerinfer, all in RAM", "ours", a, ids, None, files))
        runs.append(run_child("fixed overhead: python, torch, powerinfer imported, no model", "idle", a, ids))
    else:
        if a.only != "ours":
            runs.append(run_child("llama.cpp (mmap, --no-repack)", "llama", a, ids, None, files))
        if a.only != "llama":
            runs.append(run_child(f"powerinfer --ram-budget {a.ram_budget:g} GiB", "ours", a, ids, a.ram_budget,
                                  files))
    text = table(runs)
    print(text)
    base, ours = (runs[1], runs[0]) if a.vs_ram else (runs[0], runs[-1])
    notes = []
    if len(runs) > 1 and base.tok_s and ours.tok_s:
        notes.append(f"tok/s ratio {ours.name} / {base.name}: {ours.tok_s / base.tok_s:.2f}x")
    if a.vs_ram:
        n = min(len(base.tokens), len(ours.tokens))
        if n:
            same = base.tokens[:n] == ours.tokens[:n]
            notes.append(f"greedy tokens: {'the same' if same else 'DIFFERENT'} over {n} tokens: {ours.tokens[:n]}")
        budget_bytes = a.budget_fraction * size
        limit = 1.1 * budget_bytes + runs[2].peak_rss
        notes.append(f"peak RSS {_fmt_bytes(ours.peak_rss)} against budget + 10% + the fixed overhead "
                     f"{_fmt_bytes(budget_bytes)} + {_fmt_bytes(0.1 * budget_bytes)} + {_fmt_bytes(runs[2].peak_rss)} = "
                     f"{_fmt_bytes(limit)}: {'within' if ours.peak_rss <= limit else 'OVER'}")
        if ours.disk_per_token:
            bound = ours.disk_per_token / (rate * 1e6)
            notes.append(f"I/O bound: {_fmt_bytes(ours.disk_per_token)} per token / {rate:.0f} MB/s = "
                         f"{bound * 1e3:.1f} ms per token ({1 / bound:.1f} tok/s at most)")
    for n in notes:
        print(n)
    if a.out:
        with open(a.out, "a") as f:
            f.write(f"\n{text}\n\n" + "".join(f"- {n}\n" for n in notes))
    failed = [r for r in runs if r.error]
    for r in failed:
        print(f"error: {r.name}: {r.error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
