"""run at the edges of its flags: -c past the trained context warns as llama.cpp does (RoPE scaling counted), a huge
-b is capped at the context (it was a 2 TB allocation and a traceback), a huge -t is one line, and
--allow-non-finite runs a model with NaN weights that is refused without it."""
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from powerinfer import cli
from powerinfer.core.config import ModelConfig, RopeScaling

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from fuzz_mutants import write_seed_model  # noqa: E402


def _run(capsys, *argv) -> tuple[int, list[str]]:
    rc = cli.main(["run", "-p", "Hi", "-n", "2", "--temp", "0", "--no-stats", *argv])
    return rc, capsys.readouterr().err.strip().splitlines()


def test_context_past_training_warns(capsys, bundled_model_path):
    rc, err = _run(capsys, "-c", "16384")
    assert rc == 0 and "warning: -c 16384 exceeds the model's trained context of 8192 tokens: text past it comes " \
                      "out degraded" in err
    rc, err = _run(capsys, "-c", "8192")
    assert rc == 0 and not any("trained context" in e for e in err)


def test_trained_context_counts_rope_scaling():
    base = dict(arch="llama", n_vocab=8, d_model=64, n_layer=1, n_head=2, n_head_kv=2, head_dim=32, n_ff=64,
                context_length=32768)
    assert ModelConfig(**base).trained_context == 32768
    yarn = RopeScaling(kind="yarn", factor=4.0, original_context=32768)
    assert ModelConfig(**base, rope_scaling=yarn).trained_context == 131072
    llama3 = RopeScaling(kind="llama3", factor=8.0, original_context=8192)  # the file states the extended context
    assert ModelConfig(**{**base, "context_length": 131072}, rope_scaling=llama3).trained_context == 131072


def test_huge_batch_is_capped_and_huge_threads_is_one_line(capsys, bundled_model_path):
    rc, err = _run(capsys, "-c", "256", "-b", "1000000000")
    assert rc == 0
    rc, err = _run(capsys, "-t", str(2**31))
    assert rc == 1 and err == [f"error: --threads {2**31}: at most 4096 (the decoder uses up to 64)"]


def test_allow_non_finite_runs_what_is_refused_without_it(tmp_path, capsys):
    path = write_seed_model(tmp_path / "m.gguf", pwri=False)
    r = GGUFReader(path, "r+")
    t = next(t for t in r.tensors if t.name == "blk.1.ffn_norm.weight")
    np.asarray(t.data).reshape(-1).view(np.uint8)[:4] = np.frombuffer(struct.pack("<f", float("nan")), np.uint8)
    r.data.flush()
    del r
    rc, err = _run(capsys, "-m", str(path))
    assert rc == 1 and err[-1] == (f"error: {path}: tensor blk.1.ffn_norm.weight holds NaN or infinite values; the "
                                   "file is corrupt (--allow-non-finite loads it anyway)")
    rc, err = _run(capsys, "-m", str(path), "--allow-non-finite", "--sparsity", "off")
    assert rc == 0 and "warning: 1 tensors hold NaN or infinite values (blk.1.ffn_norm.weight); running anyway " \
                       "(--allow-non-finite)" in err
    assert cli.main(["info", "-m", str(path)]) == 0  # info describes the corrupt file instead of refusing it
    assert any(line.split() == ["non-finite", "tensors", "blk.1.ffn_norm.weight"]
               for line in capsys.readouterr().out.splitlines())
