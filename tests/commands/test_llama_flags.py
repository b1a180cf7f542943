"""docs/llama-cli-flags.md, row by row: every llama-cli flag in the table runs once through `powerinfer run` (on a
tiny model: what is checked is the flag's handling, not the text), and does what its "kind" column says."""
from __future__ import annotations

import io
import re
import shlex
from pathlib import Path

import pytest

from powerinfer.cli import build_parser, main

DOC = Path(__file__).resolve().parents[2] / "docs" / "llama-cli-flags.md"


def table_rows() -> list[tuple[str, str, str]]:
    rows = []
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) == 4 and cells[2] in ("does", "note", "refused"):
            rows.append((cells[0].strip("`").replace("\\|", "|"), cells[1].strip("`").replace("\\|", "|"), cells[2]))
    return rows


ROWS = table_rows()


def test_the_table_covers_at_least_60_flags_and_every_spelling_parses():
    assert len(ROWS) >= 60
    parser = build_parser()
    run = next(a for a in parser._actions if a.dest == "command").choices["run"]
    known = set(run._option_string_actions)
    for flags, _, _ in ROWS:
        for spelling in re.findall(r"(?:^|[ ,])(--?[A-Za-z][\w-]*)", flags):
            assert spelling in known, f"{spelling} (row {flags}) is not a flag of run"


@pytest.fixture(scope="module")
def files(tiny_gguf, tmp_path_factory):
    d = tmp_path_factory.mktemp("flags")
    (d / "prompt.txt").write_text("hello\r\nworld")
    (d / "binary.txt").write_bytes(b"hello \xff world")
    (d / "grammar.gbnf").write_text('root ::= "a" | "b"\n')
    (d / "schema.json").write_text('{"type": "object"}')
    (d / "template.jinja").write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    model = tiny_gguf(tokenizer=True, n_vocab=300, context_length=256)
    return {"MODEL": str(model.path), "PROMPT_FILE": str(d / "prompt.txt"),
            "BINARY_FILE": str(d / "binary.txt"), "GRAMMAR_FILE": str(d / "grammar.gbnf"),
            "SCHEMA_FILE": str(d / "schema.json"), "TEMPLATE_FILE": str(d / "template.jinja")}


@pytest.mark.parametrize("flags, example, kind", ROWS, ids=[r[1] for r in ROWS])
def test_each_flag_runs_once(flags, example, kind, files, capsys, monkeypatch):
    args = [files.get(a, a) for a in shlex.split(example)]
    has_prompt = any(a in ("-p", "-f", "-bf", "-cnv", "-i", "-if") for a in args) or \
        any(a in ("--version", "--list-devices") for a in args)
    argv = ["run", "-m", files["MODEL"], "-n", "2", "--temp", "0", "-c", "128", *args]
    if not has_prompt:
        argv += ["-p", "hello"]
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))  # -i / -cnv read one line, then the end of input
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    notes = [ln for ln in err.splitlines() if ln.startswith("note: ")]
    if kind == "refused":
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), err
    elif kind == "note":
        assert code == 0, err
        assert len(notes) == 1 and "has no effect here" in notes[0], err
    else:
        assert code == 0, err
        assert not notes, err


def test_a_neutral_value_prints_no_note(files, capsys):
    assert main(["run", "-m", files["MODEL"], "-n", "1", "-p", "hi", "--mirostat", "0", "-fa", "off",
                 "-ctk", "f16"]) == 0
    assert "note:" not in capsys.readouterr().err


def test_multi_letter_short_flags_are_not_split(files, capsys):
    """argparse would read -ngl 99 as -n gl and -fa as -f a; registered whole they parse as themselves."""
    args = build_parser().parse_args(["run", "-ngl", "99", "-fa", "-ctk", "q8_0", "-no-cnv", "-st", "-tb", "2",
                                      "-p", "x"])
    assert args.n_gpu_layers == "99" and args.flash_attn == "on" and args.cache_type_k == "q8_0"
    assert args.no_conversation and args.single_turn and args.threads_batch == "2"
    assert args.n_predict is None and args.file is None and args.prompt == "x"


def test_ngl_zero_means_no_fast_tier(files, capsys, monkeypatch):
    seen = {}
    import powerinfer.commands.run as run_cmd

    real = run_cmd._load

    def spy(settings, sampling, quiet=False):
        seen["vram_budget"] = settings.vram_budget
        return real(settings, sampling, quiet)

    monkeypatch.setattr(run_cmd, "_load", spy)
    assert main(["run", "-m", files["MODEL"], "-n", "1", "-p", "hi", "-ngl", "0"]) == 0
    assert seen["vram_budget"] == 0.0


def test_escapes_are_processed_like_llama_cli(files, capsys):
    from powerinfer.options_llama import unescape

    assert unescape(r"A\nB\t\'q\' \"d\" \\n \x41\x4 \q") == "A\nB\t'q' \"d\" \\n A\\x4 \\q"
    assert main(["run", "-m", files["MODEL"], "-n", "0", "-p", r"A\nB", "--no-stats"]) == 0
    assert capsys.readouterr().out.startswith("A\nB")
    assert main(["run", "-m", files["MODEL"], "-n", "0", "-p", r"A\nB", "--no-escape", "--no-stats"]) == 0
    assert capsys.readouterr().out.startswith("A\\nB")
