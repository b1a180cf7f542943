"""Chat prompts from the model's `tokenizer.chat_template` (Jinja), rendered the way HF transformers does.

transformers' `apply_chat_template` is the reference: an ImmutableSandboxedEnvironment (here with bounded time,
output and memory, template_sandbox.py: templates come from strangers' model files) with trim_blocks and
lstrip_blocks, the loopcontrols extension, a `tojson` that keeps non-ASCII text, and the globals
`raise_exception` and `strftime_now`. Models without a template get ChatML, llama.cpp's fallback.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2.ext import Extension, loopcontrols

from ..errors import PowerInferError, one_line
from .template_sandbox import BoundedSandbox, TemplateLimit

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class _TemplateRaised(Exception):
    """`raise_exception(...)` called by the template itself (e.g. "roles must alternate")."""


def _raise_exception(message: str):
    raise _TemplateRaised(message)


def _tojson(value, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    # jinja2's own tojson HTML-escapes <, >, & and ' -- wrong inside a prompt; HF overrides it the same way
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks the assistant's tokens for HF's training masks; for a
    prompt it only renders its body."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    # jinja2's ImmutableSandboxedEnvironment, with renders bounded in time, output and memory (template_sandbox.py)
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationTag])
    env.filters["tojson"] = env.bounded_filter("tojson", _tojson)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def _flatten(message: dict) -> dict:
    """OpenAI-style content lists of text parts become one string: text-only templates expect a string."""
    content = message.get("content")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return {**message, "content": "".join(p.get("text", "") for p in content)}
    return message


def render_chat(template: str | None, messages: list[dict], add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", **extra) -> str:
    """The prompt text for `messages` ([{"role": ..., "content": ...}, ...]). `template` None or empty uses
    ChatML; `extra` reaches the template as variables (tools, documents, enable_thinking, ...). Errors in the
    template, or raised by it, become PowerInferError."""
    # HF always defines these (None when absent); templates test `tools is defined`
    extra.setdefault("tools", None)
    extra.setdefault("documents", None)
    if template is not None and not isinstance(template, str):
        raise PowerInferError(f"the model's chat template is a {type(template).__name__}, not text")
    try:
        compiled = _compile(template or CHATML_TEMPLATE)
        return compiled.environment.render(compiled, messages=[_flatten(m) for m in messages],
                                           add_generation_prompt=add_generation_prompt, bos_token=bos_token,
                                           eos_token=eos_token, **extra)
    except _TemplateRaised as e:
        raise PowerInferError(f"the chat template refused these messages: {one_line(e)}") from None
    except TemplateLimit as e:
        raise PowerInferError(f"the model's chat template was stopped: {e}") from None
    except jinja2.TemplateSyntaxError as e:
        raise PowerInferError(f"the model's chat template is invalid (line {e.lineno}): {one_line(e.message)}") \
            from None
    except jinja2.TemplateError as e:
        raise PowerInferError(f"the model's chat template failed: {one_line(e)}") from None
    except RecursionError:
        raise PowerInferError("the model's chat template failed: it recursed too deeply") from None
    except MemoryError:
        raise PowerInferError("the model's chat template failed: out of memory") from None
    except Exception as e:       # e.g. TypeError from `'x' + None` when a message lacks content
        raise PowerInferError(f"the model's chat template failed: {type(e).__name__}: {one_line(e)}") from None
