"""Tokenizer ids against llama.cpp's (golden file written by scripts/tokenizer_parity.py), streaming
detokenization, special tokens, end-of-generation ids, and SentencePiece merging on a hand-built vocabulary."""
import importlib.util
import json
import logging
from pathlib import Path

import gguf
import pytest

from powerinfer.errors import ModelFormatError
from powerinfer.formats.tokenizer import StreamDecoder, Tokenizer

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "data" / "smollm2_tokenizer_golden.json"


def _load_parity_script():
    spec = importlib.util.spec_from_file_location("tokenizer_parity", ROOT / "scripts" / "tokenizer_parity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


parity = _load_parity_script()


@pytest.fixture(scope="module")
def meta():
    from powerinfer.errors import PowerInferError
    from powerinfer.formats.bundled import bundled_model_path

    try:
        path = bundled_model_path()
    except PowerInferError as e:
        pytest.skip(str(e))
    return parity.read_metadata(path)


@pytest.fixture(scope="module")
def tok(meta):
    return Tokenizer.from_gguf_metadata(meta)


@pytest.fixture(scope="module")
def golden():
    return json.loads(GOLDEN.read_text())


# -- parity with llama.cpp ---------------------------------------------------------------------------------

def _mismatches(tok, expected: dict) -> list:
    return [(s, tok.encode(s), ids) for s, ids in expected.items() if tok.encode(s) != ids]


def test_golden_covers_the_parity_strings(golden):
    assert golden["model"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert len(golden["ids"]) >= 300
    assert list(golden["ids"]) == parity.parity_strings()


def test_ids_equal_llama_cpp(tok, golden):
    bad = _mismatches(tok, golden["ids"])
    assert not bad, f"{len(bad)} of {len(golden['ids'])} differ from llama.cpp, first: {bad[:3]}"


@pytest.mark.parametrize("variant", [*parity.VARIANT_PRES, parity.SPM_VARIANT])
def test_variant_ids_equal_llama_cpp(meta, golden, variant):
    """The same vocabulary relabelled with another pre-tokenizer, or rebuilt as SentencePiece."""
    id_lists = golden["variants"][variant]
    if isinstance(id_lists, str):
        id_lists = golden["variants"][id_lists]
    vmeta = (parity.synthetic_spm_metadata(meta) if variant == parity.SPM_VARIANT
             else parity.relabel_metadata(meta, variant))
    expected = dict(zip(golden["variant_texts"], id_lists))
    bad = _mismatches(Tokenizer.from_gguf_metadata(vmeta), expected)
    assert not bad, f"{variant}: {len(bad)} differ from llama.cpp, first: {bad[:3]}"


def test_decode_round_trips(tok, golden):
    # SmolLM2's vocabulary lacks tokens for some ASCII control bytes (llama.cpp drops them too)
    missing = {chr(b) for b in range(128) if not tok.encode(chr(b))}
    assert missing and all(ord(c) < 32 for c in missing) and "\x1d" in missing
    texts = [s for s in golden["ids"] if not set(s) & missing]
    bad = [s for s in texts if tok.decode(tok.encode(s)) != s]
    assert not bad
    assert len(texts) >= 300


# -- model facts ---------------------------------------------------------------------------------------------

def test_bundled_model_special_ids(tok):
    assert (tok.bos_id, tok.eos_id, tok.vocab_size, tok.add_bos) == (1, 2, 49152, False)
    # llama.cpp: <|endoftext|> and <|im_end|> by text, <reponame> as the FIM repo token
    assert tok.eog_ids == {0, 2, 4}
    assert tok.token_text(2) == "<|im_end|>"
    assert tok.encode("hi", add_bos=True)[0] == 1
    assert tok.encode("hi", add_eos=True)[-1] == 2


def test_special_tokens_parsed_or_not(tok):
    text = "<|im_start|>user\nHi<|im_end|>\n"
    ids = tok.encode(text)
    assert ids[0] == 1 and ids.count(1) == 1 and ids.count(2) == 1
    plain = tok.encode(text, parse_special=False)
    assert 1 not in plain and 2 not in plain
    assert tok.decode(plain) == text == tok.decode(ids)


@pytest.mark.parametrize("text", ["<|im_start", "im_end|>", "< |im_end| >", "<|IM_START|>", "<|im_end|"])
def test_special_token_lookalikes_stay_text(tok, text):
    ids = tok.encode(text)
    assert not set(ids) & {0, 1, 2}
    assert tok.decode(ids) == text


def test_longest_special_token_wins_and_repeats(tok):
    assert tok.encode("<|im_end|><|im_end|>") == [2, 2]
    assert tok.encode("<|endoftext|>") == [0]


def test_empty_text(tok):
    assert tok.encode("") == []
    assert tok.decode([]) == ""


def test_unknown_pre_tokenizer_falls_back_to_default(meta, caplog):
    with caplog.at_level(logging.WARNING, logger="powerinfer.formats.tokenizer"):
        unknown = Tokenizer.from_gguf_metadata(parity.relabel_metadata(meta, "no-such-pre"))
    assert "no-such-pre" in caplog.text
    default = Tokenizer.from_gguf_metadata(parity.relabel_metadata(meta, "default"))
    for s in parity.NUMBERS + parity.PUNCT:
        assert unknown.encode(s) == default.encode(s)


def test_unsupported_tokenizer_model_is_a_clear_error(meta):
    with pytest.raises(ModelFormatError, match="not supported"):
        Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.model": "bert"})
    with pytest.raises(ModelFormatError, match="no tokenizer"):
        Tokenizer.from_gguf_metadata({"general.architecture": "llama"})


# -- streaming detokenization --------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["👨‍👩‍👧‍👦 family", "🇫🇷🇯🇵 flags", "你好，世界！", "東京は日本の首都です。",
                                  "नमस्ते दुनिया", "สวัสดีชาวโลก", "🏴󠁧󠁢󠁳󠁣󠁴󠁿 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"])
def test_stream_decoder_never_emits_broken_characters(tok, text):
    ids = tok.encode(text)
    # the case is only meaningful if some token ends inside a character
    partial = [i for i in ids if _is_incomplete_utf8(tok.token_bytes(i))]
    assert partial, "no token of this text splits a character"
    stream = StreamDecoder(tok)
    chunks = [stream.push(i) for i in ids] + [stream.flush()]
    assert all("\ufffd" not in c for c in chunks)
    assert "".join(chunks) == tok.decode(ids) == text
    assert any(c == "" for c in chunks)     # the bytes of a split character were held back


def _is_incomplete_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_stream_decoder_replaces_invalid_bytes_and_flushes(tok):
    # tokens for single raw bytes: GPT-2's byte table maps 0xE4 -> 'ä', 0xB8 -> '¸'
    lead, cont = tok.token_id("ä"), tok.token_id("¸")
    assert tok.token_bytes(lead) == b"\xe4" and tok.token_bytes(cont) == b"\xb8"
    stream = StreamDecoder(tok)
    assert stream.push(lead) == "" and stream.push(cont) == ""      # two bytes of a 3-byte character
    assert stream.push(tok.encode("a")[0]) == "\ufffda"              # the character never completes
    assert stream.push(lead) == ""
    assert stream.flush() == "\ufffd"                                 # an unfinished character at the end
    assert stream.push(tok.encode("b")[0]) == "b"                     # usable again after flush


def test_stream_decoder_hides_control_tokens_unless_asked(tok):
    assert StreamDecoder(tok).push(1) == ""
    assert StreamDecoder(tok, special=True).push(1) == "<|im_start|>"
    assert tok.decode([1, 2], special=False) == ""


def test_token_bytes_rejects_out_of_range_ids(tok):
    with pytest.raises(IndexError):
        tok.token_bytes(-1)
    with pytest.raises(IndexError):
        tok.token_bytes(tok.vocab_size)


# -- SentencePiece ("llama") vocabulary built by hand -------------------------------------------------------

def _write_spm_gguf(path, pieces: list[tuple[str, float]], **keys) -> Path:
    """<unk> <s> </s>, the 256 byte tokens <0x00>..<0xFF> (ids 3..258), then `pieces` from id 259."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + [p for p, _ in pieces]
    scores = [0.0] * 259 + [s for _, s in pieces]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    for key, value in keys.items():
        w.add_bool(f"tokenizer.ggml.{key}", value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _spm(tmp_path, pieces, **keys) -> tuple[Tokenizer, dict[str, int]]:
    tok = Tokenizer.from_gguf_file(_write_spm_gguf(tmp_path / "spm.gguf", pieces, **keys))
    return tok, {p: 259 + i for i, (p, _) in enumerate(pieces)}


BASE = [("▁", -1.0), ("a", -2.0), ("b", -3.0), ("c", -4.0), ("x", -4.5)]


def test_spm_merges_highest_score_first(tmp_path):
    # "▁abc": candidate pairs ▁a (-6), ab (-5), bc (-1.5). bc wins, then ▁a (abc = a+bc scores only -7):
    tok, ids = _spm(tmp_path, BASE + [("ab", -5.0), ("bc", -1.5), ("▁a", -6.0), ("abc", -7.0)])
    assert tok.encode("abc") == [1, ids["▁a"], ids["bc"]]
    # swap the scores of ab and bc: ab wins, then abc (-7) beats nothing else -> ▁ abc
    tok, ids = _spm(tmp_path, BASE + [("ab", -1.5), ("bc", -5.0), ("▁a", -6.0), ("abc", -7.0)])
    assert tok.encode("abc") == [1, ids["▁"], ids["abc"]]


def test_spm_equal_scores_merge_leftmost_first(tmp_path):
    # ab and bc score the same; llama.cpp merges the leftmost pair: a|b|c -> ab|c (bc has the lower id)
    tok, ids = _spm(tmp_path, BASE + [("bc", -1.0), ("ab", -1.0)], add_space_prefix=False)
    assert tok.encode("abc", add_bos=False) == [ids["ab"], ids["c"]]
    assert tok.encode("bcab", add_bos=False) == [ids["bc"], ids["ab"]]
    tok, ids = _spm(tmp_path, BASE + [("aa", -1.0)], add_space_prefix=False)
    assert tok.encode("aaa", add_bos=False) == [ids["aa"], ids["a"]]


def test_spm_space_prefix_bos_and_byte_fallback(tmp_path):
    tok, ids = _spm(tmp_path, BASE + [("▁a", -1.5), ("▁é", -1.2)])
    assert tok.add_bos and tok.add_space_prefix
    assert tok.encode("a b") == [1, ids["▁a"], ids["▁"], ids["b"]]
    # é is no token, but ▁é is: llama.cpp still merges it; alone it falls back to UTF-8 byte tokens
    assert tok.encode("é", add_bos=False) == [ids["▁é"]]
    assert tok.encode("xé", add_bos=False) == [ids["▁"], ids["x"], 3 + 0xC3, 3 + 0xA9]
    assert tok.decode(tok.encode("xé a", add_bos=False)) == "xé a"
    # after a special token the next text gets a space prefix again (llama.cpp), and <s> is parsed
    assert tok.encode("<s>a", add_bos=False) == [1, ids["▁a"]]
    assert tok.decode([1, ids["▁a"]], special=False) == " a"        # llama.cpp's detokenize, BOS first
    assert tok.decode([ids["▁a"], ids["b"]]) == "ab"                  # the prefix space is dropped again


def test_spm_without_space_prefix(tmp_path):
    tok, ids = _spm(tmp_path, BASE + [("▁a", -1.5)], add_space_prefix=False, add_bos_token=False)
    assert tok.encode("a") == [ids["a"]]
    assert tok.encode(" a") == [ids["▁a"]]
    assert tok.decode([ids["▁a"]]) == " a"
