"""Thresholds artifacts: JSON round trip, refusal of another model's or another version's file (naming both),
the model fingerprint, and the default cache path."""
import json

import pytest

from powerinfer.errors import PowerInferError
from powerinfer.formats.loader import load_model
from powerinfer.sparse.artifacts import (THRESHOLDS_VERSION, Thresholds, default_thresholds_path, load_thresholds,
                                         model_fingerprint)


def _thresholds(fp="0123456789abcdef"):
    return Thresholds(method="teal-hu", target_sparsity=0.5, values={"x": [0.125, 0.3], "h": [0.017, 1e-3 / 3]},
                      fingerprint=fp, calibration={"text": "t", "text_sha256": "ab" * 32, "n_tokens": 8192,
                                                   "n_ctx": 512},
                      achieved={"x": [0.5, 0.5], "h": [0.499, 0.501]}, model={"file": "m.gguf"})


def test_round_trip_is_exact(tmp_path):
    th = _thresholds()
    path = th.save(tmp_path / "sub" / "t.json")
    assert load_thresholds(path, th.fingerprint) == th  # floats included, bit for bit


def test_other_model_is_refused_naming_both(tmp_path):
    path = _thresholds("aaaaaaaaaaaaaaaa").save(tmp_path / "t.json")
    with pytest.raises(PowerInferError) as e:
        load_thresholds(path, "bbbbbbbbbbbbbbbb")
    assert "aaaaaaaaaaaaaaaa" in str(e.value) and "bbbbbbbbbbbbbbbb" in str(e.value)


def test_other_version_and_garbage_are_refused(tmp_path):
    path = _thresholds().save(tmp_path / "t.json")
    d = json.loads(path.read_text())
    d["version"] = THRESHOLDS_VERSION + 1
    path.write_text(json.dumps(d))
    with pytest.raises(PowerInferError, match="version"):
        load_thresholds(path, d["fingerprint"])
    path.write_text("{not json")
    with pytest.raises(PowerInferError, match="not a thresholds file"):
        load_thresholds(path, d["fingerprint"])
    with pytest.raises(PowerInferError, match="no such"):
        load_thresholds(tmp_path / "missing.json", d["fingerprint"])


def test_fingerprint_is_stable_and_tells_models_apart(tiny_llama_gguf):
    a = model_fingerprint(load_model(tiny_llama_gguf("Q4_1").path))
    assert a == model_fingerprint(load_model(tiny_llama_gguf("Q4_1").path))
    assert len(a) == 16
    # same shapes and metadata, other weights (the header and tensor table alone would be equal)
    assert a != model_fingerprint(load_model(tiny_llama_gguf("Q4_1", seed=1).path))
    assert a != model_fingerprint(load_model(tiny_llama_gguf("Q8_0").path))


def test_default_path(tmp_path):
    p = default_thresholds_path("0123456789abcdef", "hu", 0.5, cache_dir=tmp_path)
    assert p == tmp_path / "0123456789abcdef" / "thresholds-hu-0.50.json"
    assert str(default_thresholds_path("f" * 16, "teal", 0.3)).endswith(".cache/powerinfer/ffffffffffffffff/"
                                                                         "thresholds-teal-0.30.json")
