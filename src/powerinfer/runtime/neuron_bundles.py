"""The neuron-bundle file of the disk tier (DESIGN "Tiers and placement"; reference/hybrid.md 5.1, 6.7): per disk
neuron its gate row, up row and neuron-major down_t row, contiguous (PowerInfer-2's Gate/Up/Down bundles, LLM in a
flash's row-column bundling), each bundle starting and ending on 4 KiB so it can be read with O_DIRECT
(SmallThinker pads its expert bundles the same way). GGUF rows are unaligned and a neuron's three rows sit in three
tensors, so the model file itself cannot be read this way.

Layout: a header block (magic, version, then a JSON object: the model fingerprint, the placement hash, and per
layer the bundle layout, the byte offset of its first bundle and the number of bundles), padded to 4 KiB; then
per layer the bundles of its disk neurons in ascending neuron order. The file is written once per model and
placement under ~/.cache/powerinfer/<fingerprint>/, atomically (core/files.py); a file made for another model or
placement is refused, a truncated one is a one-line error.
"""
from __future__ import annotations

import json
import os
import struct
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..core.files import atomic_path
from ..errors import PowerInferError
from ..formats.pages import drop_file_cache, release_file_pages
from ..kernels.arrays import transposed
from .disk_placement import ALIGN_IO, BundleLayout, RamPlan

MAGIC = b"PINEURON"
VERSION = 1
SUFFIX = ".bundles"
CHUNK = 1024  # neurons per write: 7B-shaped bundles make 12 MiB chunks
# a header is ~190 bytes of JSON per layer (1 MiB: 5,000 layers); a longer one is a corrupt or hostile file, and
# neither its text nor the objects it would parse into are built
MAX_HEADER = 2**20


def device_block(path: Path) -> int:
    """The logical block size of the device under `path` (or its nearest existing parent): what O_DIRECT aligns
    offsets, lengths and buffers to. ALIGN_IO when the device does not say (tmpfs, overlay, no /sys)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.stat(p)
        dev = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
        for q in (dev / "queue" / "logical_block_size", dev.resolve().parent / "queue" / "logical_block_size"):
            # a disk, or a partition (whose queue is its disk's)
            if q.is_file():
                n = int(q.read_text().strip())
                if 512 <= n <= ALIGN_IO and n & (n - 1) == 0:
                    return n
    except (OSError, ValueError):
        pass
    return ALIGN_IO


def bundle_path(cache_dir: Path, model_path: Path) -> Path:
    return cache_dir / (Path(model_path).name + SUFFIX)


def _rows(t) -> np.ndarray:
    """uint8 [rows, row_bytes] view of a weight's stored rows."""
    data = np.asarray(t.data)
    if not data.flags["C_CONTIGUOUS"]:
        data = np.ascontiguousarray(data)
    return data.reshape(-1).view(np.uint8).reshape(t.rows, t.row_bytes)


def layer_rows(lw) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """(gate, up, down_t) row arrays of one layer; down_t is the file's own or a transposed copy (one layer's)."""
    down_t = lw.down_t if lw.down_t is not None else transposed(lw.down_proj)
    return (_rows(lw.gate_proj) if lw.gate_proj is not None else None), _rows(lw.up_proj), _rows(down_t)


def fill_bundles(out: np.ndarray, rows, ids: np.ndarray, lay: BundleLayout) -> None:
    """out [len(ids), >= bundle_bytes] uint8 <- the bundles of neurons `ids` (padding left as it is)."""
    gate, up, down = rows
    if gate is not None:
        out[:, lay.gate_off:lay.gate_off + gate.shape[1]] = gate[ids]
    out[:, lay.up_off:lay.up_off + up.shape[1]] = up[ids]
    out[:, lay.down_off:lay.down_off + down.shape[1]] = down[ids]


def _header(fingerprint: str, plan: RamPlan) -> tuple[bytes, list[int]]:
    offsets, layers = [], []
    body = {"fingerprint": fingerprint, "placement": plan.placement_hash(), "layers": layers}
    # the header's own size depends on the offsets' digits: size it with the largest offset first
    for _ in range(3):
        text = json.dumps(body, sort_keys=True).encode()
        start = -(-(len(MAGIC) + 8 + len(text) + 64) // ALIGN_IO) * ALIGN_IO
        offsets, pos = [], start
        for ids, lay in zip(plan.disk, plan.layouts):
            offsets.append(pos)
            pos += len(ids) * lay.bundle_bytes
        layers[:] = [{"offset": o, "count": len(ids), **asdict(lay)} for o, ids, lay in zip(offsets, plan.disk,
                                                                                            plan.layouts)]
    text = json.dumps(body, sort_keys=True).encode()
    head = MAGIC + struct.pack("<II", VERSION, len(text)) + text
    if len(head) > offsets[0]:
        raise AssertionError("bundle header outgrew its block")
    return head.ljust(offsets[0], b"\0"), offsets


def expected_size(plan: RamPlan, fingerprint: str) -> int:
    _, offsets = _header(fingerprint, plan)
    return offsets[-1] + len(plan.disk[-1]) * plan.layouts[-1].bundle_bytes


def read_header(path: Path) -> dict:
    """The header of a bundle file; a file that is not one, or an unknown version, is a one-line error."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(MAGIC) + 8)
            if len(head) < len(MAGIC) + 8 or head[:len(MAGIC)] != MAGIC:
                raise PowerInferError(f"{path}: not a neuron-bundle file (delete it to rebuild)")
            version, n = struct.unpack("<II", head[len(MAGIC):])
            if version != VERSION:
                raise PowerInferError(f"{path}: neuron-bundle version {version}, this build reads {VERSION} "
                                      "(delete it to rebuild)")
            if n > MAX_HEADER:
                raise PowerInferError(f"{path}: corrupt neuron-bundle header ({n} bytes long; delete it to rebuild)")
            text = fh.read(n)
            if len(text) < n:
                raise PowerInferError(f"{path}: truncated or corrupt neuron-bundle header (delete it to rebuild)")
    except OSError as e:
        raise PowerInferError(f"{path}: cannot read the neuron-bundle file ({e.strerror})") from None
    try:
        meta = json.loads(text)
        if not isinstance(meta, dict) or not isinstance(meta.get("layers"), list) or \
                not all(isinstance(lay, dict) for lay in meta["layers"]):
            raise ValueError
        return meta
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: JSON nested past Python's limit
        raise PowerInferError(f"{path}: truncated or corrupt neuron-bundle header (delete it to rebuild)") from None


def check_bundles(path: Path, fingerprint: str, plan: RamPlan) -> list[int]:
    """Per-layer offsets of the bundles in `path`, which must have been written for this model and placement and
    be complete; each mismatch is a one-line error."""
    meta = read_header(path)
    if meta.get("fingerprint") != fingerprint:
        raise PowerInferError(f"{path}: neuron bundles of another model (fingerprint {meta.get('fingerprint')}, "
                              f"this model {fingerprint}); delete the file or point --ram-budget at this model's")
    if meta.get("placement") != plan.placement_hash():
        raise PowerInferError(f"{path}: neuron bundles of another placement ({meta.get('placement')}, this budget "
                              f"places {plan.placement_hash()})")
    head, offsets = _header(fingerprint, plan)
    if [lay.get("offset") for lay in meta["layers"]] != offsets:
        raise PowerInferError(f"{path}: neuron-bundle layer offsets do not match its placement (delete it to rebuild)")
    size, want = os.path.getsize(path), expected_size(plan, fingerprint)
    if size < want:
        raise PowerInferError(f"{path}: truncated neuron-bundle file ({size} of {want} bytes; delete it to rebuild)")
    return offsets


def write_bundles(path: Path, loaded, fingerprint: str, plan: RamPlan, log=sys.stderr) -> int:
    """Write the bundle file for `plan` (a progress bar when it runs past 2 s); returns its size in bytes."""
    from tqdm import tqdm

    head, offsets = _header(fingerprint, plan)
    total = expected_size(plan, fingerprint)
    with atomic_path(path) as tmp, open(tmp, "r+b") as fh, \
            tqdm(total=total, desc="neuron bundles", unit="B", unit_scale=True, delay=2, file=log,
                 disable=log is None) as bar:
        fh.write(head)
        bar.update(len(head))
        for il, (ids, lay) in enumerate(zip(plan.disk, plan.layouts)):
            if not len(ids):
                continue
            rows = layer_rows(loaded.weights.layers[il])
            fh.seek(offsets[il])
            for s in range(0, len(ids), CHUNK):
                part = ids[s:s + CHUNK]
                buf = np.zeros((len(part), lay.bundle_bytes), dtype=np.uint8)
                fill_bundles(buf, rows, part, lay)
                fh.write(buf.tobytes())
                bar.update(buf.nbytes)
            del rows
            # a model larger than RAM: neither the model rows read nor the bundles written may pile up in memory
            release_file_pages(loaded)
            fh.flush()
            os.fdatasync(fh.fileno())
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        fh.truncate(total)
        fh.flush()
        # written pages would otherwise stay in the page cache and stand in for the disk on the first tokens
        os.fdatasync(fh.fileno())
        drop_file_cache(tmp)
    return total
