"""The disk tier (`--ram-budget`): with most FFN neurons in a neuron-bundle file and a small neuron cache, a run
computes what the all-RAM C decoder computes with the same activation rule (exact ReLU or predictors): the same
logits and greedy tokens. The cache's hits and misses are checked on cases that can be counted by hand; bundle
files of another model or placement are refused, a truncated one is a one-line error."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from powerinfer.core.sparse_spec import SparseSpec
from powerinfer.errors import PowerInferError
from powerinfer.formats.loader import load_model
from powerinfer.runtime import disk_placement, disk_runner
from powerinfer.runtime.disk_placement import GIB, bundle_layout, plan_ram, ram_dense_parts
from powerinfer.runtime.disk_runner import DiskRunner
from powerinfer.runtime.neuron_bundles import bundle_path, check_bundles, write_bundles
from powerinfer.runtime.runner import make_runner
from powerinfer.settings import PlacementSettings
from powerinfer.sparse.artifacts import model_fingerprint
from powerinfer.sparse.predictor import PredictorSet

N_CTX = 64
IDS = [1, 5, 9, 33, 7, 2, 11, 40, 3]


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # bundle files go to ~/.cache/powerinfer/<fingerprint>/
    # bundles padded to 4 KiB whatever the test machine's disk says, so the byte counts below are the same anywhere
    monkeypatch.setattr(disk_runner, "device_block", lambda path: 4096)


def _model(tiny_gguf, **kw):
    kw = {"qtype": Q.Q8_0, "activation": "relu", "n_layer": 3, "n_ff": 256, "context_length": 128, "gate_rank": 4,
          "gate_bias": 0.5, **kw}
    return load_model(tiny_gguf(**kw).path)


def _slot(loaded) -> int:
    return max(bundle_layout(lw, loaded.config.d_model).bundle_bytes for lw in loaded.weights.layers)


def _budget(loaded, hot_per_layer: int, gate_resident=True, predictors=None) -> float:
    """GiB holding the resident parts, the smallest neuron cache and `hot_per_layer` neurons a layer (when 10% of
    the budget is below the smallest cache)."""
    dense = sum(ram_dense_parts(loaded, N_CTX, gate_resident, predictors).values())
    cfg = loaded.config
    return (dense + (disk_placement.MIN_CACHE_SLOTS + hot_per_layer * cfg.n_layer) * _slot(loaded)) / GIB


def _disk(loaded, budget, spec, threads=2) -> DiskRunner:
    r = make_runner(loaded, N_CTX, threads, placement=PlacementSettings(ram_budget=budget))
    assert isinstance(r, DiskRunner)
    r.set_sparse(spec)
    return r


def _ram(loaded, spec, threads=2):
    r = make_runner(loaded, N_CTX, threads)
    r.set_sparse(spec)
    return r


def _rel(a, b):
    a, b = torch.as_tensor(a), torch.as_tensor(b)  # runners' logits are numpy
    return ((a - b).abs().max() / b.abs().max()).item()


def _greedy(r, n=24):
    # The prompt one step per token, as the disk tier runs it: the all-RAM batched prefill of a short prompt runs
    # the union of its tokens' active sets, which with inexact predictors computes neurons a step would not.
    logits, toks = torch.from_numpy(r.eval([1, 2, 3], all_logits=True))[-1], []
    for _ in range(n):
        toks.append(int(logits.argmax()))
        logits = r.eval([toks[-1]])
    return toks


def _perfect(loaded) -> PredictorSet:
    from fixtures.tiny import perfect_predictor

    pairs = [perfect_predictor(lw.gate_proj.dequantize().numpy(), lw.post_attention_layernorm.dequantize().numpy())
             for lw in loaded.weights.layers]
    return PredictorSet([torch.from_numpy(a) for a, _ in pairs], [torch.from_numpy(b) for _, b in pairs], 0.0)


def _random(loaded, threshold=0.5) -> PredictorSet:
    g = torch.Generator().manual_seed(0)
    cfg = loaded.config
    return PredictorSet([torch.randn(16, cfg.d_model, generator=g) for _ in range(cfg.n_layer)],
                        [torch.randn(cfg.n_ff, 16, generator=g) for _ in range(cfg.n_layer)], threshold)


@pytest.mark.parametrize("ffn_kind", [None, "dglu"], ids=["relu", "drelu"])
@pytest.mark.parametrize("threads", [1, 2])
def test_exact_relu_from_disk_is_the_all_ram_run(tiny_gguf, ffn_kind, threads):
    loaded = _model(tiny_gguf, ffn_kind=ffn_kind)
    cfg = loaded.config
    spec = SparseSpec.uniform(cfg.n_layer, method="relu")
    budget = _budget(loaded, 32)
    disk = _disk(loaded, budget, spec, threads)
    assert sum(len(d) for d in disk.plan.disk) == cfg.n_layer * (cfg.n_ff - 32)  # 1/8 of the neurons resident
    ram = _ram(loaded, spec, threads)
    a, b = torch.from_numpy(disk.eval(IDS, all_logits=True)), torch.from_numpy(ram.eval(IDS, all_logits=True))
    assert _rel(a, b) < 1e-4
    assert torch.equal(a, b)  # same neurons summed in the same order: the same floats
    st = disk.disk_stats()
    assert st["cache_misses"] > 0 and st["bytes_per_token"] > 0 and st["o_direct"] in (True, False)
    assert 0.0 < disk.ffn_stats()["sparsity"] < 1.0
    assert _greedy(_disk(loaded, budget, spec, threads)) == _greedy(_ram(loaded, spec, threads))


def test_bundles_padded_to_512_byte_blocks_compute_the_same(tiny_gguf, monkeypatch):
    """A device with 512-byte blocks gets bundles padded to 512 bytes (O_DIRECT where it is allowed, buffered reads
    where a device refuses): the same logits."""
    monkeypatch.setattr(disk_runner, "device_block", lambda path: 512)
    loaded = _model(tiny_gguf)
    spec = SparseSpec.uniform(loaded.config.n_layer, method="relu")
    disk = _disk(loaded, _budget(loaded, 32), spec)
    assert disk.plan.slot_bytes == 512 and all(lay.bundle_bytes == 512 for lay in disk.plan.layouts)
    assert np.array_equal(disk.eval(IDS, all_logits=True), _ram(loaded, spec).eval(IDS, all_logits=True))
    assert disk.disk_stats()["bytes_per_token"] % 512 == 0


def test_device_block_reads_the_logical_block_size(tmp_path):
    from powerinfer.runtime.neuron_bundles import device_block

    n = device_block(tmp_path / "not" / "made" / "yet")
    assert n in (512, 1024, 2048, 4096)
    assert device_block(Path("/proc")) == 4096  # no block device: the 4 KiB default


@pytest.fixture(scope="module")
def wide_model(tiny_gguf):
    """An FFN 8x wider than d_model in F32 (3 rows of 320 values: 3840 of a bundle's 4096 bytes), so the resident
    parts (the gate matrix included), a neuron cache and some hot neurons fit in less than the FFN's own bytes."""
    return load_model(tiny_gguf(qtype=Q.F32, activation="relu", d_model=320, n_layer=4, n_ff=2560, n_head=4,
                                n_head_kv=2, context_length=128, gate_rank=4, gate_bias=0.5).path)


@pytest.mark.parametrize("rule", ["exact", "predictors"])
def test_a_budget_below_the_ffn_size_is_the_all_ram_run(wide_model, rule):
    loaded = wide_model
    preds = _random(loaded, 0.5) if rule == "predictors" else None
    spec = SparseSpec.uniform(loaded.config.n_layer, method="relu", predictors=preds)
    ffn_bytes = sum(t.nbytes for lw in loaded.weights.layers for t in (lw.gate_proj, lw.up_proj, lw.down_proj))
    budget = _budget(loaded, 64, gate_resident=preds is None, predictors=preds)
    assert budget * GIB < ffn_bytes
    disk = _disk(loaded, budget, spec)
    assert disk.plan.used <= budget * GIB
    a, b = (torch.from_numpy(r.eval(IDS, all_logits=True)) for r in (disk, _ram(loaded, spec)))
    assert _rel(a, b) < 1e-4 and np.array_equal(np.asarray(a).argmax(-1), np.asarray(b).argmax(-1))
    assert disk.disk_stats()["cache_misses"] > 0
    assert _greedy(_disk(loaded, budget, spec), 16) == _greedy(_ram(loaded, spec), 16)


@pytest.mark.parametrize("which", ["perfect", "random"])
def test_predictors_from_disk_are_the_all_ram_run(tiny_gguf, which):
    loaded = _model(tiny_gguf)
    preds = _perfect(loaded) if which == "perfect" else _random(loaded)
    spec = SparseSpec.uniform(loaded.config.n_layer, method="relu", predictors=preds)
    budget = _budget(loaded, 16, gate_resident=False, predictors=preds)
    disk = _disk(loaded, budget, spec)
    assert not disk.plan.gate_resident and "gate" not in disk.plan.dense  # gate rows live in the bundles
    assert disk.decoder.packed_bytes < _disk_free_packed(loaded)
    ram = _ram(loaded, spec)
    a, b = torch.from_numpy(disk.eval(IDS, all_logits=True)), torch.from_numpy(ram.eval(IDS, all_logits=True))
    assert _rel(a, b) < 1e-4 and np.array_equal(np.asarray(a).argmax(-1), np.asarray(b).argmax(-1))
    assert _greedy(_disk(loaded, budget, spec)) == _greedy(_ram(loaded, spec))


def _disk_free_packed(loaded) -> int:
    return make_runner(loaded, N_CTX, 2).decoder.packed_bytes


def _all_candidates(loaded) -> SparseSpec:
    """Predictors whose logits are all 0 >= threshold 0: every neuron of every layer is a candidate."""
    cfg = loaded.config
    ps = PredictorSet([torch.zeros(8, cfg.d_model) for _ in range(cfg.n_layer)],
                      [torch.zeros(cfg.n_ff, 8) for _ in range(cfg.n_layer)], 0.0)
    return SparseSpec.uniform(cfg.n_layer, method="relu", predictors=ps)


def test_cache_hits_and_misses_by_hand(tiny_gguf, monkeypatch):
    loaded = _model(tiny_gguf)
    cfg = loaded.config
    spec = _all_candidates(loaded)
    n_l, n_ff, slot = cfg.n_layer, cfg.n_ff, _slot(loaded)
    preds = spec.predictors
    # No hot neurons and a cache of one layer (256 slots = n_ff): each layer evicts the previous one's neurons
    # (LRU), so every candidate of every token is a miss.
    r = _disk(loaded, _budget(loaded, 0, False, preds), spec)
    assert r.plan.cache_slots == n_ff and not any(len(x) for x in r.plan.resident)
    r.eval([1, 2])
    st = r.disk_stats()
    assert (st["cache_hits"], st["cache_misses"]) == (0, 2 * n_l * n_ff)
    assert st["bytes_per_token"] == n_l * n_ff * r.plan.layouts[0].bundle_bytes
    assert st["bundles_per_token"] == n_l * n_ff and st["resident_fired_per_token"] == 0
    # adjacent bundles go in one preadv of up to 32: n_ff / 32 reads per layer
    assert st["reads_per_token"] == n_l * n_ff / 32
    # A cache that holds every layer: the first token misses everything, the second hits everything.
    monkeypatch.setattr(disk_placement, "CACHE_FRACTION", 1.0)  # all of the budget is cache: no hot neurons
    dense = sum(ram_dense_parts(loaded, N_CTX, False, preds).values())
    r = _disk(loaded, (dense + (n_l * n_ff + 1) * slot) / GIB, spec)
    assert r.plan.cache_slots >= n_l * n_ff and not any(len(x) for x in r.plan.resident)
    r.eval([1])
    assert (r.disk_stats()["cache_hits"], r.disk_stats()["cache_misses"]) == (0, n_l * n_ff)
    r.eval([2])
    assert (r.disk_stats()["cache_hits"], r.disk_stats()["cache_misses"]) == (n_l * n_ff, n_l * n_ff)
    assert r.disk_stats()["hit_rate"] == 0.5
    # Resident neurons are never cache traffic: 64 per layer resident, the other 192 read once each.
    monkeypatch.setattr(disk_placement, "CACHE_FRACTION", 0.0)
    r = _disk(loaded, _budget(loaded, 64, False, preds), spec)
    r.eval([1])
    st = r.disk_stats()
    assert (st["cache_hits"], st["cache_misses"], st["resident_fired_per_token"]) == (0, n_l * 192, n_l * 64)


def test_a_layer_firing_more_than_the_cache_reads_the_rest_into_overflow(tiny_gguf, monkeypatch):
    loaded = _model(tiny_gguf)
    cfg = loaded.config
    spec = _all_candidates(loaded)
    monkeypatch.setattr(disk_placement, "MIN_CACHE_SLOTS", 64)
    r = _disk(loaded, _budget(loaded, 0, False, spec.predictors), spec)
    assert r.plan.cache_slots == 64 and not any(len(x) for x in r.plan.resident)
    a = torch.from_numpy(r.eval(IDS, all_logits=True))
    st = r.decoder.disk_stats()
    # per layer and token: 64 neurons take the cache's slots (evicting the previous layer's), 192 overflow
    n = len(IDS) * cfg.n_layer
    assert (st["hits"], st["misses"], st["overflow"]) == (0, n * cfg.n_ff, n * (cfg.n_ff - 64))
    assert torch.equal(a, torch.from_numpy(_ram(loaded, spec).eval(IDS, all_logits=True)))


def test_budget_below_the_resident_parts_is_one_line(tiny_gguf):
    loaded = _model(tiny_gguf)
    spec = SparseSpec.uniform(loaded.config.n_layer, method="relu")
    r = make_runner(loaded, N_CTX, 2, placement=PlacementSettings(ram_budget=1e-6))
    with pytest.raises(PowerInferError, match=r"below the [\d.e-]+ GiB this model needs in RAM at -c 64") as e:
        r.set_sparse(spec)
    assert "\n" not in str(e.value)
    with pytest.raises(PowerInferError, match="--ram-budget needs the sparse FFN"):
        r.set_sparse(None)
    with pytest.raises(PowerInferError, match="--ram-budget must be"):
        PlacementSettings(ram_budget=-1)


def test_bundles_of_another_model_or_placement_are_refused(tiny_gguf, tmp_path):
    a, b = _model(tiny_gguf), _model(tiny_gguf, seed=1)
    spec = SparseSpec.uniform(a.config.n_layer, method="relu")
    plan = plan_ram(a, _budget(a, 32), N_CTX, True)
    path = tmp_path / "a.bundles"
    write_bundles(path, a, model_fingerprint(a), plan, log=None)
    check_bundles(path, model_fingerprint(a), plan)
    with pytest.raises(PowerInferError, match="neuron bundles of another model"):
        check_bundles(path, model_fingerprint(b), plan)
    with pytest.raises(PowerInferError, match="neuron bundles of another placement"):
        check_bundles(path, model_fingerprint(a), plan_ram(a, _budget(a, 64), N_CTX, True))
    # the runner of model b refuses a's file at b's cache path (a copy, a link, a mix-up)
    r = _disk(a, _budget(a, 32), spec)
    shutil.copy(r.bundles, tmp_path / "a-copy")
    rb = make_runner(b, N_CTX, 2, placement=PlacementSettings(ram_budget=_budget(b, 32)))
    dest = bundle_path(rb.cache_dir, b.path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(tmp_path / "a-copy", dest)
    with pytest.raises(PowerInferError, match="another model") as e:
        rb.set_sparse(spec)
    assert "\n" not in str(e.value)


def test_a_new_budget_rewrites_the_cached_bundles(tiny_gguf, capfd):
    loaded = _model(tiny_gguf)
    spec = SparseSpec.uniform(loaded.config.n_layer, method="relu")
    r1 = _disk(loaded, _budget(loaded, 32), spec)
    size1 = r1.bundles.stat().st_size
    r2 = _disk(loaded, _budget(loaded, 64), spec)
    assert r2.bundles == r1.bundles and r2.bundles.stat().st_size < size1
    assert "neuron bundles of another placement" in capfd.readouterr().err
    assert np.array_equal(r2.eval(IDS, all_logits=True), _ram(loaded, spec).eval(IDS, all_logits=True))


def test_a_truncated_bundle_file_is_one_line(tiny_gguf):
    loaded = _model(tiny_gguf)
    spec = SparseSpec.uniform(loaded.config.n_layer, method="relu")
    budget = _budget(loaded, 32)
    r = _disk(loaded, budget, spec)
    path = r.bundles
    # truncated while in use: the reads come up short
    with open(path, "r+b") as fh:
        fh.truncate(8192)
    with pytest.raises(PowerInferError, match=r"reading neuron bundles failed") as e:
        r.eval(IDS)
    assert "\n" not in str(e.value)
    # truncated before a run: refused when the tier is set up
    with pytest.raises(PowerInferError, match=r"truncated neuron-bundle file \(8192 of \d+ bytes") as e:
        _disk(loaded, budget, spec)
    assert "\n" not in str(e.value)
    with open(path, "wb") as fh:
        fh.write(b"PINEURON\x01\x00\x00\x00\xff\x00\x00\x00{")
    with pytest.raises(PowerInferError, match="truncated or corrupt neuron-bundle header"):
        _disk(loaded, budget, spec)


def test_a_dense_gate_is_refused_without_predictors(tiny_gguf):
    loaded = _model(tiny_gguf, activation=None)  # SwiGLU: activity needs the up rows too
    spec = SparseSpec.uniform(loaded.config.n_layer, method="hu")
    r = make_runner(loaded, N_CTX, 2, placement=PlacementSettings(ram_budget=1.0))
    with pytest.raises(PowerInferError, match="needs a gated ReLU model"):
        r.set_sparse(spec)


def test_eval_before_the_sparse_rule_is_an_error_not_a_crash(tiny_gguf):
    """The FFN is placed when set_sparse runs; an eval before it read unset layers (a segfault)."""
    loaded = _model(tiny_gguf)
    r = make_runner(loaded, N_CTX, 2, placement=PlacementSettings(ram_budget=1.0))
    with pytest.raises(PowerInferError, match="call set_sparse"):
        r.eval([1, 2, 3])


def test_run_with_a_ram_budget_prints_the_disk_tier_and_the_same_text(capsys, tiny_gguf):
    from powerinfer.cli import main

    model = tiny_gguf(activation="relu", qtype=Q.Q8_0, n_layer=3, n_ff=256, context_length=128, gate_rank=4,
                      gate_bias=0.5, tokenizer=True, n_vocab=300)
    argv = ["run", "-m", str(model.path), "-p", "hello", "-n", "12", "--temp", "0", "-c", "64"]
    assert main(argv) == 0
    ram_text = capsys.readouterr().out
    assert main(argv + ["--ram-budget", "0.0015", "--verbose"]) == 0
    out = capsys.readouterr()
    assert out.out == ram_text
    assert "placement: RAM tier" in out.err and "disk neurons" in out.err
    assert "disk tier, per step (" in out.err and "neuron cache hit rate" in out.err and "I/O wait" in out.err
    assert main(argv + ["--ram-budget", "0.0001"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "this model needs in RAM at -c 64" in err[0]


def test_perplexity_with_a_ram_budget_reports_the_disk_tier_after_each_chunk(capsys, tiny_gguf, tmp_path):
    """A long run says what the disk tier costs as it goes: after every chunk (stderr, beside llama.cpp's running
    values on stdout), the bytes read, hit rate and I/O wait per step so far; the perplexity equals the all-RAM run's."""
    from powerinfer.cli import main

    model = tiny_gguf(activation="relu", qtype=Q.Q8_0, n_layer=3, n_ff=256, context_length=128, gate_rank=4,
                      gate_bias=0.5, tokenizer=True, n_vocab=300)
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 12)
    # -b 1: the all-RAM run evaluates one token per step as the disk tier does (batched prompts round differently)
    argv = ["perplexity", "-m", str(model.path), "-f", str(text), "-c", "32", "--chunks", "3", "-b", "1"]
    assert main(argv) == 0
    ram = capsys.readouterr()
    assert main(argv + ["--ram-budget", "0.0015"]) == 0
    disk = capsys.readouterr()
    lines = [ln for ln in disk.err.splitlines() if ln.startswith("perplexity: chunk ")]
    assert [ln.split(":")[1].strip() for ln in lines] == ["chunk 1/3", "chunk 2/3", "chunk 3/3"]
    assert all("MiB read" in ln and "neuron cache hit rate" in ln and "I/O wait" in ln for ln in lines)
    assert "disk tier" not in ram.err
    ppl = [ln for ln in ram.out.splitlines() if ln.startswith("Final estimate")]
    assert ppl and ppl == [ln for ln in disk.out.splitlines() if ln.startswith("Final estimate")]
