"""Hostile model files are one-line ModelFormatErrors at load, before anything is allocated from their sizes:
counts and lengths past the end of the file, tensor dimensions that overflow, misaligned or unknown types, gguf-py's
own exceptions, hyper-parameters no model has, tokenizers longer than the embedding, predictors of the wrong shape
(the C decoder read those out of bounds), non-regular files."""
import os
import resource
import shutil
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from powerinfer.errors import ModelFormatError
from powerinfer.formats.loader import load_model, load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from fuzz_mutants import gguf_layout, write_seed_model  # noqa: E402


@pytest.fixture(scope="module")
def seed(tmp_path_factory):
    return write_seed_model(tmp_path_factory.mktemp("seed") / "seed.gguf", pwri=False)


@pytest.fixture(scope="module")
def pwri_seed(tmp_path_factory):
    return write_seed_model(tmp_path_factory.mktemp("seed") / "seed.pwri.gguf", pwri=True, seed=1)


def _field(path: Path, what: str, nth: int = 0) -> tuple[int, int]:
    fields = [(o, w) for o, w, k in gguf_layout(path)[0] if k == what]
    return fields[nth]


def _patched(src: Path, dst: Path, what: str, value: int, nth: int = 0) -> Path:
    data = bytearray(src.read_bytes())
    off, width = _field(src, what, nth)
    data[off:off + width] = (value % (1 << 8 * width)).to_bytes(width, "little")
    dst.write_bytes(bytes(data))
    return dst


def _load_error(path: Path) -> str:
    """The one-line error of loading `path` (model and tokenizer); the load must take < 2 s and < 64 MiB more peak RSS."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with pytest.raises(ModelFormatError) as e:
        load_tokenizer(load_model(path))
    assert time.perf_counter() - t0 < 2.0
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) < 64 * 1024
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg.replace(str(path), "<f>")


@pytest.mark.parametrize("what,value,nth,expected", [
    ("n_kv", 2**63, 0, "corrupt or truncated GGUF header: 9,223,372,036,854,775,808 metadata key/values needs"),
    ("n_tensors", 2**40, 0, "corrupt or truncated GGUF header: 1,099,511,627,776 tensor infos needs"),
    ("string_len", 2**62, 0, "corrupt or truncated GGUF header: a field needs bytes"),
    ("array_len", 2**40, 0, "corrupt or truncated GGUF header: an array of 1,099,511,627,776 STRING values needs"),
    ("array_len", 2**33, 1, "corrupt or truncated GGUF header: an array of 8,589,934,592 INT32 values needs"),
    ("key_len", 2**64 - 1, 3, "corrupt or truncated GGUF header: a field needs bytes"),
    ("n_dims", 9, 0, "a tensor at byte"),
    ("dim", 2**40, 0, "truncated GGUF: tensor token_embd.weight ends at byte"),
    ("dim", 2**32, 1, "truncated GGUF: tensor token_embd.weight ends at byte"),
    ("tensor_type", 99, 2, "tensor blk.0.attn_q.weight has unknown GGML type 99"),
    ("tensor_offset", 7, 0, "tensor token_embd.weight has offset 7, not a multiple of the alignment 32"),
    ("value_type", 99, 0, "corrupt or truncated GGUF header (ValueError: np.uint32(99) is not a valid GGUFValueType)"),
    ("array_type", 1234, 0, "metadata array of unknown type 1234"),
])
def test_header_sizes_and_types(seed, tmp_path, what, value, nth, expected):
    assert expected in _load_error(_patched(seed, tmp_path / "bad.gguf", what, value, nth))


def test_dimension_product_overflow_is_not_wrapped(seed, tmp_path):
    # [2^32, 2^32] wraps to 0 elements in int64 arithmetic; the byte range check must see 2^64
    data = bytearray(seed.read_bytes())
    for nth in (0, 1):
        off, width = _field(seed, "dim", nth)
        data[off:off + width] = (2**32).to_bytes(width, "little")
    (tmp_path / "bad.gguf").write_bytes(bytes(data))
    assert "truncated GGUF: tensor token_embd.weight ends at byte 19,599,665,578," in _load_error(tmp_path / "bad.gguf")


def _rewrite(src: Path, dst: Path, set_kv: dict | None = None, drop: tuple = (), raw_header=None) -> Path:
    """`src` written again with metadata keys replaced ({key: (value, GGUFValueType)}) or dropped."""
    r = GGUFReader(src)
    w = GGUFWriter(str(dst), str(r.fields["general.architecture"].contents()))
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture" or f.name in drop or \
                f.name in (set_kv or {}):
            continue
        t = f.types[0]
        w.add_key_value(f.name, f.contents(), t, f.types[-1] if t == GGUFValueType.ARRAY else None)
    for k, (v, t) in (set_kv or {}).items():
        sub = (GGUFValueType.STRING if isinstance(v[0], str) else GGUFValueType.INT32) if t == GGUFValueType.ARRAY \
            else None
        w.add_key_value(k, v, t, sub)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type if t.data.dtype == np.uint8 else None)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return dst


U32, F32, STR = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.STRING


@pytest.mark.parametrize("kv,expected", [
    ({"llama.attention.head_count": (0, U32)}, "llama.attention.head_count = 0 (must be >= 1)"),
    ({"llama.attention.head_count": ("8", STR)}, "metadata key llama.attention.head_count is '8', expected an integer"),
    ({"llama.attention.head_count_kv": (3, U32)}, "8 attention heads are not a multiple of 3 KV heads"),
    ({"llama.attention.key_length": (1024, U32)}, "head_dim = 1024 is outside [1, 512]"),
    ({"llama.rope.dimension_count": (31, U32)}, "rope dimension 31 must be even and at most the head dimension 32"),
    ({"llama.context_length": (0, U32)}, "context_length = 0 is outside [1, 16,777,216]"),
    ({"llama.block_count": (100000, U32)}, "n_layer = 100000 is outside [1, 4,096]"),
    ({"llama.rope.freq_base": (float("nan"), F32)}, "rope_theta = nan must be a finite number > 0"),
    ({"llama.attention.layer_norm_rms_epsilon": (-1.0, F32)}, "norm_eps = -1.0 must be a finite number >= 0"),
    ({"llama.rope.scaling.factor": (float("inf"), F32), "llama.rope.scaling.type": ("linear", STR)},
     "RoPE scaling factors must be finite and > 0"),
    ({"powerinfer.ffn_activation": (7, U32)}, "unsupported powerinfer.ffn_activation '7'"),
    ({"tokenizer.ggml.token_type": ([1, 2], GGUFValueType.ARRAY)}, "tokenizer.ggml.token_type has 2 entries for 355 "
                                                                    "tokens"),
])
def test_hyperparameters_no_model_has(seed, tmp_path, kv, expected):
    assert expected in _load_error(_rewrite(seed, tmp_path / "bad.gguf", kv))


def test_tokenizer_longer_than_embedding(seed, tmp_path):
    tokens = GGUFReader(seed).fields["tokenizer.ggml.tokens"].contents()
    bad = _rewrite(seed, tmp_path / "bad.gguf", {"tokenizer.ggml.tokens": (tokens + ["x1", "x2"], GGUFValueType.ARRAY)},
                   drop=("tokenizer.ggml.token_type",))
    # (a token id past the embedding's rows would index past the end of the weights)
    assert _load_error(bad) == "<f>: the tokenizer has 357 tokens but the embedding has 355 rows"


def test_gguf_py_exceptions_are_translated(seed, tmp_path):
    data = bytearray(seed.read_bytes())
    bad = tmp_path / "v.gguf"
    bad.write_bytes(bytes(data[:4] + struct.pack("<I", 99) + data[8:]))
    assert "file appears to be version 99" in _load_error(bad)
    names = [k for k in GGUFReader(seed).fields if not k.startswith("GGUF.")]
    a, b = next((a, b) for a in names for b in names if a < b and len(a) == len(b))  # one key renamed to another
    (tmp_path / "d.gguf").write_bytes(bytes(data.replace(b.encode(), a.encode(), 1)))
    assert f"Duplicate {a} already in list" in _load_error(tmp_path / "d.gguf")
    al = _rewrite(seed, tmp_path / "a.gguf", {"general.alignment": (3, U32)})
    assert "alignment" in _load_error(al)


def test_invalid_utf8_in_a_string_value(seed, tmp_path):
    data = bytearray(seed.read_bytes())
    i = data.find(b"fuzz-seed")  # general.name's value
    data[i:i + 2] = b"\xff\xfe"
    (tmp_path / "u.gguf").write_bytes(bytes(data))
    assert "metadata key 'general.name' is unreadable (UnicodeDecodeError" in _load_error(tmp_path / "u.gguf")


def test_fifo_is_not_opened(tmp_path):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    assert _load_error(fifo) == "<f>: not a regular file, expected a .gguf file"  # opening it would block


# -- the predictor-shape case: the C decoder read fc1/fc2 out of bounds (ASan: heap-buffer-overflow in rows_f16) --

def _pwri_with_predictors(src: Path, dst: Path, fc1_shape, fc2_shape, layer: int = 1) -> Path:
    data = bytearray(src.read_bytes())
    data[:4] = b"GGUF"
    tmp = dst.with_suffix(".plain")
    tmp.write_bytes(bytes(data))
    r = GGUFReader(tmp)
    w = GGUFWriter(str(dst), "llama")
    for f in r.fields.values():
        if not f.name.startswith("GGUF.") and f.name != "general.architecture":
            t = f.types[0]
            w.add_key_value(f.name, f.contents(), t, f.types[-1] if t == GGUFValueType.ARRAY else None)
    rng = np.random.default_rng(0)
    for t in r.tensors:
        arr = np.asarray(t.data)
        if t.name == f"blk.{layer}.fc1.weight":
            arr = rng.standard_normal(fc1_shape).astype(np.float16)
        elif t.name == f"blk.{layer}.fc2.weight":
            arr = rng.standard_normal(fc2_shape).astype(np.float16)
        w.add_tensor(t.name, arr, raw_dtype=t.tensor_type if arr.dtype == np.uint8 else None)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with open(dst, "r+b") as fh:
        fh.write(b"PWRI")
    return dst


@pytest.mark.parametrize("fc1,fc2,expected", [
    ((64, 512), (768, 64), "tensor blk.1.fc1.weight has shape [64, 512], expected [64, 256] (d_model 256, n_ff 768)"),
    ((64, 256), (768, 4096), "tensor blk.1.fc2.weight has shape [768, 4096], expected [768, 64] (d_model 256, n_ff 768)"),
    ((64, 256), (1536, 64), "tensor blk.1.fc2.weight has shape [1536, 64], expected [768, 64] (d_model 256, n_ff 768)"),
])
def test_predictor_shapes_in_a_powerinfer_gguf(pwri_seed, tmp_path, fc1, fc2, expected):
    from powerinfer import cli

    bad = _pwri_with_predictors(pwri_seed, tmp_path / "bad.pwri.gguf", fc1, fc2)
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(["run", "-m", str(bad), "-p", "Hello", "-n", "2", "-c", "32", "--sparsity", "auto"])
    lines = err.getvalue().strip().splitlines()
    assert rc == 1 and lines[-1] == f"error: {bad}: {expected}", lines


def test_gate_in_some_layers_only(seed, tmp_path):
    # a flipped bit in blk.0's gate name made an act(up) MLP with gates in layers 1..3: the C decoder refused
    # set_layer with a ValueError traceback (found by scripts/fuzz_gguf.py, seed 5, mutant 789)
    data = seed.read_bytes().replace(b"blk.0.ffn_gate.weight", b"blk.0.ffn_gatx.weight", 1)
    (tmp_path / "bad.gguf").write_bytes(data)
    assert _load_error(tmp_path / "bad.gguf") == ("<f>: tensor blk.1.ffn_gate.weight in a model whose FFN has no gate "
                                                  "(blk.0.ffn_gate.weight is missing)")
    # a file that says it is an MLP (powerinfer.ffn_kind) may carry gates it does not use: they are left unread
    ok = _rewrite(seed, tmp_path / "mlp.gguf", {"powerinfer.ffn_kind": ("mlp", STR)})
    assert all(lw.gate_proj is None for lw in load_model(ok).weights.layers)
