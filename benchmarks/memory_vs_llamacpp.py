"""Peak memory of powerinfer and llama.cpp on the same GGUF and settings, each engine in a process of its own.

Needs the `bench` extra (llama-cpp-python). Example (7B-shaped synthetic, a 4,096 context with 3,000 of its
positions written: every KV page up to there is touched):

    python benchmarks/memory_vs_llamacpp.py -m 7b-q4_0.gguf -c 4096 --prompt-tokens 2900 -n 100 -t 2

Each child loads the model, reports its peak RSS (VmHWM) after loading, prefills the prompt (the same token ids
for both engines), decodes -n greedy steps, and reports its peak RSS again (VmHWM is the figure `/usr/bin/time
-v` prints as "Maximum resident set size"). Ratios are powerinfer / llama.cpp from the same run.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _prompt(n_vocab: int, n: int) -> list[int]:
    # Fixed, spread-out ids (no BOS/EOS games): both engines see exactly the same tokens.
    return [(1000 + 7919 * i) % (n_vocab - 1000) + 500 for i in range(n)]


def child(args) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from compare_llamacpp import LlamaCpp, Ours

    t0 = time.perf_counter()
    if args.child == "llama.cpp":
        eng = LlamaCpp(args.model, args.threads, args.ctx_size)
        n_vocab = eng.n_vocab
    else:
        eng = Ours(args.model, args.threads, args.ctx_size)
        n_vocab = eng.llm.runner.config.n_vocab
    out = {"load_s": time.perf_counter() - t0, "load_hwm_mib": _hwm_mib()}
    ids = _prompt(n_vocab, args.prompt_tokens)
    t1 = time.perf_counter()
    logits = eng.prefill(ids)
    t2 = time.perf_counter()
    for _ in range(args.n_predict):
        logits = eng.step(int(np.argmax(np.asarray(logits))))
    t3 = time.perf_counter()
    out.update(prefill_tok_s=len(ids) / (t2 - t1), decode_tok_s=args.n_predict / max(t3 - t2, 1e-9),
               end_hwm_mib=_hwm_mib())
    print(json.dumps(out), flush=True)


def run_child(engine: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", engine, "-m", str(args.model), "-c", str(args.ctx_size),
           "-t", str(args.threads), "--prompt-tokens", str(args.prompt_tokens), "-n", str(args.n_predict)]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if p.returncode:
        raise SystemExit(f"{engine} child failed with exit code {p.returncode}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", type=Path, required=True, help="GGUF file both engines load")
    ap.add_argument("-c", "--ctx-size", type=int, default=4096, help="context both engines allocate (default 4096)")
    ap.add_argument("-t", "--threads", type=int, default=2, help="threads for both engines (default 2)")
    ap.add_argument("--prompt-tokens", type=int, default=2900, help="prompt length prefilled (default 2900)")
    ap.add_argument("-n", "--n-predict", type=int, default=100, help="greedy decode steps after it (default 100)")
    ap.add_argument("--child", choices=("powerinfer", "llama.cpp"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    rows = {}
    for engine in ("powerinfer", "llama.cpp"):
        rows[engine] = run_child(engine, args)
        print(engine, json.dumps(rows[engine]), file=sys.stderr, flush=True)
    ours, ref = rows["powerinfer"], rows["llama.cpp"]
    print(f"model {args.model.name}, -c {args.ctx_size}, -t {args.threads}, {args.prompt_tokens} prompt tokens + "
          f"{args.n_predict} decoded")
    print("| engine | peak RSS after load (MiB) | peak RSS at the end (MiB) | prefill tok/s | decode tok/s |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['load_hwm_mib']:.0f} | {r['end_hwm_mib']:.0f} | {r['prefill_tok_s']:.1f} | "
              f"{r['decode_tok_s']:.2f} |")
    print(f"| ratio | {ours['load_hwm_mib'] / ref['load_hwm_mib']:.3f} | {ours['end_hwm_mib'] / ref['end_hwm_mib']:.3f} "
          f"| {ours['prefill_tok_s'] / ref['prefill_tok_s']:.2f} | {ours['decode_tok_s'] / ref['decode_tok_s']:.2f} |")


if __name__ == "__main__":
    main()
