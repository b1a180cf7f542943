"""Offline calibration / evaluation text (DESIGN: "Calibration and evaluation text").

The default corpus is the English text of CPython's `pydoc_data.topics` (present in every Python
install, so nothing is downloaded). Split as in reference/baselines.md section 2.3: topics sorted by key,
the first 39 are the calibration split, the last 40 the evaluation split; entries joined by blank lines.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from .errors import PowerInferError


def pydoc_topics(split: str = "eval") -> str:
    from pydoc_data.topics import topics

    keys = sorted(topics)
    if split == "calib":
        chosen = keys[:39]
    elif split == "eval":
        chosen = keys[39:]
    else:
        raise ValueError(f"split must be 'calib' or 'eval', not {split!r}")
    return "\n\n".join(topics[k] for k in chosen)


def describe(text: str) -> str:
    """Short provenance string for reports: size and sha256 prefix."""
    return f"{len(text)} chars, sha256 {hashlib.sha256(text.encode()).hexdigest()[:12]}"


def read_text(path: str) -> str:
    """A user's text file (prompt, calibration or evaluation text): its bytes decoded as UTF-8, nothing else.

    Read as bytes, so line ends stay as written (text mode would turn CRLF into LF and the tokens would differ from
    llama.cpp's, which reads -f files byte for byte). Invalid UTF-8 is a one-line error naming the byte offset
    (llama.cpp would tokenize each bad byte as U+FFFD; refusing says what is wrong instead of guessing)."""
    p = Path(path)
    if not p.is_file():
        raise PowerInferError(f"{path}: no such file" if not p.exists() else f"{path}: not a regular file")
    try:
        return p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise PowerInferError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise PowerInferError(f"{path}: cannot read ({e.strerror})") from None


def read_texts(paths: list[str]) -> tuple[str, str]:
    """Several text files joined by blank lines, and their names for reports."""
    return "\n\n".join(read_text(p) for p in paths), ", ".join(paths)
