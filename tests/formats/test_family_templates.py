"""The families' own chat templates, read from a GGUF, render through formats/chat.py to what transformers'
apply_chat_template renders (its render_jinja_template) and, where llama.cpp's built-in formatter knows the template
(llama_chat_apply_template: Phi-3's and ChatML), to what llama.cpp writes. tests/data/templates holds the templates
as the models ship them: Phi-3-mini-4k-instruct's and Qwen3's (thinking blocks, tools). Falcon's models ship none
(llama.cpp and this package then use ChatML)."""
import ctypes
from pathlib import Path

import pytest

from fixtures.family_vocabs import family_vocabularies, parity
from powerinfer.formats.chat import render_chat
from powerinfer.formats.gguf import open_gguf, read_metadata
from powerinfer.formats.tokenizer import Tokenizer

TEMPLATES = Path(__file__).resolve().parents[1] / "data" / "templates"
FAMILIES = {"phi3": "spm-phi3", "qwen3": "qwen2"}  # template -> the vocabulary kind it ships with
SYSTEM_USER_ASSISTANT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
                         {"role": "assistant", "content": "4"}]
USER_ASSISTANT_USER = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": " Hello! \n"},
                       {"role": "user", "content": "Say <b>ünï</b>\n\ntwice."}]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{family: GGUF metadata as read back from a vocabulary file carrying the template}."""
    from powerinfer.errors import PowerInferError

    try:
        vocabs = family_vocabularies()
    except PowerInferError as e:
        pytest.skip(str(e))
    root = tmp_path_factory.mktemp("templates")
    out = {}
    for family, vocab in FAMILIES.items():
        path = root / f"{family}.gguf"
        template = (TEMPLATES / f"{family}.jinja").read_text()
        parity.write_vocab_gguf({**vocabs[vocab], "tokenizer.chat_template": template}, path)
        out[family] = dict(meta=read_metadata(open_gguf(path)[0]), path=path)
    return out


def _tokens(meta) -> dict:
    """bos_token / eos_token as the package passes them (api.LLM.chat_prompt): the tokens' text."""
    tok = Tokenizer.from_gguf_metadata(meta)
    return {k: tok.token_bytes(i).decode() if i is not None else "" for k, i in
            (("bos_token", tok.bos_id), ("eos_token", tok.eos_id))}


def _transformers(template: str, messages, add_generation_prompt: bool, **kw) -> str:
    hf = pytest.importorskip("transformers.utils.chat_template_utils")
    (text,), _ = hf.render_jinja_template([messages], chat_template=template,
                                          add_generation_prompt=add_generation_prompt, **kw)
    return text


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("messages,add_generation_prompt", [(SYSTEM_USER_ASSISTANT, False),
                                                            (USER_ASSISTANT_USER, True)])
def test_template_from_gguf_matches_transformers(models, family, messages, add_generation_prompt):
    meta = models[family]["meta"]
    template = meta["tokenizer.chat_template"]
    assert template == (TEMPLATES / f"{family}.jinja").read_text()
    ours = render_chat(template, messages, add_generation_prompt=add_generation_prompt, **_tokens(meta))
    assert ours == _transformers(template, messages, add_generation_prompt, **_tokens(meta))


def test_expected_texts(models):
    """What the two templates write (so a template that renders nothing cannot pass the comparisons)."""
    phi3 = render_chat(models["phi3"]["meta"]["tokenizer.chat_template"], SYSTEM_USER_ASSISTANT,
                       add_generation_prompt=False, **_tokens(models["phi3"]["meta"]))
    assert phi3 == "<|system|>\nYou are terse.<|end|>\n<|user|>\n2+2?<|end|>\n<|assistant|>\n4<|end|>\n<|endoftext|>"
    qwen3 = models["qwen3"]["meta"]["tokenizer.chat_template"]
    assert render_chat(qwen3, SYSTEM_USER_ASSISTANT, add_generation_prompt=False) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n4<|im_end|>\n")
    no_thinking = render_chat(qwen3, SYSTEM_USER_ASSISTANT[:2], enable_thinking=False)
    assert no_thinking.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert no_thinking == _transformers(qwen3, SYSTEM_USER_ASSISTANT[:2], True, enable_thinking=False)
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    with_tools = render_chat(qwen3, SYSTEM_USER_ASSISTANT[:2], tools=tools)
    assert '<tools>\n{"type": "function"' in with_tools
    assert with_tools == _transformers(qwen3, SYSTEM_USER_ASSISTANT[:2], True, tools=tools)


@pytest.mark.parametrize("family", FAMILIES)
def test_same_text_as_llama_cpp_formatter(models, family):
    """llama.cpp's llama_chat_apply_template on the template it reads from the file (it detects Phi-3's format and
    ChatML for Qwen3) for user / assistant / user and a generation prompt."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(models[family]["path"]), vocab_only=True, verbose=False)
    template = llm.metadata["tokenizer.chat_template"]
    chat = (llama_cpp.llama_chat_message * 3)(*(llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode())
                                                for m in USER_ASSISTANT_USER))
    buf = ctypes.create_string_buffer(4096)
    n = llama_cpp.llama_chat_apply_template(template.encode(), chat, 3, True, buf, len(buf))
    assert 0 < n < len(buf)
    theirs = buf.raw[:n].decode()
    meta = models[family]["meta"]
    assert render_chat(meta["tokenizer.chat_template"], USER_ASSISTANT_USER, **_tokens(meta)) == theirs
