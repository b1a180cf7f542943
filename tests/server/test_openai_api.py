"""The OpenAI routes against a real `powerinfer serve`, through the official `openai` client (and raw HTTP where the
client hides what is checked): shapes, streaming invariants, limits, stop strings, errors (reference/serving.md 7)."""
from __future__ import annotations

import json

import openai
import pytest

CHAT = [{"role": "user", "content": "Tell me a story about a lighthouse."}]


def _stream_chunks(client, **kw):
    return list(client.chat.completions.create(model="any", stream=True, **kw))


def test_health_models_and_alias(tiny_server, tiny_model):
    status, _, body = tiny_server.request("GET", "/health")
    assert (status, body) == (200, {"status": "ok"})
    models = tiny_server.client().models.list()
    assert [m.id for m in models.data] == [tiny_model.path.stem]
    # any model name is accepted; the server's alias is returned
    r = tiny_server.client().chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=3)
    assert r.model == tiny_model.path.stem and r.id.startswith("chatcmpl-") and r.object == "chat.completion"


def test_chat_stream_equals_non_stream_and_usage_only_on_request(tiny_server):
    client = tiny_server.client()
    whole = client.chat.completions.create(model="m", messages=CHAT, max_tokens=40, temperature=0)
    chunks = _stream_chunks(client, messages=CHAT, max_tokens=40, temperature=0)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:])
    finishes = [c.choices[0].finish_reason for c in chunks]
    assert finishes[-1] == whole.choices[0].finish_reason == "length" and not any(finishes[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content and len(text) > 0
    assert all(c.usage is None for c in chunks)  # no usage chunk unless asked for
    assert whole.usage.completion_tokens == 40
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 40

    chunks = _stream_chunks(client, messages=CHAT, max_tokens=40, temperature=0,
                            stream_options={"include_usage": True})
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 40
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_stream_equals_non_stream(tiny_server):
    client = tiny_server.client()
    whole = client.completions.create(model="m", prompt="Once upon a time", max_tokens=30, temperature=0)
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    chunks = list(client.completions.create(model="m", prompt="Once upon a time", max_tokens=30, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length" == whole.choices[0].finish_reason
    assert whole.usage.completion_tokens == 30
    # a token-id prompt is the same prompt
    ids = tiny_server.request("POST", "/tokenize", {"content": "Once upon a time"})[2]["tokens"]
    same = client.completions.create(model="m", prompt=ids, max_tokens=30, temperature=0)
    assert same.choices[0].text == whole.choices[0].text


def test_stop_string_split_across_tokens(tiny_server):
    """Every character is its own token in the tiny vocabulary, so a 3-character stop string spans 3 tokens; the
    text before it comes back, the stop string and everything after it do not, stream and non-stream alike."""
    client = tiny_server.client()
    full = client.completions.create(model="m", prompt="abc", max_tokens=60, temperature=0).choices[0].text
    k = next(i for i in range(5, len(full) - 3) if full.find(full[i:i + 3]) == i)
    stop = full[k:k + 3]
    ids = tiny_server.request("POST", "/tokenize", {"content": stop})[2]["tokens"]
    assert len(ids) >= 2, (stop, ids)
    r = client.completions.create(model="m", prompt="abc", max_tokens=60, temperature=0, stop=stop)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (full[:k], "stop")
    chunks = list(client.completions.create(model="m", prompt="abc", max_tokens=60, temperature=0, stop=[stop],
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full[:k]
    assert chunks[-1].choices[0].finish_reason == "stop"
    # of several stop strings, the earliest in the text wins, whatever their order in the list
    later = full[k + 5:k + 8]
    r = client.completions.create(model="m", prompt="abc", max_tokens=60, temperature=0, stop=[later, stop])
    assert r.choices[0].text == full[:k]


def test_max_tokens_and_max_completion_tokens(tiny_server):
    client = tiny_server.client()
    r = client.chat.completions.create(model="m", messages=CHAT, max_completion_tokens=7)
    assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (7, "length")
    # both given: the smaller wins
    r = client.chat.completions.create(model="m", messages=CHAT, max_tokens=9, max_completion_tokens=5)
    assert r.usage.completion_tokens == 5
    r = client.chat.completions.create(model="m", messages=CHAT, max_tokens=4, max_completion_tokens=12)
    assert r.usage.completion_tokens == 4


def test_context_overflow_is_a_400_with_the_counts(tiny_server):
    long = "x" * 9000  # one token per character: over -c 8192
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            tiny_server.client().chat.completions.create(model="m", messages=[{"role": "user", "content": long}],
                                                         stream=stream)
        err = e.value.body
        assert err["type"] == "exceed_context_size_error" and err["code"] == "context_length_exceeded"
        assert err["n_ctx"] == 8192 and err["n_prompt_tokens"] > 9000
        assert "8192" in err["message"]


def test_seed_and_sampling_fields(tiny_server):
    client = tiny_server.client()
    kw = dict(model="m", prompt="Hello", max_tokens=30, temperature=1.0, top_p=1.0,
              extra_body={"top_k": 0, "min_p": 0.0})
    a = client.completions.create(seed=7, **kw).choices[0].text
    b = client.completions.create(seed=7, **kw).choices[0].text
    c = client.completions.create(seed=8, **kw).choices[0].text
    assert a == b and a != c
    # llama.cpp's and vLLM's extra fields arrive through extra_body, at the top level
    r = client.completions.create(model="m", prompt="Hello", max_tokens=5,
                                  extra_body={"repetition_penalty": 1.3, "repeat_last_n": 16, "top_k": 5})
    assert r.usage.completion_tokens == 5


def test_n_choices(tiny_server):
    r = tiny_server.client().chat.completions.create(model="m", messages=CHAT, max_tokens=6, n=2, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].message.content == r.choices[1].message.content  # greedy: the same twice
    assert r.usage.completion_tokens == 12


def test_errors_are_openai_shaped(tiny_server):
    s = tiny_server
    status, _, body = s.request("POST", "/v1/chat/completions", raw=b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    assert body["error"]["type"] == "invalid_request_error"
    status, _, body = s.request("POST", "/v1/chat/completions", {"messages": CHAT, "temperature": "hot"})
    assert status == 400 and body["error"]["param"] == "temperature"
    assert body["error"]["message"].startswith("temperature:") and "\n" not in body["error"]["message"]
    status, _, body = s.request("POST", "/v1/chat/completions", {"messages": []})
    assert status == 400 and body["error"]["param"] == "messages"
    status, _, body = s.request("POST", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]})
    assert status == 400 and body["error"]["param"] == "messages.0.role"
    status, _, body = s.request("GET", "/v1/nothing-here")
    assert status == 404 and body["error"]["type"] == "not_found_error"
    assert "/v1/nothing-here" in body["error"]["message"]
    status, _, body = s.request("POST", "/v1/chat/completions", raw=b" " * (9 << 20))
    assert status == 413 and body["error"]["code"] == "request_too_large"
    # what the engine cannot do is refused, not ignored
    for field, value in (("logit_bias", {"5": 10}), ("tools", [{"type": "function", "function": {"name": "f"}}]),
                         ("response_format", {"type": "sound"})):
        status, _, body = s.request("POST", "/v1/chat/completions", {"messages": CHAT, field: value})
        assert status == 400 and body["error"]["param"] == field, (field, body)
    # unknown fields are ignored, and text response_format is plain generation
    status, _, body = s.request("POST", "/chat/completions", {"messages": CHAT, "max_tokens": 2, "store": True,
                                                             "reasoning_effort": "low",
                                                             "response_format": {"type": "text"}})
    assert status == 200 and body["usage"]["completion_tokens"] == 2  # also without the /v1 prefix


def test_response_format_is_enforced_or_refused(bundled_server):
    """Structured output follows the engine: with its grammar hook (SamplingParams.json_schema) the reply is JSON
    under the schema; without one the request is a 400, never free text (llama.cpp #11988)."""
    from powerinfer.settings import SamplingParams, field_names

    client = bundled_server.client()
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    ask = dict(model="m", messages=[{"role": "user", "content": "Which city is the capital of France? Reply in JSON."}],
               temperature=0, max_tokens=40)
    if not {"json_schema", "grammar"} <= field_names(SamplingParams):
        for rf in ({"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}):
            with pytest.raises(openai.BadRequestError, match="constrained decoding"):
                client.chat.completions.create(response_format=rf, **ask)
        return
    r = client.chat.completions.create(response_format={"type": "json_schema", "json_schema": {"name": "c",
                                                                                               "schema": schema}},
                                       **ask)
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content)["city"], str)
    r = client.chat.completions.create(response_format={"type": "json_object"}, **ask)
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.chat.completions.create(extra_body={"grammar": 'root ::= "yes" | "no"'}, **ask)  # llama-server's
    assert r.choices[0].message.content in ("yes", "no")


def test_utility_routes(tiny_server, tiny_model):
    s = tiny_server
    status, _, body = s.request("POST", "/tokenize", {"content": "hi <|im_end|>", "with_pieces": True})
    assert status == 200 and body["tokens"] == [{"id": 104, "piece": "h"}, {"id": 105, "piece": "i"},
                                                {"id": 32, "piece": " "}, {"id": 257, "piece": "<|im_end|>"}]
    assert s.request("POST", "/tokenize", {"content": "é"})[2] == {"tokens": [195, 169]}
    assert s.request("POST", "/detokenize", {"tokens": [104, 105]})[2] == {"content": "hi"}
    assert s.request("POST", "/detokenize", {"tokens": [100000]})[0] == 400
    status, _, body = s.request("POST", "/apply-template", {"messages": [{"role": "user", "content": "hi"}]})
    assert body == {"prompt": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"}  # ChatML: no template
    status, _, props = s.request("GET", "/props")
    assert props["default_generation_settings"]["n_ctx"] == 8192 and props["total_slots"] == 1
    assert props["default_generation_settings"]["params"]["temp"] == 0.0  # the --temp 0 the server got
    assert props["ffn"] == {"mode": "relu: exact (zero activations skipped)", "sparse": True, "n_layer": 6,
                            "n_ff": 256}
    before = s.metrics()
    r = s.client().completions.create(model="m", prompt="abcdef", max_tokens=5)
    after = s.metrics()
    assert after["powerinfer_tokens_predicted_total"] - before["powerinfer_tokens_predicted_total"] == 5
    assert after["powerinfer_requests_total{route=\"completions\"}"] - \
        before.get("powerinfer_requests_total{route=\"completions\"}", 0) == 1
    evaluated = after["powerinfer_prompt_tokens_total"] - before["powerinfer_prompt_tokens_total"]
    cached = after["powerinfer_prompt_tokens_cached_total"] - before["powerinfer_prompt_tokens_cached_total"]
    assert evaluated + cached == r.usage.prompt_tokens == 6
    assert 0.2 < after["powerinfer_ffn_sparsity"] < 0.9  # random ReLU layers: about half the neurons are zero


def test_prompt_prefix_is_reused_across_turns(tiny_server):
    client = tiny_server.client()
    first = client.chat.completions.create(model="m", messages=CHAT, max_tokens=10)
    turn2 = CHAT + [{"role": "assistant", "content": first.choices[0].message.content},
                    {"role": "user", "content": "And then?"}]
    second = client.chat.completions.create(model="m", messages=turn2, max_tokens=10)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    assert second.timings["cache_n"] == second.usage.prompt_tokens_details.cached_tokens


def test_ffn_extension_per_token(tiny_server):
    """ffn_per_token: each token from a sparse decode step carries its per-layer neuron counts, consistent with its
    sparsity; without the flag no chunk has the field."""
    chunks = [c.model_dump() for c in _stream_chunks(tiny_server.client(), messages=CHAT, max_tokens=12,
                                                      extra_body={"ffn_per_token": True})]
    ffn = [c["ffn"] for c in chunks if c.get("ffn")]
    assert len(ffn) == 11  # every token but the first, which comes out of the prefill
    for f in ffn:
        assert len(f["neurons"]) == 6 and f["n_ff"] == 256 and all(0 < n < 256 for n in f["neurons"])
        assert f["sparsity"] == pytest.approx(1 - sum(f["neurons"]) / (6 * 256))
        assert f["bytes"] > 0 and "hot" not in f  # no placement: no tier split
    plain = [c.model_dump() for c in _stream_chunks(tiny_server.client(), messages=CHAT, max_tokens=12)]
    assert not any(c.get("ffn") for c in plain)


def test_logprobs_on_the_bundled_model(bundled_server):
    client = bundled_server.client()
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model="m", messages=msgs, max_tokens=12, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3 and bytes(t.bytes).decode() == t.token
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == pytest.approx(t.logprob)
    chunks = _stream_chunks(client, messages=msgs, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3)
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [(t.token, round(t.logprob, 4)) for t in content]
    legacy = client.completions.create(model="m", prompt="The capital of France is", max_tokens=5, temperature=0,
                                       logprobs=2)
    lp = legacy.choices[0].logprobs
    assert "".join(lp.tokens) == legacy.choices[0].text and len(lp.top_logprobs[0]) == 2
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_quoted_client_call(bundled_server):
    """The README's call, verbatim but for the port."""
    from openai import OpenAI

    client = OpenAI(base_url=bundled_server.url + "/v1", api_key="sk-no-key-required")
    r = client.chat.completions.create(model="local", messages=[{"role": "user", "content":
                                       "What is the capital of France? Answer in one sentence."}], temperature=0)
    assert r.choices[0].message.content == "The capital of France is Paris."
    assert r.choices[0].finish_reason == "stop"
    assert json.loads(r.model_dump_json())["usage"]["prompt_tokens"] > 0
