"""Upstream's `.generated.gpuidx` (written the way upstream's export does, read by position, PWRI magic) and our
placement artifact."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from powerinfer.errors import PowerInferError
from powerinfer.formats.gpuidx import (PLACEMENT_VERSION, gpuidx_path, read_gpuidx, read_placement, write_gpuidx,
                                       write_placement)


def _random_hot(rng, n_layer, n_ff):
    hot = [np.sort(rng.choice(n_ff, int(rng.integers(0, n_ff + 1)), replace=False)) for _ in range(n_layer)]
    hot[0] = np.zeros(0, dtype=np.int64)  # a layer with nothing on the fast tier
    hot[-1] = np.arange(n_ff)  # and one entirely there
    return hot


def _gguf_py(path, tmp_path):
    """Stock gguf-py refuses the PWRI magic: read a copy with the magic patched back."""
    copy = tmp_path / (path.name + ".gguf")
    shutil.copy(path, copy)
    with open(copy, "r+b") as fh:
        fh.write(b"GGUF")
    return GGUFReader(copy)


def _write_raw(path, tensors, arch="generic.gpu_index", blocks=None, capacity=1 << 30, magic=b"PWRI"):
    """A GGUF with the given (name, int32 array) tensors in the given order."""
    w = GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.block_count", len(tensors) // 2 if blocks is None else blocks)
    w.add_uint64("split.vram_capacity", capacity)
    for name, a in tensors:
        w.add_tensor(name, np.asarray(a, dtype=np.int32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open(path, "r+b") as fh:
        fh.write(magic)
    return path


def _layer(mask):
    mask = np.asarray(mask, dtype=np.int32)
    return mask, np.flatnonzero(mask).astype(np.int32)


def test_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    for n_layer, n_ff in ((1, 8), (3, 256), (40, 1536)):
        hot = _random_hot(rng, n_layer, n_ff)
        path = write_gpuidx(tmp_path / f"m{n_layer}.generated.gpuidx", hot, n_ff, 123_456_789_012)
        data = path.read_bytes()
        assert data[:4] == b"PWRI" and int.from_bytes(data[4:8], "little") == 3
        idx = read_gpuidx(path, n_layer, n_ff)
        assert idx.vram_capacity == 123_456_789_012
        assert [h.tolist() for h in idx.hot_index] == [h.tolist() for h in hot]
        assert not (tmp_path / f"m{n_layer}.generated.gpuidx.tmp").exists()


def test_gguf_py_reads_upstream_layout(tmp_path):
    hot = [np.array([1, 5]), np.array([], dtype=np.int64), np.array([0, 2, 3])]
    path = write_gpuidx(tmp_path / "x.gpuidx", hot, 8, 5 << 30)
    with pytest.raises(ValueError):  # stock gguf-py rejects the PWRI magic, as with upstream's model files
        GGUFReader(path)
    r = _gguf_py(path, tmp_path)
    f = r.fields
    assert f["general.architecture"].contents() == "generic.gpu_index"
    assert f["generic.gpu_index.block_count"].types == [GGUFValueType.UINT32]
    assert f["generic.gpu_index.block_count"].contents() == 3
    assert f["split.vram_capacity"].types == [GGUFValueType.UINT64]
    assert f["split.vram_capacity"].contents() == 5 << 30
    assert [t.name for t in r.tensors] == ["blk.0.gpu_idx", "blk.0.gpu_bucket", "blk.1.gpu_idx",
                                           "blk.1.gpu_bucket", "blk.2.gpu_idx", "blk.2.gpu_bucket"]
    assert {t.tensor_type.name for t in r.tensors} == {"I32"}
    assert [t.data.tolist() for t in r.tensors] == [[0, 1, 0, 0, 0, 1, 0, 0], [1, 5], [0] * 8, [],
                                                    [1, 0, 1, 1, 0, 0, 0, 0], [0, 2, 3]]


def test_byte_identical_to_upstream_export(tmp_path):
    """Upstream's export: per layer gpu_idx marks torch.topk(counts, k_i) and gpu_bucket = sorted indices,
    written in that order by GGUFWriter(path, "generic.gpu_index"), then the magic patched to PWRI."""
    rng = np.random.default_rng(1)
    n_ff, ks = 512, [256, 0, 512, 256]
    counts = [torch.from_numpy(rng.permutation(n_ff)) for _ in ks]  # distinct counts: topk is unambiguous
    theirs = []
    for i, (c, k) in enumerate(zip(counts, ks)):
        ids = torch.topk(c, k).indices
        mask = torch.zeros(n_ff, dtype=torch.int32)
        mask[ids] = 1
        theirs += [(f"blk.{i}.gpu_idx", mask.numpy()), (f"blk.{i}.gpu_bucket", torch.sort(ids).values.numpy())]
    ref = _write_raw(tmp_path / "theirs.gpuidx", theirs, capacity=3 << 30)
    hot = [np.argsort(-c.numpy())[:k] for c, k in zip(counts, ks)]
    ours = write_gpuidx(tmp_path / "ours.gpuidx", hot, n_ff, 3 << 30)
    assert ours.read_bytes() == ref.read_bytes()


def test_read_by_position_and_refusals(tmp_path):
    m0, b0 = _layer([0, 1, 1, 0])
    m1, b1 = _layer([1, 0, 0, 0])
    good = [("blk.0.gpu_idx", m0), ("blk.0.gpu_bucket", b0), ("blk.1.gpu_idx", m1), ("blk.1.gpu_bucket", b1)]
    assert [h.tolist() for h in read_gpuidx(_write_raw(tmp_path / "ok", good)).hot_index] == [[1, 2], [0]]
    # plain GGUF magic is read too
    assert read_gpuidx(_write_raw(tmp_path / "gguf", good, magic=b"GGUF")).hot_index[1].tolist() == [0]
    cases = {
        "swapped": ([good[1], good[0], good[2], good[3]], {}, "expected blk.0.gpu_idx"),
        "layers swapped": (good[2:] + good[:2], {}, "expected blk.0.gpu_idx"),
        "missing": (good[:3], {"blocks": 2}, "3 tensors for 2 layers"),
        "disagree": ([good[0], ("blk.0.gpu_bucket", b1)] + good[2:], {}, "layer 0: gpu_bucket"),
        "not binary": ([("blk.0.gpu_idx", [0, 2, 1, 0]), good[1]], {}, "other than 0 and 1"),
        "arch": (good, {"arch": "llama"}, "not a .gpuidx"),
    }
    for name, (tensors, kw, needle) in cases.items():
        with pytest.raises(PowerInferError, match=needle):
            read_gpuidx(_write_raw(tmp_path / name, tensors, **kw))
    with pytest.raises(PowerInferError, match="made for 2 layers"):
        read_gpuidx(tmp_path / "ok", n_layer=3)
    with pytest.raises(PowerInferError, match="layer 0 has 4 neurons"):
        read_gpuidx(tmp_path / "ok", n_ff=8)
    (tmp_path / "junk").write_bytes(b"junk" * 10)
    with pytest.raises(PowerInferError, match="not a GGUF"):
        read_gpuidx(tmp_path / "junk")


def test_write_checks_ids(tmp_path):
    with pytest.raises(PowerInferError, match=r"\[0, 8\)"):
        write_gpuidx(tmp_path / "x.gpuidx", [np.array([3, 8])], 8, 0)
    idx = read_gpuidx(write_gpuidx(tmp_path / "y.gpuidx", [np.array([5, 1, 5])], 8, 0))
    assert idx.hot_index[0].tolist() == [1, 5]


def test_gpuidx_path_is_next_to_the_model():
    assert str(gpuidx_path("/m/llama-7b-relu.powerinfer.gguf")) == \
        "/m/llama-7b-relu.powerinfer.gguf.generated.gpuidx"


def test_placement_artifact(tmp_path):
    hot = [np.array([0, 3]), np.array([], dtype=np.int64)]
    rec = {"inputs": {"budget_bytes": 1000}, "bandwidths": {"fast_bytes_per_s": 9e11, "slow_bytes_per_s": 3e10}}
    path = write_placement(tmp_path / "sub" / "m.placement.json", "abcd", hot, rec)
    doc = read_placement(path, "abcd")
    assert [h.tolist() for h in doc["hot_index"]] == [[0, 3], []]
    assert doc["inputs"]["budget_bytes"] == 1000 and doc["bandwidths"]["slow_bytes_per_s"] == 3e10
    with pytest.raises(PowerInferError, match="solved for model abcd"):
        read_placement(path, "ef01")
    d = json.loads(path.read_text())
    d["version"] = PLACEMENT_VERSION + 1
    path.write_text(json.dumps(d))
    with pytest.raises(PowerInferError, match="version"):
        read_placement(path, "abcd")
    path.write_text("{not json")
    with pytest.raises(PowerInferError, match="not a placement file"):
        read_placement(path, "abcd")
    path.write_text(json.dumps({"format": "powerinfer.thresholds", "version": 1}))
    with pytest.raises(PowerInferError, match="not a placement file"):
        read_placement(path, "abcd")
    with pytest.raises(PowerInferError, match="no such placement file"):
        read_placement(tmp_path / "none.json", "abcd")
