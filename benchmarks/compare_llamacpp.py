"""powerinfer vs llama.cpp on the same GGUF, in one process: speed (interleaved rounds, medians, ratios)
and quality (perplexity and top-1 agreement on the same held-out tokens).

Needs the `bench` extra (llama-cpp-python). Example:

    python benchmarks/compare_llamacpp.py -t 2 --rounds 5 --out benchmarks/RESULTS.md

Protocols (chosen to match reference/baselines.md so numbers are comparable):
- speed: prompt = the first N eval-split tokens; prefill of the prompt from an empty cache, then greedy
  decode steps (argmax in Python on both sides, so per-token Python overhead is included for both).
  Engines alternate which goes first in each round; the ratio is the median of per-round ratios.
- long contexts (--depths D[,D...]): for each depth D, a prompt of the first D eval-split tokens from an empty
  cache (prefill tok/s at D), then --depth-gen greedy steps after it (decode tok/s at depth D), the same
  interleaving for --depth-rounds rounds; each decode step's reads are weights + every layer's K and V rows
  0..pos (f16 on both sides), and the table gives that byte count and the GB/s it implies.
- quality: the first `--ppl-tokens` tokens of the eval split (llama.cpp's tokenizer, no BOS), cut into
  chunks of 512, each evaluated from an empty context; NLL over the 511 next-token predictions of every
  chunk; PPL = exp(mean NLL). Top-1 agreement compares the two engines' argmax at every scored position.
  Two yardsticks for that agreement come from the same chunks: llama.cpp against itself (batched vs one token
  per call), and the model's exact math (the same weights in float64, float64 KV, no 8-bit activation
  rounding) against each engine.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from powerinfer import kernels


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


class LlamaCpp:
    def __init__(self, path, n_threads, n_ctx, logits_all=False, flash_attn=False):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_threads=n_threads,
                         n_threads_batch=n_threads, logits_all=logits_all, verbose=False, flash_attn=flash_attn)
        self.n_vocab = self.llm.n_vocab()

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False, special=False)

    def prefill(self, ids):
        self.llm.reset()
        self.llm.eval(ids)
        return self._last()

    def step(self, tok):
        self.llm.eval([tok])
        return self._last()

    def _last(self):
        return np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.n_vocab,))

    def all_logits(self, ids):
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float64)

    def stepwise_logits(self, ids):
        """The same logits computed one token per call (llama.cpp's decode path instead of its batched one)."""
        self.llm.reset()
        for t in ids:
            self.llm.eval([t])
        return np.array(self.llm.scores[: len(ids)], dtype=np.float64)


class Exact:
    """The model's exact math: the torch reference model with the same dequantized weights in float64 and a
    float64 KV cache, no 8-bit rounding of activations (which both engines apply before every quantized matmul)."""

    def __init__(self, loaded):
        from powerinfer.model.kvcache import KVCache
        from powerinfer.model.llama import Transformer

        cfg = loaded.config
        self.model = Transformer(cfg, loaded.weights, dtype=torch.float64)
        self.new_cache = lambda n: KVCache.allocate(cfg.n_layer, n, cfg.n_head_kv * cfg.head_dim,
                                                    dtype=torch.float64)

    def all_logits(self, ids):
        with torch.inference_mode():
            return self.model(torch.tensor(ids), 0, self.new_cache(len(ids))).numpy()


class LlamaCppRunner:
    """llama.cpp behind the runner API (truncate/eval) that powerinfer.measure.perplexity scores."""

    def __init__(self, ref: LlamaCpp, n_ctx: int):
        self.llm, self.n_ctx = ref.llm, n_ctx
        self.config = type("Config", (), {"n_vocab": ref.n_vocab})()

    def truncate(self, n):
        assert n == 0
        self.llm.reset()

    def eval(self, ids, all_logits=False):
        start = self.llm.n_tokens
        self.llm.eval(ids)
        rows = torch.from_numpy(np.array(self.llm.scores[start:start + len(ids)], dtype=np.float32))
        return rows if all_logits else rows[-1]


class Ours:
    """powerinfer on one model; `sparse` (per-layer thresholds from prepare.sparsity) is switched on for the
    prefill of each timed run and off otherwise, so dense and sparse share one loaded model."""

    def __init__(self, path, n_threads, n_ctx, sparse=None):
        import powerinfer

        self.llm = powerinfer.load(path, n_threads=n_threads, n_ctx=n_ctx)
        self.runner = self.llm.runner
        self.sparse = sparse

    def mode(self, sparse):
        other = Ours.__new__(Ours)
        other.llm, other.runner, other.sparse = self.llm, self.runner, sparse
        return other

    def prefill(self, ids):
        if self.runner.spec != self.sparse:
            self.runner.set_sparse(self.sparse)
        self.runner.truncate(0)
        return self.runner.eval(ids)

    def step(self, tok):
        return self.runner.eval([tok])

    def all_logits(self, ids):
        self.runner.truncate(0)
        return self.runner.eval(ids, all_logits=True).astype(np.float64)


def time_engine(engine, prompt, n_gen):
    t0 = time.perf_counter()
    logits = engine.prefill(prompt)
    t1 = time.perf_counter()
    tok = int(np.argmax(logits))
    out = [tok]
    for _ in range(n_gen - 1):
        tok = int(np.argmax(engine.step(tok)))
        out.append(tok)
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), (n_gen - 1) / (t2 - t1), out


# Pause before every timed run so the previous engine's worker threads have parked (llama.cpp's and ours spin
# for a while after a call; a run that starts while they spin loses a core to them).
PAUSE_S = 0.5


def speed_rounds(ours, ref, prompt, n_gen, rounds, sparse=None):
    """Interleaved rounds (the engines' order rotates every round); medians and median per-round ratios against
    llama.cpp. With `sparse` thresholds, powerinfer's sparse decode is a third engine in the same rounds."""
    engines = [("ours", ours.mode(None)), ("llama.cpp", ref)]
    if sparse is not None:
        engines.append(("ours sparse", ours.mode(sparse)))
    rows, sparsity, ffn_stats = [], [], None
    for r in range(rounds):
        order = engines[r % len(engines):] + engines[:r % len(engines)]
        res = {}
        for name, eng in order:
            time.sleep(PAUSE_S)
            res[name] = time_engine(eng, prompt, n_gen)
            if name == "ours sparse":
                sparsity.append(eng.runner.ffn_sparsity())
                ffn_stats = eng.runner.ffn_stats()
        rows.append(res)
        print(f"round {r + 1}: " + " | ".join(f"{n} pp {res[n][0]:.1f} tg {res[n][1]:.1f}" for n, _ in engines)
              + " tok/s", file=sys.stderr)

    def summary(name, i):
        return (statistics.median(r[name][i] for r in rows), statistics.median(r["llama.cpp"][i] for r in rows),
                statistics.median(r[name][i] / r["llama.cpp"][i] for r in rows))

    a, b = rows[-1]["ours"][2], rows[-1]["llama.cpp"][2]
    out = dict(pp=summary("ours", 0), tg=summary("ours", 1), n_prompt=len(prompt), n_gen=n_gen,
               same=sum(x == y for x, y in zip(a, b)),
               first_div=next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), n_gen))
    if sparse is not None:
        out["tg_sparse"] = summary("ours sparse", 1)
        out["tg_sparse_vs_dense"] = statistics.median(r["ours sparse"][1] / r["ours"][1] for r in rows)
        out["sparsity"] = statistics.median(sparsity)
        if ffn_stats is not None:
            out["bytes"] = byte_bounds(ours.runner.weights, ffn_stats)
    ours.runner.set_sparse(None)
    return out


def byte_bounds(weights, ffn_stats):
    """Weight bytes per decode step, dense and as the sparse decoder read them, and what they bound: decode
    streams its weights from DRAM, so at equal bandwidth the sparse decoder is at most dense/sparse times faster
    than the dense one. `predicted` is the read had the gate rows been skipped too (a predictor choosing the
    same neurons at no cost), the bound for any skipping of this FFN that leaves attention dense."""
    from powerinfer.measure.bench import bytes_per_token

    dense = bytes_per_token(weights)
    ffn_dense, ffn_sparse = ffn_stats["ffn_dense_bytes"], ffn_stats["ffn_bytes_per_token"]
    return dict(dense=dense, sparse=dense - ffn_dense + ffn_sparse,
                predicted=dense - ffn_dense * ffn_stats["sparsity"], ffn_dense=ffn_dense, ffn_sparse=ffn_sparse)


def depth_rounds(path, tokens, depths, n_gen, rounds, n_threads, flash_attn=False):
    """Prefill of the first D tokens and decode after them, for each depth D, on engines sized for the largest;
    returns [(D, speed_rounds result, bytes one decode step reads on average)]."""
    from powerinfer.measure.bench import bytes_per_token

    n_ctx = max(depths) + n_gen + 8
    ref = LlamaCpp(path, n_threads, n_ctx=n_ctx, flash_attn=flash_attn)
    ours = Ours(str(path), n_threads, n_ctx=n_ctx)
    cfg, kv = ours.runner.config, ours.runner.kv
    kv_row = kv.k[0].shape[1] * kv.k[0].element_size()  # every layer's K and V rows 0..pos, f16 on both sides
    out = []
    for d in depths:
        print(f"depth {d}:", file=sys.stderr)
        sp = speed_rounds(ours, ref, tokens[:d], n_gen, rounds)
        step_bytes = bytes_per_token(ours.runner.weights) + cfg.n_layer * 2 * kv_row * (d + n_gen / 2)
        out.append((d, sp, step_bytes))
    del ref, ours
    return out


def log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def quality(ours, ref, tokens, exact=None, chunk=512):
    """Perplexity of both engines on the same chunks, their top-1 agreement, and as yardsticks for that
    agreement: llama.cpp against itself (its batched logits vs its one-token-per-call logits, which differ only
    in the order of floating-point sums and where those flip an activation's 8-bit rounding), and with `exact`,
    the model's exact math against each engine."""
    acc = dict.fromkeys(("nll_a", "nll_b", "agree", "self_agree", "kl", "self_kl", "exact_ref", "exact_ours"), 0.0)
    n = 0
    for start in range(0, len(tokens) - chunk + 1, chunk):
        ids = tokens[start:start + chunk]
        la, lb = log_softmax(ours.all_logits(ids)[:-1]), log_softmax(ref.all_logits(ids)[:-1])
        ls = log_softmax(ref.stepwise_logits(ids)[:-1])
        tgt = np.array(ids[1:])
        rows = np.arange(len(tgt))
        top_a, top_b = la.argmax(-1), lb.argmax(-1)
        acc["nll_a"] -= la[rows, tgt].sum()
        acc["nll_b"] -= lb[rows, tgt].sum()
        acc["agree"] += int((top_a == top_b).sum())
        acc["self_agree"] += int((ls.argmax(-1) == top_b).sum())
        acc["self_kl"] += float((np.exp(lb) * (lb - ls)).sum())
        acc["kl"] += float((np.exp(lb) * (lb - la)).sum())
        if exact is not None:
            top_x = exact.all_logits(ids)[:-1].argmax(-1)
            acc["exact_ref"] += int((top_x == top_b).sum())
            acc["exact_ours"] += int((top_x == top_a).sum())
        n += len(tgt)
        print(f"  chunk {start // chunk + 1}: ppl ours {np.exp(acc['nll_a'] / n):.4f} "
              f"llama.cpp {np.exp(acc['nll_b'] / n):.4f}", file=sys.stderr)
    out = dict(n=n, ppl_ours=float(np.exp(acc["nll_a"] / n)), ppl_ref=float(np.exp(acc["nll_b"] / n)),
               top1=acc["agree"] / n, top1_self=acc["self_agree"] / n, kl=acc["kl"] / n, kl_self=acc["self_kl"] / n)
    if exact is not None:
        out.update(top1_exact_ref=acc["exact_ref"] / n, top1_exact_ours=acc["exact_ours"] / n)
    return out


def main(argv=None):
    from powerinfer.formats.bundled import bundled_model_path
    from powerinfer.textdata import describe, pydoc_topics

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", help="GGUF file (default: the bundled SmolLM2)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n-prompt", type=int, default=128)
    ap.add_argument("--n-gen", type=int, default=128)
    ap.add_argument("--ppl-tokens", type=int, default=4096, help="0 skips the quality comparison")
    ap.add_argument("--depths", default="", metavar="D[,D...]",
                    help="also time prefill of D prompt tokens and decode at depth D for each D (e.g. "
                         "4096,8192,16384,32768)")
    ap.add_argument("--depth-gen", type=int, default=32, help="decode steps timed at each depth")
    ap.add_argument("--depth-rounds", type=int, default=1, help="interleaved rounds at each depth")
    ap.add_argument("--flash-attn", action="store_true",
                    help="run llama.cpp with flash attention (llama-cpp-python's default is off)")
    ap.add_argument("--also", action="append", metavar="GGUF",
                    help="another model to time the same way (speed only), e.g. a synthetic 7B file; repeatable")
    ap.add_argument("--also-prompt", type=int, default=32, help="prompt tokens for --also models")
    ap.add_argument("--also-gen", type=int, default=16, help="generated tokens for --also models")
    ap.add_argument("--sparsity", default="off", metavar="auto|off|S",
                    help="also time powerinfer's sparse decode at this setting (as `powerinfer run --sparsity`) in "
                         "the same rounds, and measure its perplexity cost; --also models use `auto` (exact "
                         "skipping on ReLU models) when this is not off")
    ap.add_argument("--sparse-method", default="hu", help="threshold criterion for SwiGLU models (default: hu)")
    ap.add_argument("--out", help="write a markdown report here")
    args = ap.parse_args(argv)
    path = Path(args.model) if args.model else bundled_model_path()
    text = pydoc_topics("eval")
    torch.set_num_threads(args.threads)

    ref = LlamaCpp(path, args.threads, n_ctx=1024, flash_attn=args.flash_attn)
    ours = Ours(str(path), args.threads, n_ctx=1024)
    from powerinfer.runtime.sparsity import resolve_sparsity

    sparse, sparse_desc = resolve_sparsity(ours.llm.loaded, args.sparsity, args.sparse_method)
    tokens = ref.tokenize(text)
    prompt = tokens[: args.n_prompt]
    # decode speed on this VM follows the DRAM bandwidth, which moves between runs when the host is shared
    bandwidth = kernels.read_bandwidth(args.threads) / 1e9
    speed = speed_rounds(ours, ref, prompt, args.n_gen, args.rounds, sparse)
    extra = []
    for other in args.also or []:
        o_ref = LlamaCpp(other, args.threads, n_ctx=256)
        o_ours = Ours(other, args.threads, n_ctx=256)
        o_sparse, o_desc = resolve_sparsity(o_ours.llm.loaded, "auto" if args.sparsity != "off" else "off")
        sp = speed_rounds(o_ours, o_ref, o_ref.tokenize(text)[: args.also_prompt], args.also_gen, args.rounds,
                          o_sparse)
        sp["desc"] = o_desc
        extra.append((Path(other), sp))
        del o_ref, o_ours

    depths = [int(d) for d in args.depths.split(",") if d.strip() and int(d) > 0]
    if depths and max(depths) + args.depth_gen > len(tokens):
        raise SystemExit(f"the eval text has {len(tokens)} tokens, fewer than depth {max(depths)} + {args.depth_gen}")
    deep = depth_rounds(path, tokens, depths, args.depth_gen, args.depth_rounds, args.threads, args.flash_attn) \
        if depths else []

    breakdown = None
    dec = getattr(ours.runner, "decoder", None)
    if dec is not None:
        from powerinfer.runtime.sampling import make_sampler

        dec.profile(True)
        ours.prefill(prompt)
        dec.stats(reset=True)
        greedy, default = make_sampler(temp=0), make_sampler(seed=0)
        t_sample = 0.0
        t0 = time.perf_counter()
        tok = 0
        for _ in range(args.n_gen):
            logits = ours.step(tok)
            ts = time.perf_counter()
            tok = greedy(logits)
            default(logits)  # llama.cpp's default chain (top-k 40, top-p, min-p, temp), timed, result unused
            t_sample += time.perf_counter() - ts
        wall = (time.perf_counter() - t0 - t_sample) / args.n_gen
        breakdown = (dec.stats(), wall, t_sample / args.n_gen)
        dec.profile(False)

    q = None
    if args.ppl_tokens:
        from powerinfer.measure.bench import model_size
        from powerinfer.measure.perplexity import perplexity

        ref_q = LlamaCpp(path, args.threads, n_ctx=512, logits_all=True)
        # float64 weights take 8 bytes a parameter (SmolLM2: 1.1 GB); skipped when they would fill half the RAM
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        exact = Exact(ours.llm.loaded) if 8 * model_size(ours.llm.loaded.weights)[1] < ram / 2 else None
        q = quality(ours, ref_q, tokens[: args.ppl_tokens], exact)
        # llama-perplexity's own convention (second half of each 512-chunk scored), same tokens, both engines
        chunks = args.ppl_tokens // 512
        q["lp_ours"] = perplexity(ours.runner, tokens, 512, max_chunks=chunks).ppl
        if sparse is not None:
            ours.runner.set_sparse(sparse)
            q["lp_sparse"] = perplexity(ours.runner, tokens, 512, max_chunks=chunks).ppl
            q["sparsity"] = ours.runner.ffn_sparsity()
            ours.runner.set_sparse(None)
        q["lp_ref"] = perplexity(LlamaCppRunner(ref_q, 512), tokens, 512, max_chunks=chunks).ppl
        q["lp_chunks"] = chunks

    lines = [
        "# powerinfer vs llama.cpp",
        "",
        f"Machine: {_cpu_name()} (our kernels: {kernels.isa()}), {args.threads} threads, "
        f"Python {platform.python_version()}, "
        f"torch {torch.__version__}, llama-cpp-python {__import__('llama_cpp').__version__}.",
        f"Model: `{path.name}`. Command: `python benchmarks/compare_llamacpp.py {' '.join(argv or sys.argv[1:])}`",
        f"Text: pydoc_data.topics eval split ({describe(text)}), llama.cpp tokens. llama.cpp flash attention: "
        f"{'on' if args.flash_attn else 'off (llama-cpp-python default)'}.",
        "",
        f"## Speed, {args.threads} threads ({args.rounds} interleaved rounds, medians)",
        "",
        f"DRAM read bandwidth in this run ({args.threads} threads, sequential): {bandwidth:.1f} GB/s.",
        "",
        "| model | test | powerinfer tok/s | llama.cpp tok/s | ratio (median of per-round) |",
        "|---|---|---|---|---|",
    ]
    for name, sp in [(path.name, speed)] + [(p.name, sp) for p, sp in extra]:
        lines += [f"| `{name}` | prompt {sp['n_prompt']} | {sp['pp'][0]:.1f} | {sp['pp'][1]:.1f} | {sp['pp'][2]:.2f}x |",
                  f"| `{name}` | decode {sp['n_gen']} | {sp['tg'][0]:.1f} | {sp['tg'][1]:.1f} | {sp['tg'][2]:.2f}x |"]
        if "tg_sparse" in sp:
            t = sp["tg_sparse"]
            lines.append(f"| `{name}` | decode {sp['n_gen']}, sparse ({100 * sp['sparsity']:.0f}% of FFN neurons "
                         f"skipped; {sp['tg_sparse_vs_dense']:.2f}x our dense) | {t[0]:.1f} | {t[1]:.1f} | {t[2]:.2f}x |")
    if deep:
        lines += ["", f"## Long contexts, {args.threads} threads ({args.depth_rounds} interleaved round(s) per depth; "
                  f"decode: {args.depth_gen} steps after the prompt)", "",
                  "| depth | test | powerinfer tok/s | llama.cpp tok/s | ratio | bytes per decode step (weights + KV) "
                  "| powerinfer GB/s |", "|---|---|---|---|---|---|---|"]
        for d, sp, step_bytes in deep:
            lines += [f"| {d} | prefill {d} tokens | {sp['pp'][0]:.1f} | {sp['pp'][1]:.1f} | {sp['pp'][2]:.2f}x | | |",
                      f"| {d} | decode at depth {d} | {sp['tg'][0]:.2f} | {sp['tg'][1]:.2f} | {sp['tg'][2]:.2f}x "
                      f"| {step_bytes / 1e6:.0f} MB | {step_bytes * sp['tg'][0] / 1e9:.1f} |"]
    lines += [
        "",
        f"Greedy continuations on `{path.name}`: {speed['same']}/{args.n_gen} positions equal, first divergence "
        f"at token {speed['first_div']}.",
        "",
        f"Sparse FFN on `{path.name}`: {sparse_desc}." + "".join(
            f" On `{p.name}`: {sp['desc']}." for p, sp in extra if "desc" in sp),
        "Prompt processing (prompts longer than 8 tokens) is dense in every configuration (batched prefill).",
    ]
    for name, sp in [(path.name, speed)] + [(p.name, sp) for p, sp in extra]:
        if "bytes" in sp:
            b, mib = sp["bytes"], 2 ** 20
            lines += ["", f"Weights read per decode step on `{name}`: dense {b['dense'] / mib:.0f} MiB, sparse "
                          f"{b['sparse'] / mib:.0f} MiB (FFN {b['ffn_sparse'] / mib:.0f} of {b['ffn_dense'] / mib:.0f}"
                          f" MiB). At equal bandwidth the sparse decode is bounded by {b['dense'] / b['sparse']:.2f}x "
                          f"our dense; skipping the gate rows too (a free, perfect predictor) would read "
                          f"{b['predicted'] / mib:.0f} MiB, a bound of {b['dense'] / b['predicted']:.2f}x."]
    if q:
        lines += [
            "",
            f"## Quality ({q['n']} predictions: chunks of 512 from an empty context, 511 scored each)",
            "",
            "| | powerinfer | llama.cpp |",
            "|---|---|---|",
            f"| perplexity | {q['ppl_ours']:.4f} | {q['ppl_ref']:.4f} |",
            "",
            f"Perplexity ratio {q['ppl_ours'] / q['ppl_ref']:.4f}; top-1 agreement {100 * q['top1']:.2f}%; "
            f"mean KL(llama.cpp || ours) {q['kl']:.5f} nats. For scale, llama.cpp against itself (its batched "
            f"logits vs the same tokens one per call) agrees on {100 * q['top1_self']:.2f}% of top-1 tokens, mean KL "
            f"{q['kl_self']:.5f} nats." + (
                f" The model's exact math (the same weights in float64, no 8-bit activation rounding) agrees with "
                f"llama.cpp on {100 * q['top1_exact_ref']:.2f}% and with powerinfer on {100 * q['top1_exact_ours']:.2f}%."
                if "top1_exact_ref" in q else " (Exact-math yardstick skipped: a float64 copy would not fit in RAM.)"),
            "",
            f"`powerinfer perplexity` convention (llama-perplexity's: -c 512, second half of each chunk scored, "
            f"{q['lp_chunks']} chunks): powerinfer {q['lp_ours']:.4f}, llama.cpp's logits {q['lp_ref']:.4f}.",
        ]
        if "lp_sparse" in q:
            lines += ["", f"Sparse decode, same convention and tokens: perplexity {q['lp_sparse']:.4f} "
                          f"({q['lp_sparse'] / q['lp_ours'] - 1:+.2%} vs our dense, "
                          f"{q['lp_sparse'] / q['lp_ref'] - 1:+.2%} vs llama.cpp), {100 * q['sparsity']:.1f}% of FFN "
                          "neurons skipped per token."]
    if breakdown:
        stats, wall, sample = breakdown
        c_total = stats.get("total_ns", sum(v for k, v in stats.items() if k.endswith("_ns"))) / 1e6 / args.n_gen
        lines += ["", f"## Decode time per token, {args.threads} threads ({1e3 * wall:.3f} ms per step "
                  "excluding sampling)", "", "| phase | ms/token |", "|---|---|"]
        for k, v in stats.items():
            if isinstance(v, (int, float)) and k.endswith("_ns") and k != "total_ns":
                lines.append(f"| C: {k[:-3]} | {v / 1e6 / args.n_gen:.3f} |")
        lines += [f"| C: total | {c_total:.3f} |",
                  f"| Python (runner, embedding lookup, call overhead) | {1e3 * wall - c_total:.3f} |",
                  f"| sampling (greedy + default chain) | {1e3 * sample:.3f} |"]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        Path(args.out).write_text(report)


if __name__ == "__main__":
    main()
