"""The placement solver against upstream's rule (never worse, budget respected to the byte), the layer numbering
of activation_N.pt, and `powerinfer solve`."""
from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from powerinfer.cli import main
from powerinfer.errors import PowerInferError
from powerinfer.formats.gpuidx import read_gpuidx, read_placement
from powerinfer.prepare.solve import (GIB, firings_served, load_activation_dir, model_parts, score,
                                      solve_placement, upstream_placement)
from powerinfer.sparse.artifacts import model_fingerprint

FAST, SLOW = 900e9, 30e9
ALIGNS = (1, 2, 8, 32, 64, 256)


# -- inputs ------------------------------------------------------------------------------------------------

def _random_counts(rng, n_layer, n_ff):
    kind = rng.integers(4)
    if kind == 0:  # power law, scale per layer
        return [np.floor(rng.pareto(rng.uniform(0.5, 3.0), n_ff) * rng.uniform(1, 100)) for _ in range(n_layer)]
    if kind == 1:  # few distinct values: many ties
        return [rng.integers(0, 4, n_ff).astype(float) for _ in range(n_layer)]
    if kind == 2:  # mostly silent
        return [np.where(rng.random(n_ff) < 0.9, 0, rng.integers(1, 1000, n_ff)).astype(float)
                for _ in range(n_layer)]
    return [rng.random(n_ff) for _ in range(n_layer)]  # normalised frequencies, not counts


def profiled_counts(rng, n_layer, n_ff, n_tokens):
    """Like a profile of a ReLU model: per layer a Zipf-like firing probability over a random neuron order,
    a layer-dependent exponent and sparsity, counts sampled over n_tokens tokens."""
    out = []
    for _ in range(n_layer):
        p = (1.0 + np.arange(n_ff)) ** -rng.uniform(0.6, 1.4)
        p = np.minimum(1.0, p / p.mean() * rng.uniform(0.05, 0.3))
        out.append(rng.binomial(n_tokens, rng.permutation(p)).astype(float))
    return out


def _random_case(rng):
    n_layer = int(rng.integers(1, 15))
    n_ff = int(rng.choice([64, 256, 512, 768, 1000, 1536]))
    counts = _random_counts(rng, n_layer, n_ff)
    if rng.random() < 0.5:
        nb = [int(rng.choice([576, 1080, 2304]))] * n_layer
    else:  # layers in different formats
        nb = [int(rng.choice([576, 1080, 1152, 2304, 4608])) for _ in range(n_layer)]
    parts = [(f"attention.{i}", int(rng.integers(0, 50_000))) for i in range(n_layer)] + [("output", 80_000)]
    total = sum(p for _, p in parts) + sum(nb) * n_ff
    budget = int(rng.integers(0, total + 1)) if rng.random() < 0.8 else \
        sum(p for _, p in parts) + 256 * int(rng.integers(0, n_ff // 256 + 1)) * nb[0]  # exact boundaries
    return counts, nb, parts, budget


def _check_placement(p, counts, nb, parts, budget):
    """Budget to the byte, valid ids, non-FFN parts a prefix of the priority order."""
    ffn = sum(len(h) * nb[l] for l, h in enumerate(p.hot))
    assert ffn == p.ffn_bytes
    assert sum(p.parts.values()) + ffn == p.used <= budget
    assert list(p.parts) == [n for n, _ in parts[:len(p.parts)]]
    if len(p.parts) < len(parts):  # stopped at the first part that does not fit
        assert sum(p.parts.values()) + parts[len(p.parts)][1] > budget
    for l, h in enumerate(p.hot):
        assert h.dtype.kind == "i" and np.all(np.diff(h) > 0)
        assert len(h) == 0 or 0 <= h[0] <= h[-1] < len(counts[l])


# -- properties against upstream's rule ---------------------------------------------------------------------

def test_never_below_upstream_on_random_inputs():
    rng = np.random.default_rng(20240604)
    fell_back = 0
    for case in range(400):
        counts, nb, parts, budget = _random_case(rng)
        align = int(rng.choice(ALIGNS))
        n_tok = int(max(c.max() for c in counts)) + 1
        ours, up = solve_placement(counts, n_tok, nb, parts, budget, FAST, SLOW, align)
        for p in (ours, up):
            _check_placement(p, counts, nb, parts, budget)
        assert score(ours, counts, n_tok, FAST, SLOW) >= score(up, counts, n_tok, FAST, SLOW), case
        if len(set(nb)) == 1:  # equal bytes per neuron: the time score is proportional to firings
            assert firings_served(ours, counts) >= firings_served(up, counts), case
        assert ours.parts == up.parts or len(up.parts) == len(parts)
        # upstream: whole groups of 256, each layer's hottest, and nothing unless every part fit
        for l, h in enumerate(up.hot):
            assert len(h) % 256 == 0
            if len(h):
                assert counts[l][h].min() >= np.delete(counts[l], h).max(initial=-1)
        if len(up.parts) < len(parts):
            assert up.ffn_bytes == 0
        n_ff = len(counts[0])
        if ours.rule.startswith("ours (groups"):
            # groups of `align` (a layer's last group may be its remainder) and nothing more fits
            assert all(len(h) % align in (0, n_ff % align) for h in ours.hot)
            left = budget - ours.used
            for l, h in enumerate(ours.hot):
                if len(h) < n_ff:
                    assert left < min(align, n_ff - len(h)) * nb[l], (case, l)
        else:
            fell_back += 1
    assert fell_back < 40  # the fallback is a guard, not the method


@pytest.mark.parametrize("align", [1, 32])
def test_never_below_upstream_on_profiled_power_law(align):
    """SmolLM2's shape (30 layers, 1536 neurons, 1080 bytes each) and a 7B-like layer count, profile-like counts,
    budgets from nothing to everything: never worse; strictly better whenever upstream's 256-neuron steps leave
    room for more of ours."""
    rng = np.random.default_rng(7)
    for n_layer, n_ff, nb in ((30, 1536, 1080), (32, 2048, 3 * 4096 * 2 // 8)):
        counts = profiled_counts(rng, n_layer, n_ff, 4096)
        full = n_layer * n_ff * nb
        for frac in (0.0, 0.01, 0.05, 0.1, 0.17, 0.25, 0.5, 0.9, 1.0):
            budget = int(full * frac) + int(rng.integers(0, nb))
            ours, up = solve_placement(counts, 4096, [nb] * n_layer, [], budget, FAST, SLOW, align)
            _check_placement(ours, counts, [nb] * n_layer, [], budget)
            assert firings_served(ours, counts) >= firings_served(up, counts)
            assert ours.used <= budget and budget - ours.used < align * nb
            outside = any((np.delete(c, h) > 0).any() for c, h in zip(counts, up.hot))
            if budget - up.used >= align * nb and outside:  # room for one more group of ours, worth something
                assert score(ours, counts, 4096, FAST, SLOW) > score(up, counts, 4096, FAST, SLOW)


def test_equal_bytes_matches_brute_force_optimum():
    """Equal bytes per neuron: the best set is the top-M neurons by count; check against enumeration."""
    rng = np.random.default_rng(1)
    for _ in range(30):
        counts = [rng.integers(0, 20, 4).astype(float) for _ in range(3)]
        budget = int(rng.integers(0, 13 * 7))
        ours, _ = solve_placement(counts, 20, [7, 7, 7], [], budget)
        flat = np.concatenate(counts)
        m = budget // 7
        best = max((flat[list(s)].sum() for s in itertools.combinations(range(12), min(m, 12))), default=0.0)
        assert firings_served(ours, counts) == best


def test_unequal_bytes_take_value_per_byte():
    """Ours: by frequency, skipping what no longer fits (to the byte); upstream: top groups of 256 by count."""
    counts = [np.r_[np.full(256, 10.0), np.full(256, 1.0)], np.r_[np.full(256, 9.0), np.full(256, 8.0)]]
    nb = [100, 10]
    budget = 256 * 100 + 256 * 10 * 2 - 1  # one byte short of layer 0's top group + all of layer 1
    ours, up = solve_placement(counts, 10, nb, [], budget)
    assert [len(h) for h in ours.hot] == [256, 511] and ours.used == budget - 9
    assert [len(h) for h in up.hot] == [256, 256]  # the next group (layer 1's second) would not fit whole
    assert score(ours, counts, 10) > score(up, counts, 10)


def test_upstream_places_no_neurons_unless_every_part_fit():
    counts = [np.arange(512.0)]
    parts = [("attention.0", 1000), ("output", 10**9)]
    ours, up = solve_placement(counts, 512, [100], parts, 30_000)
    assert up.parts == ours.parts == {"attention.0": 1000}
    assert up.ffn_bytes == 0  # upstream skips the FFN split when a dense part did not fit
    assert ours.hot[0].tolist() == list(range(222, 512))  # ours: what is left is still budget (290 neurons)
    assert upstream_placement(counts, [100], parts[:1], 30_000).hot[0].tolist() == list(range(256, 512))


def test_fast_tier_not_faster_places_no_neurons():
    counts = [np.arange(512.0)]
    ours, up = solve_placement(counts, 512, [100], [], 10**9, fast_bw=20e9, slow_bw=30e9)
    assert ours.ffn_bytes == 0 and up.ffn_bytes > 0
    assert score(ours, counts, 512, 20e9, 30e9) > score(up, counts, 512, 20e9, 30e9)


def test_rejects_bad_inputs():
    with pytest.raises(PowerInferError, match="budget"):
        solve_placement([np.ones(256)], 1, [10], [], -1)
    with pytest.raises(PowerInferError, match="align"):
        solve_placement([np.ones(256)], 1, [10], [], 100, align=3)
    with pytest.raises(PowerInferError, match="finite"):
        upstream_placement([np.r_[np.ones(255), np.nan]], [10], [], 100)
    with pytest.raises(PowerInferError, match="neuron sizes"):
        upstream_placement([np.ones(256)] * 2, [10], [], 100)


# -- layer numbering ---------------------------------------------------------------------------------------

def _layer_ten_counts(n_layer, n_ff, seed=3):
    """Low noise everywhere; layer 10 alone has 256 hot neurons, at ids no other layer favours."""
    rng = np.random.default_rng(seed)
    counts = [rng.integers(0, 5, n_ff).astype(np.int64) for _ in range(n_layer)]
    special = np.sort(rng.choice(n_ff, 256, replace=False))
    counts[10][special] = 1000 + rng.integers(0, 100, 256)
    return counts, special


def _write_activation(directory, counts):
    directory.mkdir(parents=True, exist_ok=True)
    for i, c in enumerate(counts):
        torch.save(torch.from_numpy(np.asarray(c)), directory / f"activation_{i}.pt")
    return directory


def test_layer_ten_uses_layer_ten_statistics(tmp_path):
    counts, special = _layer_ten_counts(12, 512)
    loaded = load_activation_dir(_write_activation(tmp_path / "activation", counts), 12, 512)
    assert all(np.array_equal(a, b) for a, b in zip(loaded, counts))  # activation_10.pt is layer 10, not 2
    ours, up = solve_placement(loaded, 2000, [1000] * 12, [], 256 * 1000)
    for p in (ours, up):
        assert p.hot[10].tolist() == special.tolist()
        assert all(len(h) == 0 for i, h in enumerate(p.hot) if i != 10)


def test_cli_layer_ten_gpu_bucket(capsys, tmp_path, bundled_model):
    """Through `powerinfer solve` on the bundled model (30 layers): blk.10.gpu_bucket holds layer 10's hot ids."""
    cfg = bundled_model.config
    counts, special = _layer_ten_counts(cfg.n_layer, cfg.n_ff)
    act = _write_activation(tmp_path / "activation", counts)
    parts, per_neuron = model_parts(bundled_model, 16)
    budget = sum(b for _, b in parts) + 256 * per_neuron[10] + 500
    out = tmp_path / "m.generated.gpuidx"
    assert main(["solve", "--activation", str(act), "-o", str(out), "-c", "16", "--vram-budget",
                 repr(budget / GIB), "--cpu-bandwidth", "30", "--predictor-bytes", "0"]) == 0
    idx = read_gpuidx(out, cfg.n_layer, cfg.n_ff)
    assert idx.hot_index[10].tolist() == special.tolist()
    assert all(len(h) == 0 for i, h in enumerate(idx.hot_index) if i != 10)
    table = capsys.readouterr().out.splitlines()
    row = next(ln for ln in table if ln.split()[:1] == ["10"])
    assert row.split()[1] == "256"


# -- the model's parts ---------------------------------------------------------------------------------------

def test_model_parts_priority_order_and_neuron_bytes(bundled_model):
    cfg = bundled_model.config
    parts, per_neuron = model_parts(bundled_model, 64, predictor_bytes=1234)
    cats = [n.split(".")[0] for n, _ in parts]
    order = ["attention", "predictors", "norms", "output", "kv_cache"]
    assert [c for i, c in enumerate(cats) if i == 0 or cats[i - 1] != c] == order  # each category once, in order
    lw = bundled_model.weights.layers[0]
    # SmolLM2 Q4_1: a row of 576 values is 18 blocks of 20 bytes; gate + up + down_t rows = 3 * 360
    assert per_neuron == [3 * 360] * cfg.n_layer
    assert lw.down_proj.nbytes // cfg.n_ff == 360
    assert dict(parts)["kv_cache.v.0"] == 64 * cfg.n_head_kv * cfg.head_dim * 2
    assert dict(parts)["predictors"] == 1234


# -- CLI -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny12(tiny_llama_gguf):
    """12 layers (so there is an activation_10.pt), 512 neurons of 108 bytes each (Q4_0 gate + up + down_t rows of
    64 values), PowerInfer layout with predictors: loads in 0.1 s where the bundled model takes 2 s."""
    from powerinfer.formats.loader import load_model

    return load_model(tiny_llama_gguf("Q4_0", activation="relu", n_layer=12, n_ff=512, pwri=True, ffn_down_t=True,
                                      predictors=True).path)


def _gib(nbytes):
    return repr(nbytes / GIB)  # exact: a division by a power of two


def _one_line_error(capsys, code):
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code not in (0, None) and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_model_parts_of_a_powerinfer_gguf(tiny12):
    parts, per_neuron = model_parts(tiny12, 16)
    assert per_neuron == [3 * 36] * 12  # 64 Q4_0 values: 2 blocks of 18 bytes, in gate, up and down_t
    names = [n for n, _ in parts]
    assert names.index("predictors.0.fc1") > names.index("attention.11.o_proj")
    assert dict(parts)["predictors.3.fc2"] == tiny12.extra_tensors["blk.3.fc2.weight"].nbytes
    assert names.index("norms.0.post_attention_layernorm") > names.index("predictors.11.fc2")


def test_cli_reuse_and_budget_changes(capsys, tmp_path, tiny12):
    act = _write_activation(tmp_path / "activation", [np.random.default_rng(i).integers(0, 100, 512)
                                                       for i in range(12)])
    out = tmp_path / "m.gpuidx"
    parts, _ = model_parts(tiny12, 16)
    fixed = sum(b for _, b in parts)
    args = ["solve", "-m", str(tiny12.path), "--activation", str(act), "-o", str(out), "-c", "16",
            "--cpu-bandwidth", "30", "--vram-budget"]
    assert main(args + [_gib(fixed + 1000 * 108)]) == 0
    small = read_gpuidx(out)
    assert sum(map(len, small.hot_index)) == 992  # 31 groups of 32
    doc = read_placement(tmp_path / "m.placement.json", model_fingerprint(tiny12))
    assert doc["inputs"]["budget_bytes"] == small.vram_capacity == fixed + 1000 * 108
    assert doc["bandwidths"]["slow_bytes_per_s"] == 30e9 and doc["used_bytes"] == fixed + 992 * 108
    assert all(np.array_equal(a, b) for a, b in zip(doc["hot_index"], small.hot_index))
    capsys.readouterr()
    assert main(args + [_gib(fixed + 1000 * 108)]) == 0
    assert "reusing" in capsys.readouterr().err
    assert main(args + [_gib(fixed + 1000 * 108), "--reset-gpu-index"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(args + [_gib(fixed + 2000 * 108)]) == 0  # larger: never reuse the smaller placement
    assert "solving again" in capsys.readouterr().err
    big = read_gpuidx(out)
    assert big.vram_capacity == fixed + 2000 * 108 and sum(map(len, big.hot_index)) == 1984
    assert main(args + [_gib(fixed + 1000 * 108)]) == 0  # smaller: solved again too
    assert "solving again" in capsys.readouterr().err
    assert [h.tolist() for h in read_gpuidx(out).hot_index] == [h.tolist() for h in small.hot_index]
    # other counts under the same budget: solved again
    torch.save(torch.full((512,), 10**6, dtype=torch.int64), act / "activation_3.pt")
    assert main(args + [_gib(fixed + 1000 * 108)]) == 0
    assert "counts_sha256" in capsys.readouterr().err
    assert read_gpuidx(out).hot_index[3].tolist() == list(range(512))
    # a budget that does not hold every non-FFN part: upstream places no neurons, ours uses what is left
    assert main(args + [_gib(fixed - 1), "--align", "1"]) == 0  # the last KV part (1024 bytes) does not fit
    table = capsys.readouterr().out
    total = next(ln for ln in table.splitlines() if ln.startswith("total"))
    assert total.split()[1] == "9" and total.split("|")[1].split()[0] == "0"


def test_cli_disable_gpu_index(capsys, tmp_path, tiny12):
    out = tmp_path / "m.gpuidx"
    out.write_bytes(b"left alone")
    # no activation counts needed: upstream does not solve at all with --disable-gpu-index
    assert main(["solve", "-m", str(tiny12.path), "-o", str(out), "--vram-budget", "1", "--disable-gpu-index",
                 "--activation", str(tmp_path / "none"), "--cpu-bandwidth", "30"]) == 0
    assert out.read_bytes() == b"left alone"
    doc = read_placement(tmp_path / "m.placement.json", model_fingerprint(tiny12))
    assert all(len(h) == 0 for h in doc["hot_index"]) and "kv_cache.k.11" in doc["parts"]
    assert "none on the fast tier" in capsys.readouterr().out


def test_cli_default_paths(capsys, tmp_path, monkeypatch, tiny_llama_gguf):
    """Without --activation / -o / --predictor-bytes: the profile and the trained predictors under
    ~/.cache/powerinfer/<fingerprint>/, and the index beside them."""
    from powerinfer.formats.loader import load_model
    from powerinfer.prepare.profile import PROFILE_FORMAT, PROFILE_VERSION
    from powerinfer.prepare.train import default_predictors_path
    from powerinfer.sparse.predictor import PredictorSet

    monkeypatch.setenv("HOME", str(tmp_path))
    tiny = load_model(tiny_llama_gguf("Q4_0", activation="relu", n_layer=12, n_ff=512).path)  # no fc1/fc2 inside
    fp = model_fingerprint(tiny)
    args = ["solve", "-m", str(tiny.path), "--vram-budget", "1", "--cpu-bandwidth", "30"]
    assert "powerinfer profile" in _one_line_error(capsys, main(args))
    prof = tmp_path / ".cache" / "powerinfer" / fp / "profile"
    _write_activation(prof / "activation", [np.arange(512) for _ in range(12)])
    meta = {"format": PROFILE_FORMAT, "version": PROFILE_VERSION, "n_tokens": 5000}
    (prof / "profile.json").write_text(json.dumps({**meta, "fingerprint": "0123456789abcdef"}))
    assert "profiled model 0123456789abcdef" in _one_line_error(capsys, main(args))
    (prof / "profile.json").write_text(json.dumps({**meta, "fingerprint": fp}))
    preds = PredictorSet([torch.zeros(8, 64) for _ in range(12)], [torch.zeros(512, 8) for _ in range(12)])
    preds.save(default_predictors_path(fp))
    assert main(args) == 0
    assert "5000 profiled tokens" in capsys.readouterr().out
    idx = read_gpuidx(tmp_path / ".cache" / "powerinfer" / fp / f"{tiny.path.name}.generated.gpuidx")
    assert [len(h) for h in idx.hot_index] == [512] * 12  # 1 GiB holds everything
    doc = read_placement(tmp_path / ".cache" / "powerinfer" / fp / f"{tiny.path.name}.placement.json", fp)
    assert doc["parts"]["predictors"] == 12 * (8 * 64 + 512 * 8) * 2  # as f16


def test_cli_measures_cpu_bandwidth(tmp_path, tiny12):
    act = _write_activation(tmp_path / "activation", [np.arange(512) for _ in range(12)])
    assert main(["solve", "-m", str(tiny12.path), "--activation", str(act), "-o", str(tmp_path / "m.gpuidx"),
                 "--vram-budget", "0.5"]) == 0
    doc = read_placement(tmp_path / "m.placement.json", model_fingerprint(tiny12))
    assert doc["bandwidths"]["slow"] == "measured" and 1e8 < doc["bandwidths"]["slow_bytes_per_s"] < 1e13


@pytest.mark.parametrize("budget", ["-1", "nan", "inf"])
def test_cli_bad_budget(capsys, budget):
    assert "--vram-budget" in _one_line_error(capsys, main(["solve", "--vram-budget", budget]))


def test_cli_bad_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["solve", "--vram-budget", "lots"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        main(["solve"])  # --vram-budget is required
    capsys.readouterr()
    assert "--align" in _one_line_error(capsys, main(["solve", "--vram-budget", "1", "--align", "48"]))
    line = _one_line_error(capsys, main(["solve", "--vram-budget", "1", "--gpu-bandwidth", "0"]))
    assert "--gpu-bandwidth" in line


def test_cli_bad_activation_inputs(capsys, tmp_path, tiny12):
    base = ["solve", "-m", str(tiny12.path), "--vram-budget", "1", "--cpu-bandwidth", "30",
            "-o", str(tmp_path / "m.gpuidx")]
    line = _one_line_error(capsys, main(base + ["--activation", str(tmp_path / "nope")]))
    assert "nope" in line and "powerinfer profile" in line
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "activation_0.pt").write_bytes(b"not a torch file")
    assert "not a tensor file" in _one_line_error(capsys, main(base + ["--activation", str(bad)]))
    short = _write_activation(tmp_path / "short", [np.ones(512)] * 5)
    assert "activation_5.pt: missing" in _one_line_error(capsys, main(base + ["--activation", str(short)]))
    wrong = _write_activation(tmp_path / "wrong", [np.ones(100)] * 12)
    assert "1-D tensor of 512" in _one_line_error(capsys, main(base + ["--activation", str(wrong)]))
    extra = _write_activation(tmp_path / "extra", [np.ones(512)] * 13)
    assert "another model" in _one_line_error(capsys, main(base + ["--activation", str(extra)]))
    neg = _write_activation(tmp_path / "neg", [-np.ones(512)] * 12)
    assert ">= 0" in _one_line_error(capsys, main(base + ["--activation", str(neg)]))
    assert not (tmp_path / "m.gpuidx").exists()


def test_cli_process_exit_code(tmp_path, tiny12):
    r = subprocess.run([sys.executable, "-m", "powerinfer", "solve", "-m", str(tiny12.path), "--vram-budget", "1",
                        "--activation", str(tmp_path / "missing")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "powerinfer profile" in r.stderr
