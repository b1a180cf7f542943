"""The `powerinfer` program (cli.entry): main's exit status and output, atexit handlers and threads, without the
interpreter's teardown."""
import subprocess
import sys

import pytest

PRELUDE = "import atexit, sys, threading, time\nfrom powerinfer import cli\n"


def _program(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PRELUDE + code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("argv, status, out, err", [
    (["--version"], 0, "powerinfer 0.1.0\n", ""),
    (["run", "--no-such-flag"], 2, "", "powerinfer: error: unrecognized arguments: --no-such-flag"),
    (["tokenize", "-m", "/no/such/model.gguf", "-p", "x"], 1, "", "error: /no/such/model.gguf: no such file"),
])
def test_status_and_output_are_mains(argv, status, out, err):
    r = _program(f"sys.argv = ['powerinfer', *{argv!r}]\ncli.entry()")
    assert r.returncode == status and r.stdout == out and err in r.stderr, r


def test_atexit_handlers_run_and_threads_finish_before_the_exit():
    r = _program("atexit.register(print, 'atexit ran')\n"
                 "threading.Thread(target=lambda: (time.sleep(0.3), print('thread done', flush=False))).start()\n"
                 "sys.argv = ['powerinfer', '--version']\ncli.entry()")
    assert r.returncode == 0 and r.stdout == "powerinfer 0.1.0\nthread done\natexit ran\n", r


def test_exit_message_and_status_from_systemexit():
    r = _program("cli.main = lambda: sys.exit('stopped: a reason')\ncli.entry()")
    assert (r.returncode, r.stderr) == (1, "stopped: a reason\n"), r
    r = _program("cli.main = lambda: 3\ncli.entry()")
    assert r.returncode == 3, r


def test_the_generated_text_reaches_a_pipe():
    # buffered stdout is flushed before the process ends (no interpreter teardown to do it)
    r = subprocess.run([sys.executable, "-m", "powerinfer", "run", "-p", "The capital of France is", "-n", "4",
                        "--temp", "0", "--no-stats"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("The capital of France is") and \
        len(r.stdout) > len("The capital of France is"), r
