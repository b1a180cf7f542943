"""The disk tier (`--ram-budget`) on a K-quant model: gate/up bundles hold the file's Q4_K rows as stored (the
row-sparse K-quant kernels read them from the neuron cache), down_t is the Q8_0 re-blocking every block format
gets; the run computes what the all-RAM decoder computes with the same exact-ReLU rule."""
from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from powerinfer.core.sparse_spec import SparseSpec
from powerinfer.formats.loader import load_model
from powerinfer.runtime import disk_placement, disk_runner
from powerinfer.runtime.disk_placement import GIB, bundle_layout, ram_dense_parts
from powerinfer.runtime.disk_runner import DiskRunner
from powerinfer.runtime.runner import make_runner
from powerinfer.settings import PlacementSettings

N_CTX = 64
IDS = [1, 5, 9, 33, 7, 2, 11, 40, 3]


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(disk_runner, "device_block", lambda path: 4096)


# the fixture's plain Q4_K encoder divides by a zero scale on all-zero blocks (channel 0 of the low-rank gates)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_exact_relu_from_disk_is_the_all_ram_run_on_q4_k(tiny_gguf):
    loaded = load_model(tiny_gguf(qtype=Q.Q4_K, activation="relu", n_layer=2, d_model=256, n_ff=512, n_head=4,
                                  n_head_kv=2, context_length=128, gate_rank=4, gate_bias=0.5).path)
    cfg, lw = loaded.config, loaded.weights.layers[0]
    assert lw.gate_proj.qtype == Q.Q4_K and not loaded.conversion_report
    lay = bundle_layout(lw, cfg.d_model)
    assert (lay.gate_qtype, lay.up_qtype, lay.down_qtype) == (int(Q.Q4_K), int(Q.Q4_K), int(Q.Q8_0))
    spec = SparseSpec.uniform(cfg.n_layer, method="relu")
    dense = sum(ram_dense_parts(loaded, N_CTX, True, None).values())
    budget = (dense + (disk_placement.MIN_CACHE_SLOTS + 32 * cfg.n_layer) * lay.bundle_bytes) / GIB
    disk = make_runner(loaded, N_CTX, 2, placement=PlacementSettings(ram_budget=budget))
    assert isinstance(disk, DiskRunner)
    disk.set_sparse(spec)
    ram = make_runner(loaded, N_CTX, 2)
    ram.set_sparse(spec)
    a, b = torch.from_numpy(disk.eval(IDS, all_logits=True)), torch.from_numpy(ram.eval(IDS, all_logits=True))
    assert sum(len(d) for d in disk.plan.disk) > 0 and disk.disk_stats()["cache_misses"] > 0
    assert torch.equal(a, b)  # same neurons summed in the same order: the same floats
