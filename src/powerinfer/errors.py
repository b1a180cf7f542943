"""User-facing errors: the CLI prints their message as one line and exits non-zero (no traceback)."""


class PowerInferError(Exception):
    """A problem with the user's input (file, flag, request) that the user can fix."""


class ModelFormatError(PowerInferError):
    """The model file is missing, not a GGUF / HF model, truncated, or uses something we do not support."""


class ContextOverflowError(PowerInferError):
    """The request does not fit in the context window."""


def one_line(text: object, limit: int = 300) -> str:
    """`text` (an exception's message, a value read from a hostile file) squeezed onto one line of at most `limit`
    characters, so that an error built from it stays one line on stderr."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[:limit - 3] + "..."
