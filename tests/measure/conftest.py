"""Shared fixtures of the measurement tests."""
import importlib.util
import sys
from pathlib import Path

import pytest

MAKE_SYNTHETIC = Path(__file__).resolve().parents[2] / "benchmarks" / "make_synthetic.py"


@pytest.fixture(scope="module")
def make_synthetic():
    """benchmarks/make_synthetic.py's main(argv), loaded from the script."""
    spec = importlib.util.spec_from_file_location("make_synthetic", MAKE_SYNTHETIC)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod.main
