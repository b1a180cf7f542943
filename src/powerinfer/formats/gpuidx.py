"""Neuron placement files: upstream PowerInfer's `<model>.generated.gpuidx` and our placement artifact.

`.gpuidx` (reference/powerinfer.md 2.6): a GGUF written by gguf-py's GGUFWriter with architecture
`generic.gpu_index`, the keys `generic.gpu_index.block_count` (u32) and `split.vram_capacity` (u64, the byte
budget it was solved for), and two I32 tensors per layer in strict order: `blk.{i}.gpu_idx` ([n_ff], 1 = the
neuron has a copy on the fast tier) then `blk.{i}.gpu_bucket` ([k_i], those neurons' ids, ascending). The magic is
then overwritten with `PWRI`. Upstream's loader reads the tensors by position (2i, 2i+1) and wants exactly
2 * n_layer of them, so the reader here does the same and checks the names only as a consistency test.

The placement artifact is ours: a JSON file with the hot neuron ids per layer and everything they were solved
from (model fingerprint, budget, tier bandwidths, hash of the firing counts, ...). Like every artifact (DESIGN,
"Artifacts") it carries a format version and the model fingerprint, and reading refuses a mismatch.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..core.files import atomic_path
from ..errors import PowerInferError, one_line
from .artifact import read_json_artifact, write_json_artifact
from .gguf import PWRI_MAGIC, open_gguf, read_metadata

GPUIDX_ARCH = "generic.gpu_index"
GPUIDX_SUFFIX = ".generated.gpuidx"
PLACEMENT_FORMAT = "powerinfer.placement"
PLACEMENT_VERSION = 1


class GpuIndex(NamedTuple):
    hot_index: list[np.ndarray]  # per layer: ascending ids of the neurons on the fast tier (int64)
    vram_capacity: int  # split.vram_capacity: the budget in bytes the placement was solved for


def gpuidx_path(model_path: str | Path) -> Path:
    """Where upstream looks for a model's index: next to the model file, `<model file>.generated.gpuidx`."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + GPUIDX_SUFFIX)


def write_gpuidx(path: str | Path, hot_index: list[np.ndarray], n_ff: int, vram_capacity: int) -> Path:
    """Write an upstream `.gpuidx` (module doc) atomically; `hot_index[i]` are layer i's fast-tier neurons."""
    from gguf import GGUFWriter

    path = Path(path)
    if vram_capacity < 0:
        raise PowerInferError(f"split.vram_capacity must be >= 0, got {vram_capacity}")
    buckets = []
    for i, hot in enumerate(hot_index):
        bucket = np.unique(np.asarray(hot, dtype=np.int64))  # sorted, duplicates removed
        if len(bucket) and (bucket[0] < 0 or bucket[-1] >= n_ff):
            raise PowerInferError(f"layer {i}: neuron ids must lie in [0, {n_ff}), got {bucket[0]}..{bucket[-1]}")
        buckets.append(bucket)
    with atomic_path(path) as tmp:
        writer = GGUFWriter(str(tmp), GPUIDX_ARCH)
        writer.add_uint32(f"{GPUIDX_ARCH}.block_count", len(hot_index))
        writer.add_uint64("split.vram_capacity", int(vram_capacity))
        for i, bucket in enumerate(buckets):
            mask = np.zeros(n_ff, dtype=np.int32)
            mask[bucket] = 1
            writer.add_tensor(f"blk.{i}.gpu_idx", mask)
            writer.add_tensor(f"blk.{i}.gpu_bucket", bucket.astype(np.int32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "r+b") as fh:  # upstream patches the magic after writing a plain GGUF
            fh.write(PWRI_MAGIC)
    return path


def read_gpuidx(path: str | Path, n_layer: int | None = None, n_ff: int | None = None) -> GpuIndex:
    """Read a `.gpuidx` (PWRI or GGUF magic). With n_layer / n_ff, also check it was made for that shape.
    PowerInferError (ModelFormatError for a broken GGUF) on anything upstream's loader would reject."""
    path = Path(path)
    reader, _ = open_gguf(path)
    md = read_metadata(reader)
    arch = md.get("general.architecture")
    if arch != GPUIDX_ARCH:
        raise PowerInferError(f"{path}: not a .gpuidx (architecture {one_line(repr(arch), 80)}, expected "
                              f"{GPUIDX_ARCH!r})")
    if "split.vram_capacity" not in md:
        raise PowerInferError(f"{path}: no split.vram_capacity key")
    key = f"{GPUIDX_ARCH}.block_count"
    capacity, blocks = md["split.vram_capacity"], md.get(key, len(reader.tensors) // 2)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (capacity, blocks)):
        raise PowerInferError(f"{path}: split.vram_capacity and {key} must be integers >= 0")
    tensors = reader.tensors
    if len(tensors) != 2 * blocks:
        raise PowerInferError(f"{path}: {len(tensors)} tensors for {blocks} layers (expected two per layer)")
    if n_layer is not None and blocks != n_layer:
        raise PowerInferError(f"{path}: made for {blocks} layers, the model has {n_layer}")
    hot = []
    for i in range(blocks):
        idx_t, bucket_t = tensors[2 * i], tensors[2 * i + 1]  # by position, like upstream's loader
        for t, want in ((idx_t, f"blk.{i}.gpu_idx"), (bucket_t, f"blk.{i}.gpu_bucket")):
            if t.name != want or t.tensor_type.name != "I32":
                raise PowerInferError(f"{path}: tensor {2 * i + (t is bucket_t)} is {t.name} "
                                      f"({t.tensor_type.name}); expected {want} (I32)")
        mask = np.asarray(idx_t.data, dtype=np.int64).reshape(-1)
        bucket = np.asarray(bucket_t.data, dtype=np.int64).reshape(-1)
        if n_ff is not None and len(mask) != n_ff:
            raise PowerInferError(f"{path}: layer {i} has {len(mask)} neurons, the model has {n_ff}")
        if not np.isin(mask, (0, 1)).all():
            raise PowerInferError(f"{path}: layer {i}: gpu_idx holds values other than 0 and 1")
        if not np.array_equal(np.flatnonzero(mask), bucket):
            raise PowerInferError(f"{path}: layer {i}: gpu_bucket is not the sorted ids that gpu_idx marks")
        hot.append(bucket)
    return GpuIndex(hot, capacity)


# -- our placement artifact -------------------------------------------------------------------------------

def write_placement(path: str | Path, fingerprint: str, hot_index: list[np.ndarray], record: dict) -> Path:
    """Write the placement artifact atomically. `record` holds what it was solved from and what it scored
    (budget_bytes, bandwidths, counts hash, parts placed, ...): plain JSON values."""
    doc = {"format": PLACEMENT_FORMAT, "version": PLACEMENT_VERSION, "fingerprint": fingerprint, **record,
           "hot_index": [np.asarray(h, dtype=np.int64).tolist() for h in hot_index]}
    return write_json_artifact(path, doc)


def read_placement(path: str | Path, fingerprint: str) -> dict:
    """The artifact's record with `hot_index` as int64 arrays; PowerInferError if it is missing, malformed,
    another format version, or made for another model."""
    doc = read_json_artifact(path, kind="placement", fmt=PLACEMENT_FORMAT, version=PLACEMENT_VERSION,
                             fingerprint=fingerprint, made="solved for model", remake="powerinfer solve")
    try:
        doc["hot_index"] = [np.asarray(h, dtype=np.int64).reshape(-1) for h in doc["hot_index"]]
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise PowerInferError(f"{path}: malformed hot_index ({e.__class__.__name__})") from None
    if not isinstance(doc.get("inputs", {}), dict):
        raise PowerInferError(f"{path}: malformed placement (`inputs` is not an object)")
    return doc
