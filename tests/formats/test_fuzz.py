"""The fuzz harness (scripts/fuzz_gguf.py) at CI size: 80 mutants of the GGUF, PowerInfer GGUF, thresholds and
predictor seeds through `powerinfer run` and `load()`; every outcome a clean run or a one-line error (no traceback,
signal, hang or allocation past 2 x the file + KV). The acceptance run is the same command with --count 2000."""
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fuzz_gguf.py"


def test_fuzz_mutants_are_clean_runs_or_one_line_errors():
    p = subprocess.run([sys.executable, str(SCRIPT), "--count", "80", "--seed", "19", "--json"], capture_output=True,
                       text=True, timeout=600)
    doc = json.loads(p.stdout)
    outcomes = Counter(r["outcome"] for r in doc["results"])
    findings = [f"{r['i']} {r['seed']} {r['what']}: {r['outcome']}: {r['err'][-300:]}" for r in doc["results"]
                if r["outcome"] not in ("clean", "error")]
    assert doc["count"] == 80 and not findings, findings
    assert p.returncode == 0
    # every seed was exercised and some mutants still ran: the harness is not only testing the header parser
    assert {r["seed"] for r in doc["results"]} == {"gguf", "pwri", "thresholds", "predictors"}
    assert outcomes["clean"] > 0 and outcomes["error"] > 0
    assert all(r["growth"] <= r["allowance"] for r in doc["results"])
