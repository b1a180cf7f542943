"""`powerinfer run -cnv` in a real terminal (tmux: the program gets a pty, keys are typed, the screen is read back):
two turns, Ctrl-C in the middle of a reply returns to the prompt with the conversation kept, a third turn
answers, a conversation longer than -c goes on by context shift, the arrow keys edit the line, a pasted block is one
message, and Ctrl-C at the prompt ends the session with status 0. The bundled model, greedy (the answers are
checked for their facts).

.ci/run installs Debian's tmux; without it the test is skipped with the reason."""
from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
import uuid

import pytest

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux)")


class Tmux:
    def __init__(self, command: str, width: int = 120, height: int = 50):
        self.name = f"pi-{uuid.uuid4().hex[:8]}"
        self.socket = ["-L", self.name]  # a server of its own: nothing shared with a user's tmux
        subprocess.run(["tmux", *self.socket, "new-session", "-d", "-s", self.name, "-x", str(width), "-y",
                        str(height), f"{command}; echo EXITED rc=$?; sleep 600"], check=True)

    def keys(self, *keys: str) -> None:
        subprocess.run(["tmux", *self.socket, "send-keys", "-t", self.name, *keys], check=True)

    def screen(self) -> str:
        r = subprocess.run(["tmux", *self.socket, "capture-pane", "-p", "-J", "-S", "-200", "-t", self.name],
                           capture_output=True, text=True, check=True)
        return r.stdout

    def wait_for(self, predicate, timeout: float = 60.0) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            s = self.screen()
            if predicate(s):
                return s
            if "EXITED rc=" in s:  # the program ended while the test waited for something else
                raise AssertionError(f"the program exited; the screen:\n{s}")
            time.sleep(0.2)
        raise AssertionError(f"timed out; the screen:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run(["tmux", *self.socket, "kill-server"], capture_output=True)


def prompts(screen: str) -> int:
    """How many times the input prompt "> " starts a line."""
    return sum(1 for ln in screen.splitlines() if ln.startswith("> ") or ln == ">")


def test_chat_in_a_terminal(bundled_model_path, tmp_path):
    log = tmp_path / "screens.txt"
    cmd = (f"{shlex.quote(sys.executable)} -m powerinfer run -cnv --temp 0 -c 128 -n 300 --no-stats --verbose "
           f"-m {shlex.quote(str(bundled_model_path))}")
    t = Tmux(cmd)
    try:
        t.wait_for(lambda s: prompts(s) == 1)
        # turn 1
        t.keys("What is the capital of France? Answer in one paragraph.", "Enter")
        s = t.wait_for(lambda s: prompts(s) == 2)
        assert "Paris" in s
        # turn 2, stopped by Ctrl-C once the reply has started
        t.keys("Write a long story about a dragon.", "Enter")
        t.wait_for(lambda s: "dragon" in s.split("Write a long story about a dragon.")[-1])
        t.keys("C-c")
        s = t.wait_for(lambda s: prompts(s) == 3)
        assert "EXITED" not in s and "Traceback" not in s
        stopped = s
        # turn 3, typed with a mistake that the arrow keys fix: "Italy" -> "France"
        t.keys("What is the capital of Italy? Answer in one paragraph.")
        t.keys(*["Left"] * len(" Answer in one paragraph."), "Left", *["BSpace"] * 5, "France", "Enter")
        s = t.wait_for(lambda s: prompts(s) == 4)
        assert "> What is the capital of France? Answer in one paragraph." in s
        third = s.split("> What is the capital of France? Answer in one paragraph.")[-1]
        assert "Paris" in third and "Rome" not in third
        # the conversation outgrew -c 128: it went on by dropping the older half after --keep
        assert "[context full: dropped" in s
        # a pasted block of three lines is one message (readline's bracketed paste), not three turns
        block = tmp_path / "block.txt"
        block.write_text("Summarize this code:\ndef f(x):\n    return x + 1")
        subprocess.run(["tmux", *t.socket, "load-buffer", str(block)], check=True)
        subprocess.run(["tmux", *t.socket, "paste-buffer", "-p", "-t", t.name], check=True)
        t.keys("Enter")
        s = t.wait_for(lambda s: prompts(s) == 5)
        lines = "\n".join(ln.rstrip() for ln in s.splitlines())
        assert "> Summarize this code:\ndef f(x):\n    return x + 1\n" in lines
        # Ctrl-C at the prompt ends the session normally
        t.keys("C-c")
        s = t.wait_for(lambda s: "EXITED" in s)
        assert "EXITED rc=0" in s and "Traceback" not in s
        def tidy(screen):
            return "\n".join(ln.rstrip() for ln in screen.strip().splitlines())

        log.write_text(f"--- after Ctrl-C in turn 2 ---\n{tidy(stopped)}\n--- the end ---\n{tidy(s)}\n")
        print(log.read_text())
    finally:
        t.close()


def test_interactive_text_is_what_the_model_reads(bundled_model_path):
    """-i with a reverse prompt: control comes back at "User:", the typed line and its newline go to the model, and
    the screen shows exactly the text (no prompt marker the model does not see)."""
    prompt = r"Transcript of a dialog.\nUser: Hello, what is 2+2?\nBot:"
    cmd = (f"{shlex.quote(sys.executable)} -m powerinfer run -i --temp 0 -c 512 -n 40 --no-stats -r User: "
           f"-p {shlex.quote(prompt)} -m {shlex.quote(str(bundled_model_path))}")
    t = Tmux(cmd)
    try:
        s = t.wait_for(lambda s: s.rstrip().endswith("User:") and s.count("User:") >= 2)
        t.keys(" And 3+3?", "Enter")
        s = t.wait_for(lambda s: s.count("User:") >= 3)
        lines = [ln for ln in s.splitlines() if ln.strip()]
        assert lines[:3] == ["Transcript of a dialog.", "User: Hello, what is 2+2?", "Bot: 2 + 2 = 4"]
        assert lines[3] == "User: And 3+3?" and "6" in lines[4]
        t.keys("C-d")
        assert "EXITED rc=0" in t.wait_for(lambda s: "EXITED" in s)
    finally:
        t.close()
