"""Versioned JSON artifacts bound to one model (DESIGN, "Artifacts"): thresholds, profiles, placements.

Each document carries `format`, `version` and the model's `fingerprint`; it is written atomically (a reader never
sees half a file) and read back only if all three match, with an error that says which command remakes it.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import PowerInferError


def write_json_artifact(path: str | Path, doc: dict, indent: int | None = None) -> Path:
    """Write `doc` (plain JSON values) to `path` through a temporary file; parent directories are created."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=indent) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def read_json_artifact(path: str | Path, *, kind: str, fmt: str, version: int, fingerprint: str | None,
                       made: str, remake: str) -> dict:
    """The document at `path`, checked: PowerInferError if it is missing, not JSON, another format or version, or
    (unless `fingerprint` is None) made for another model. `kind` names the file in messages ("thresholds"),
    `made` says for which model it was made ("calibrated for model"), `remake` is the command that makes it ("powerinfer calibrate")."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PowerInferError(f"{path}: no such {kind} file (run `{remake} -m MODEL`)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PowerInferError(f"{path}: not a {kind} file ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise PowerInferError(f"{path}: not a {kind} file (format {found!r}, expected {fmt!r})")
    if doc.get("version") != version:
        raise PowerInferError(f"{path}: {kind} format version {doc.get('version')!r}; this powerinfer reads "
                              f"version {version} (run `{remake} -m MODEL` again)")
    if fingerprint is not None and doc.get("fingerprint") != fingerprint:
        raise PowerInferError(f"{path}: {made} {doc.get('fingerprint')}, but this model is {fingerprint} "
                              f"(run `{remake} -m MODEL` for it)")
    return doc
