"""NaN/inf weights and logits are reported, not computed with silently: weights at load (formats/finite.py, floats
value by value, block formats through their f16 scales), logits after every eval (runtime/runner.py); both can be
allowed (--allow-non-finite), and then NaN logits become -inf so sampling still works."""
import shutil
import struct

import numpy as np
import pytest
from gguf import GGUFReader

from powerinfer.errors import ModelFormatError
from powerinfer.formats.loader import load_model
from powerinfer.runtime.runner import make_runner


def _patched(src, dst, name, fn):
    shutil.copy(src, dst)
    r = GGUFReader(dst, "r+")
    t = next(t for t in r.tensors if t.name == name)
    fn(t.data)
    r.data.flush()
    del r
    return dst


@pytest.mark.parametrize("qtype,name,value", [("F32", "blk.0.ffn_norm.weight", float("nan")),
                                              ("F16", "blk.1.attn_q.weight", float("inf")),
                                              ("Q8_0", "blk.0.ffn_up.weight", float("nan")),
                                              ("Q4_1", "output.weight", float("-inf"))])
def test_nonfinite_weights_refused_at_load_unless_allowed(tiny_llama_gguf, tmp_path, qtype, name, value):
    src = tiny_llama_gguf(qtype).path

    def poison(data):
        raw = np.asarray(data).reshape(-1).view(np.uint8)
        if name.endswith("norm.weight") or qtype in ("F32",):
            raw[4:8] = np.frombuffer(struct.pack("<f", value), np.uint8)
        else:  # F16 values and the f16 scale d at the start of a Q8_0/Q4_1 block alike
            raw[34 * 3 if qtype == "Q8_0" else 0:][:2] = np.frombuffer(struct.pack("<e", value), np.uint8)

    bad = _patched(src, tmp_path / "bad.gguf", name, poison)
    with pytest.raises(ModelFormatError) as e:
        load_model(bad)
    assert str(e.value) == (f"{bad}: tensor {name} holds NaN or infinite values; the file is corrupt "
                            "(--allow-non-finite loads it anyway)")
    loaded = load_model(bad, allow_non_finite=True)
    assert loaded.non_finite == [name]


def test_nonfinite_logits_are_an_error_then_allowed(tiny_llama_gguf, tmp_path):
    # finite weights whose products overflow float32: the head row of token 7 is 3e38 everywhere
    def huge(data):
        a = np.asarray(data)
        a[7, :] = 3e38

    path = _patched(tiny_llama_gguf("F32").path, tmp_path / "huge.gguf", "output.weight", huge)
    loaded = load_model(path)
    runner = make_runner(loaded, n_ctx=32, n_threads=1)
    with pytest.raises(ModelFormatError, match=r"^the model produced NaN or infinite logits at position 2 "
                                               r"\(corrupt or overflowing weights\); --allow-non-finite"):
        runner.eval([1, 2, 3])
    assert runner.n_past == 0  # nothing was appended: the runner is still usable
    runner.allow_non_finite = True
    logits = runner.eval([1, 2, 3])
    # row 7 overflowed to NaN (inf - inf across the row's signs): now -inf, never sampled; the rest untouched
    assert not np.isnan(logits).any() and logits[7] == float("-inf")
    assert np.isfinite(np.concatenate([logits[:7], logits[8:]])).all() and int(logits.argmax()) != 7
