"""Context shift (runtime/context_shift.py): llama-cli's rule (keep n_keep, drop the older half of the rest), and a
generation that runs past the context instead of stopping."""
from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from fixtures.shift import shifted_and_fresh
from powerinfer.errors import PowerInferError
from powerinfer.runtime.context_shift import fit, stream_shifting


def test_fit_keeps_the_start_and_the_newer_half():
    ids = list(range(100))
    assert fit(ids, 4, 200) == ids  # room left: unchanged
    out = fit(ids, 4, 100)
    assert out[:4] == [0, 1, 2, 3] and out[4:] == list(range(52, 100))  # (100 - 4) // 2 = 48 dropped
    assert len(fit(list(range(1000)), 2, 64)) + 1 < 64  # repeated until one more token fits
    with pytest.raises(PowerInferError, match="--keep"):
        fit(ids, 62, 64)


@pytest.mark.parametrize("k_shift", [True, False], ids=["k-shift", "evaluated-again"])
def test_generation_goes_past_the_context(tiny_gguf, k_shift):
    import powerinfer

    model = tiny_gguf(tokenizer=True, n_vocab=300, context_length=256)
    llm = powerinfer.load(str(model.path), n_ctx=64)
    ids = llm.tokenize("hello world", add_bos=True)
    start = list(ids)
    shifts = []
    chunks = list(stream_shifting(lambda i, n: llm.stream(i, n_predict=n, temp=0, ignore_eos=True), ids, 64, 3,
                                  n_predict=150, on_shift=shifts.append, runner=llm.runner if k_shift else None))
    generated = [c.token for c in chunks if c.token is not None]
    assert len(generated) == 150 > 64  # more tokens than the context holds
    assert len(shifts) >= 2 and chunks[-1].finish_reason == "length"
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert ids[:3] == start[:3] and len(ids) < 64  # --keep 3 survived every shift
    assert ids[-20:] == generated[-20:]  # what the context holds now ends with the newest tokens
    assert llm.runner.tokens == ids[:llm.runner.n_past]  # the cache holds them (shifted, or evaluated again)
    # without a shift the same generation stops at the context
    last = list(llm.stream(start, n_predict=150, temp=0, ignore_eos=True))[-1]
    assert last.finish_reason == "context"


@pytest.mark.parametrize("compute, arch", [("c", None), ("torch", "llama"), ("torch", "qwen2")],
                         ids=["c-bundled", "torch-llama-norm-rope", "torch-qwen2-neox-rope"])
def test_k_shift_rotates_keys_to_their_new_positions(bundled_model, tiny_gguf, compute, arch):
    """Layer 0's keys and values depend only on the token and its position: after dropping 30 positions the
    shifted cache equals a fresh evaluation of the shortened sequence there (keys within f16 rounding). The C
    runner on the bundled model, the torch runner on a tiny one (building its dense weights for 135M parameters
    takes 20 s here)."""
    from powerinfer.formats.loader import load_model, load_tokenizer

    if compute == "c":
        model = bundled_model
        ids = load_tokenizer(model).encode("The quick brown fox jumps over the lazy dog. " * 12)[:100]
    else:
        model = load_model(tiny_gguf(arch=arch, qtype=Q.F32).path)
        ids = [(7 * i + 3) % model.config.n_vocab for i in range(100)]
    shifted, fresh = shifted_and_fresh(model, ids, 256, compute=compute)
    n = fresh.n_past
    assert shifted.tokens == fresh.tokens and shifted.n_past == n == 70
    k, k_fresh, v, v_fresh = (torch.as_tensor(c[0][:n]) for c in (shifted.kv.k, fresh.kv.k, shifted.kv.v, fresh.kv.v))
    k_err = (k.float() - k_fresh.float()).abs().max().item()
    assert k_err <= 2 ** -8 * k.float().abs().max().item()  # one f16 ulp at the largest key
    assert torch.equal(v, v_fresh)
    if compute == "c":  # the deeper layers saw the dropped tokens (llama.cpp's K-shift keeps them so)
        a, b = torch.tensor(shifted.eval([ids[5]])), torch.tensor(fresh.eval([ids[5]]))
        assert int(a.argmax()) == int(b.argmax())
    assert not shifted.shift(0, 0) and not shifted.shift(10, 200)  # nothing to drop / past the cache: refused
