"""Offline calibration / evaluation text (DESIGN: "Calibration and evaluation text").

The default corpus is the English text of CPython's `pydoc_data.topics` (present in every Python
install, so nothing is downloaded). Split as in reference/baselines.md section 2.3: topics sorted by key,
the first 39 are the calibration split, the last 40 the evaluation split; entries joined by blank lines.
"""
from __future__ import annotations

import hashlib


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
