"""benchmarks/disk_bench.py: its help, its one-line argument errors, and the cold-cache helpers it relies on (a
file's pages really leave the page cache, measured with mincore)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "disk_bench.py"


@pytest.fixture(scope="module")
def disk_bench(benchmark_module):
    return benchmark_module("disk_bench")


def test_help():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "--ram-budget" in out.stdout and "--vs-ram" in out.stdout and "posix_fadvise(DONTNEED)" in out.stdout


@pytest.mark.parametrize("argv, message", [
    (["-m", "{missing}", "--ram-budget", "4"], "{missing}: no such file"),
    (["-m", "{model}"], "--ram-budget is required (or --vs-ram)"),
    (["-m", "{model}", "--ram-budget", "0"], "--ram-budget must be > 0 GiB, got 0"),
    (["-m", "{model}", "--vs-ram", "--ram-budget", "2"], "--vs-ram sets the budget from --budget-fraction"),
    (["-m", "{model}", "--vs-ram", "--budget-fraction", "1.5"], "--budget-fraction must be in (0, 1), got 1.5"),
    (["-m", "{model}", "--ram-budget", "2", "-n", "0"], "-n must be >= 1, got 0"),
    (["-m", "{model}", "--ram-budget", "2", "--time-limit", "0"], "--time-limit must be > 0 s"),
    (["-m", "{model}", "--ram-budget", "2", "--ctx", "8", "-n", "8"], "--ctx 8 is too small"),
    (["-m", "{model}", "--ram-budget", "2", "--predictors", "{missing}"], "{missing}: no such predictor file"),
])
def test_argument_errors(disk_bench, tmp_path, capsys, argv, message):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    names = {"model": str(model), "missing": str(tmp_path / "nope")}
    with pytest.raises(SystemExit) as e:
        disk_bench.main([a.format(**names) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message.format(**names) in err and err.count("\n") == 1  # one line


def test_not_a_model(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(os.urandom(1000))
    out = subprocess.run([sys.executable, str(SCRIPT), "-m", str(junk), "--ram-budget", "1"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.strip() == f"error: {junk}: not a readable GGUF model (GGUF magic invalid)"


def test_drop_cache_empties_the_page_cache(disk_bench, tmp_path):
    f = tmp_path / "data.bin"
    f.write_bytes(os.urandom(8 << 20))
    f.read_bytes()  # cached now
    assert disk_bench.resident_bytes(f) > 4 << 20
    fd = os.open(f, os.O_RDONLY)
    os.fsync(fd)  # dirty pages cannot be dropped until written
    os.close(fd)
    disk_bench.drop_cache(f)
    assert disk_bench.resident_bytes(f) == 0
    assert disk_bench.disk_read_rate(f, total=4 << 20, chunk=1 << 20) > 0


def test_vs_ram_on_a_tiny_model(tmp_path):
    """--vs-ram end to end on a model whose FFN mostly goes to disk at 90% of the file: both runs decode, with the
    same greedy tokens, and the budget run reads bundles from the disk (its own counters and /proc io)."""
    model = tmp_path / "tiny.gguf"
    make = [sys.executable, str(SCRIPT.parent / "make_synthetic.py"), "--shape", "custom", "--d-model", "1024",
            "--n-ff", "1024", "--n-layer", "8", "--n-head", "8", "--n-head-kv", "2", "--vocab", "1024",
            "--sparsity", "0.9", "--locality", "--calib-tokens", "16", "--verify-tokens", "0", "-o", str(model)]
    subprocess.run(make, check=True, capture_output=True, timeout=300)
    out = subprocess.run([sys.executable, str(SCRIPT), "-m", str(model), "--vs-ram", "--budget-fraction", "0.9",
                          "-n", "6", "--ctx", "32", "--time-limit", "120"], capture_output=True, text=True,
                         timeout=400)
    assert out.returncode == 0, out.stderr
    rows = {line.split("|")[1].strip(): line.split("|")[2:] for line in out.stdout.splitlines()
            if line.startswith("| powerinfer")}
    budget_run = next(v for k, v in rows.items() if k.startswith("powerinfer --ram-budget"))
    assert budget_run[0].strip() == "6" and rows["powerinfer, all in RAM"][0].strip() == "6"  # decode steps
    ours = budget_run[3].strip()  # disk / token, hit rate, I/O wait / token
    assert ours != "-" and not ours.startswith("0.0 MiB")
    assert "greedy tokens: the same over 7 tokens" in out.stdout
    assert "peak RSS" in out.stdout and "I/O bound" in out.stdout


def test_only_is_for_the_default_mode(disk_bench, tmp_path, capsys):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    with pytest.raises(SystemExit):
        disk_bench.main(["-m", str(model), "--vs-ram", "--only", "llama"])
    assert "--only is for the default mode" in capsys.readouterr().err
