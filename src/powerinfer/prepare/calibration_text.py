"""Calibration and evaluation text as token chunks, read the way llama-perplexity reads a text; the one path from a
text to chunks that calibrate, profile and prepare share (so a profile and the thresholds it uses see the same
tokens).

  * the text (the user's files joined by blank lines, or a split of the built-in pydoc_data.topics corpus,
    textdata.py) is tokenized once with BOS per the model and special-token text left as text (llama.cpp's
    `common_tokenize(ctx, text, add_special=true, parse_special=false)`);
  * its first N tokens are cut into chunks of n_ctx, each run from an empty context, with BOS replacing the
    chunk's first token when the model adds one.
Provenance (DESIGN: report which text and how many tokens) travels with the tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import PowerInferError
from ..sparse.artifacts import text_sha256
from ..textdata import describe, pydoc_topics, read_texts

DEFAULT_SOURCES = {"calib": "default calibration text (pydoc_data.topics, calib split)",
                   "eval": "default evaluation text (pydoc_data.topics, eval split)"}


def chunks_of(tokens: list[int], n_tokens: int, n_ctx: int, bos_id: int | None = None) -> list[list[int]]:
    """The first n_tokens tokens in chunks of n_ctx (whole chunks; one shorter chunk if n_tokens < n_ctx), with
    BOS replacing each chunk's first token when `bos_id` is given (llama-perplexity's convention)."""
    n_tokens = min(n_tokens, len(tokens))
    if n_tokens <= 0:
        raise PowerInferError("no calibration tokens")
    if n_tokens < n_ctx:
        out = [list(tokens[:n_tokens])]
    else:
        out = [list(tokens[i * n_ctx:(i + 1) * n_ctx]) for i in range(n_tokens // n_ctx)]
    if bos_id is not None:
        for c in out:
            c[0] = bos_id
    return out


@dataclass
class TokenText:
    """Tokens of a text with their provenance."""

    tokens: list[int]
    source: str  # "default calibration text (...)" or the file names
    description: str  # textdata.describe(text): size and sha256 prefix
    sha256: str
    bos_id: int | None  # the BOS every chunk starts with; None when the model adds none

    @property
    def info(self) -> dict:
        """What artifacts record about the text."""
        return {"text": f"{self.source} ({self.description})", "text_sha256": self.sha256}

    def chunks(self, n_tokens: int, n_ctx: int) -> list[list[int]]:
        return chunks_of(self.tokens, n_tokens, n_ctx, self.bos_id)


def token_text(tok, paths: list[str] | None = None, split: str = "calib") -> TokenText:
    """The files at `paths` (UTF-8, joined by blank lines), else the built-in `split` ("calib" | "eval"), tokenized
    by `tok` (formats.tokenizer.Tokenizer) as llama-perplexity does."""
    if paths:
        text, source = read_texts(paths)
    else:
        text, source = pydoc_topics(split), DEFAULT_SOURCES[split]
    return TokenText(tok.encode(text, add_bos=None, parse_special=False), source, describe(text), text_sha256(text),
                     tok.bos_id if tok.add_bos else None)
