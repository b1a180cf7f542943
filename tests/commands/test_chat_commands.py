"""-cnv and -i read from a pipe (no terminal): commands never reach the model, empty lines are ignored, /clear starts
over, and -i gives the model exactly the text it shows. A tiny model: what is checked is what the model is fed."""
from __future__ import annotations

import io
import re

import pytest

from powerinfer.cli import main


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    return str(tiny_gguf(tokenizer=True, n_vocab=300, context_length=256).path)


def run_with_stdin(monkeypatch, capsys, text, *argv):
    monkeypatch.setattr("sys.stdin", io.StringIO(text))
    code = main(["run", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def prompt_counts(err):
    """(prompt tokens, cached tokens) of each reply's timing line."""
    return [(int(a), int(b)) for a, b in re.findall(r"prompt: (\d+) tokens \((\d+) cached\)", err)]


def test_commands_and_empty_lines_are_not_messages(tiny, monkeypatch, capsys):
    code, out, err = run_with_stdin(monkeypatch, capsys, "/help\n\n   \n/nope\nhello\n/bye\nnever sent\n",
                                    "-m", tiny, "-cnv", "-n", "3", "--temp", "0")
    assert code == 0
    assert "/clear" in out and "unknown command /nope" in out
    assert len(prompt_counts(err)) == 1  # one reply: to "hello"; "never sent" came after /bye


def test_turns_reuse_the_cache_and_clear_starts_over(tiny, monkeypatch, capsys):
    code, _, err = run_with_stdin(monkeypatch, capsys, "hello\nagain\n/clear\nhello\n",
                                  "-m", tiny, "-cnv", "-n", "3", "--temp", "0")
    counts = prompt_counts(err)
    assert code == 0 and len(counts) == 3
    assert counts[1][1] >= counts[0][0]  # the second turn reads only its new tokens: the first turn is cached
    assert counts[2][0] == counts[0][0]  # after /clear the prompt is the first turn's again


def test_a_trailing_backslash_continues_the_message(tiny, monkeypatch, capsys):
    _, _, err1 = run_with_stdin(monkeypatch, capsys, "one\\\ntwo\n", "-m", tiny, "-cnv", "-n", "1", "--temp", "0")
    _, _, err2 = run_with_stdin(monkeypatch, capsys, "one\n", "-m", tiny, "-cnv", "-n", "1", "--temp", "0")
    # one message of "one\ntwo" (4 more tokens than "one": newline, t, w, o in the byte vocabulary)
    assert len(prompt_counts(err1)) == 1 and prompt_counts(err1)[0][0] == prompt_counts(err2)[0][0] + 4


def test_interactive_feeds_the_model_what_it_shows(tiny, monkeypatch, capsys):
    """-i: the model's tokens after the session are the text on the screen, prefix and suffix included."""
    import powerinfer.commands.chat as chat

    sessions = []
    real = chat.run_text

    def spy(session, *a, **kw):
        sessions.append(session)
        return real(session, *a, **kw)

    monkeypatch.setattr("powerinfer.commands.run.run_text", spy)
    code, out, _ = run_with_stdin(monkeypatch, capsys, "abc\n", "-m", tiny, "-i", "-p", r"Q:\n", "-n", "3",
                                  "--temp", "0", "--in-prefix", "[", "--in-suffix", "]", "--no-stats")
    assert code == 0
    s = sessions[0]
    model_text = s.llm.tokenizer.decode(s.ids)
    # the screen: the prompt, a reply, then (the typed line echoes on a terminal, not from a pipe) the suffix and
    # a second reply; the model: the same text with the prefix and the typed line in place
    assert model_text.startswith("Q:\n")
    assert "[abc\n]" in model_text
    # (the last "[" is the prefix of an input that never came: the pipe ended)
    assert out.replace("[]", "[abc\n]", 1).rstrip("\n").removesuffix("[") == model_text


def test_version_flags():
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
