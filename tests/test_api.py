"""The public `LLM` API points a server needs: stop as a string or a list, one generation at a time (serialised
across threads, an error within one), a result object beside the plain string, log-probabilities, per-layer FFN
counts, cancellation between prompt chunks and tokens, and an assistant prefill."""
from __future__ import annotations

import threading

import pytest
import torch

import powerinfer
from powerinfer.errors import PowerInferError
from powerinfer.runtime.engine import Completion

TINY = dict(activation="relu", tokenizer=True, n_vocab=272, n_layer=3, n_ff=128, context_length=512)


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    return powerinfer.load(tiny_gguf(**TINY).path, n_ctx=512, n_threads=1, n_batch=16, sparsity="auto", temp=0)


def test_stop_is_a_string_or_a_list(tiny):
    full = tiny.generate("abc", n_predict=40)
    stop = full[10:13]
    k = full.find(stop)
    assert tiny.generate("abc", n_predict=40, stop=stop) == full[:k]  # not its characters one by one
    assert tiny.generate("abc", n_predict=40, stop=[stop, full[k + 6:k + 9]]) == full[:k]
    with pytest.raises(PowerInferError, match="stop"):
        tiny.generate("abc", stop=[3])


def test_details_give_a_completion(tiny):
    c = tiny.generate("abc", n_predict=12, details=True)
    assert isinstance(c, Completion) and str(c) == c.text == tiny.generate("abc", n_predict=12)
    assert (c.finish_reason, c.completion_tokens, len(c.tokens), c.prompt_tokens) == ("length", 12, 12, 3)
    assert tiny.detokenize(c.tokens) == c.text
    assert c.logprobs is None and c.generation_seconds > 0 and 0.2 < c.ffn_sparsity < 0.9
    again = tiny.generate("abc", n_predict=12, details=True)
    assert again.cached_tokens == 2  # the prompt but its last token came from the KV cache


def test_logprobs_are_the_models_distribution(tiny):
    c = tiny.generate("abc", n_predict=6, logprobs=4)
    assert len(c.logprobs) == len(c.top_logprobs) == 6
    runner = tiny.runner
    runner.truncate(0)
    ids = tiny.tokenize("abc") + c.tokens
    want = torch.log_softmax(torch.from_numpy(runner.eval(ids, all_logits=True)[2:-1]), dim=-1)
    for i, tok in enumerate(c.tokens):
        assert c.logprobs[i] == pytest.approx(float(want[i, tok]), abs=1e-3)  # prefill vs steps: summation order
        top = c.top_logprobs[i]
        assert len(top) == 4 and top[0][0] == tok  # greedy: the chosen token is the most likely
        assert [t for t, _ in top] == torch.topk(want[i], 4).indices.tolist()


def test_layer_stats_are_per_layer_neuron_counts(tiny):
    rs = list(tiny.stream("abc", n_predict=5, layer_stats=True))
    steps = [r for r in rs if r.ffn_neurons is not None]
    assert len(steps) == 4  # every token but the first, which comes out of the prefill
    for r in steps:
        assert len(r.ffn_neurons) == 3
        assert r.ffn_sparsity == pytest.approx(1 - sum(r.ffn_neurons) / (3 * 128))


def test_two_streams_in_one_thread_are_an_error_not_a_mix(tiny):
    alone = tiny.generate("hello", n_predict=8)
    a, b = tiny.stream("hello", n_predict=8), tiny.stream("world", n_predict=8)
    first = next(a)
    with pytest.raises(PowerInferError, match="already generating in this thread"):
        next(b)
    assert first.text + "".join(r.text for r in a) == alone  # the first stream is untouched
    assert tiny.generate("world", n_predict=8)  # and the LLM is free again


def test_threads_take_turns(tiny):
    prompts = [f"prompt {i}" for i in range(4)]
    alone = [tiny.generate(p, n_predict=20) for p in prompts]
    got = [None] * 4

    def run(i):
        got[i] = "".join(r.text for r in tiny.stream(prompts[i], n_predict=20))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == alone


def test_cancel_between_prompt_chunks_and_tokens(tiny):
    runner = tiny.runner
    prompt = tiny.tokenize("x" * 100)  # 100 tokens: 7 chunks of -b 16
    runner.truncate(0)
    rs = list(tiny.stream(prompt, n_predict=50, cancel=lambda: runner.n_past >= 48))
    assert rs[-1].finish_reason == "cancelled" and runner.n_past == 48  # stopped after three chunks
    assert [r.token for r in rs] == [None]
    calls = []
    rs = list(tiny.stream("abc", n_predict=50, cancel=lambda: calls.append(1) or len(calls) > 5))
    # one check before the prompt's chunk, one after each token: the sixth check stops it after five tokens
    assert rs[-1].finish_reason == "cancelled" and len([r for r in rs if r.token is not None]) == 5


def test_trailing_assistant_message_is_a_prefill(tiny):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Well,"}]
    assert tiny.chat_prompt(msgs).endswith("<|im_start|>assistant\nWell,")
    assert tiny.chat_prompt(msgs[:1]).endswith("<|im_start|>assistant\n")


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("add_bos", [False, True])
@pytest.mark.parametrize("template_bos", [False, True])
def test_chat_prompt_has_one_bos_exactly_when_the_vocabulary_asks(tiny_gguf, add_bos, template_bos):
    """llama.cpp's chat: the template's own leading BOS is taken off and the tokenizer adds the model's BOS when
    tokenizer.ggml.add_bos_token says so; a template BOS in a model without add_bos stays (nothing doubles)."""
    template = ("{{ bos_token }}" if template_bos else "") + CHATML
    llm = powerinfer.load(tiny_gguf(**TINY, add_bos=add_bos, chat_template=template).path, n_ctx=64, n_threads=1)
    bos = llm.tokenizer.bos_id
    ids = llm.chat_ids([{"role": "user", "content": "hi"}])
    body = llm.tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_bos=False)
    assert ids == ([bos] if add_bos or template_bos else []) + body
