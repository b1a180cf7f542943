"""Decode speed and KV cache bytes per -ctk/-ctv type (f32, f16, q8_0) on one model, in one process, interleaved.

    python benchmarks/kv_cache_bench.py                       # the bundled model, depths 512 and 4096
    python benchmarks/kv_cache_bench.py -m model.gguf -d 4096 --rounds 9 -n 32 -t 2

One C runner per type (each its own KV cache), each filled with the same prompt tokens to the depth. A round
times -n decode steps from the depth on every runner (then truncates back), the runners' order rotating between
rounds, so each type sees the same load on a shared host; tok/s is the median over the rounds. f32 is the
baseline: the ratios are tok/s / f32's. KV bytes are the whole cache (all layers, K and V) for -c = depth + n.
"""
from __future__ import annotations

import argparse
import statistics
import time

import powerinfer
from powerinfer import kernels
from powerinfer.runtime.runner import make_runner

TYPES = ("f32", "f16", "q8_0")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("-d", "--depth", type=int, action="append", help="context depth (repeatable; default 512, 4096)")
    ap.add_argument("-n", type=int, default=32, help="decode steps per round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("-t", "--threads", type=int, default=2)
    args = ap.parse_args()
    llm = powerinfer.load(args.model, n_ctx=16, sparsity="off")
    loaded, tok = llm.loaded, llm.tokenizer
    text = " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(2000))
    print(f"model {llm.settings.model or 'bundled'}, ISA {kernels.isa()}, {args.threads} threads, "
          f"{args.n} decode steps x {args.rounds} rounds, interleaved")
    for depth in args.depth or [512, 4096]:
        ids = tok.encode(text)[:depth]
        runners = {}
        for t in TYPES:
            r = make_runner(loaded, depth + args.n, args.threads, cache_types=(t, t))
            r.eval(ids)
            runners[t] = r
        times = {t: [] for t in TYPES}
        for rnd in range(args.rounds):
            order = TYPES[rnd % 3:] + TYPES[:rnd % 3]
            for t in order:
                r, nxt = runners[t], ids[-1]
                r.truncate(depth)
                t0 = time.perf_counter()
                for _ in range(args.n):
                    nxt = int(r.eval([nxt]).argmax())
                times[t].append(time.perf_counter() - t0)
        base = args.n / statistics.median(times["f32"])
        print(f"\ndepth {depth}:  type  KV MiB   tok/s (median)  vs f32")
        for t in TYPES:
            ts = args.n / statistics.median(times[t])
            print(f"{'':10}{t:>5} {runners[t].kv.nbytes / 2**20:7.1f} {ts:10.1f} {ts / base:14.3f}x")
        del runners


if __name__ == "__main__":
    main()
