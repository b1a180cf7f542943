"""Prompt files are bytes in, bytes out (textdata.read_text): CRLF line ends reach the tokenizer as written, so a
-f prompt tokenizes as llama.cpp tokenizes the same bytes; invalid UTF-8 is a one-line error naming the byte."""
import json

import pytest

from powerinfer import cli
from powerinfer.errors import PowerInferError
from powerinfer.formats.loader import load_tokenizer
from powerinfer.textdata import read_text

CRLF = b"First line\r\nSecond line\r\n\r\nA third\rand a bare CR.\r\n"
# llama.cpp's ids for CRLF with the bundled SmolLM2 (llama-cpp-python 0.3.36, Llama(vocab_only=True).tokenize(CRLF,
# special=True)), so the suite checks them where llama.cpp is not installed: the first "\r\n" is '\r' '\n' (201 198),
# "\r\n\r\n" is '\r\n\r' '\n' (7209 198), the last "\r\n" one token (2738); LF line ends give 198 each instead
LLAMA_CPP_IDS = [5345, 1761, 201, 198, 12556, 1761, 7209, 198, 49, 3464, 201, 397, 253, 9965, 11012, 30, 2738]


@pytest.fixture(scope="module")
def tokenizer(bundled_model):
    return load_tokenizer(bundled_model)


def _tokenize_file(path, capsys) -> list[int]:
    assert cli.main(["tokenize", "-f", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_crlf_prompt_file_keeps_its_bytes(tmp_path, tokenizer, capsys):
    path = tmp_path / "prompt.txt"
    path.write_bytes(CRLF)
    assert read_text(path).encode() == CRLF
    ids = _tokenize_file(path, capsys)
    assert ids == LLAMA_CPP_IDS
    # our tokenizer's ids equal llama.cpp's (scripts/tokenizer_parity.py, 508/508 strings): the exact bytes' ids
    assert ids == tokenizer.encode(CRLF.decode(), add_bos=None, parse_special=True)
    assert ids != tokenizer.encode(CRLF.replace(b"\r\n", b"\n").decode(), add_bos=None, parse_special=True)
    assert tokenizer.decode(ids).encode() == CRLF


def test_crlf_prompt_file_matches_llama_cpp(tmp_path, bundled_model_path, tokenizer, capsys):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the `bench` extra) is not installed")
    path = tmp_path / "prompt.txt"
    path.write_bytes(CRLF)
    llm = llama_cpp.Llama(str(bundled_model_path), vocab_only=True, verbose=False)
    want = llm.tokenize(CRLF, add_bos=tokenizer.add_bos, special=True)
    assert _tokenize_file(path, capsys) == want == LLAMA_CPP_IDS


def test_invalid_utf8_prompt_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"caf\xc3 au lait\r\n")
    rc = cli.main(["run", "-f", str(path), "-n", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err == [f"error: {path}: not UTF-8 text (invalid continuation byte at byte 3)"]
    with pytest.raises(PowerInferError, match="not a regular file"):
        read_text(tmp_path)
