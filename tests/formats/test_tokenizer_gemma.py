"""Gemma's vocabulary and chat template from a GGUF: tokenizer.ggml.model "llama" (SentencePiece with byte fallback,
add_space_prefix false as llama.cpp's converter writes it for gemma2/gemma3, <bos> 2 added), the turn markers as
control tokens, and Gemma's <start_of_turn> template. A Gemma-style vocabulary (fixtures/gemma.py: Gemma's special
ids, 256 byte tokens, 58 pieces) in a tiny gemma2 GGUF: ids equal llama.cpp's, recorded with llama-cpp-python 0.3.36
(Llama(vocab_only=True).tokenize(text, add_bos=True, special=True)) and compared live where it is installed."""
import pytest

from fixtures.gemma import GEMMA_TEMPLATE, SPM_N_VOCAB, gemma_model, write_llama_cpp_gemma
from powerinfer.errors import PowerInferError
from powerinfer.formats.chat import render_chat
from powerinfer.formats.loader import load_model, load_tokenizer

LLAMA_CPP_IDS = {
    "hello world": [2, 292, 297, 277, 326, 274, 266],
    " hello  world": [2, 262, 292, 297, 277, 262, 326, 274, 266],
    "the thing is\nin it": [2, 291, 267, 289, 270, 313, 306, 16, 294, 319],
    "<start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\n":
        [2, 4, 283, 281, 295, 16, 292, 297, 277, 5, 16, 4, 275, 277, 266, 303, 16],
    "héllo ÿ 漢字": [2, 270, 201, 175, 297, 277, 262, 201, 197, 262, 236, 194, 168, 235, 179, 157],
    "  leading spaces\t\ttabs": [2, 320, 274, 267, 263, 266, 313, 304, 278, 263, 265, 315, 15, 15, 282, 263, 264, 281],
    "world, hello! 123": [2, 285, 300, 274, 266, 50, 262, 292, 297, 277, 39, 262, 55, 56, 57],
}


@pytest.fixture(scope="module")
def gemma_gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma_vocab")
    gemma_model("gemma2", vocab_size=SPM_N_VOCAB, num_hidden_layers=2).save_pretrained(root / "hf")
    return write_llama_cpp_gemma(root / "gemma2.gguf", load_model(root / "hf"))


@pytest.mark.parametrize("text", list(LLAMA_CPP_IDS))
def test_ids_equal_llama_cpp(gemma_gguf, text):
    tok = load_tokenizer(load_model(gemma_gguf))
    assert (tok.is_spm, tok.add_space_prefix, tok.bos_id, tok.eos_id) == (True, False, 2, 1)
    ids = tok.encode(text, add_bos=True, parse_special=True)
    assert ids == LLAMA_CPP_IDS[text]
    assert tok.decode(ids[1:]) == text  # byte fallback: every text round-trips


def test_ids_equal_llama_cpp_live(gemma_gguf):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(gemma_gguf), vocab_only=True, verbose=False)
    tok = load_tokenizer(load_model(gemma_gguf))
    for text in (*LLAMA_CPP_IDS, "<start_of_turn>", "a<end_of_turn>b", "▁x", "\n\n\n", "hello" * 20):
        assert tok.encode(text, add_bos=True, parse_special=True) == \
            llm.tokenize(text.encode(), add_bos=True, special=True), text
        # the markers are plain text when specials are not parsed
        assert tok.encode(text, add_bos=False, parse_special=False) == \
            llm.tokenize(text.encode(), add_bos=False, special=False), text


def test_chat_template_from_the_file_renders(gemma_gguf):
    loaded = load_model(gemma_gguf)
    template = loaded.metadata["tokenizer.chat_template"]
    assert template == GEMMA_TEMPLATE
    messages = [{"role": "user", "content": " Hi "}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Bye"}]
    prompt = render_chat(template, messages, bos_token="<bos>")
    assert prompt == ("<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
                      "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")
    tok = load_tokenizer(loaded)
    ids = tok.encode(prompt, add_bos=False, parse_special=True)
    assert ids[:2] == [2, 4] and ids.count(4) == 4 and ids.count(5) == 3  # <bos>, then one id per marker
    with pytest.raises(PowerInferError, match="System role not supported"):
        render_chat(template, [{"role": "system", "content": "x"}, *messages], bos_token="<bos>")
