"""benchmarks/formats_decode.py: one model shape in two weight formats, timed in one process (the table's shape and
the ratio column's anchor), and its one-line errors."""
import pytest


@pytest.fixture(scope="module")
def formats_decode(benchmark_module):
    return benchmark_module("formats_decode").main


def test_table_has_every_file_and_ratios_to_the_first(capsys, tiny_llama_gguf, formats_decode):
    q40 = tiny_llama_gguf("Q4_0", d_model=256, n_ff=512, n_vocab=320, tokenizer=True)
    q4k = tiny_llama_gguf("Q4_K", d_model=256, n_ff=512, n_vocab=320, tokenizer=True)
    assert formats_decode([str(q40.path), str(q4k.path), "--rounds", "2", "--n-prompt", "2", "--n-gen", "3",
                           "-t", "1"]) == 0
    out = capsys.readouterr().out
    assert sum(ln.startswith("round ") for ln in out.splitlines()) == 2
    rows = [ln.split("|")[1:-1] for ln in out.splitlines() if ln.startswith("| ") and not ln.startswith("| file")]
    assert [r[0].strip() for r in rows] == [q40.path.name, q4k.path.name]
    assert float(rows[0][2]) == 1.0 and float(rows[1][1]) > 0 and float(rows[1][2]) > 0


@pytest.mark.parametrize("argv, needle", [
    (["missing.gguf"], "no such file: missing.gguf"),
    (["--rounds", "0"], "need --rounds >= 1"),
])
def test_bad_arguments_are_one_line_errors(capsys, tiny_llama_gguf, formats_decode, argv, needle):
    path = str(tiny_llama_gguf("Q4_0").path)
    with pytest.raises(SystemExit) as e:
        formats_decode([path, *argv])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert e.value.code == 2 and needle in err[-1]
