"""Resource failures leave the engine usable or refuse with one line: a refused set_threads (threads cannot be
created under a tight address-space limit) is a PowerInferError, and generation afterwards gives the same tokens on
the old threads (it was a segfault: the decoder had freed its pool before making the new one)."""
import json
import subprocess
import sys

import pytest

THREADS_SCRIPT = r"""
import json, resource
import powerinfer
from powerinfer.errors import PowerInferError

def vm_size():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024

llm = powerinfer.load(n_threads=1, n_ctx=256)
before = llm.generate("The capital of France is", n_predict=8, temp=0)
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
# 2 MiB of address space left: a new thread's 8 MiB stack cannot be mapped, so pthread_create fails
resource.setrlimit(resource.RLIMIT_AS, (vm_size() + 2 * 2**20, hard))
errors = []
for n in (8, 2):
    try:
        llm.runner.set_threads(n)
    except PowerInferError as e:
        errors.append(str(e))
try:
    llm.runner.decoder.set_threads(4)  # the C binding itself: MemoryError, not a crash
except MemoryError as e:
    errors.append(f"MemoryError: {e}")
resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
after = llm.generate("The capital of France is", n_predict=8, temp=0)
llm.runner.set_threads(2)  # and with the limit lifted, threads start again
again = llm.generate("The capital of France is", n_predict=8, temp=0)
print(json.dumps({"errors": errors, "before": before, "after": after, "again": again,
                  "threads": llm.runner.decoder.n_threads}))
"""


def test_refused_set_threads_then_generate_is_an_error_not_a_signal(bundled_model_path):
    if sys.platform != "linux":
        pytest.skip("needs /proc and RLIMIT_AS")
    p = subprocess.run([sys.executable, "-c", THREADS_SCRIPT], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]  # a signal would be a negative return code
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["errors"][:2] == ["could not start 8 threads (thread limit or out of memory); the decoder keeps its 1",
                               "could not start 2 threads (thread limit or out of memory); the decoder keeps its 1"]
    assert r["errors"][2].startswith("MemoryError: could not start 4 threads")
    assert r["before"] == r["after"] == r["again"] and r["before"]
    assert r["threads"] == 2
