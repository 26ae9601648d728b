"""/metrics: Prometheus text format, one registry per app.

Bounded labels: `llama_requests_total`'s endpoint label is a route template
(`/v1/models/{name}`), never a raw path, and every path the server does not
serve is the one label `other`, so no client can grow the metrics by
requesting new paths (`endpoint_label`; the counter applies it to whatever
path it is given).
"""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds; CPU models range from milliseconds (tiny) to seconds (70B) per token.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


# The served paths, and the one template with a parameter.
_ENDPOINTS = frozenset(("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"))
_MODEL_PREFIX = "/v1/models/"
OTHER = "other"


def endpoint_label(path: str) -> str:
    """The metrics label of a request path: itself if served, its route template, or `other`."""
    if path in _ENDPOINTS:
        return path
    if path.startswith(_MODEL_PREFIX) and len(path) > len(_MODEL_PREFIX):
        return _MODEL_PREFIX + "{name}"
    return OTHER


class _RequestCounter:
    """`llama_requests_total` whose `labels(path, status)` maps the path to its `endpoint_label`."""

    def __init__(self, registry):
        self._counter = Counter("llama_requests", "HTTP requests answered", ["endpoint", "status"], registry=registry)

    def labels(self, path: str, status: str):
        return self._counter.labels(endpoint_label(path), str(status))


class ServerMetrics:
    def __init__(self, worker):
        r = self.registry = CollectorRegistry()
        self.requests = _RequestCounter(r)
        self.prompt_tokens = Counter("llama_prompt_tokens", "Prompt tokens submitted", registry=r)
        self.generated_tokens = Counter("llama_generated_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("llama_time_to_first_token_seconds", "From request to its first token",
                              buckets=_BUCKETS, registry=r)
        self.per_token = Histogram("llama_time_per_output_token_seconds", "Between two tokens of one answer",
                                   buckets=_BUCKETS, registry=r)
        g = Gauge("llama_queue_length", "Requests waiting for a KV-cache slot", registry=r)
        g.set_function(lambda: worker.waiting)
        g = Gauge("llama_running_requests", "Requests decoding in the batch", registry=r)
        g.set_function(lambda: worker.running)
        g = Gauge("llama_inflight_requests", "Requests accepted and not finished", registry=r)
        g.set_function(lambda: worker.inflight)
        # Totals the engine thread counts (plain ints: read here without a lock).
        engine = worker.engine
        g = Gauge("llama_prefilled_tokens", "Prompt tokens run through the model since the start", registry=r)
        g.set_function(lambda: engine.prefilled_tokens)
        g = Gauge("llama_prefix_cache_reused_tokens",
                  "Prompt tokens copied from the prefix cache instead of prefilled, since the start", registry=r)
        g.set_function(lambda: engine.prefix_cache.reused_tokens if engine.prefix_cache is not None else 0)
        # Speculative decoding (--speculate, --draft_ckpt_dir): proposals made
        # and accepted, and each finished request's acceptance rate.
        g = Gauge("llama_speculative_proposed_tokens", "Tokens proposed for verification since the start", registry=r)
        g.set_function(lambda: engine.speculator.proposed if engine.speculator is not None else 0)
        g = Gauge("llama_speculative_accepted_tokens", "Proposed tokens the model accepted since the start",
                  registry=r)
        g.set_function(lambda: engine.speculator.accepted if engine.speculator is not None else 0)
        self.acceptance = Histogram("llama_speculative_acceptance_rate",
                                    "Accepted / proposed tokens of each finished request that had proposals",
                                    buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), registry=r)

    def text(self) -> bytes:
        return generate_latest(self.registry)
