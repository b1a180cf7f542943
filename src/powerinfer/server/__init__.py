"""`powerinfer serve`: an OpenAI-compatible HTTP server and a web chat page over one `LLM` (DESIGN, "Serving"). It is
an adapter over the engine: no tensors, no sampling of its own. reference/serving.md is the checklist it follows.

  app.py         routes, API key / Host / body checks, errors in OpenAI's shape, the utility routes
  generation.py  /v1/chat/completions and /v1/completions: JSON or Server-Sent Events
  protocol.py    request models (pydantic) and their mapping onto SamplingParams
  worker.py      the engine thread and its bounded FIFO queue; cancellation
  metrics.py     Prometheus /metrics
  lifecycle.py   bind, load on a thread, serve (uvicorn), shut down on SIGINT/SIGTERM
  static/        the chat page (plain HTML/CSS/JS, no build step, nothing fetched from elsewhere)

Extensions to OpenAI's shapes (clients ignore fields they do not know):
  * `timings` (llama-server's) in every response and in a stream's finish chunk: cache_n, prompt_n, prompt_ms,
    prompt_per_second, predicted_n, predicted_ms, predicted_per_second.
  * request field `ffn_per_token: true` (like llama-server's `timings_per_token`): every streamed token gets a
    chunk, and a chunk whose token came from a neuron-sparse decode step carries
        "ffn": {"sparsity": 0.61,          fraction of all FFN neurons skipped in that step
                "bytes": 1234567,          FFN weight bytes that step read
                "n_ff": 1536,              neurons per layer
                "neurons": [612, 580, ...]}  neurons computed, per layer (n_layer ints)
    No "ffn" when the FFN is dense or for the first token (it comes out of the prompt's prefill). Once a placement
    splits neurons between a fast tier and the CPU, the object gains "hot" and "cold": per layer, how many of the
    computed neurons ran on each tier (their sum is "neurons"); they are absent while no placement is active.
"""
from __future__ import annotations


def run_server(opts, alias, load, fingerprint="powerinfer"):
    from .lifecycle import run_server as run

    return run(opts, alias, load, fingerprint)
