#!/usr/bin/env python
"""The GPU check of the hybrid tier (one short run on a machine with one GPU, no network, under 8 minutes):

  1. the hybrid parity tests with the fast tier on that device (pytest tests/runtime/test_hybrid.py --hot-device);
  2. a decode table on the 7B-shaped ReLU Q4_0 model of benchmarks/make_synthetic.py (90 % of FFN neurons
     inactive, exact ReLU skipping everywhere): CPU only (the C decoder), hybrid with 25 %, 50 % and 100 % of
     every layer's FFN neurons hot (the rest of the budget: the dense parts, f16), and everything on the GPU (the
     torch model in f16, dense FFN). Per token: total ms, and the hybrid's split into the fast tier's FFN ops,
     the CPU tier's C calls, the copies across the boundary, and the rest (attention, head and Python on the
     fast tier's side). On CUDA the fast-tier columns time the queueing of asynchronous kernels; their run time
     shows up where the host waits for them (the copy to the host, the logits).

    python benchmarks/gpu_check.py                        # GPU machine: makes /tmp/synth-7b-relu-q4_0.gguf if absent
    python benchmarks/gpu_check.py --model relu7b.gguf -n 32
    python benchmarks/gpu_check.py --dry-run              # here / CI: fast tier on the CPU, a tiny model

Output: the pytest summary line, then one markdown table (columns: config, hot %, tok/s, ms/token, fast FFN ms,
CPU ms, copies ms, rest ms; `-` where a runner has no such part), then `total: N s`.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _decode(runner, n: int) -> tuple[float, dict | None]:
    """tok/s of n greedy decode steps after a 4-token prompt, and the runner's per-tier split of those steps."""
    runner.truncate(0)
    logits = runner.eval([1, 2, 3, 4])
    if hasattr(runner, "reset_ffn_stats"):
        runner.reset_ffn_stats()
    t0 = time.perf_counter()
    for _ in range(n):
        logits = runner.eval([int(logits.argmax())])
    dt = time.perf_counter() - t0
    return n / dt, (runner.tier_stats() if hasattr(runner, "tier_stats") else None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a ReLU GGUF (default: make the 7B-shaped synthetic, or a tiny one with --dry-run)")
    ap.add_argument("--hot-device", default=None, help="fast-tier device (default: cuda; cpu with --dry-run)")
    ap.add_argument("--dry-run", action="store_true", help="fast tier on the CPU and a tiny model (CI)")
    ap.add_argument("-n", type=int, default=None, help="decode steps per config (default: 16; 4 with --dry-run)")
    ap.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    ap.add_argument("--skip-tests", action="store_true", help="only the table")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    device = args.hot_device or ("cpu" if args.dry_run else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --dry-run (or --hot-device cpu)", file=sys.stderr)
        return 2
    n = args.n or (4 if args.dry_run else 16)

    if not args.skip_tests:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            str(ROOT / "tests/runtime/test_hybrid.py"), f"--hot-device={device}"],
                           cwd=ROOT, capture_output=True, text=True)
        print(f"hybrid parity tests (--hot-device {device}): {r.stdout.strip().splitlines()[-1]}")
        if r.returncode:
            print(r.stdout[-3000:], file=sys.stderr)

    model = args.model
    if model is None:
        model = str(Path(tempfile.gettempdir()) / ("synth-tiny-relu.gguf" if args.dry_run else
                                                   "synth-7b-relu-q4_0.gguf"))
        if not Path(model).exists():
            shape = ["--shape", "custom", "--d-model", "256", "--n-ff", "1024", "--n-layer", "4", "--vocab", "4096"] \
                if args.dry_run else ["--shape", "7b"]
            subprocess.run([sys.executable, str(ROOT / "benchmarks/make_synthetic.py"), *shape, "--type", "Q4_0",
                            "--activation", "relu", "--sparsity", "0.9", "-o", model], check=True,
                           stdout=subprocess.DEVNULL)

    from powerinfer.core.sparse_spec import SparseSpec
    from powerinfer.formats.loader import load_model
    from powerinfer.prepare.solve import solve_hot_sets
    from powerinfer.runtime.placement import GIB, dense_parts, neuron_bytes
    from powerinfer.runtime.runner import make_runner
    from powerinfer.settings import PlacementSettings, default_threads

    loaded = load_model(model)
    cfg = loaded.config
    threads = args.threads or default_threads()
    n_ctx = 64
    relu = SparseSpec.uniform(cfg.n_layer, method="relu")
    vb = 2 if device.startswith("cuda") else 4
    dense = sum(dense_parts(loaded, n_ctx, vb).values())
    per = neuron_bytes(loaded, vb)
    rows = []

    def row(name, hot, runner, spec):
        runner.set_sparse(spec)
        tps, tiers = _decode(runner, n)
        t = tiers or {}
        cell = lambda k: f"{t[k]:.2f}" if k in t else "-"  # noqa: E731
        rows.append(f"| {name} | {hot} | {tps:.2f} | {1e3 / tps:.2f} | {cell('fast_ffn_ms')} | {cell('cpu_ms')} | "
                    f"{cell('copies_ms')} | {cell('fast_rest_ms')} |")
        del runner

    row("CPU only (C decoder)", "0", make_runner(loaded, n_ctx, threads), relu)
    for frac in (0.25, 0.5, 1.0):
        budget = (dense + sum(int(frac * cfg.n_ff) * b for b in per)) / GIB
        s = PlacementSettings(vram_budget=budget, hot_device=device, reset_gpu_index=True)
        r = make_runner(loaded, n_ctx, threads, placement=s, solve=solve_hot_sets)
        hot = sum(len(h) for h in r.plan.hot) / (cfg.n_layer * cfg.n_ff)
        row(f"hybrid, {frac:.0%} hot", f"{hot:.0%}", r, relu)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    gpu = make_runner(loaded, n_ctx, threads, compute="torch", device=device)
    if device.startswith("cuda"):
        gpu = type(gpu)(loaded, n_ctx, threads, device=device, dtype=torch.float16)
    row(f"all on {device} (torch, dense FFN)", "100", gpu, None)

    print(f"\n{Path(model).name}: {cfg.n_layer} layers, d {cfg.d_model}, n_ff {cfg.n_ff}; fast tier {device}, "
          f"{threads} CPU threads, {n} decode steps each\n")
    print("| config | hot % | tok/s | ms/token | fast FFN ms | CPU ms | copies ms | rest ms |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\ntotal: {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
