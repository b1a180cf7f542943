"""String arrays of the GGUF header (a vocabulary's tokens and merges) read by formats/gguf.py's one-pass parser:
the same values, parts and errors as gguf-py's own reader."""
from gguf import GGUFReader, GGUFValueType

from powerinfer.errors import ModelFormatError
from powerinfer.formats.gguf import open_gguf, read_metadata

KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")


def test_bundled_vocabulary_equals_gguf_py(bundled_model_path):
    ours, _ = open_gguf(bundled_model_path)
    ref = GGUFReader(bundled_model_path)
    assert list(ours.fields) == list(ref.fields)
    for key in KEYS:
        a, b = ours.fields[key], ref.fields[key]
        assert a.contents() == b.contents() and len(a.contents()) > 48000
        assert a.contents(5) == b.contents(5) and a.contents(slice(10, 20, 3)) == b.contents(slice(10, 20, 3))
        assert a.types == b.types == [GGUFValueType.ARRAY, GGUFValueType.STRING]
        assert list(a.data) == list(b.data) and len(a.parts) == len(b.parts)
        for i in (0, 1, 2, 3, 4, 5, 6, 7, len(b.parts) - 2, -1):  # key, types, count, lengths, bytes
            assert bytes(a.parts[i]) == bytes(b.parts[i]), i
    meta = read_metadata(ours)
    assert meta["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _with_bad_token(src, dst):
    data = bytearray(src.read_bytes())
    i = data.find(b"<|im_start|>")
    data[i:i + 2] = b"\xff\xfe"
    dst.write_bytes(bytes(data))
    return dst


def test_a_token_that_is_not_utf8_is_named(bundled_model_path, tmp_path):
    bad = _with_bad_token(bundled_model_path, tmp_path / "bad.gguf")
    try:
        read_metadata(open_gguf(bad)[0])
    except ModelFormatError as e:
        assert "metadata key 'tokenizer.ggml.tokens' is unreadable (UnicodeDecodeError" in str(e)
    else:
        raise AssertionError("no error for a token that is not UTF-8")


def test_a_string_past_the_end_is_refused(bundled_model_path, tmp_path):
    data = bundled_model_path.read_bytes()
    i = data.find(b"tokenizer.ggml.merges")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:i + 4096])  # the merges' array is cut after a few strings
    try:
        open_gguf(cut)
    except ModelFormatError as e:
        assert "corrupt or truncated GGUF header: an array of 48,900 STRING values needs bytes" in str(e)
    else:
        raise AssertionError("no error for a truncated array")
