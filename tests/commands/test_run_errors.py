"""`powerinfer run`: batch mode goes on past bad lines, and each user error the issue listed is one line."""
from __future__ import annotations

import json

import pytest

from powerinfer.cli import main


def one_line_error(code, err, *needles):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code not in (0, None) and "Traceback" not in err
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    return str(tiny_gguf(tokenizer=True, n_vocab=300, context_length=256).path)


def test_batch_goes_on_past_bad_lines(tiny, tmp_path, capsys):
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join([
        "hello",                                   # line 1
        "",                                        # line 2: skipped
        '{"prompt": "one two", "n_predict": 3}',   # line 3: its own settings
        '{"prompt": 5}',                           # line 4: bad
        "{not json",                               # line 5: bad
        '{"prompt": "x", "temp": "hot"}',          # line 6: bad value
        '{"prompt": "x", "colour": 1}',            # line 7: unknown setting
        "word " * 200,                             # line 8: longer than -c 64
        "last one",                                # line 9
    ]) + "\n")
    out = tmp_path / "out.jsonl"
    code = main(["run", "-m", tiny, "--prompt-file-batch", str(f), "-o", str(out), "-n", "4", "--temp", "0",
                 "-c", "64"])
    err = capsys.readouterr().err
    recs = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert [r["line"] for r in recs] == [1, 3, 4, 5, 6, 7, 8, 9]
    assert [r["index"] for r in recs] == list(range(8))
    failed = {r["line"]: r["error"] for r in recs if "error" in r}
    assert set(failed) == {4, 5, 6, 7, 8}
    assert "prompt" in failed[4] and "JSON object" in failed[5] and "temp: expected a number" in failed[6]
    assert "colour" in failed[7] and "context" in failed[8]
    assert recs[1]["completion_tokens"] == 3 and recs[-1]["prompt"] == "last one" and recs[-1]["completion"]
    assert code == 5  # the number of failed lines
    assert "5 of 8 prompts failed (line 4, 5, 6, 7, 8)" in err.splitlines()[-1] and "Traceback" not in err


@pytest.mark.parametrize("argv, needles", [
    (["-p", "hi", "--temp", "nan"], ["--temp must be a finite number"]),
    (["-p", "hi", "--presence-penalty", "nan"], ["--presence-penalty must be a finite number"]),
    (["-p", "hi", "--frequency-penalty", "inf"], ["--frequency-penalty must be a finite number"]),
    (["-p", "hi", "-c", "999999999"], ["KV cache", "lower -c"]),
    (["-p", "hi", "--keep", "-2"], ["--keep must be >= -1"]),
    (["-p", "hi", "-hf", "user/model"], ["-hf", "-m FILE"]),
    (["-p", "hi", "--lora", "a.gguf"], ["LoRA"]),
    (["-f", "/"], ["not a regular file"]),
    (["--grammar-file", "/nonexistent/g.gbnf", "-p", "hi"], ["no such file"]),
])
def test_user_errors_are_one_line(tiny, capsys, argv, needles):
    code = main(["run", "-m", tiny, "-n", "2", *argv])
    one_line_error(code, capsys.readouterr().err, *needles)


def test_unreadable_model_is_one_line(tmp_path, capsys):
    code = main(["run", "-m", str(tmp_path), "-p", "hi"])  # a directory without a model in it
    one_line_error(code, capsys.readouterr().err, str(tmp_path))


def test_output_onto_a_directory_is_one_line(tiny, tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("hello\n")
    code = main(["run", "-m", tiny, "--prompt-file-batch", str(f), "-o", str(tmp_path), "-n", "1"])
    one_line_error(code, capsys.readouterr().err, "is a directory")


def test_random_run_prints_its_seed(tiny, capsys):
    assert main(["run", "-m", tiny, "-p", "hi", "-n", "2"]) == 0
    err = capsys.readouterr().err
    seed = int(err.split("seed ")[1].split("]")[0])
    assert main(["run", "-m", tiny, "-p", "hi", "-n", "2", "-s", str(seed)]) == 0


def test_interrupted_batch_keeps_the_records_so_far(tiny, tmp_path, capsys, monkeypatch):
    from powerinfer.api import LLM

    real = LLM.stream

    def stream(self, prompt, **kw):
        if prompt == "stop here":
            raise KeyboardInterrupt  # as Ctrl-C would, in the middle of the batch
        return real(self, prompt, **kw)

    monkeypatch.setattr(LLM, "stream", stream)
    f = tmp_path / "prompts.txt"
    f.write_text("first\nsecond\nstop here\nnever\n")
    out = tmp_path / "out.jsonl"
    code = main(["run", "-m", tiny, "--prompt-file-batch", str(f), "-o", str(out), "-n", "2", "--temp", "0"])
    assert code == 130
    assert [json.loads(ln)["prompt"] for ln in out.read_text().splitlines()] == ["first", "second"]
    assert "interrupted: 2 of 4 prompts done" in capsys.readouterr().err
