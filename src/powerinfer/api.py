"""Public Python API: `powerinfer.load(path=None, **settings) -> LLM`.

    llm = powerinfer.load()                      # the bundled SmolLM2-135M-Instruct
    llm.generate("The capital of France is", n_predict=16, temp=0)
    for r in llm.stream("Once upon a time"): print(r.text, end="")
    llm.chat([{"role": "user", "content": "Hi!"}])
    llm.generate("2+2=", n_predict=4, details=True)   # a Completion: text, tokens, finish reason, usage, timings

One generation runs at a time per `LLM`: a generation started in another thread waits for the running one; a
second stream started in the same thread while the first is unfinished is an error (alternating two streams
would interleave their tokens in one KV cache).
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import replace

from .errors import PowerInferError
from .formats.chat import render_chat
from .formats.loader import LoadedModel, load_model, load_tokenizer
from .formats.tokenizer import Tokenizer
from .runtime import engine
from .runtime.engine import Completion, Response
from .runtime.runner import make_runner
from .runtime.sparsity import apply_sparsity
from .settings import ModelSettings, SamplingParams, field_names, split_settings


# The offline pipeline's solver and calibration (prepare/, torch), handed to the runtime as callables: imported only
# when a placement has no cached hot sets or a --sparsity has no cached thresholds, so a plain run never loads torch.
def _solve_hot_sets(*args, **kwargs):
    from .prepare.solve import solve_hot_sets

    return solve_hot_sets(*args, **kwargs)


def _calibrate_default(*args, **kwargs):
    from .prepare.calibrate import calibrate_default

    return calibrate_default(*args, **kwargs)


class LLM:
    def __init__(self, loaded: LoadedModel, settings: ModelSettings, defaults: SamplingParams,
                 tokenizer: Tokenizer | None = None):
        self.loaded = loaded
        self.settings = settings
        self.defaults = defaults
        self.tokenizer = tokenizer or load_tokenizer(loaded)
        self._lock = threading.Lock()  # held by the generation that owns the runner's KV cache
        self._owner: int | None = None  # its thread
        self.runner = make_runner(loaded, settings.n_ctx, settings.n_threads, settings.n_batch, placement=settings,
                                  solve=_solve_hot_sets, cache_types=(settings.cache_type_k, settings.cache_type_v))
        self.runner.allow_non_finite = settings.allow_non_finite  # else NaN/inf logits are an error
        self.sparsity = "dense FFN"
        if settings.sparsity != "off" or settings.predictors:
            self.sparsity = apply_sparsity(self.runner, loaded, settings.sparsity, settings.sparse_method,
                                           settings.predictors, calibrate=_calibrate_default)

    @property
    def config(self):
        return self.loaded.config

    def _params(self, overrides: dict) -> SamplingParams:
        unknown = set(overrides) - field_names(SamplingParams)
        if unknown:
            raise PowerInferError(f"unknown sampling setting(s): {', '.join(sorted(unknown))}")
        return replace(self.defaults, **overrides)

    def stream(self, prompt: str | list[int], *, logprobs: int | None = None, layer_stats: bool = False,
               cancel: Callable[[], bool] | None = None, **params) -> Iterator[Response]:
        """Yield `Response` chunks (text, token, timing); the last one has `finish_reason` set.

        logprobs=N adds each token's log-probability and the N most likely alternatives; layer_stats adds the FFN
        neurons each layer computed (sparse decode steps); cancel() is checked between prompt chunks and tokens."""
        return self._exclusive(engine.stream_generate(self.runner, self.tokenizer, prompt, self._params(params),
                                                      logprobs=logprobs, layer_stats=layer_stats, cancel=cancel))

    def generate(self, prompt: str | list[int], *, details: bool = False, logprobs: int | None = None,
                 **params) -> str | Completion:
        """The completion's text; with details=True (implied by logprobs) a `Completion`: text, token ids, finish
        reason, token counts, timings and the log-probabilities asked for."""
        return self._finish(self.stream(prompt, logprobs=logprobs, **params), details or logprobs is not None)

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The model's chat template over `messages`. A trailing assistant message is a prefill: the reply
        continues its text (llama-server's behaviour) instead of starting a new turn."""
        tok = self.tokenizer
        prefill = ""
        if messages and messages[-1].get("role") == "assistant" and add_generation_prompt:
            messages, prefill = messages[:-1], messages[-1].get("content") or ""
        return render_chat(self.loaded.metadata.get("tokenizer.chat_template"), messages,
                           add_generation_prompt=add_generation_prompt,
                           bos_token=_piece(tok, tok.bos_id), eos_token=_piece(tok, tok.eos_id)) + prefill

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of the rendered chat prompt (chat_text_ids)."""
        return self.chat_text_ids(self.chat_prompt(messages))

    def chat_text_ids(self, text: str) -> list[int]:
        """Token ids of a whole rendered chat prompt, with a BOS exactly when the vocabulary asks for one
        (tokenizer.ggml.add_bos_token), as llama.cpp's chat does: a BOS the template writes itself is taken off
        first (so it is never doubled), and a template that writes none still gets the model's BOS."""
        tok = self.tokenizer
        if not tok.add_bos or tok.bos_id is None:
            return tok.encode(text, add_bos=False, parse_special=True)
        bos = _piece(tok, tok.bos_id)  # the text chat_prompt gives the template as bos_token
        return tok.encode(text[len(bos):] if bos and text.startswith(bos) else text, add_bos=True, parse_special=True)

    def stream_chat(self, messages: list[dict], **kw) -> Iterator[Response]:
        return self.stream(self.chat_ids(messages), **kw)

    def chat(self, messages: list[dict], *, details: bool = False, logprobs: int | None = None,
             **params) -> str | Completion:
        return self._finish(self.stream_chat(messages, logprobs=logprobs, **params), details or logprobs is not None)

    @staticmethod
    def _finish(responses: Iterator[Response], details: bool) -> str | Completion:
        if details:
            return engine.collect(responses)
        return "".join(r.text for r in responses)

    def _exclusive(self, responses: Iterator[Response]) -> Iterator[Response]:
        """Run `responses` holding the runner: other threads wait; the same thread starting a second generation
        before the first finished gets an error instead of a deadlock or two streams mixed in one KV cache."""
        me = threading.get_ident()
        if self._owner == me:
            responses.close()
            raise PowerInferError("this LLM is already generating in this thread: a stream was started and is "
                                  "neither finished nor closed; exhaust it or call its close() first")
        with self._lock:
            self._owner = me
            try:
                yield from responses
            finally:
                self._owner = None

    def tokenize(self, text: str, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_bos=add_bos, parse_special=parse_special)

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


def _piece(tok: Tokenizer, token_id: int | None) -> str:
    return "" if token_id is None else tok.token_bytes(token_id).decode("utf-8", "replace")


def load(path=None, **settings) -> LLM:
    model_settings, sampling = split_settings({"model": path, **settings} if path is not None else settings)
    loaded = load_model(model_settings.model, allow_non_finite=model_settings.allow_non_finite)
    return LLM(loaded, model_settings, sampling)
