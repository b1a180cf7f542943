"""Tampered caches and predictor directories are one-line PowerInferErrors through the readers the runtime and the
offline tools use, never tracebacks or crashes: thresholds JSON of the wrong shape, replaced by a directory, nested
past Python's recursion limit or huge; truncated, object-dtype or mis-shaped .npy files in a profile; predictor
files and directories for another layer count or shape (the C decoder read those out of bounds); pickles with code
in them (weights_only); tampered placement and .gpuidx files and neuron-bundle headers. Nothing is ever unpickled."""
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from powerinfer.errors import PowerInferError
from powerinfer.formats.gpuidx import read_gpuidx, read_placement, write_gpuidx, write_placement
from powerinfer.formats.loader import load_model
from powerinfer.measure.logits import open_logits
from powerinfer.prepare.profile import load_profile
from powerinfer.sparse.artifacts import Thresholds, load_thresholds, model_fingerprint
from powerinfer.sparse.predictor import PredictorSet

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from fuzz_mutants import write_seed_model  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = write_seed_model(tmp_path_factory.mktemp("m") / "relu.pwri.gguf", pwri=True, seed=1)
    loaded = load_model(path)
    return loaded, model_fingerprint(loaded)


class Pickled:  # a pickle that would run code: weights_only=True must refuse to build it
    def __reduce__(self):
        return (print, ("pwned",))


def _thresholds(fp, n):
    return Thresholds("hu", 0.5, {"h": [0.01] * n}, fp, {"text": "t", "n_tokens": 1}).to_json()


def _json(path: Path, doc) -> Path:
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


# -- thresholds ---------------------------------------------------------------------------------------------------

THRESHOLD_CASES = {
    "values a list": lambda d: {**d, "values": [0.1, 0.2]},
    "values of strings": lambda d: {**d, "values": {"h": ["a", "b", "c", "d"]}},
    "values nested": lambda d: {**d, "values": {"h": [[0.1]] * 4}},
    "values negative": lambda d: {**d, "values": {"h": [-1.0] * 4}},
    "values NaN": lambda d: {**d, "values": {"h": [float("nan")] * 4}},
    "values inf": lambda d: {**d, "values": {"h": [float("inf")] * 4}},
    "values empty": lambda d: {**d, "values": {}},
    "unknown site": lambda d: {**d, "values": {"q": [0.1] * 4}},
    "wrong method": lambda d: {**d, "method": ["hu"]},
    "calibration a list": lambda d: {**d, "calibration": [1]},
    "missing target": lambda d: {k: v for k, v in d.items() if k != "target_sparsity"},
    "a list document": lambda d: [d],
    "a number": lambda d: 5,
    "nested 100000 deep": lambda d: "[" * 100000 + "]" * 100000,
    "truncated": lambda d: json.dumps(d)[:40],
    "not utf-8": lambda d: json.dumps(d).encode("utf-16").decode("latin-1"),
    "huge integer": lambda d: json.dumps(d).replace('"version": 1', '"version": 1' + "0" * 5000),
    "bool version": lambda d: {**d, "version": True},
}


@pytest.mark.parametrize("case", list(THRESHOLD_CASES))
def test_tampered_thresholds(model, tmp_path, case):
    loaded, fp = model
    doc = THRESHOLD_CASES[case](_thresholds(fp, loaded.config.n_layer))
    path = _json(tmp_path / "t.json", doc)
    with pytest.raises(PowerInferError) as e:
        load_thresholds(path, fp)
    assert "\n" not in str(e.value) and str(e.value).startswith(str(path))


def test_thresholds_for_another_layer_count_and_a_directory(model, tmp_path):
    from powerinfer.runtime.sparsity import resolve_sparsity

    loaded, fp = model
    cache = tmp_path / "cache"
    path = cache / fp / "thresholds-hu-0.50.json"
    path.parent.mkdir(parents=True)
    _json(path, _thresholds(fp, loaded.config.n_layer + 3))
    with pytest.raises(PowerInferError, match=r"thresholds for 7 layers, the model has 4$"):
        resolve_sparsity(loaded, 0.5, "hu", cache_dir=cache)
    path.unlink()
    path.mkdir()  # a directory where the cached file should be: calibrating would write over it
    with pytest.raises(PowerInferError, match=r"is a directory"):
        resolve_sparsity(loaded, 0.5, "hu", cache_dir=cache, calibrate=lambda *a: Thresholds(
            "hu", 0.5, {"h": [0.0] * 4}, fp, {}).save(path))


def test_huge_json_artifact_is_not_read(model, tmp_path):
    loaded, fp = model
    path = tmp_path / "t.json"
    with open(path, "wb") as fh:
        fh.truncate(65 * 2**20)  # sparse: 65 MiB of zeros on disk costs nothing
    with pytest.raises(PowerInferError, match=r"too large for a thresholds file"):
        load_thresholds(path, fp)


# -- predictors -----------------------------------------------------------------------------------------------------

def _predictors(cfg, fp, n_layer=None, rank=16, d=None, n_ff=None, **kw):
    n = cfg.n_layer if n_layer is None else n_layer
    return PredictorSet([torch.randn(rank, d or cfg.d_model) for _ in range(n)],
                        [torch.randn(n_ff or cfg.n_ff, rank) for _ in range(n)], 0.0, {"fingerprint": fp}, **kw)


@pytest.mark.parametrize("case,kw,expected", [
    ("layers", dict(n_layer=6), "6 predictor layers for a 4-layer model"),
    ("width", dict(d=512), "layer 0 fc1 has shape [16, 512], expected [16, 256] (d_model 256, n_ff 768, rank 16)"),
    ("neurons", dict(n_ff=4096), "layer 0 fc2 has shape [4096, 16], expected [768, 16] (d_model 256, n_ff 768, "
                                 "rank 16)"),
    ("thresholds", dict(thresholds=[0.0] * 3), None),
])
def test_predictor_file_that_does_not_fit(model, tmp_path, case, kw, expected):
    loaded, fp = model
    if case == "thresholds":
        with pytest.raises(PowerInferError, match="3 per-layer predictor thresholds for 4 layers"):
            _predictors(loaded.config, fp, **kw)
        return
    path = _predictors(loaded.config, fp, **kw).save(tmp_path / "p.safetensors")
    with pytest.raises(PowerInferError) as e:
        PredictorSet.load(path, fp, loaded.config)
    assert str(e.value) == f"{path}: {expected}"


def test_predictor_file_with_nonfinite_weights(model, tmp_path):
    loaded, fp = model
    ps = _predictors(loaded.config, fp)
    ps.fc2[2][5, 3] = float("nan")
    path = ps.save(tmp_path / "p.safetensors")
    with pytest.raises(PowerInferError, match=r"layer 2 fc2 holds NaN or infinite values$"):
        PredictorSet.load(path, fp, loaded.config)


def test_predictor_file_through_the_cli_is_one_line(model, tmp_path, capsys):
    """The reported segfault: `run --predictors` with shapes that do not fit is now an error before C sees them."""
    from powerinfer import cli

    loaded, fp = model
    path = _predictors(loaded.config, fp, d=4096).save(tmp_path / "p.safetensors")
    rc = cli.main(["run", "-m", str(loaded.path), "-p", "Hi", "-n", "2", "-c", "32", "--sparsity", "auto",
                   "--predictors", str(path), "--no-stats"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1].startswith(f"error: {path}: layer 0 fc1 has shape [16, 4096], expected [16, 256]")


@pytest.mark.parametrize("case", ["pickle with code", "not a dict", "no fc2", "fc1 a string", "truncated",
                                  "wrong layer count", "config.json garbage", "config.json nested",
                                  "config.json threshold string", "config.json a directory"])
def test_tampered_upstream_predictor_directory(model, tmp_path, case):
    loaded, fp = model
    cfg = loaded.config
    d = tmp_path / "preds"
    d.mkdir()
    n = cfg.n_layer + (2 if case == "wrong layer count" else 0)
    for i in range(n):
        torch.save({"fc1.weight": torch.randn(16, cfg.d_model), "fc2.weight": torch.randn(cfg.n_ff, 16)},
                   d / f"model_{i}.pt")
    victim = d / "model_1.pt"
    if case == "pickle with code":
        victim.write_bytes(pickle.dumps({"fc1.weight": Pickled()}, protocol=2))
    elif case == "not a dict":
        torch.save([torch.zeros(2)], victim)
    elif case == "no fc2":
        torch.save({"fc1.weight": torch.randn(16, cfg.d_model)}, victim)
    elif case == "fc1 a string":
        torch.save({"fc1.weight": "x", "fc2.weight": torch.zeros(3)}, victim)
    elif case == "truncated":
        victim.write_bytes(victim.read_bytes()[:100])
    elif case == "config.json garbage":
        (d / "config.json").write_bytes(b"\xff\xfe{")
    elif case == "config.json nested":
        (d / "config.json").write_text("[" * 100000)
    elif case == "config.json threshold string":
        (d / "config.json").write_text('{"sparse_threshold": "high"}')
    elif case == "config.json a directory":
        (d / "config.json").mkdir()
    with pytest.raises(PowerInferError) as e:
        PredictorSet.from_upstream_dir(d, cfg)
    assert "\n" not in str(e.value) and "pwned" not in str(e.value)


# -- profiles -----------------------------------------------------------------------------------------------------

def _profile(tmp_path, fp, cfg):
    d = tmp_path / "profile"
    (d / "samples").mkdir(parents=True)
    _json(d / "profile.json", {"format": "powerinfer.profile", "version": 1, "fingerprint": fp, "n_tokens": 10,
                               "n_samples": 4, "calibration": {}, "criterion": "relu"})
    np.save(d / "counts.npy", np.zeros((cfg.n_layer, cfg.n_ff), np.int64))
    for i in range(cfg.n_layer):
        np.save(d / "samples" / f"x_{i}.npy", np.zeros((4, cfg.d_model), np.float16))
        np.save(d / "samples" / f"active_{i}.npy", np.zeros((4, cfg.n_ff // 8), np.uint8))
    return d


@pytest.mark.parametrize("case", ["counts truncated", "counts object dtype", "counts float", "counts 1-D",
                                  "counts negative", "counts a pickle", "samples truncated", "samples object dtype",
                                  "samples wrong width", "samples too few", "profile.json n_samples string",
                                  "profile.json nested", "profile.json calibration list", "counts wrong shape"])
def test_tampered_profile(model, tmp_path, case):
    loaded, fp = model
    cfg = loaded.config
    d = _profile(tmp_path, fp, cfg)
    counts, x1 = d / "counts.npy", d / "samples" / "x_1.npy"
    if case == "counts truncated":
        counts.write_bytes(counts.read_bytes()[:200])
    elif case == "counts object dtype":
        np.save(counts, np.array([[1, "a"]], dtype=object), allow_pickle=True)
    elif case == "counts float":
        np.save(counts, np.zeros((cfg.n_layer, cfg.n_ff)))
    elif case == "counts 1-D":
        np.save(counts, np.zeros(cfg.n_ff, np.int64))
    elif case == "counts negative":
        np.save(counts, -np.ones((cfg.n_layer, cfg.n_ff), np.int64))
    elif case == "counts a pickle":
        counts.write_bytes(pickle.dumps(Pickled(), protocol=2))
    elif case == "counts wrong shape":
        np.save(counts, np.zeros((cfg.n_layer + 1, cfg.n_ff), np.int64))
    elif case == "samples truncated":
        x1.write_bytes(x1.read_bytes()[:150])
    elif case == "samples object dtype":
        np.save(x1, np.array([None] * 4, dtype=object), allow_pickle=True)
    elif case == "samples wrong width":
        np.save(d / "samples" / "active_1.npy", np.zeros((4, 3), np.uint8))
    elif case == "samples too few":
        np.save(x1, np.zeros((2, cfg.d_model), np.float16))
    elif case.startswith("profile.json"):
        doc = json.loads((d / "profile.json").read_text())
        doc = {**doc, "n_samples": "4"} if "string" in case else {**doc, "calibration": [1]} if "list" in case \
            else "[" * 100000
        _json(d / "profile.json", doc)
    with pytest.raises(PowerInferError) as e:
        profile = load_profile(d, fp).check(cfg)
        for i in range(cfg.n_layer):
            profile.samples(i)
    assert "\n" not in str(e.value) and "pwned" not in str(e.value)


# -- placements, .gpuidx, logits ------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["hot_index strings", "hot_index nested", "inputs a list", "hot_index missing",
                                  "not an object"])
def test_tampered_placement(model, tmp_path, case):
    loaded, fp = model
    path = write_placement(tmp_path / "p.json", fp, [np.arange(3)] * 4, {"inputs": {}})
    doc = json.loads(path.read_text())
    doc = {**doc, "hot_index": [["a"]]} if case == "hot_index strings" else \
        {**doc, "hot_index": [[[1, [2]]]]} if case == "hot_index nested" else \
        {**doc, "inputs": [1]} if case == "inputs a list" else \
        {k: v for k, v in doc.items() if k != "hot_index"} if case == "hot_index missing" else [doc]
    _json(path, doc)
    with pytest.raises(PowerInferError) as e:
        read_placement(path, fp)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("case", ["truncated", "bucket not the mask", "mask values", "layer count", "capacity type"])
def test_tampered_gpuidx(model, tmp_path, case):
    loaded, _ = model
    cfg = loaded.config
    path = write_gpuidx(tmp_path / "m.gpuidx", [np.arange(5)] * cfg.n_layer, cfg.n_ff, 1000)
    data = bytearray(path.read_bytes())
    if case in ("bucket not the mask", "mask values"):
        plain = tmp_path / "plain.gguf"  # gguf-py reads GGUF magic only: find the tensors' offsets in a copy
        plain.write_bytes(b"GGUF" + bytes(data[4:]))
        r = GGUFReader(plain)
    if case == "truncated":
        data = data[:len(data) // 2]
    elif case in ("bucket not the mask", "mask values"):
        t = r.tensors[-1 if case.startswith("bucket") else 0]
        off = t.data_offset + (4 * 4 if case.startswith("bucket") else 8)
        data[off:off + 4] = (7 if case.startswith("bucket") else 9).to_bytes(4, "little")
    elif case == "layer count":
        path = write_gpuidx(tmp_path / "m.gpuidx", [np.arange(5)] * (cfg.n_layer - 1), cfg.n_ff, 1000)
        data = bytearray(path.read_bytes())
    elif case == "capacity type":
        data = data.replace(b"split.vram_capacity", b"split.vram_capacitx")
    path.write_bytes(bytes(data))
    with pytest.raises(PowerInferError) as e:
        read_gpuidx(path, cfg.n_layer, cfg.n_ff)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("case", ["object dtype", "truncated", "targets missing", "targets wrong count"])
def test_tampered_logits_file(tmp_path, case):
    a = tmp_path / "a.npy"
    np.save(a, np.zeros((3, 8), np.float32))
    np.save(tmp_path / "a.tokens.npy", np.zeros(3, np.int32))
    if case == "object dtype":
        np.save(a, np.array([None] * 3, dtype=object), allow_pickle=True)
    elif case == "truncated":
        a.write_bytes(a.read_bytes()[:140])
    elif case == "targets missing":
        (tmp_path / "a.tokens.npy").unlink()
    else:
        np.save(tmp_path / "a.tokens.npy", np.zeros(5, np.int32))
    with pytest.raises(PowerInferError) as e:
        open_logits(a)
    assert "\n" not in str(e.value)


# -- neuron-bundle files (the disk tier's cache) ----------------------------------------------------------------------

@pytest.mark.parametrize("case", ["not one", "version", "truncated", "nested 100000 deep", "layers not objects",
                                  "header past 1 MiB", "header length 4 GiB"])
def test_tampered_neuron_bundle_header(tmp_path, case):
    import struct

    from powerinfer.runtime.neuron_bundles import MAGIC, read_header

    text = json.dumps({"fingerprint": "f", "placement": "p", "layers": [{"offset": 4096, "count": 1}]}).encode()
    version, n = 1, None
    if case == "not one":
        text = b"GGUF" * 8
    elif case == "version":
        version = 7
    elif case == "truncated":
        text = text[:20]
    elif case == "nested 100000 deep":
        text = b"[" * 100000 + b"]" * 100000
    elif case == "layers not objects":  # check_bundles called .get on each: an AttributeError traceback
        text = json.dumps({"fingerprint": "f", "placement": "p", "layers": [1, 2]}).encode()
    elif case == "header past 1 MiB":  # valid JSON, but ~300,000 layer objects: never parsed
        text = json.dumps({"layers": [{}] * 300000}).encode()
    elif case == "header length 4 GiB":
        n = 2**32 - 1
    path = tmp_path / "m.gguf.bundles"
    path.write_bytes(MAGIC + struct.pack("<II", version, len(text) if n is None else n) + text)
    with pytest.raises(PowerInferError) as e:
        read_header(path)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{path}: ") and "delete it" in str(e.value)
