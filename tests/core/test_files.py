"""Every writer of the project refuses or replaces a symlink planted where it writes, never writing through it
(core/files.py): thresholds/placement/profile JSON, predictor files, PowerInfer GGUF conversion, .gpuidx, the
profile's counts, activation_N.pt, samples and plots, train-predictors' parts, saved logits and their targets,
`solve -o` (.gpuidx and .placement.json), the .gpuidx a hybrid run caches, the disk tier's neuron bundles and
`run -o`. A link planted in place of a directory the project fills itself (predictors.parts, samples, activation)
is refused. Directories the project creates are user-only (0700)."""
import json
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from powerinfer.core.files import atomic_write, ensure_dir
from powerinfer.errors import PowerInferError
from powerinfer.formats.artifact import write_json_artifact
from powerinfer.formats.gpuidx import read_gpuidx, write_gpuidx
from powerinfer.formats.loader import load_model
from powerinfer.sparse.predictor import PredictorSet

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from fuzz_mutants import write_seed_model  # noqa: E402

SECRET = b"root:x:0:0:root:/root:/bin/bash\n"


@pytest.fixture
def victim(tmp_path):
    """A file the planted links point at ('/etc/passwd' when run as root): it must never change."""
    v = tmp_path / "victim" / "passwd"
    v.parent.mkdir()
    v.write_bytes(SECRET)
    return v


def plant(path: Path, victim: Path) -> Path:
    """Symlinks at `path` and at the name the writers used for their temporary file (`path.tmp`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for p in (path, path.with_name(path.name + ".tmp")):
        if p.is_symlink() or p.exists():
            p.unlink()
        p.symlink_to(victim)
    return path


def assert_replaced(path: Path, victim: Path):
    assert victim.read_bytes() == SECRET, f"{path} was written through its link"
    assert path.is_file() and not path.is_symlink()


@pytest.fixture(scope="module")
def relu_model(tmp_path_factory):
    path = write_seed_model(tmp_path_factory.mktemp("m") / "relu.pwri.gguf", pwri=True, seed=1)
    return load_model(path)


def test_json_artifact(tmp_path, victim):
    path = plant(tmp_path / "cache" / "thresholds.json", victim)
    write_json_artifact(path, {"a": 1})
    assert_replaced(path, victim)
    assert json.loads(path.read_text()) == {"a": 1}


def test_predictor_file(tmp_path, victim, relu_model):
    cfg = relu_model.config
    path = plant(tmp_path / "predictors.safetensors", victim)
    PredictorSet([torch.zeros(8, cfg.d_model) for _ in range(cfg.n_layer)],
                 [torch.zeros(cfg.n_ff, 8) for _ in range(cfg.n_layer)]).save(path)
    assert_replaced(path, victim)
    assert PredictorSet.load(path, config=cfg).n_layer == cfg.n_layer


def test_powerinfer_gguf_conversion(tmp_path, victim, relu_model):
    from powerinfer.formats.powerinfer_gguf import write_powerinfer_gguf

    path = plant(tmp_path / "out.powerinfer.gguf", victim)
    write_powerinfer_gguf(relu_model.path, path, progress=False)
    assert_replaced(path, victim)
    assert path.read_bytes()[:4] == b"PWRI" and load_model(path).config.n_layer == relu_model.config.n_layer


def test_gpuidx(tmp_path, victim):
    path = plant(tmp_path / "m.gguf.generated.gpuidx", victim)
    write_gpuidx(path, [np.arange(3)] * 2, 8, 100)
    assert_replaced(path, victim)
    assert read_gpuidx(path, 2, 8).vram_capacity == 100


def test_profile_and_train_predictors(tmp_path, victim, relu_model):
    from powerinfer.prepare.profile import load_profile, run_profile
    from powerinfer.prepare.train import train_predictors

    cfg = relu_model.config
    out = tmp_path / "profile"
    planted = [out / "profile.json", out / "counts.npy", out / "power_law.png", out / "sparsity.png",
               out / "activation" / "activation_0.pt", out / "samples" / "x_0.npy", out / "samples" / "active_3.npy"]
    for p in planted:
        plant(p, victim)
    tokens = list(range(1, 200))
    profile = run_profile(relu_model, tokens, {"text": "ids"}, out, n_tokens=96, n_ctx=32, progress=False,
                          log=open(os.devnull, "w"))
    for p in planted:
        assert_replaced(p, victim)
    profile = load_profile(out, profile.meta["fingerprint"])
    assert profile.samples(0)[0].shape == (96, cfg.d_model)

    pred = tmp_path / "predictors.safetensors"
    parts = pred.with_suffix(".parts")
    planted = [parts / "layer_0.pt", parts / "layer_0.json", parts / "layer_3.pt", pred]
    for p in planted:
        plant(p, victim)
    ps = train_predictors(relu_model, profile, pred, budget=0.02, epochs=1, progress=False, log=open(os.devnull, "w"))
    for p in planted:
        assert_replaced(p, victim)
    assert ps.n_layer == cfg.n_layer


@pytest.mark.parametrize("subdir", ["predictors.parts", "samples", "activation"])
def test_planted_directory_links_are_refused(tmp_path, relu_model, subdir):
    from powerinfer.prepare.profile import run_profile
    from powerinfer.prepare.train import train_predictors

    target = tmp_path / "elsewhere"
    target.mkdir()
    out = tmp_path / "profile"
    out.mkdir()
    (tmp_path / "predictors.parts" if subdir == "predictors.parts" else out / subdir).symlink_to(target)
    with pytest.raises(PowerInferError, match="is a symbolic link; refusing to write artifacts through it"):
        if subdir == "predictors.parts":
            from powerinfer.prepare.profile import Profile

            profile = Profile(out, {"fingerprint": "x", "n_samples": 1, "calibration": {}},
                              np.zeros((relu_model.config.n_layer, relu_model.config.n_ff), np.int64))
            train_predictors(relu_model, profile, tmp_path / "predictors.safetensors", progress=False)
        else:
            run_profile(relu_model, list(range(1, 100)), {}, out, n_tokens=64, n_ctx=32, progress=False,
                        log=open(os.devnull, "w"))
    assert list(target.iterdir()) == []


def test_logits_and_targets(tmp_path, victim):
    from powerinfer.measure.logits import LogitsWriter, open_logits

    path = plant(tmp_path / "run.npy", victim)
    plant(tmp_path / "run.tokens.npy", victim)
    w = LogitsWriter(path, 2, 4)
    w.add(torch.ones(2, 4), [1, 2])
    w.close()
    assert_replaced(path, victim)
    assert_replaced(tmp_path / "run.tokens.npy", victim)
    logits, targets = open_logits(path)
    assert logits.shape == (2, 4) and targets.tolist() == [1, 2]


def test_run_batch_output(tmp_path, victim, relu_model, capsys):
    from powerinfer import cli

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello\nWorld\n")
    out = plant(tmp_path / "out.jsonl", victim)
    rc = cli.main(["run", "-m", str(relu_model.path), "--prompt-file-batch", str(prompts), "-o", str(out), "-n", "2",
                   "-c", "32", "--temp", "0"])
    assert rc == 0
    assert_replaced(out, victim)
    assert [json.loads(x)["index"] for x in out.read_text().splitlines()] == [0, 1]


def test_solve_writes_index_and_placement(tmp_path, victim, relu_model, capsys):
    from powerinfer import cli

    cfg = relu_model.config
    act = tmp_path / "activation"
    act.mkdir()
    for i in range(cfg.n_layer):
        torch.save(torch.arange(cfg.n_ff, dtype=torch.int64), act / f"activation_{i}.pt")
    out = plant(tmp_path / "m.generated.gpuidx", victim)
    placement = plant(tmp_path / "m.placement.json", victim)
    rc = cli.main(["solve", "-m", str(relu_model.path), "-c", "32", "--vram-budget", "0.001", "--hot-device", "cpu",
                   "--activation", str(act), "--cpu-bandwidth", "20", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert_replaced(out, victim)
    assert_replaced(placement, victim)
    assert read_gpuidx(out, relu_model.config.n_layer, relu_model.config.n_ff).vram_capacity > 0


def test_placement_cache_of_a_hybrid_run(tmp_path, victim, relu_model, monkeypatch):
    """The .gpuidx a hybrid run solves and caches under ~/.cache/powerinfer/<fingerprint>/: its directories are
    made user-only, and a link planted at the cached file is replaced."""
    from powerinfer.prepare.solve import solve_hot_sets
    from powerinfer.runtime.placement import GIB, dense_parts, neuron_bytes
    from powerinfer.runtime.runner import make_runner
    from powerinfer.settings import PlacementSettings

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    per = neuron_bytes(relu_model, 4)  # the f32 fast tier on the CPU: half of every layer's neurons fit
    budget = (sum(dense_parts(relu_model, 32, 4).values()) + sum(relu_model.config.n_ff // 2 * b for b in per)) / GIB
    settings = PlacementSettings(vram_budget=budget, hot_device="cpu", reset_gpu_index=True)
    cached = Path(make_runner(relu_model, 32, 1, placement=settings, solve=solve_hot_sets)
                  .plan.source.split("cached ")[1].rstrip(")"))
    assert cached.is_file() and cached.is_relative_to(tmp_path / "home" / ".cache" / "powerinfer")
    for d in (tmp_path / "home", tmp_path / "home" / ".cache", cached.parent.parent, cached.parent):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d  # it was 0755: the cache made them with mkdir()
    plant(cached, victim)
    make_runner(relu_model, 32, 1, placement=settings, solve=solve_hot_sets)
    assert_replaced(cached, victim)


def test_neuron_bundles(tmp_path, victim, relu_model):
    from powerinfer.runtime.disk_placement import GIB, MIN_CACHE_SLOTS, bundle_layout, plan_ram, ram_dense_parts
    from powerinfer.runtime.neuron_bundles import check_bundles, write_bundles
    from powerinfer.sparse.artifacts import model_fingerprint

    cfg = relu_model.config
    slot = max(bundle_layout(lw, cfg.d_model).bundle_bytes for lw in relu_model.weights.layers)
    dense = sum(ram_dense_parts(relu_model, 32, True).values())
    plan = plan_ram(relu_model, (dense + (MIN_CACHE_SLOTS + 8 * cfg.n_layer) * slot) / GIB, 32, True, log=None)
    path = plant(tmp_path / "relu.pwri.gguf.bundles", victim)
    write_bundles(path, relu_model, model_fingerprint(relu_model), plan, log=None)
    assert_replaced(path, victim)
    assert len(check_bundles(path, model_fingerprint(relu_model), plan)) == cfg.n_layer


def test_new_directories_are_user_only_and_failures_leave_nothing(tmp_path):
    d = ensure_dir(tmp_path / "a" / "b" / "c")
    for p in (tmp_path / "a", tmp_path / "a" / "b", d):
        assert stat.S_IMODE(p.stat().st_mode) == 0o700
    with pytest.raises(RuntimeError):
        with atomic_write(d / "f.bin") as fh:
            fh.write(b"half")
            raise RuntimeError("interrupted")
    assert list(d.iterdir()) == []  # no half-written file, no temporary left behind
    (d / "x").mkdir()
    with pytest.raises(PowerInferError, match="is a directory, expected a file to write"):
        write_json_artifact(d / "x", {})
