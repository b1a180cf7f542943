"""Mutation fuzzing of what powerinfer reads from strangers: GGUF and PowerInfer GGUF model files, thresholds
artifacts and predictor files.

    python scripts/fuzz_gguf.py --count 2000            # the acceptance run: prints the outcome table and time
    python scripts/fuzz_gguf.py --count 60 --json       # what tests/formats/test_fuzz.py runs in CI
    python scripts/fuzz_gguf.py --replay 1234 -o m.gguf # write mutant 1234 (same --seed) to look at it

Seeds (written fresh, small and valid): a llama SwiGLU GGUF with a byte-level BPE vocabulary and a chat template
(mixed Q8_0/Q4_0/Q4_1/F16/F32 tensors); a PowerInfer GGUF (PWRI magic, ReLU, ffn_down_t, fc1/fc2 predictors) run
sparse so its predictors reach the C decoder; a thresholds artifact of the first (run with --sparsity 0.5); a
predictor file of the second (run with --predictors). Mutations: truncation, bit flips, random bytes, extreme or
off-by-some values written into the header's integer fields (counts, string and array lengths, value types, tensor
n_dims/dims/types/offsets, metadata numbers), NaN/inf/huge values in tensor data, chunks deleted or duplicated,
same-length hostile chat templates; for JSON and safetensors artifacts the same byte mutations plus type swaps.

Each mutant runs in a forked child (the parent imported everything once): `powerinfer run -m ... -p ... -n 4`
through the CLI's own main(), then, if that succeeded, `powerinfer.load()` and a chat turn. Outcomes:
  clean      exit 0
  error      exit 1 with exactly one `error: ...` line on stderr and no traceback
  traceback  a Python traceback on stderr (any exception the code did not turn into a one-line error)
  signal     the child died of a signal (segfault, abort)
  hang       killed after --timeout seconds
  alloc      the child's peak RSS grew past its clean run's by more than 2 x the file size + the KV cache, or it
             ran out of the address space the harness allows (MemoryError / 'out of memory' on stderr); under
             ASan (LD_PRELOAD of libasan) only the latter, since its quarantine and shadow memory move the RSS
  sanitizer  an AddressSanitizer or UndefinedBehaviorSanitizer report (scripts/asan_check.sh's build)
Anything but clean/error is a finding; the exit status is the number of findings (0 = pass).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fuzz_mutants import Seed, make_seeds, mutant  # noqa: E402

OUTCOMES = ("clean", "error", "traceback", "signal", "hang", "alloc", "sanitizer")
N_CTX = 64
PROMPT = "Hello world, this is a test."


# -- running ------------------------------------------------------------------------------------------------------

def _rss_bytes() -> int:
    with open("/proc/self/statm", "rb") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _vm_bytes() -> int:
    with open("/proc/self/statm", "rb") as fh:
        return int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _child(seed: Seed, model: Path, home: Path, err_path: Path, as_limit: int | None) -> None:
    """Runs in the forked child; never returns."""
    rss_start = _rss_bytes()  # the child's own growth is measured from here (inherited pages are the parent's)
    try:
        fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(fd, 2)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.environ["HOME"] = str(home)
        if as_limit:
            resource.setrlimit(resource.RLIMIT_AS, (as_limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
        import traceback

        from powerinfer import cli
        from powerinfer.errors import PowerInferError

        argv = ["run", "-m", str(model), "-p", PROMPT, "-n", "4", "--temp", "0", "-c", str(N_CTX), "-t", "1",
                "--no-stats", *[a.replace("{target}", str(home / seed.target)) for a in seed.argv]]
        try:
            rc = cli.main(argv)
            if rc == 0:
                import powerinfer

                settings = {"predictors": str(home / seed.target)} if "--predictors" in seed.argv else {}
                sp = seed.argv[seed.argv.index("--sparsity") + 1]
                try:
                    llm = powerinfer.load(str(model), n_ctx=N_CTX, n_threads=1, sparsity=sp, **settings)
                    llm.chat([{"role": "user", "content": "Hi there"}], n_predict=2, temp=0)
                except PowerInferError as e:
                    print(f"error: {e}", file=sys.stderr)
                    rc = 1
        except SystemExit as e:  # argparse
            rc = e.code if isinstance(e.code, int) else 2
        except BaseException:
            traceback.print_exc()
            rc = 3
        sys.stderr.flush()
        _report_rss(err_path, rss_start)
        os._exit(rc)
    except BaseException:
        os._exit(4)


def _report_rss(err_path: Path, start: int) -> None:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    err_path.with_suffix(".rss").write_text(f"{max(0, peak - start)}")


def _growth(err_path: Path, ru) -> int:
    """Peak RSS growth of a finished child (its own report; for a killed child, its peak RSS from wait4)."""
    try:
        return int(err_path.with_suffix(".rss").read_text())
    except (OSError, ValueError):
        return ru.ru_maxrss * 1024


def _warm(seeds: list[Seed], home: Path) -> None:
    import contextlib
    import io

    from powerinfer import cli

    for seed in seeds:
        if seed.kind == "gguf":
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                cli.main(["run", "-m", str(seed.model), "-p", PROMPT, "-n", "2", "--temp", "0", "-c", str(N_CTX),
                          "-t", "1", "--no-stats", *seed.argv])


def classify(rc_status: int, err: str, growth: int, allowance: int) -> str:
    if "ERROR: AddressSanitizer" in err or ": runtime error: " in err:  # a report of the sanitized build
        return "sanitizer"
    if os.WIFSIGNALED(rc_status):
        return "signal"
    if "Traceback (most recent call last)" in err:
        return "traceback"
    if "MemoryError" in err or "out of memory" in err or "Cannot allocate memory" in err or growth > allowance:
        return "alloc"
    rc = os.WEXITSTATUS(rc_status)
    if rc == 0:
        return "clean"
    # a one-line error is exactly one `error: ...` line and exit status 1; anything else is not a clean refusal
    return "error" if rc == 1 and sum(ln.startswith("error: ") for ln in err.splitlines()) == 1 else "traceback"


def run(args) -> dict:
    import torch

    torch.set_num_threads(1)  # the parent runs no parallel torch work before forking (OpenMP is not fork-safe)
    work = Path(tempfile.mkdtemp(prefix="fuzz-gguf-"))
    seeds = make_seeds(work, N_CTX)
    asan = "asan" in os.environ.get("LD_PRELOAD", "")
    slots = [work / f"slot{j}" for j in range(args.jobs)]
    for s in slots:
        (s / "home").mkdir(parents=True)

    def launch(slot: Path, seed: Seed, data: bytes):
        home = slot / "home"
        if seed.kind == "gguf":
            model = slot / ("mutant.pwri.gguf" if seed.name == "pwri" else "mutant.gguf")
            model.write_bytes(data)
        else:
            model = seed.model
            target = home / seed.target
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        err = slot / "stderr.txt"
        err.with_suffix(".rss").unlink(missing_ok=True)
        # the machine's guard, not the measure: 4 GiB of address space past the parent's (ASan maps terabytes of
        # shadow, so there only the RSS measure applies)
        limit = None if asan else _vm_bytes() + 4 * 2**30
        pid = os.fork()
        if pid == 0:
            _child(seed, model, home, err, limit)
        return pid, err, model

    # Warm the parent: one clean run of each seed in-process imports everything a child uses (otherwise every
    # child pays the lazy imports again: 0.7 s per mutant instead of ~0.1 s)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # no Rust thread pool alive at fork
    _warm(seeds, slots[0] / "home")
    # clean runs of every seed in children: they must pass, and their peak RSS is the memory bound's baseline
    baseline = {}
    for seed in seeds:
        pid, err, model = launch(slots[0], seed, seed.data)
        _, status, ru = os.wait4(pid, 0)
        text = err.read_text(errors="replace")
        if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
            raise SystemExit(f"seed {seed.name} does not run clean: {text[-2000:]}")
        baseline[seed.name] = _growth(err, ru)

    results, running, next_i, t0 = [], {}, 0, time.perf_counter()
    free = list(range(args.jobs))
    while next_i < args.count or running:
        while free and next_i < args.count:
            j = free.pop()
            seed, data, what = mutant(seeds, args.seed, next_i)
            pid, err, model = launch(slots[j], seed, data)
            running[pid] = (j, next_i, seed, what, err, time.perf_counter(), len(data))
            next_i += 1
        pid, status, ru = os.wait4(-1, os.WNOHANG)
        if pid == 0:
            now = time.perf_counter()
            for p, (j, i, seed, what, err, start, size) in list(running.items()):
                if now - start > args.timeout:
                    os.kill(p, signal.SIGKILL)
                    _, status, ru = os.wait4(p, 0)
                    results.append(dict(i=i, seed=seed.name, what=what, outcome="hang", seconds=now - start,
                                        growth=0, allowance=0, err=""))
                    del running[p]
                    free.append(j)
            time.sleep(0.002)
            continue
        j, i, seed, what, err, start, size = running.pop(pid)
        free.append(j)
        text = err.read_text(errors="replace")
        growth = _growth(err, ru) - baseline[seed.name]
        allowance = 2 * (size if seed.kind == "gguf" else len(seed.data) + seed.model.stat().st_size) + seed.kv_bytes
        # under ASan the RSS measure is its quarantine and shadow as much as ours: only MemoryErrors count there
        outcome = classify(status, text, growth, float("inf") if asan else allowance)
        if os.WIFSIGNALED(status):
            text = f"signal {os.WTERMSIG(status)}\n" + text
        results.append(dict(i=i, seed=seed.name, what=what, outcome=outcome, seconds=time.perf_counter() - start,
                            growth=growth, allowance=allowance, err=text[-600:]))
    elapsed = time.perf_counter() - t0
    return {"count": len(results), "seconds": elapsed, "jobs": args.jobs, "seed": args.seed, "asan": asan,
            "baseline_growth": baseline, "results": sorted(results, key=lambda r: r["i"]), "work": str(work)}


def report(doc: dict) -> str:
    rs = doc["results"]
    by = Counter(r["outcome"] for r in rs)
    lines = [f"fuzz: {doc['count']} mutants in {doc['seconds']:.1f} s ({doc['jobs']} workers, seed {doc['seed']}"
             f"{', ASan' if doc['asan'] else ''}; {doc['count'] / max(doc['seconds'], 1e-9):.1f} mutants/s)",
             "outcome     count", *[f"{o:10s} {by.get(o, 0):6d}" for o in OUTCOMES]]
    per_seed = Counter((r["seed"], r["outcome"]) for r in rs)
    lines.append("seed        " + " ".join(f"{o:>9s}" for o in OUTCOMES))
    for s in sorted({r["seed"] for r in rs}):
        lines.append(f"{s:11s} " + " ".join(f"{per_seed.get((s, o), 0):9d}" for o in OUTCOMES))
    worst = max(rs, key=lambda r: r["growth"] - r["allowance"]) if rs else None
    if worst:
        lines.append(f"memory: largest peak-RSS growth past the clean run {worst['growth'] / 2**20:.2f} MiB "
                     f"(allowance 2 x file + KV = {worst['allowance'] / 2**20:.2f} MiB; mutant {worst['i']})")
    lines.append(f"slowest mutant {max((r['seconds'] for r in rs), default=0):.2f} s")
    for r in rs:
        if r["outcome"] not in ("clean", "error"):
            lines.append(f"FINDING mutant {r['i']} ({r['seed']}, {r['what']}): {r['outcome']}: "
                         f"{' | '.join(r['err'].strip().splitlines()[-3:])}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=2000, help="mutants to run")
    p.add_argument("--seed", type=int, default=0, help="the mutation sequence (mutant i is the same for a seed)")
    p.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)), help="children at a time")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds before a child counts as hung")
    p.add_argument("--json", action="store_true", help="print the whole result as JSON")
    p.add_argument("--replay", type=int, help="write mutant N to -o instead of running")
    p.add_argument("-o", "--output", help="where --replay writes")
    args = p.parse_args(argv)
    if args.replay is not None:
        work = Path(tempfile.mkdtemp(prefix="fuzz-gguf-"))
        seed, data, what = mutant(make_seeds(work, N_CTX), args.seed, args.replay)
        Path(args.output or f"mutant-{args.replay}.bin").write_bytes(data)
        print(f"mutant {args.replay}: {seed.name}, {what} ({len(data)} bytes); run with: {seed.argv}")
        return 0
    doc = run(args)
    print(json.dumps(doc) if args.json else report(doc))
    return sum(1 for r in doc["results"] if r["outcome"] not in ("clean", "error"))


if __name__ == "__main__":
    raise SystemExit(main())
