"""The placement solver against upstream's rule, the budget, layer numbering, and the .gpuidx format."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from powerinfer.cli import main
from powerinfer.prepare.solve import (fill_neurons, read_gpuidx, saving, solve_placement,
                                      write_gpuidx)

FAST, SLOW = 900e9, 30e9


def _random_case(rng):
    n_layer = int(rng.integers(1, 13))
    n_ff = int(rng.choice([256, 512, 768, 1000, 1536]))
    alpha = rng.uniform(0.5, 3.0)  # power-law-ish firing counts
    counts = [np.floor(rng.pareto(alpha, n_ff) * rng.uniform(1, 100)).astype(np.int64) for _ in range(n_layer)]
    if rng.random() < 0.5:
        nb = [int(rng.choice([576, 1152, 2304]))] * n_layer
    else:
        nb = [int(rng.choice([576, 1152, 2304, 4608])) for _ in range(n_layer)]
    parts = [(f"attention.{i}", int(rng.integers(0, 50_000))) for i in range(n_layer)] + [("output", 80_000)]
    budget = int(rng.integers(0, sum(p for _, p in parts) + sum(nb) * n_ff))
    return counts, nb, parts, budget


@pytest.mark.parametrize("seed", range(40))
def test_never_below_upstream_and_within_budget(seed):
    rng = np.random.default_rng(seed)
    counts, nb, parts, budget = _random_case(rng)
    n_tok = int(max(c.max() for c in counts)) + 1
    ours, up = solve_placement(counts, n_tok, nb, parts, budget, FAST, SLOW)
    freq = [c / n_tok for c in counts]
    assert saving(ours.hot, freq, nb, FAST, SLOW) >= saving(up.hot, freq, nb, FAST, SLOW) - 1e-15
    for p in (ours, up):
        ffn = sum(len(h) * nb[l] for l, h in enumerate(p.hot))
        assert ffn == p.ffn_bytes and p.used <= budget
        assert all(len(np.unique(h)) == len(h) and (len(h) == 0 or h.max() < len(counts[l]))
                   for l, h in enumerate(p.hot))
    # upstream's rule places whole groups of 256, a layer's hottest first
    for l, h in enumerate(up.hot):
        assert len(h) % 256 == 0
        if len(h):
            assert counts[l][h].min() >= np.sort(counts[l])[::-1][len(h) - 1]


def test_fill_is_exact_to_the_byte():
    freq = [np.array([0.9, 0.8, 0.1]), np.array([0.85, 0.05])]
    hot, used = fill_neurons(freq, [100, 60], 200)
    # 0.9 (100) then 0.85 (60) fit (160); 0.8 (100) does not; 0.1 (100) neither; 0.05 (60) does not either
    assert [h.tolist() for h in hot] == [[0], [0]] and used == 160
    hot, used = fill_neurons(freq, [100, 60], 220)
    assert [h.tolist() for h in hot] == [[0], [0, 1]] and used == 220


def test_layer_ten_uses_layer_ten_statistics(tmp_path):
    """12 layers; only layer 10 has hot neurons, at ids no other layer favours. Its placement (ours and
    upstream's rule), written to and read back from the .gpuidx, holds exactly those ids."""
    rng = np.random.default_rng(3)
    n_ff = 512
    counts = [rng.integers(0, 5, n_ff) for _ in range(12)]
    special = np.sort(rng.choice(n_ff, 256, replace=False))
    counts[10][special] = 1000 + rng.integers(0, 100, 256)
    ours, up = solve_placement(counts, 2000, [1000] * 12, [], 256 * 1000, FAST, SLOW)
    for p in (ours, up):
        assert p.hot[10].tolist() == special.tolist()
        assert all(len(h) == 0 for i, h in enumerate(p.hot) if i != 10)
    path = write_gpuidx(tmp_path / "m.generated.gpuidx", ours.hot, n_ff, 123456)
    hot, cap = read_gpuidx(path)
    assert cap == 123456 and hot[10].tolist() == special.tolist()


def test_gpuidx_layout_matches_upstream(tmp_path):
    from powerinfer.formats.gguf import open_gguf

    hot = [np.array([1, 5]), np.array([], dtype=np.int64), np.array([0, 2, 3])]
    path = write_gpuidx(tmp_path / "x.gpuidx", hot, 8, 1 << 30)
    assert path.read_bytes()[:4] == b"PWRI"
    reader, pwri = open_gguf(path)
    assert pwri
    names = [t.name for t in reader.tensors]
    assert names == ["blk.0.gpu_idx", "blk.0.gpu_bucket", "blk.1.gpu_idx", "blk.1.gpu_bucket", "blk.2.gpu_idx",
                     "blk.2.gpu_bucket"]
    assert np.asarray(reader.tensors[0].data).tolist() == [0, 1, 0, 0, 0, 1, 0, 0]
    fields = {f.name: f for f in reader.fields.values()}
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "generic.gpu_index"
    assert int(fields["generic.gpu_index.block_count"].parts[-1][0]) == 3


def _activation_dir(tmp_path, n_layer, n_ff, seed=0):
    d = tmp_path / "activation"
    d.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n_layer):
        torch.save(torch.from_numpy(rng.integers(0, 100, n_ff)), d / f"activation_{i}.pt")
    return d


def test_cli_solve_reuse_and_stale_budget(capsys, tmp_path, bundled_model):
    cfg = bundled_model.config
    act = _activation_dir(tmp_path, cfg.n_layer, cfg.n_ff)
    out = tmp_path / "m.gpuidx"
    args = ["solve", "--activation", str(act), "-o", str(out)]
    assert main(args + ["--vram-budget", "0.05"]) == 0
    hot_small, cap_small = read_gpuidx(out)
    assert main(args + ["--vram-budget", "0.05"]) == 0
    assert "reusing" in capsys.readouterr().err
    assert main(args + ["--vram-budget", "0.08"]) == 0  # a larger budget never reuses the smaller placement
    err = capsys.readouterr().err
    assert "re-solving" in err
    hot_big, cap_big = read_gpuidx(out)
    assert cap_big > cap_small and sum(map(len, hot_big)) > sum(map(len, hot_small))
    assert main(args + ["--vram-budget", "0.08", "--disable-gpu-index"]) == 0
    assert sum(map(len, read_gpuidx(out)[0])) == 0


def test_cli_solve_errors(capsys, tmp_path):
    assert main(["solve", "--vram-budget", "-1"]) == 1
    assert "--vram-budget" in capsys.readouterr().err
    assert main(["solve", "--vram-budget", "1", "--activation", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert "powerinfer profile" in err and "Traceback" not in err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "activation_0.pt").write_bytes(b"not a torch file")
    assert main(["solve", "--vram-budget", "1", "--activation", str(bad)]) == 1
    assert "not a tensor file" in capsys.readouterr().err
