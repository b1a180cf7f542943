"""Structured output: a token mask from a grammar, applied to the logits before sampling (llama.cpp's `--grammar`,
`--json-schema`; OpenAI's `response_format`).

The grammar engine is llguidance (PyPI `llguidance`, the Rust library llama.cpp itself links for its grammars with
LLAMA_LLGUIDANCE): it takes llama.cpp's GBNF (`grammar_from("gbnf", ...)`) and JSON Schema, computes the set of
allowed tokens of a 49k vocabulary in tens of microseconds (its lexer works on the token trie, with "slices" that
precompute common token classes), and its wheel has no Python dependencies. xgrammar, the alternative, pulls in
transformers, pydantic and a torch build of its own for the same two formats.

A `Constraint` holds one matcher per generation: `mask(logits)` gives logits with every token the grammar does not
allow at -inf (a new tensor: the caller's buffer stays the raw distribution for logprobs), `allows(token)` tests
one token, `accept(token)` advances the matcher. The engine samples first and masks only when the grammar refuses
the token (llama.cpp's common sampler does the same): a refused draw is redrawn from the masked logits, which for
plain sampling gives exactly the masked distribution (p(t) + p(refused) * p(t) / p(allowed) = p(t) / p(allowed)),
and greedy decoding picks the same token; expanding the 49k-bit mask into the logits costs more than the mask
(measured: 0.81x decode speed masking every step, see benchmarks/grammar_bench.py). When the grammar is complete
only end-of-generation tokens are allowed, so generation ends with finish_reason "stop" like any other end of turn.
"""
from __future__ import annotations

import json
import weakref

import numpy as np

from ..errors import PowerInferError
from ..formats.tokenizer import Attr, Tokenizer

# LLTokenizer per Tokenizer: building one walks the whole vocabulary (~0.3 s for 49k tokens), a grammar per
# request must not pay it again.
_LL_TOKENIZERS: "weakref.WeakKeyDictionary[Tokenizer, object]" = weakref.WeakKeyDictionary()


def _llguidance():
    try:
        import llguidance
    except ImportError:  # a default dependency; only a broken install lacks it
        raise PowerInferError("structured output needs the llguidance package: pip install llguidance") from None
    return llguidance


class _Vocab:
    """What llguidance's TokenizerWrapper reads: the bytes of every token (control tokens prefixed with 0xFF, as
    llguidance's own llama.cpp bridge does, so no grammar text can produce them), the end-of-generation ids, and an
    encoder it uses to tokenize forced text."""

    def __init__(self, tok: Tokenizer):
        self.tokens = []
        for i in range(tok.vocab_size):
            if tok.token_attr(i) & Attr.CONTROL:
                self.tokens.append(b"\xff" + tok.token_bytes(i, special=True))
            else:
                self.tokens.append(tok.token_bytes(i, special=True))
        eog = sorted(tok.eog_ids)
        self.eos_token_id = eog[0] if eog else tok.eos_id
        self.bos_token_id = tok.bos_id
        self.special_token_ids = [i for i in range(tok.vocab_size) if tok.token_attr(i) & Attr.CONTROL]
        self._tok = tok

    def __call__(self, text: bytes) -> list[int]:
        return self._tok.encode(text.decode("utf-8", "replace"), add_bos=False, parse_special=False)


def ll_tokenizer(tok: Tokenizer):
    cached = _LL_TOKENIZERS.get(tok)
    if cached is None:
        llg = _llguidance()
        eog = sorted(tok.eog_ids) or ([tok.eos_id] if tok.eos_id is not None else [])
        cached = llg.LLTokenizer(llg.TokenizerWrapper(_Vocab(tok)), n_vocab=tok.vocab_size, eos_token=eog)
        _LL_TOKENIZERS[tok] = cached
    return cached


def grammar_text(grammar: str | None = None, json_schema: str | dict | None = None) -> str:
    """llguidance's grammar from GBNF text or a JSON Schema (a dict, or JSON text); one-line errors."""
    llg = _llguidance()
    if grammar is not None and json_schema is not None:
        raise PowerInferError("give a grammar or a JSON schema, not both")
    try:
        if json_schema is not None:
            schema = json.loads(json_schema) if isinstance(json_schema, str) else json_schema
            text = llg.LLMatcher.grammar_from_json_schema(schema)
            where = "--json-schema"
        else:
            text = llg.grammar_from("gbnf", grammar)
            where = "--grammar"
    except (ValueError, TypeError) as e:  # GBNF that does not parse, JSON that is not JSON
        raise PowerInferError(f"{'--json-schema' if json_schema is not None else '--grammar'}: "
                              f"{_one_line(e)}") from None
    err = llg.LLMatcher.validate_grammar(text)
    if err:
        raise PowerInferError(f"{where}: {_one_line(err)}")
    return text


def _one_line(e) -> str:
    return " ".join(str(e).split())


class Constraint:
    """One generation's grammar state over a model's vocabulary of `n_vocab` logits."""

    def __init__(self, tok: Tokenizer, n_vocab: int, grammar: str | None = None,
                 json_schema: str | dict | None = None):
        llg = _llguidance()
        lltok = ll_tokenizer(tok)
        self.matcher = llg.LLMatcher(lltok, grammar_text(grammar, json_schema), log_level=0)
        if self.matcher.is_error():
            raise PowerInferError(f"grammar: {_one_line(self.matcher.get_error())}")
        self.n_vocab = n_vocab
        self._words = np.full(((lltok.vocab_size + 31) // 32,), -1, dtype=np.int32)
        self._fresh = False  # _words holds the mask of the current step

    def _compute(self) -> None:
        if not self._fresh:
            self.matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
            self._fresh = True

    def allows(self, token: int) -> bool:
        """Whether the grammar allows `token` next: one bit of the mask (the mask itself takes ~10 us)."""
        if self.matcher.is_error():
            raise PowerInferError(f"grammar: {_one_line(self.matcher.get_error())}")
        self._compute()
        return 0 <= token < 32 * len(self._words) and bool((int(self._words[token >> 5]) >> (token & 31)) & 1)

    def _allowed(self) -> np.ndarray:
        self._compute()
        # bit i of word j is token 32*j + i. numpy throughout: unpacking 49k bits takes 3 us and np.where 30 us,
        # where torch's shifts, masked_fill and friends took 1.6 ms per step on this loaded 2-core host
        bits = np.unpackbits(self._words.view(np.uint8), bitorder="little").view(np.bool_)
        if bits.size >= self.n_vocab:
            return bits[:self.n_vocab]
        # model vocabularies padded past the tokenizer's: the padding ids are never allowed
        return np.concatenate([bits, np.zeros(self.n_vocab - bits.size, dtype=np.bool_)])

    def allowed(self) -> np.ndarray:
        """bool [n_vocab]: the tokens the grammar allows next."""
        return self._allowed().copy()

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """The logits with every token the grammar does not allow at -inf (a new array)."""
        if self.matcher.is_error():
            raise PowerInferError(f"grammar: {_one_line(self.matcher.get_error())}")
        return np.where(self._allowed(), np.asarray(logits, dtype=np.float32), np.float32(-np.inf))

    def accept(self, token: int) -> None:
        self._fresh = False
        if not self.matcher.consume_token(token):
            raise PowerInferError(f"grammar: token {token} was sampled but the grammar does not allow it "
                                  f"({_one_line(self.matcher.get_error())})")

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing more (only end-of-generation)."""
        return self.matcher.is_stopped()


def make_constraint(tok: Tokenizer, n_vocab: int, params) -> Constraint | None:
    """The constraint a SamplingParams asks for (`grammar` or `json_schema`), or None."""
    grammar, schema = getattr(params, "grammar", None), getattr(params, "json_schema", None)
    if grammar is None and schema is None:
        return None
    return Constraint(tok, n_vocab, grammar, schema)
