"""`GET /metrics` in Prometheus' text format (prometheus_client), named after llama-server's (prompt and predicted
tokens and seconds, requests processing and deferred; reference/serving.md 2.1) plus the neuron-sparse FFN's own:
the fraction of FFN neurons skipped and the FFN weight bytes read."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("powerinfer_requests", "Generation requests accepted", ["route"], registry=r)
        self.cancelled = Counter("powerinfer_requests_cancelled", "Generations stopped because the client went "
                                 "away or the server is stopping", registry=r)
        self.rejected = Counter("powerinfer_requests_rejected", "Generation requests refused with 503 because the "
                                "queue was full", registry=r)
        self.processing = Gauge("powerinfer_requests_processing", "Generations running (0 or 1)", registry=r)
        self.deferred = Gauge("powerinfer_requests_deferred", "Generation requests waiting in the queue", registry=r)
        self.prompt_tokens = Counter("powerinfer_prompt_tokens", "Prompt tokens evaluated (cached ones excluded)",
                                     registry=r)
        self.cached_tokens = Counter("powerinfer_prompt_tokens_cached", "Prompt tokens reused from the KV cache",
                                     registry=r)
        self.prompt_seconds = Counter("powerinfer_prompt_seconds", "Time spent evaluating prompts", registry=r)
        self.predicted_tokens = Counter("powerinfer_tokens_predicted", "Tokens generated", registry=r)
        self.predicted_seconds = Counter("powerinfer_tokens_predicted_seconds", "Time spent generating after the "
                                         "first token", registry=r)
        self.ffn_sparsity = Gauge("powerinfer_ffn_sparsity", "Fraction of FFN neurons skipped per decode step, "
                                  "mean over the last generation (0 for a dense FFN)", registry=r)
        self.ffn_bytes = Counter("powerinfer_ffn_bytes_read", "FFN weight bytes read by neuron-sparse decode steps",
                                 registry=r)

    def watch(self, worker) -> None:
        self.processing.set_function(lambda: 0 if worker.running is None else 1)
        self.deferred.set_function(lambda: worker.n_waiting)

    def record(self, last, evaluated: int, sparsity: float | None, ffn_bytes: int) -> None:
        """One finished generation: its final Response and the prompt tokens actually evaluated."""
        self.prompt_tokens.inc(evaluated)
        self.cached_tokens.inc(last.cached_tokens)
        self.prompt_seconds.inc(last.prompt_seconds)
        self.predicted_tokens.inc(last.generation_tokens)
        self.predicted_seconds.inc(last.generation_seconds)
        self.ffn_sparsity.set(sparsity or 0.0)
        self.ffn_bytes.inc(ffn_bytes)

    def render(self) -> bytes:
        return generate_latest(self.registry)
