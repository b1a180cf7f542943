"""Shared fixtures of the measurement tests."""
import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_benchmark(name: str):
    """benchmarks/<name>.py loaded as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def benchmark_module():
    """load_benchmark: a fixture's way to a benchmarks/ script, e.g. benchmark_module("disk_bench")."""
    return load_benchmark


@pytest.fixture(scope="module")
def make_synthetic():
    """benchmarks/make_synthetic.py's main(argv), loaded from the script."""
    return load_benchmark("make_synthetic").main
