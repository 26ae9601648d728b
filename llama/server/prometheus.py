"""/metrics: Prometheus text format, one registry per app."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds; CPU models range from milliseconds (tiny) to seconds (70B) per token.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServerMetrics:
    def __init__(self, worker):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("llama_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
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

    def text(self) -> bytes:
        return generate_latest(self.registry)
