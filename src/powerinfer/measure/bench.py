"""`powerinfer bench`: prompt-processing and generation speed, modelled on llama.cpp's `llama-bench`.

Protocol (as llama-bench, tools/llama-bench): for every thread count in -t and every test,
  * ppN: N prompt tokens evaluated from an empty KV cache in prefill calls of -b tokens; tokens are random ids
    (seeded), the first one BOS when the model adds BOS; t/s = N / time;
  * tgN: N single-token decode steps from an empty cache (the first input BOS when the model adds BOS, then
    random ids); t/s = N / time.
  * with -d D (llama-bench's --n-depth), both run after D random tokens already in the KV cache ("pp512 @ d4096"):
    the context is prefilled once per thread count and depth (untimed) and every repetition starts from it
    again (the cache is cut back to D positions; llama-bench re-evaluates them, which leaves the same cache).
One untimed warm-up repetition of the same test runs first (page faults, caches, thread start-up), then -r timed
repetitions; reported: mean +/- sample standard deviation and median of the per-repetition t/s.
Time is wall-clock around `runner.eval` calls, so the Python per-token overhead a user of the engine pays is
included, as llama-bench includes llama_decode's.

Derived numbers (generation tests only):
  * bytes_per_token: weight bytes one decode step reads: every layer matrix (q, k, v, o, gate, up, down) at its
    stored size, the norm vectors and biases, the output norm, the output head and one embedding row. The FFN
    matrices count in full for a dense decoder; with --sparsity the FFN counts what the sparse decoder read,
    averaged over the test's steps (Runner.ffn_stats: gate/up rows or input-major columns, and the down_t rows
    of the kept neurons, each in its stored format). KV-cache reads are counted apart (kv_bytes_per_token).
  * gb_per_s: bytes_per_token * t/s / 1e9, the effective weight bandwidth.
  * kv_bytes_per_token: KV-cache bytes one decode step reads, averaged over the test's steps (every layer's K
    and V rows 0..pos, at the cache's element size); read_gb_per_s: (bytes_per_token + kv_bytes_per_token) *
    t/s / 1e9, what the step streams in all (the markdown table's GB/s). At depth the cache dominates:
    SmolLM2 at 16k reads 377 MB of K/V per step against 92 MiB of weights.
  * ffn_sparsity: fraction of FFN neurons skipped per token. 0 for the dense decoder. A runner that skips
    neurons exposes `ffn_sparsity()` (fraction skipped over the evals since `reset_ffn_stats()`); it is read
    after each timed test.
Peak RSS is the process's resource.getrusage maximum resident set, in MiB.

JSON schema (`--json`, "schema": "powerinfer.bench/1"):
  {"schema": str, "model": {"path", "type", "arch", "size_bytes", "n_params", "n_layer", "d_model", "n_ff",
                            "n_vocab", "activation", "bytes_per_token"},
   "system": {"isa", "cpu", "n_cpus", "python", "torch", "powerinfer"},
   "settings": {"n_batch", "n_ctx", "repetitions", "warmup", "seed", "ffn", "type_k", "type_v", "kv_bytes"},
   "results": [{"test": "pp128" | "tg128" | "tg128 @ d4096", "n_prompt", "n_gen", "n_depth", "n_threads",
                "samples_ns": [int],
                "samples_ts": [float], "avg_ts", "stddev_ts", "median_ts", "avg_ns", "stddev_ns",
                "bytes_per_token": int | null, "gb_per_s": float | null, "kv_bytes_per_token": int | null,
                "read_gb_per_s": float | null, "ffn_sparsity": float,
                "sparsity_source": "dense" | "runner", "peak_rss_mib": float,
                "phases_ms_per_token": {phase: ms} | null}],
   "peak_rss_mib": float}
avg_ts/stddev_ts/samples_ts follow llama-bench's JSON field names; stddev is 0 with one repetition.
"""
from __future__ import annotations

import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np

from ..errors import PowerInferError
from ..options import BenchOptions
from ..settings import default_threads

SCHEMA = "powerinfer.bench/1"


# -- what a model costs -------------------------------------------------------------------------------------

def _weight_tensors(weights):
    """(kind, tensor) for every stored weight, the tied head counted once."""
    out = [("embed", weights.embed_tokens), ("norm", weights.norm)]
    if weights.lm_head is not weights.embed_tokens:
        out.append(("head", weights.lm_head))
    for lw in weights.layers:
        for name, t in vars(lw).items():
            if t is None:
                continue
            kind = "ffn" if name in ("gate_proj", "up_proj", "down_proj") else "layer"
            out.append((kind, t))
    return out


def model_size(weights) -> tuple[int, int]:
    """(bytes, parameters) of the weights as stored (the tied head once), like llama-bench's size/params."""
    ts = [t for _, t in _weight_tensors(weights)]
    return sum(t.nbytes for t in ts), sum(t.rows * t.cols for t in ts)


def bytes_per_token(weights, ffn_sparsity: float = 0.0) -> int:
    """Weight bytes one decode step reads (see the module docstring for what is counted)."""
    total = weights.embed_tokens.row_bytes  # one embedding row is looked up
    total += weights.lm_head.nbytes  # the head is read in full, tied or not
    for kind, t in _weight_tensors(weights):
        if kind in ("embed", "head"):
            continue
        total += t.nbytes * (1.0 - ffn_sparsity) if kind == "ffn" else t.nbytes
    return int(total)


def _runner_sparsity(runner) -> tuple[float, str]:
    fn = getattr(runner, "ffn_sparsity", None)
    if callable(fn) and getattr(runner, "sparse", True):
        s = fn()
        if s is not None:
            return float(s), "runner"
    return 0.0, "dense"


def _reset_runner_sparsity(runner) -> None:
    fn = getattr(runner, "reset_ffn_stats", None)
    if callable(fn):
        fn()


# -- the tests ------------------------------------------------------------------------------------------------

@dataclass
class Test:
    kind: str  # "pp" | "tg"
    n: int
    depth: int = 0  # tokens already in the cache

    @property
    def name(self) -> str:
        return f"{self.kind}{self.n}" + (f" @ d{self.depth}" if self.depth else "")


def _tokens(rng, n: int, n_vocab: int, bos_id: int | None) -> list[int]:
    ids = rng.integers(0, n_vocab, size=n).tolist()
    if bos_id is not None and ids:
        ids[0] = bos_id
    return ids


def _run_once(runner, test: Test, ids: list[int]) -> int:
    """Wall-clock ns of one repetition from a cache holding test.depth positions (see _fill_depth)."""
    runner.truncate(test.depth)
    t0 = time.perf_counter_ns()
    if test.kind == "pp":
        runner.eval(ids)
    else:
        for tok in ids:
            runner.eval([tok])
    return time.perf_counter_ns() - t0


def _fill_depth(runner, depth: int, seed: int, bos_id: int | None) -> None:
    """Put `depth` random tokens (BOS first when the model adds it) in an empty cache, untimed."""
    runner.truncate(0)
    if depth:
        runner.eval(_tokens(np.random.default_rng([seed, depth]), depth, runner.config.n_vocab, bos_id))


def _kv_bytes_per_step(runner, test: Test) -> int:
    """KV-cache bytes a decode step of the tg test reads on average: K and V rows 0..pos of every layer, for the
    positions test.depth .. test.depth + n - 1 (rows: depth + (n + 1) / 2 on average)."""
    cfg = runner.config
    kv = getattr(runner, "kv", None)
    # a K row and a V row, each in its own type (-ctk/-ctv: q8_0 rows are uint8 blocks)
    rows = kv.k[0][0].nbytes + kv.v[0][0].nbytes if kv is not None else 2 * cfg.n_head_kv * cfg.head_dim * 2
    return int(cfg.n_layer * rows * (test.depth + (test.n + 1) / 2))


def _profile_phases(runner, test: Test, ids: list[int]) -> dict | None:
    """ms per generated token in each decoder phase, from one extra untimed repetition with profiling on
    (profiling adds clock reads, so it never runs inside the timed repetitions)."""
    dec = getattr(runner, "decoder", None)
    if dec is None or not hasattr(dec, "profile") or test.kind != "tg":
        return None
    dec.profile(True)
    dec.reset_stats()
    try:
        _run_once(runner, test, ids)
        st = dec.stats(reset=True)
    finally:
        dec.profile(False)
    n = max(1, len(ids))
    return {k[:-3]: round(v / n / 1e6, 4) for k, v in st.items() if k.endswith("_ns")}


def _peak_rss_mib() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(r / (2**20 if sys.platform == "darwin" else 2**10), 1)


def run_bench(runner, weights, tests: list[Test], threads: list[int], repetitions: int, *, warmup: bool = True,
              seed: int = 0, bos_id: int | None = None, profile: bool = False, on_result=None) -> list[dict]:
    """One result dict per (thread count, depth, test), in llama-bench order (threads outer, then depths; pp
    tests before tg tests)."""
    if repetitions < 1:
        raise PowerInferError(f"-r/--repetitions must be >= 1, got {repetitions}")
    n_vocab = runner.config.n_vocab
    results = []
    for nt in threads:
        runner.set_threads(nt)
        depth = None
        for test in tests:
            if test.depth != depth:
                depth = test.depth
                _fill_depth(runner, depth, seed, bos_id)
            rng = np.random.default_rng(seed)  # the same token ids for every thread count
            ids = _tokens(rng, test.n, n_vocab, bos_id if not test.depth else None)
            if warmup:
                _run_once(runner, test, ids)
            _reset_runner_sparsity(runner)
            samples = [_run_once(runner, test, ids) for _ in range(repetitions)]
            ts = [test.n * 1e9 / ns for ns in samples]
            sparsity, source = _runner_sparsity(runner)
            r = {
                "test": test.name, "n_prompt": test.n if test.kind == "pp" else 0,
                "n_gen": test.n if test.kind == "tg" else 0, "n_depth": test.depth, "n_threads": nt,
                "samples_ns": samples, "samples_ts": [round(x, 4) for x in ts],
                "avg_ts": statistics.fmean(ts), "stddev_ts": statistics.stdev(ts) if len(ts) > 1 else 0.0,
                "median_ts": statistics.median(ts), "avg_ns": statistics.fmean(samples),
                "stddev_ns": statistics.stdev(samples) if len(samples) > 1 else 0.0,
                "bytes_per_token": None, "gb_per_s": None, "kv_bytes_per_token": None, "read_gb_per_s": None,
                "ffn_sparsity": sparsity, "sparsity_source": source,
                "peak_rss_mib": _peak_rss_mib(), "phases_ms_per_token": None,
                # --ram-budget: bundle bytes read per token, cache hit rate and I/O wait over the repetitions
                "disk": runner.disk_stats() if hasattr(runner, "disk_stats") else None,
            }
            if test.kind == "tg":
                ffn = runner.ffn_stats() if hasattr(runner, "ffn_stats") else None
                if ffn:
                    bpt = int(bytes_per_token(weights) - ffn["ffn_dense_bytes"] + ffn["ffn_bytes_per_token"])
                else:
                    bpt = bytes_per_token(weights, sparsity)
                r["bytes_per_token"] = bpt
                r["gb_per_s"] = bpt * r["avg_ts"] / 1e9
                r["kv_bytes_per_token"] = _kv_bytes_per_step(runner, test)
                r["read_gb_per_s"] = (bpt + r["kv_bytes_per_token"]) * r["avg_ts"] / 1e9
                if profile:
                    r["phases_ms_per_token"] = _profile_phases(runner, test, ids)
            results.append(r)
            if on_result is not None:
                on_result(r)
    return results


# -- formatting ---------------------------------------------------------------------------------------------

def _fmt_size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def model_type(loaded, n_params: int) -> str:
    """llama-bench's model column: architecture, size class, file type."""
    ftype = (loaded.file_type or "?").split(" (")[0]
    size = f"{n_params / 1e9:.0f}B" if n_params >= 1e9 else f"{n_params / 1e6:.0f}M"
    return f"{loaded.config.arch} {size} {ftype}"


_COLUMNS = ("model", "size", "params", "threads", "test", "t/s", "median t/s", "GB/s", "sparsity")


def markdown_row(model: dict, r: dict) -> str:
    cells = [model["type"], _fmt_size(model["size_bytes"]), _fmt_params(model["n_params"]), str(r["n_threads"]),
             r["test"], f"{r['avg_ts']:.2f} ± {r['stddev_ts']:.2f}", f"{r['median_ts']:.2f}",
             f"{r['read_gb_per_s']:.2f}" if r["read_gb_per_s"] is not None else "-",
             f"{r['ffn_sparsity']:.2f}" if r["n_gen"] else "-"]
    return "| " + " | ".join(cells) + " |"


def markdown_header() -> str:
    right = {"size", "params", "threads", "test", "t/s", "median t/s", "GB/s", "sparsity"}
    return ("| " + " | ".join(_COLUMNS) + " |\n|" +
            "|".join("-" * (len(c) + 1) + (":" if c in right else "-") for c in _COLUMNS) + "|")


# -- the whole run ------------------------------------------------------------------------------------------

def random_ids_bos(metadata: dict) -> int | None:
    """The BOS id that starts the random token ids, or None. Tokenizer-free on purpose (random ids), so models
    without tokenizer metadata can be benchmarked too. llama.cpp's defaults when the keys are absent:
    SentencePiece ("llama") vocabularies add BOS id 1, BPE none."""
    spm = metadata.get("tokenizer.ggml.model") == "llama"
    add_bos = metadata.get("tokenizer.ggml.add_bos_token", spm) and "tokenizer.ggml.tokens" in metadata
    return int(metadata.get("tokenizer.ggml.bos_token_id", 1)) if add_bos else None


def model_summary(loaded) -> dict:
    """The JSON document's "model" object (and the markdown table's model columns)."""
    cfg = loaded.config
    size_bytes, n_params = model_size(loaded.weights)
    return {"path": str(loaded.path), "type": model_type(loaded, n_params), "arch": cfg.arch,
            "size_bytes": size_bytes, "n_params": n_params, "n_layer": cfg.n_layer, "d_model": cfg.d_model,
            "n_ff": cfg.n_ff, "n_vocab": cfg.n_vocab, "activation": cfg.activation,
            "bytes_per_token": bytes_per_token(loaded.weights)}


def _placement_summary(runner) -> dict | None:
    """The tiers of a hybrid runner: fast-tier device, budget, hot neurons per layer, per-token time split."""
    plan = getattr(runner, "plan", None)
    if plan is None:
        return None
    if hasattr(runner, "disk_stats"):  # --ram-budget: the RAM/disk placement (runtime/disk_placement.py)
        n_ff = runner.config.n_ff
        return {"tier": "ram+disk", "budget_bytes": plan.budget, "resident_bytes": plan.used,
                "dense_bytes": plan.dense, "cache_bytes": plan.cache_bytes, "slot_bytes": plan.slot_bytes,
                "resident_neurons_per_layer": [len(r) for r in plan.resident],
                "resident_fraction": sum(len(r) for r in plan.resident) / (len(plan.resident) * n_ff),
                "gate_resident": plan.gate_resident, "source": plan.source, "bundle_file": str(runner.bundles),
                "bundle_file_bytes": runner.bundle_bytes, "model_file_bytes": runner.model_file_bytes()}
    return {"device": str(plan.device), "dtype": str(plan.dtype).removeprefix("torch."), "budget_bytes": plan.budget,
            "dense_bytes": plan.dense_bytes, "hot_neurons_per_layer": [len(h) for h in plan.hot],
            "hot_fraction": plan.hot_fraction(runner.config.n_ff), "source": plan.source,
            "last_test_ms_per_token": runner.tier_stats()}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("powerinfer")
    except PackageNotFoundError:  # a source tree on sys.path, not installed
        return "unknown"


def bench(loaded, opts: BenchOptions, n_batch: int = 512, sparsity="off", sparse_method: str | None = None,
          predictors: str | None = None, *, calibrate=None, placement=None, solve=None, on_result=None,
          log=sys.stderr, cache_types: tuple[str, str] = ("f16", "f16")) -> dict:
    """llama-bench's tests (opts: lengths, thread counts, repetitions, seed) on `loaded`, with the sparse FFN
    `sparsity` / `sparse_method` / `predictors` (runtime/sparsity.py; `calibrate` makes missing thresholds) and the
    tiers `placement` asks for (runtime/placement.py; `solve` finds hot neurons).
    `on_result(result)` sees each result as it is measured. Returns the JSON document (schema above)."""
    import torch

    from .. import kernels
    from ..runtime.runner import make_runner
    from ..runtime.sparsity import apply_sparsity

    tests = [t for d in opts.depths
             for t in [Test("pp", n, d) for n in opts.prompt_lengths] + [Test("tg", n, d) for n in opts.gen_lengths]]
    cfg = loaded.config
    n_ctx = max(t.depth + t.n for t in tests)
    try:
        runner = make_runner(loaded, n_ctx, opts.thread_counts[0], min(n_batch, n_ctx), placement=placement,
                             solve=solve, log=log, cache_types=cache_types)
    except PowerInferError as e:
        if "KV cache" not in str(e):
            raise
        # bench has no -c: its context is the deepest -d plus the longest test
        d = max(opts.depths)
        raise PowerInferError(f"{str(e).removesuffix('; lower -c/--ctx-size')} "
                              + (f"(-d {d} plus the longest test); lower -d/--n-depth" if d else
                                 "(the longest test); lower -p/-n")) from None
    # after the runner, so a context that cannot be allocated is one line on stderr, not a warning and an error
    if cfg.context_length and n_ctx > cfg.context_length:
        print(f"warning: {n_ctx} tokens exceed the model's trained context of {cfg.context_length}", file=log)
    sparse_desc = "dense FFN"
    if sparsity != "off" or predictors:
        sparse_desc = apply_sparsity(runner, loaded, sparsity, sparse_method, predictors, calibrate=calibrate)
        print(f"ffn: {sparse_desc}", file=log)
    results = run_bench(runner, loaded.weights, tests, opts.thread_counts, opts.repetitions,
                        warmup=not opts.no_warmup, seed=opts.seed, bos_id=random_ids_bos(loaded.metadata),
                        profile=opts.profile, on_result=on_result)
    return {
        "schema": SCHEMA, "model": model_summary(loaded),
        "system": {"isa": {"c": kernels.isa(), "torch": f"torch ({runner.device})",
                           "hybrid": f"torch ({runner.device}) + {kernels.isa()}"}[runner.compute],
                   "cpu": _cpu_name(), "n_cpus": default_threads(), "python": platform.python_version(),
                   "torch": torch.__version__, "powerinfer": _version()},
        "settings": {"n_batch": runner.n_batch, "n_ctx": n_ctx, "repetitions": opts.repetitions,
                     "warmup": not opts.no_warmup, "seed": opts.seed, "ffn": sparse_desc,
                     "placement": _placement_summary(runner), "type_k": cache_types[0], "type_v": cache_types[1],
                     "kv_bytes": runner.kv.nbytes if getattr(runner, "kv", None) is not None else None},
        "results": results, "peak_rss_mib": _peak_rss_mib(),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
