"""Our decode speed on the same model shape stored in different weight formats (e.g. the 7B-shaped Q4_0 and Q4_K_M
synthetics), every file loaded in one process and timed in interleaved rounds: medians, and the median of the
per-round ratios against the first file. No llama.cpp needed.

    python benchmarks/formats_decode.py 7b-q4_0.gguf 7b-q4_k_m.gguf [-t 2] [--rounds 9] [--n-prompt 32] [--n-gen 32]

Protocol (compare_llamacpp.py's): prefill a fixed prompt of token ids from an empty cache, then --n-gen greedy
steps (argmax in Python), dense; the files' order rotates every round, and each timed run starts after a pause
that lets the previous run's worker threads park. This host's speed drifts by tens of percent from minute to
minute, so only the ratios of one run mean anything.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_llamacpp import PAUSE_S, Ours, time_engine  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", metavar="GGUF", help="files of one model shape; ratios are to the first")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--n-prompt", type=int, default=32, help="prompt tokens (ids 1, 300, 301, ...)")
    ap.add_argument("--n-gen", type=int, default=32, help="greedy decode steps timed")
    ap.add_argument("-c", "--ctx-size", type=int, default=256)
    args = ap.parse_args(argv)
    for p in args.models:
        if not Path(p).is_file():
            ap.error(f"no such file: {p}")
    if args.rounds < 1 or args.n_gen < 2 or args.n_prompt < 1 or args.n_prompt + args.n_gen > args.ctx_size:
        ap.error("need --rounds >= 1, --n-gen >= 2, --n-prompt >= 1 and --n-prompt + --n-gen <= --ctx-size")

    from powerinfer import kernels

    print(f"isa {kernels.isa()}, {args.threads} threads", flush=True)
    names = [Path(p).name for p in args.models]
    engines = [(n, Ours(p, args.threads, args.ctx_size)) for n, p in zip(names, args.models)]
    prompt = [1] + list(range(300, 300 + args.n_prompt - 1))
    rows = []
    for r in range(args.rounds):
        order = engines[r % len(engines):] + engines[:r % len(engines)]
        res = {}
        for name, eng in order:
            time.sleep(PAUSE_S)
            res[name] = time_engine(eng, prompt, args.n_gen)[1]
        rows.append(res)
        print(f"round {r + 1}: " + " | ".join(f"{n} {res[n]:.2f}" for n in names) + " tok/s", flush=True)

    base = names[0]
    print(f"\n| file | decode tok/s (median) | median per-round ratio to {base} |\n|---|---|---|")
    for n in names:
        med = statistics.median(r[n] for r in rows)
        ratio = statistics.median(r[n] / r[base] for r in rows)
        print(f"| {n} | {med:.2f} | {ratio:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
