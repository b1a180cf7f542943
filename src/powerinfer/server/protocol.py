"""The OpenAI wire format (reference/serving.md section 1): request models, their mapping onto the engine's sampling
settings, and errors in OpenAI's shape.

Requests are pydantic models that ignore unknown fields (a strictly validating server broke clients that send
newer fields, voideditor/void #128) and answer a malformed field with a one-line 400 naming it. Features the engine
does not have are a 400 / 501, never silently ignored (llama.cpp #11988: `response_format` accepted and ignored).
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# OpenAI's error types; llama-server's for the cases OpenAI has none (reference/serving.md 1.11)
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
               413: "invalid_request_error", 500: "server_error", 501: "not_supported_error",
               503: "unavailable_error"}


class APIError(Exception):
    """An HTTP error with an OpenAI-shaped body: {"error": {"message", "type", "param", "code", ...extra}}."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: dict | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ERROR_TYPES.get(status, "server_error")
        self.headers = headers or {}
        self.extra = extra

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code,
                          **self.extra}}


def validation_message(e: ValidationError) -> tuple[str, str | None]:
    """One line for the first problem of a pydantic error, and the field it concerns."""
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
    # pydantic tries every member of a union: name the field, not the member type it tried last
    parts = [p for p in loc.split(".") if p not in ("str", "list[str]", "list[int]", "list[list[int]]", "int")]
    field = ".".join(parts) or None
    return (f"{field}: {err['msg']}" if field else err["msg"]), field


class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Base):
    include_usage: bool = False


class ContentPart(_Base):
    type: str
    text: str | None = None


class Message(_Base):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for p in self.content:
            if p.type != "text":
                raise APIError(400, f"message content of type {p.type!r} is not supported: this model reads text "
                                    "only", param="messages", code="unsupported_content")
            parts.append(p.text or "")
        return "".join(parts)


class _Generation(_Base):
    """Fields the two completion routes share: sampling (OpenAI's, and llama.cpp's extras at the top level, which
    is where `extra_body` puts them), limits, streaming."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=-1)  # -1: until end-of-generation or the context is full
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, gt=0)
    repetition_penalty: float | None = Field(None, gt=0)  # vLLM's spelling
    repeat_last_n: int | None = Field(None, ge=-1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool = False
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    # llama-server's structured output fields (response_format is OpenAI's)
    json_schema: dict[str, Any] | bool | None = None
    grammar: str | None = None
    # powerinfer's extension (like llama.cpp's timings_per_token): each streamed chunk carries an "ffn" object with
    # the FFN neurons every layer computed for that token (see server/__init__.py)
    ffn_per_token: bool = False

    def limit(self) -> int | None:
        return self.max_tokens

    def sampling(self) -> dict:
        """Keyword overrides of the server's SamplingParams (only the fields the request sets)."""
        out: dict[str, Any] = {}
        for src, dst in (("temperature", "temp"), ("top_p", "top_p"), ("top_k", "top_k"), ("min_p", "min_p"),
                         ("repeat_last_n", "repeat_last_n"), ("presence_penalty", "presence_penalty"),
                         ("frequency_penalty", "frequency_penalty"), ("seed", "seed")):
            v = getattr(self, src)
            if v is not None:
                out[dst] = v
        penalty = self.repeat_penalty if self.repeat_penalty is not None else self.repetition_penalty
        if penalty is not None:
            out["repeat_penalty"] = penalty
        if self.stop is not None:
            out["stop"] = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if self.ignore_eos:
            out["ignore_eos"] = True
        limit = self.limit()
        if limit is not None:
            out["n_predict"] = limit
        schema = self.schema()
        if schema is not None:
            out["json_schema"] = schema
        if self.grammar is not None:
            out["grammar"] = self.grammar
        return out

    def schema(self):
        """The JSON Schema the output must follow: response_format's (json_object: any object, as llama-server and
        Ollama map it) or llama-server's top-level `json_schema`."""
        rf = self.response_format
        if rf is not None and rf.get("type") == "json_object":
            return rf.get("schema") or {"type": "object"}
        if rf is not None and rf.get("type") == "json_schema":
            spec = rf.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), (dict, bool)):
                raise APIError(400, "response_format.json_schema must be an object with a `schema` object",
                               param="response_format")
            return spec.get("schema", {})
        return self.json_schema

    def check_supported(self, constrained: bool) -> None:
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server", param="logit_bias",
                           code="not_supported")
        rf = self.response_format
        if rf is not None:
            kind = rf.get("type")
            if kind not in ("text", "json_object", "json_schema"):
                raise APIError(400, f"response_format.type must be text, json_object or json_schema, got {kind!r}",
                               param="response_format")
            if kind != "text" and not constrained:
                raise APIError(400, f"response_format {kind} needs constrained decoding, which this server does not "
                                    "have yet; the output would not be guaranteed JSON",
                               param="response_format", code="not_supported")
        for name in ("json_schema", "grammar"):
            if getattr(self, name) is not None and not constrained:
                raise APIError(400, f"{name} needs constrained decoding, which this server does not have yet",
                               param=name, code="not_supported")


class ChatRequest(_Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=-1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict] | None = None
    tool_choice: Any = None

    def limit(self) -> int | None:
        # newer clients send only max_completion_tokens (llama.cpp #13700); if both are given, the smaller wins
        given = [v for v in (self.max_tokens, self.max_completion_tokens) if v is not None]
        bounded = [v for v in given if v >= 0]
        return min(bounded) if bounded else (-1 if given else None)

    def n_logprobs(self) -> int | None:
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def check_supported(self, constrained: bool) -> None:
        super().check_supported(constrained)
        if self.tools and self.tool_choice != "none":
            raise APIError(400, "tools (function calling) are not supported by this server", param="tools",
                           code="not_supported")

    def chat_messages(self) -> list[dict]:
        return [{"role": m.role if m.role != "developer" else "system", "content": m.text()} for m in self.messages]


class CompletionRequest(_Generation):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    def prompt_value(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and not isinstance(p[0], int):
            if len(p) != 1:
                raise APIError(400, "a list of several prompts is not supported; send one prompt per request",
                               param="prompt", code="not_supported")
            p = p[0]
        return p

    def check_supported(self, constrained: bool) -> None:
        super().check_supported(constrained)
        if self.suffix:
            raise APIError(400, "suffix (fill-in-the-middle) is not supported by this server", param="suffix",
                           code="not_supported")
        if self.best_of is not None and self.best_of > self.n:
            raise APIError(400, "best_of is not supported by this server", param="best_of", code="not_supported")
        if self.echo and self.logprobs is not None:
            raise APIError(400, "echo with logprobs is not supported (prompt tokens are not scored)",
                           param="echo", code="not_supported")


class TokenizeRequest(_Base):
    content: str
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeRequest(_Base):
    tokens: list[int]


class TemplateRequest(_Base):
    messages: list[Message] = Field(min_length=1)


def parse(model: type[BaseModel], body: Any) -> BaseModel:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        message, field = validation_message(e)
        raise APIError(400, message, param=field) from None


def finish_reason(engine_reason: str | None) -> str | None:
    """OpenAI's finish_reason: a full context ends generation like a token limit does (llama.cpp: length)."""
    return {"context": "length"}.get(engine_reason, engine_reason)
