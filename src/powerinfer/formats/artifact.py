"""Versioned JSON artifacts bound to one model (DESIGN, "Artifacts"): thresholds, profiles, placements.

Each document carries `format`, `version` and the model's `fingerprint`; it is written atomically (a reader never
sees half a file) and read back only if all three match, with an error that says which command remakes it.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..core.files import write_text
from ..errors import PowerInferError

# The largest JSON artifact read: a 7B placement (32 x 11008 neuron ids) is ~2.5 MB; a file far past that is not one
# of ours, and json.loads would hold several times its size in Python objects.
MAX_JSON_BYTES = 64 * 2**20


def write_json_artifact(path: str | Path, doc: dict, indent: int | None = None) -> Path:
    """Write `doc` (plain JSON values) to `path` through a fresh temporary file renamed over it (core/files.py:
    never through a link planted at `path`); missing parent directories are created user-only."""
    return write_text(path, json.dumps(doc, indent=indent) + "\n")


def read_json_artifact(path: str | Path, *, kind: str, fmt: str, version: int, fingerprint: str | None,
                       made: str, remake: str) -> dict:
    """The document at `path`, checked: PowerInferError if it is missing, not JSON, another format or version, or
    (unless `fingerprint` is None) made for another model. `kind` names the file in messages ("thresholds"),
    `made` says for which model it was made ("calibrated for model"), `remake` is the command that makes it ("powerinfer calibrate")."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise PowerInferError(f"{path}: is a directory, expected a {kind} file")
    if not path.is_file():
        raise PowerInferError(f"{path}: no such {kind} file (run `{remake} -m MODEL`)")
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise PowerInferError(f"{path}: {size:,} bytes is too large for a {kind} file (at most {MAX_JSON_BYTES:,})")
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError, or an integer past Python's digit limit
        raise PowerInferError(f"{path}: not a {kind} file ({' '.join(str(e).split())})") from None
    except RecursionError:
        raise PowerInferError(f"{path}: not a {kind} file (JSON nested too deeply)") from None
    except OSError as e:
        raise PowerInferError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise PowerInferError(f"{path}: not a {kind} file (format {found!r}, expected {fmt!r})")
    if doc.get("version") != version or isinstance(doc.get("version"), bool):
        raise PowerInferError(f"{path}: {kind} format version {doc.get('version')!r}; this powerinfer reads "
                              f"version {version} (run `{remake} -m MODEL` again)")
    if fingerprint is not None and doc.get("fingerprint") != fingerprint:
        raise PowerInferError(f"{path}: {made} {doc.get('fingerprint')}, but this model is {fingerprint} "
                              f"(run `{remake} -m MODEL` for it)")
    return doc
