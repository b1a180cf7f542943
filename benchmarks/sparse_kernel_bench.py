"""Neuron-sparse kernels against our dense path and the machine's DRAM bandwidth, weights streaming from DRAM.

    python benchmarks/sparse_kernel_bench.py [--shape 7b|smollm2] [--sparsity 0.5 0.9 0.99] [--threads 2 1]
                                             [--formats F32 F16 BF16 Q8_0 Q4_0 Q4_1] [--repeats 5]

Per format, at the layer shape (7B: 11008 neurons x d_model 4096):
  dense   our dense matvec of the whole matrix (packed VNNI layout for block formats, GGUF rows otherwise):
          what one of up / gate / down costs without sparsity;
  gather  row-sparse dot of the k = (1-s) * n_ff active neurons' rows (gate/up of the active neurons);
  axpy    neuron-major axpy over the same k rows of down_t (the down projection of the active neurons).
GB/s = bytes of the rows touched / time; "%DRAM" divides by the read bandwidth measured in the same run (an
AVX-512 sum over 1 GiB with the same thread count). "x dense" = dense time / sparse time. One table per thread
count: with every core of the machine (the default's first), the kernels against the machine's read bandwidth;
with one, a core's share (one core does not saturate DRAM, and on an SMT pair two threads share one core's units).
Cold: every call reads another copy of the weights (copies total >= 512 MiB, 16 random sorted index sets), so
nothing is reused from the 32 MiB L3. Each number is the median of --repeats interleaved runs.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from powerinfer import _C, kernels  # noqa: E402

SHAPES = {"7b": (11008, 4096), "smollm2": (1536, 576)}
BLOCK_BYTES = {Q.Q4_0: 18, Q.Q4_1: 20, Q.Q8_0: 34}
COLD_BYTES = 512 << 20


def random_weights(qtype: Q, rows: int, cols: int, rng) -> np.ndarray:
    """Random bytes in qtype's layout with sane f16 scales (speed does not depend on the values)."""
    if qtype in BLOCK_BYTES:
        nb = cols // 32
        raw = rng.integers(0, 256, size=(rows, nb, BLOCK_BYTES[qtype]), dtype=np.uint8)
        raw[..., :2] = np.full((rows, nb, 1), 0.01, np.float16).view(np.uint8)
        if qtype == Q.Q4_1:
            raw[..., 2:4] = np.full((rows, nb, 1), -0.08, np.float16).view(np.uint8)
        return raw.reshape(rows, -1)
    w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    if qtype == Q.F32:
        return w
    if qtype == Q.F16:
        return w.astype(np.float16)
    return (w.view(np.uint32) >> 16).astype(np.uint16)


def copies(qtype, rows, cols, rng):
    first = random_weights(qtype, rows, cols, rng)
    n = max(2, -(-COLD_BYTES // first.nbytes))
    return [first] + [first.copy() for _ in range(n - 1)]


def addrs(arrays):
    return tuple(kernels.address(a) for a in arrays)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=list(SHAPES), default="7b")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.9, 0.99])
    p.add_argument("--threads", type=int, nargs="+", default=[2, 1], help="one table per thread count")
    p.add_argument("--formats", nargs="+", default=["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    for threads in args.threads:
        table(args, threads)
        print()
    return 0


def table(args, threads: int) -> None:
    n_ff, d = SHAPES[args.shape]
    rng = np.random.default_rng(0)
    bw = kernels.read_bandwidth(threads, repeats=args.repeats)
    print(f"shape {args.shape}: {n_ff} neurons x d_model {d}; {threads} thread(s); ISA {kernels.isa()}; "
          f"DRAM read bandwidth {bw / 1e9:.1f} GB/s (median of {args.repeats})\n")
    print("| format | s | dense us | gather us | gather GB/s | %DRAM | x dense | axpy us | axpy GB/s | %DRAM | x dense |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    x = torch.randn(d)
    h = torch.randn(n_ff)
    for name in args.formats:
        qtype = Q[name]
        rows_mat = copies(qtype, n_ff, d, rng)   # up/gate rows and down_t rows: [n_ff, d]
        dense_mat = copies(qtype, d, n_ff, rng)  # down as stored by GGUF: [d, n_ff] (same bytes as up)
        row_bytes = rows_mat[0].nbytes // n_ff
        iters = 2 * len(rows_mat)
        idx_sets = {s: [torch.from_numpy(np.sort(rng.choice(n_ff, max(1, round(n_ff * (1 - s))), replace=False))
                                         .astype(np.int32)) for _ in range(16)] for s in args.sparsity}
        times = {("dense",): []}
        for s in args.sparsity:
            times[("gather", s)], times[("axpy", s)] = [], []
        for _ in range(args.repeats):  # interleaved: every kernel once per repeat
            times[("dense",)].append(_C.bench_sparse(0, int(qtype), addrs(dense_mat), d, n_ff, (), 0, h.data_ptr(),
                                                     threads, iters))
            for s in args.sparsity:
                ids = tuple(i.data_ptr() for i in idx_sets[s])
                k = idx_sets[s][0].numel()
                times[("gather", s)].append(_C.bench_sparse(1, int(qtype), addrs(rows_mat), n_ff, d, ids, k,
                                                            x.data_ptr(), threads, iters))
                times[("axpy", s)].append(_C.bench_sparse(2, int(qtype), addrs(rows_mat), n_ff, d, ids, k,
                                                          h.data_ptr(), threads, iters))
        dense = statistics.median(times[("dense",)])
        for s in args.sparsity:
            k = idx_sets[s][0].numel()
            cells = [name, f"{s:g}", f"{dense / 1e3:.0f}"]
            for kind in ("gather", "axpy"):
                t = statistics.median(times[(kind, s)])
                gbs = k * row_bytes / t  # bytes per ns = GB/s
                cells += [f"{t / 1e3:.1f}", f"{gbs:.1f}", f"{gbs * 1e9 / bw:.0%}", f"{dense / t:.1f}"]
            print("| " + " | ".join(cells) + " |", flush=True)
        del rows_mat, dense_mat


if __name__ == "__main__":
    raise SystemExit(main())
