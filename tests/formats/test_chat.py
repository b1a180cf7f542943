"""Chat templates: the bundled model's template, HF-compatible Jinja behaviour, errors, the ChatML fallback."""
import gguf
import pytest

from powerinfer.errors import PowerInferError
from powerinfer.formats.chat import CHATML_TEMPLATE, render_chat
from powerinfer.formats.tokenizer import Tokenizer

SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def bundled():
    from powerinfer.formats.bundled import bundled_model_path

    try:
        path = bundled_model_path()
    except PowerInferError as e:
        pytest.skip(str(e))
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith(("tokenizer.", "general."))}


def test_bundled_template_renders_chatml_with_default_system_prompt(bundled):
    template = bundled["tokenizer.chat_template"]
    prompt = render_chat(template, [{"role": "user", "content": "What is 2+2?"}])
    assert prompt == (f"<|im_start|>system\n{SMOLLM_SYSTEM}<|im_end|>\n"
                      "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                      "<|im_start|>assistant\n")


def test_bundled_template_multi_turn_with_system(bundled):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    prompt = render_chat(bundled["tokenizer.chat_template"], messages, add_generation_prompt=False)
    assert prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                      "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n")


def test_rendered_prompt_tokenizes_into_control_tokens(bundled):
    tok = Tokenizer.from_gguf_metadata(bundled)
    prompt = render_chat(bundled["tokenizer.chat_template"], [{"role": "user", "content": "Hi"}])
    ids = tok.encode(prompt, add_bos=False)
    assert ids[0] == tok.bos_id == 1                      # <|im_start|> is SmolLM2's BOS
    assert ids.count(1) == 3 and ids.count(2) == 2        # three headers, two closed turns
    assert tok.decode(ids) == prompt


def test_fallback_is_chatml():
    messages = [{"role": "user", "content": "Hi"}]
    expected = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert render_chat(None, messages) == expected
    assert render_chat("", messages) == expected
    without_prompt = expected[:-len("<|im_start|>assistant\n")]
    assert render_chat(CHATML_TEMPLATE, messages, add_generation_prompt=False) == without_prompt


def test_template_syntax_error_is_a_powerinfer_error():
    with pytest.raises(PowerInferError, match="invalid"):
        render_chat("{% for m in messages %}{{ m.content }}", [{"role": "user", "content": "x"}])


def test_raise_exception_from_template():
    template = ("{% if messages[0]['role'] != 'user' %}"
                "{{ raise_exception('first message must be from the user') }}{% endif %}")
    with pytest.raises(PowerInferError, match="first message must be from the user"):
        render_chat(template, [{"role": "assistant", "content": "x"}])


def test_runtime_error_in_template_is_a_powerinfer_error():
    with pytest.raises(PowerInferError, match="TypeError"):
        render_chat("{{ messages[0]['content'] + 1 }}", [{"role": "user", "content": "x"}])


def test_sandbox_blocks_mutation():
    with pytest.raises(PowerInferError):
        render_chat("{{ messages.append(1) }}", [])


def test_hf_environment_features():
    # trim_blocks/lstrip_blocks: block tags do not leave their newline or indentation behind
    template = "{% for m in messages %}\n    {% if m.role == 'user' %}\n{{ m.content }}\n    {% endif %}\n{% endfor %}"
    assert render_chat(template, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "a\nb\n"
    # loopcontrols, tojson keeping non-ASCII and <>, bos/eos tokens, extra variables, strftime_now
    template = ("{{ bos_token }}{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
                "{{ m | tojson }}{% endfor %}{{ tools | tojson }}{{ eos_token }}{{ strftime_now('%Y') | length }}")
    out = render_chat(template, [{"role": "user", "content": "<é>"}, {"role": "user", "content": "skip"}],
                      bos_token="<s>", eos_token="</s>", tools=[{"name": "f"}])
    assert out == '<s>{"role": "user", "content": "<é>"}[{"name": "f"}]</s>4'


def test_generation_tag_renders_its_body():
    template = "{% for m in messages %}{% generation %}[{{ m.content }}]{% endgeneration %}{% endfor %}"
    assert render_chat(template, [{"role": "assistant", "content": "ok"}]) == "[ok]"


def test_text_part_lists_become_strings():
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]}]
    assert render_chat(None, messages) == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"


TEMPLATES = {
    "indented blocks": ("{% for m in messages %}\n  {% if m.role == 'system' %}\n    <<SYS>>{{ m.content }}<</SYS>>\n"
                        "  {% else %}\n    [{{ m.role | upper }}] {{ m.content | trim }}\n  {% endif %}\n{% endfor %}\n"
                        "{% if add_generation_prompt %}[ASSISTANT]{% endif %}"),
    "tools as json": ("{{ bos_token }}{% if tools %}Tools: {{ tools | tojson(indent=2) }}\n{% endif %}"
                      "{% for m in messages %}{{ m.role }}: {{ m.content }}{{ eos_token }}\n{% endfor %}"),
    "namespace and loop": ("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
                           "{% if loop.last %}{{ ns.n }}:{{ m.content }}{% endif %}{% endfor %}"),
    "tools defined": "{{ tools is defined }} {{ tools is none }} {{ documents is defined }}",
}


@pytest.mark.parametrize("name", [*TEMPLATES, "bundled"])
def test_same_text_as_transformers(name, bundled):
    hf = pytest.importorskip("transformers.utils.chat_template_utils")
    template = bundled["tokenizer.chat_template"] if name == "bundled" else TEMPLATES[name]
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": " Hi  <é> "},
                {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "more"}]
    tools = None if name == "tools defined" else [{"type": "function", "function": {"name": "f"}}]
    extra = {} if tools is None else {"tools": tools}        # not passing tools must look like HF's None
    ours = render_chat(template, messages, bos_token="<s>", eos_token="</s>", **extra)
    (theirs,), _ = hf.render_jinja_template([messages], tools=tools, chat_template=template,
                                            add_generation_prompt=True, bos_token="<s>", eos_token="</s>")
    assert ours == theirs
