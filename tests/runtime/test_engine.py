"""The engine end to end: the C runner against the torch reference model, generation semantics on the real
bundled model (streaming, stop conditions, prefix reuse, seeds, chat)."""
import pytest
import torch

import powerinfer
from powerinfer.errors import ContextOverflowError
from powerinfer.formats.loader import load_model
from powerinfer.runtime.runner import make_runner


@pytest.fixture(scope="module")
def llm():
    return powerinfer.load(n_ctx=512, n_threads=2)


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_1"])
@pytest.mark.parametrize("activation", ["silu", "relu"])
def test_c_runner_matches_torch_runner(tiny_llama_gguf, qtype, activation):
    """The compiled decoder (prefill chunk + single steps) against the torch model on the same file."""
    loaded = load_model(tiny_llama_gguf(qtype, activation=activation).path)
    c = make_runner(loaded, n_ctx=64, n_threads=2, n_batch=4, compute="c")
    ref = make_runner(loaded, n_ctx=64, n_threads=1, compute="torch")
    for t in c.kv.k + c.kv.v + ref.kv.k + ref.kv.v:  # the cache starts uninitialized: rows past the last
        t[:] = float("nan")                          # written position must never be read
    ids = [3, 17, 42, 5, 8, 60, 1, 33, 90, 12]
    # prefill 7 tokens (two chunks of n_batch=4 and 3), then 3 single steps
    got = [torch.tensor(c.eval(ids[:7]))] + [torch.tensor(c.eval([t])) for t in ids[7:]]
    want = [torch.tensor(ref.eval(ids[:7]))] + [torch.tensor(ref.eval([t])) for t in ids[7:]]
    for g, w in zip(got, want):
        # F32/F16 weights: the C side differs only in summation order (and x->f16 for F16 weights);
        # quantized weights: the C side quantizes activations to 8 bits as llama.cpp does.
        tol = 1e-3 if qtype == "F32" else 5e-2
        assert torch.allclose(g, w, atol=tol * w.abs().max(), rtol=0), (qtype, (g - w).abs().max())
        assert int(g.argmax()) == int(w.argmax())


def test_all_logits_equal_stepwise(tiny_llama_gguf):
    loaded = load_model(tiny_llama_gguf("Q8_0").path)
    r = make_runner(loaded, n_ctx=64, n_threads=2)
    ids = [5, 6, 7, 8, 9]
    full = torch.from_numpy(r.eval(ids, all_logits=True))
    r.truncate(0)
    steps = torch.stack([torch.tensor(r.eval([t])) for t in ids])
    assert torch.allclose(full, steps, atol=1e-5)


def test_greedy_generation_is_coherent(llm):
    out = llm.generate("The capital of France is", n_predict=8, temp=0)
    assert "Paris" in out


def test_stream_chunks_concatenate_to_generate(llm):
    chunks = list(llm.stream("List three fruits:", n_predict=20, temp=0))
    assert chunks[-1].finish_reason in ("length", "stop")
    assert chunks[-1].generation_tokens <= 20
    assert "".join(c.text for c in chunks) == llm.generate("List three fruits:", n_predict=20, temp=0)


def test_n_predict_limits_tokens(llm):
    last = list(llm.stream("Once upon a time", n_predict=5, temp=0, ignore_eos=True))[-1]
    assert last.generation_tokens == 5 and last.finish_reason == "length"


def test_stop_string_is_cut(llm):
    full = llm.generate("1, 2, 3, 4,", n_predict=12, temp=0)
    assert " 6" in full
    cut = llm.generate("1, 2, 3, 4,", n_predict=12, temp=0, stop=[" 6"])
    assert cut == full[: full.index(" 6")]


def test_prefix_reuse_gives_same_tokens(llm):
    base = "The history of the Roman Empire"
    fresh = llm.generate(base + " began", n_predict=10, temp=0)
    llm.generate(base, n_predict=3, temp=0)  # leaves the base prompt in the cache
    chunks = list(llm.stream(base + " began", n_predict=10, temp=0))
    assert chunks[-1].cached_tokens > 0
    assert "".join(c.text for c in chunks) == fresh


def test_seeded_sampling_is_reproducible(llm):
    a = llm.generate("Write a word:", n_predict=12, temp=1.0, seed=7)
    b = llm.generate("Write a word:", n_predict=12, temp=1.0, seed=7)
    assert a == b


def test_context_full_stops_generation():
    small = powerinfer.load(n_ctx=24, n_threads=1)
    last = list(small.stream("Tell me a long story about dragons.", n_predict=-1, temp=0, ignore_eos=True))[-1]
    assert last.finish_reason == "context"
    assert small.runner.n_past <= 24


def test_prompt_over_context_raises(llm):
    with pytest.raises(ContextOverflowError):
        llm.generate("word " * 600, n_predict=1)


def test_chat_answers_and_stops_at_end_of_turn(llm):
    last = list(llm.stream_chat([{"role": "user", "content": "What is the capital of France? Answer in one paragraph."}],
                                temp=0, n_predict=64))
    text = "".join(c.text for c in last)
    assert "Paris" in text and "<|im_end|>" not in text
    assert last[-1].finish_reason == "stop"
