"""Decode speed of the C decoder on the bundled SmolLM2 (ms/token, per-phase breakdown), against llama.cpp
in the same process when `llama_cpp` is importable.

    python benchmarks/decode_profile.py [--steps 200] [--threads 1 2] [--rounds 3] [--model PATH]

Protocol: for each thread count, each round runs `--steps` greedy-free decode steps (fixed token, positions
0..steps-1; no sampling, no Python per-token work besides the call) of our Decoder, then of llama.cpp
(`eval([tok])` loop after a reset), alternating which goes first. Reported: medians over rounds. The
breakdown comes from a separate profiled pass (timestamps cost ~1%); it is thread 0's view, so with 2
threads `barrier` is time thread 0 waited for the other.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from powerinfer import kernels  # noqa: E402
from powerinfer.formats.bundled import bundled_model_path  # noqa: E402
from powerinfer.formats.loader import load_model  # noqa: E402
from powerinfer.model.kvcache import KVCache  # noqa: E402
from powerinfer.model.rope import rope_tables  # noqa: E402

BUNDLED = str(bundled_model_path())


class Ours:
    def __init__(self, path, n_threads, n_ctx):
        loaded = load_model(path)
        self.cfg, self.w = loaded.config, loaded.weights
        c = self.cfg
        self.kv = KVCache.allocate(c.n_layer, n_ctx, c.n_head_kv * c.head_dim)
        self.cos, self.sin = rope_tables(c, n_ctx)
        self.dec = kernels.bind_decoder(c, self.w, self.kv, self.cos, self.sin, n_threads)
        self.x = torch.empty(c.d_model)
        self.logits = torch.empty(c.n_vocab)
        emb = self.w.embed_tokens
        self.emb_addr, self.emb_rb, self.emb_qt = kernels.address(np.asarray(emb.data)), emb.row_bytes, int(emb.qtype)

    def run(self, tok: int, steps: int) -> float:
        from powerinfer import _C

        x, lg, dec = self.x.data_ptr(), self.logits.data_ptr(), self.dec
        t0 = time.perf_counter()
        for pos in range(steps):
            _C.dequantize(self.emb_qt, self.emb_addr + tok * self.emb_rb, self.cfg.d_model, x)
            dec.step(x, pos, lg)
        return (time.perf_counter() - t0) / steps * 1e3


class LlamaCpp:
    def __init__(self, path, n_threads, n_ctx):
        from llama_cpp import Llama

        self.llm = Llama(model_path=path, n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads, verbose=False)

    def run(self, tok: int, steps: int) -> float:
        self.llm.reset()
        t0 = time.perf_counter()
        for _ in range(steps):
            self.llm.eval([tok])
        return (time.perf_counter() - t0) / steps * 1e3


def breakdown(ours: Ours, tok: int, steps: int) -> dict:
    ours.dec.profile(True)
    ours.dec.reset_stats()
    ours.run(tok, steps)
    s = ours.dec.stats(reset=True)
    ours.dec.profile(False)
    return {k[:-3]: v / s["steps"] / 1e6 for k, v in s.items() if k.endswith("_ns")}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=BUNDLED)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--token", type=int, default=1070)
    ap.add_argument("--no-llama", action="store_true")
    args = ap.parse_args()
    n_ctx = max(512, args.steps + 8)
    try:
        if args.no_llama:
            raise ImportError
        import llama_cpp  # noqa: F401
        have_llama = True
    except ImportError:
        have_llama = False
    print(f"isa={kernels.isa()}  model={Path(args.model).name}  steps={args.steps}  rounds={args.rounds}"
          f"  llama.cpp={'yes' if have_llama else 'no'}")
    rows = []
    for nt in args.threads:
        ours = Ours(args.model, nt, n_ctx)
        ref = LlamaCpp(args.model, nt, n_ctx) if have_llama else None
        ours.run(args.token, 20)  # warm-up: page in weights, wake threads
        if ref:
            ref.run(args.token, 20)
        t_ours, t_ref, ratios = [], [], []
        for r in range(args.rounds):
            order = [("ours", ours), ("ref", ref)] if r % 2 == 0 else [("ref", ref), ("ours", ours)]
            got = {}
            for name, eng in order:
                if eng is not None:
                    got[name] = eng.run(args.token, args.steps)
            t_ours.append(got["ours"])
            if ref:
                t_ref.append(got["ref"])
                ratios.append(got["ref"] / got["ours"])
        bd = breakdown(ours, args.token, args.steps)
        rows.append((nt, statistics.median(t_ours), statistics.median(t_ref) if ref else None,
                     statistics.median(ratios) if ref else None, bd, (min(t_ours), max(t_ours)),
                     (min(t_ref), max(t_ref)) if ref else None))
        del ours, ref
    print(f"\n{'threads':>7} {'ours ms/tok':>12} {'(min-max)':>13} {'llama.cpp':>10} {'(min-max)':>13} {'speed-up':>9}")
    for nt, a, b, r, _, ra, rb in rows:
        print(f"{nt:>7} {a:>12.3f} {ra[0]:>6.2f}-{ra[1]:<6.2f} {'-' if b is None else format(b, '.3f'):>10} "
              f"{'' if rb is None else format(rb[0], '6.2f') + '-' + format(rb[1], '<6.2f'):>13} "
              f"{'-' if r is None else format(r, '.2f') + 'x':>9}")
    print("\nper-token breakdown (ms, thread 0, profiled pass):")
    keys = list(rows[0][4].keys())
    print(f"{'threads':>7} " + " ".join(f"{k:>10}" for k in keys))
    for nt, _, _, _, bd, _, _ in rows:
        print(f"{nt:>7} " + " ".join(f"{bd[k]:>10.3f}" for k in keys))


if __name__ == "__main__":
    main()
