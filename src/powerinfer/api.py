"""Public Python API: `powerinfer.load(path=None, **settings) -> LLM`.

    llm = powerinfer.load()                      # the bundled SmolLM2-135M-Instruct
    llm.generate("The capital of France is", n_predict=16, temp=0)
    for r in llm.stream("Once upon a time"): print(r.text, end="")
    llm.chat([{"role": "user", "content": "Hi!"}])
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

from .errors import PowerInferError
from .formats.chat import render_chat
from .formats.loader import LoadedModel, load_model, load_tokenizer
from .formats.tokenizer import Tokenizer
from .runtime import engine
from .runtime.engine import Response
from .runtime.runner import make_runner
from .runtime.sparsity import apply_sparsity
from .prepare.calibrate import calibrate_default
from .prepare.solve import solve_hot_sets
from .settings import ModelSettings, SamplingParams, field_names, split_settings


class LLM:
    def __init__(self, loaded: LoadedModel, settings: ModelSettings, defaults: SamplingParams,
                 tokenizer: Tokenizer | None = None):
        self.loaded = loaded
        self.settings = settings
        self.defaults = defaults
        self.tokenizer = tokenizer or load_tokenizer(loaded)
        self.runner = make_runner(loaded, settings.n_ctx, settings.n_threads, settings.n_batch, placement=settings,
                                  solve=solve_hot_sets)
        self.sparsity = "dense FFN"
        if settings.sparsity != "off" or settings.predictors:
            self.sparsity = apply_sparsity(self.runner, loaded, settings.sparsity, settings.sparse_method,
                                           settings.predictors, calibrate=calibrate_default)

    @property
    def config(self):
        return self.loaded.config

    def _params(self, overrides: dict) -> SamplingParams:
        unknown = set(overrides) - field_names(SamplingParams)
        if unknown:
            raise PowerInferError(f"unknown sampling setting(s): {', '.join(sorted(unknown))}")
        return replace(self.defaults, **overrides)

    def stream(self, prompt: str | list[int], **params) -> Iterator[Response]:
        """Yield `Response` chunks (text, token, timing); the last one has `finish_reason` set."""
        return engine.stream_generate(self.runner, self.tokenizer, prompt, self._params(params))

    def generate(self, prompt: str | list[int], **params) -> str:
        return "".join(r.text for r in self.stream(prompt, **params))

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        tok = self.tokenizer
        return render_chat(self.loaded.metadata.get("tokenizer.chat_template"), messages,
                           add_generation_prompt=add_generation_prompt,
                           bos_token=_piece(tok, tok.bos_id), eos_token=_piece(tok, tok.eos_id))

    def stream_chat(self, messages: list[dict], **params) -> Iterator[Response]:
        # The template already writes any BOS it wants; adding another would double it.
        prompt = self.chat_prompt(messages)
        ids = self.tokenizer.encode(prompt, add_bos=False, parse_special=True)
        return engine.stream_generate(self.runner, self.tokenizer, ids, self._params(params))

    def chat(self, messages: list[dict], **params) -> str:
        return "".join(r.text for r in self.stream_chat(messages, **params))

    def tokenize(self, text: str, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_bos=add_bos, parse_special=parse_special)

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


def _piece(tok: Tokenizer, token_id: int | None) -> str:
    return "" if token_id is None else tok.token_bytes(token_id).decode("utf-8", "replace")


def load(path=None, **settings) -> LLM:
    model_settings, sampling = split_settings({"model": path, **settings} if path is not None else settings)
    loaded = load_model(model_settings.model)
    return LLM(loaded, model_settings, sampling)
