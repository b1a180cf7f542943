"""benchmarks/gpu_check.py in its dry mode (fast tier on the CPU, a tiny model): the script a GPU machine runs
produces its documented table."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run_prints_its_table(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_check.py"), "--dry-run", "--skip-tests", "-n", "2",
                        "--model", str(_tiny_relu(tmp_path))], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    header = "| config | hot % | tok/s | ms/token | fast FFN ms | CPU ms | copies ms | rest ms |"
    table = lines[lines.index(header) + 2:]
    names = [row.split("|")[1].strip() for row in table if row.startswith("|")]
    assert names == ["CPU only (C decoder)", "hybrid, 25% hot", "hybrid, 50% hot", "hybrid, 100% hot",
                     "all on cpu (torch, dense FFN)"]
    hybrid = [row for row in table if row.startswith("| hybrid")]
    assert all(float(c) >= 0 for row in hybrid for c in row.split("|")[3:9])
    assert lines[-1].startswith("total: ")


def _tiny_relu(tmp_path) -> Path:
    out = tmp_path / "tiny-relu.gguf"
    subprocess.run([sys.executable, str(ROOT / "benchmarks/make_synthetic.py"), "--shape", "custom", "--vocab", "2048",
                    "--type", "Q8_0", "--activation", "relu", "--sparsity", "0.8", "-o", str(out)], check=True,
                   capture_output=True)
    return out
