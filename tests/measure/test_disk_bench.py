"""benchmarks/disk_bench.py: its help, its one-line argument errors, and the cold-cache helpers it relies on (a
file's pages really leave the page cache, measured with mincore)."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "disk_bench.py"


@pytest.fixture(scope="module")
def disk_bench():
    spec = importlib.util.spec_from_file_location("disk_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


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
