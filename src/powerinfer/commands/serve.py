"""`powerinfer serve` (llama-server): parse the flags, then hand the model's loader to the server package."""
from __future__ import annotations

import importlib.metadata
import os
import sys
from pathlib import Path

from ..errors import PowerInferError
from ..options import ServeOptions
from ..settings import ModelSettings, SamplingParams, from_namespace
from . import load_model_noted


def cmd_serve(args) -> int:
    """Serve the model over HTTP: OpenAI-compatible /v1/chat/completions, /v1/completions and /v1/models, llama-server's
    /health, /tokenize, /detokenize, /apply-template, /props, Prometheus /metrics, and a web chat page at / with a
    live view of the FFN neurons that fire. The run flags set the defaults a request may override.
    Example: powerinfer serve --port 8080, then point any OpenAI client at http://127.0.0.1:8080/v1"""
    opts = from_namespace(ServeOptions, args)
    if opts.api_key is None and os.environ.get("POWERINFER_API_KEY"):
        opts.api_key = os.environ["POWERINFER_API_KEY"]
    settings, sampling = from_namespace(ModelSettings, args), from_namespace(SamplingParams, args)
    path = _model_path(settings.model)
    alias = opts.alias or (path.stem if path.suffix.lower() == ".gguf" else path.name)

    def load():
        from ..api import LLM

        llm = LLM(load_model_noted(settings.model, settings.allow_non_finite), settings, sampling)
        if settings.verbose or llm.runner.sparse:
            print(f"ffn: {llm.sparsity}", file=sys.stderr)
        return llm

    from ..server import run_server

    return run_server(opts, alias, load, fingerprint=f"powerinfer-{_version()}")


def _model_path(model: str | None) -> Path:
    """The model's path, checked before the port is bound (a typo is a one-line error, not a server that fails)."""
    if model is None:
        from ..formats.bundled import bundled_model_path

        return bundled_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise PowerInferError(f"{model}: no such file or directory")
    return path


def _version() -> str:
    try:
        return importlib.metadata.version("powerinfer")
    except importlib.metadata.PackageNotFoundError:
        return "dev"
