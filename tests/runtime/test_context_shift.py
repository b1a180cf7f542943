"""Context shift (runtime/context_shift.py): llama-cli's rule (keep n_keep, drop the older half of the rest), and a
generation that runs past the context instead of stopping."""
from __future__ import annotations

import pytest

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


def test_generation_goes_past_the_context(tiny_gguf):
    import powerinfer

    model = tiny_gguf(tokenizer=True, n_vocab=300, context_length=256)
    llm = powerinfer.load(str(model.path), n_ctx=64)
    ids = llm.tokenize("hello world", add_bos=True)
    start = list(ids)
    shifts = []
    chunks = list(stream_shifting(lambda i, n: llm.stream(i, n_predict=n, temp=0, ignore_eos=True), ids, 64, 3,
                                  n_predict=150, on_shift=shifts.append))
    generated = [c.token for c in chunks if c.token is not None]
    assert len(generated) == 150 > 64  # more tokens than the context holds
    assert len(shifts) >= 2 and chunks[-1].finish_reason == "length"
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert ids[:3] == start[:3] and len(ids) < 64  # --keep 3 survived every shift
    assert ids[-20:] == generated[-20:]  # what the context holds now ends with the newest tokens
    # without a shift the same generation stops at the context
    last = list(llm.stream(start, n_predict=150, temp=0, ignore_eos=True))[-1]
    assert last.finish_reason == "context"
