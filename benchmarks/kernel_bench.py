"""Kernel throughput of powerinfer._C on SmolLM2 shapes: matvec (GGUF-row vs packed layout, hot vs cold
weights), matmul (prefill) and every ISA path this CPU supports. Plain script, prints tables.

    python benchmarks/kernel_bench.py [--threads 1 2] [--isa avx512 avx2 portable] [--quick]

hot  = one matrix reused (it stays in L2/L3): the kernel's compute rate.
cold = the same shape repeated over ~96 MB (SmolLM2's bytes per token), read once per call: DRAM-bound.
Times come from `_C.bench_mm` (weights packed and activations quantized once, outside the timed loop).
For reference on the test machine (2-core Zen 4 VM): raw streaming reads reach 43-50 GB/s with one core
and ~40-48 GB/s with two, i.e. one core saturates DRAM.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from powerinfer import _C, kernels  # noqa: E402

SHAPES = {"gate/up 1536x576": (1536, 576), "down 576x1536": (576, 1536), "k/v 192x576": (192, 576),
          "head 49152x576": (49152, 576)}
COLD_BYTES = 96 << 20


def weights(qtype, rows, cols, rng):
    w = rng.standard_normal((rows, cols)).astype(np.float32) * 0.1
    if qtype == Q.F32:
        return w
    if qtype == Q.F16:
        return w.astype(np.float16)
    return quantize(w, qtype)


def bench(qtype, rows, cols, n_tok, n_threads, packed, iters, rng, cold):
    w1 = weights(qtype, rows, cols, rng)
    reps = max(1, COLD_BYTES // w1.nbytes) if cold else 1
    w = np.concatenate([w1] * reps) if reps > 1 else w1  # reps copies: each call streams reps*rows rows
    x = rng.standard_normal((n_tok, cols)).astype(np.float32)
    y = np.empty((n_tok, rows * reps), np.float32)
    ns = _C.bench_mm(int(qtype), w.ctypes.data, rows * reps, cols, x.ctypes.data, n_tok, y.ctypes.data,
                     n_threads, packed, iters)
    return ns / reps, w.nbytes / ns  # ns per matrix, GB/s


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--isa", nargs="+", default=kernels.available_isas())
    ap.add_argument("--quick", action="store_true", help="fewer iterations, Q4_1/Q8_0 only")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    formats = [Q.Q4_1, Q.Q8_0] if args.quick else [Q.Q4_1, Q.Q4_0, Q.Q8_0, Q.F16, Q.F32]
    it_hot, it_cold = (20, 3) if args.quick else (100, 5)
    isa0 = kernels.isa()
    print(f"CPU features: {', '.join(k for k, v in kernels.cpu_features().items() if v)}")
    for isa in args.isa:
        kernels.set_isa(isa)
        print(f"\n== matvec, isa={isa} (us per matrix, GB/s of weights) ==")
        print(f"{'format':>6} {'shape':>18} {'thr':>3} {'rows hot':>16} {'packed hot':>16} {'rows cold':>16} "
              f"{'packed cold':>16}")
        for qt in formats:
            for name, (r, c) in SHAPES.items():
                if name.startswith("head") and qt not in (Q.Q8_0,):
                    continue
                for nt in args.threads:
                    cells = []
                    for cold in (False, True):
                        for packed in (False, True):
                            if packed and qt in (Q.F16, Q.F32, Q.BF16):
                                cells.append("-")
                                continue
                            ns, gbs = bench(qt, r, c, 1, nt, packed, it_cold if cold else it_hot, rng, cold)
                            cells.append(f"{ns / 1e3:8.1f} {gbs:5.1f}")
                    print(f"{qt.name:>6} {name:>18} {nt:>3} " + " ".join(f"{x:>16}" for x in cells))
        print(f"\n== matmul (prefill), isa={isa}: 1536x576 weights, GMAC/s ==")
        print(f"{'format':>6} {'thr':>3} " + " ".join(f"{'T=' + str(t):>9}" for t in (1, 4, 16, 64, 256)))
        for qt in formats:
            for nt in args.threads:
                out = []
                for T in (1, 4, 16, 64, 256):
                    ns, _ = bench(qt, 1536, 576, T, nt, True, max(2, it_hot // max(1, T // 4)), rng, False)
                    out.append(f"{1536 * 576 * T / ns:9.1f}")
                print(f"{qt.name:>6} {nt:>3} " + " ".join(out))
    kernels.set_isa(isa0)


if __name__ == "__main__":
    main()
