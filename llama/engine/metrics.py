"""Inference metrics: what one `generate` call cost, measured without slowing it.

Definitions (the Llama 2 CPU / multi-node README's, made precise for batches
whose rows stop at different steps):

* T, latency: seconds from the start of generation (prompts already
  tokenized) until the last step's token is known.
* L, decoded length: the number of engine steps the call ran. Each step
  gives every running row one new token and prefills, in one packed pass,
  the whole prompts admitted at that step, sampling their first token. When
  every prompt is admitted at the first step (no more prompts than KV-cache
  rows, and together within the engine's prefill token budget), L is the
  longest generation in the batch (stop token included), whatever the
  prompt lengths; a prompt that waits for a free row or for a later step's
  budget adds the steps it waited.
* Per-token latency: T / L, the average time of one step.
* Throughput: generated tokens / T, where generated tokens count, for each
  row, the tokens it produced up to and including its stop token. This equals
  B * L / T when every row runs all L steps, and does not count the idle
  slots of rows that stopped early.
* Time to first token: until the first step that gives tokens has sampled
  them (the prefill of the prompts admitted first, plus one token each;
  with chunked prefill or pipeline lanes other prompts may still be
  prefilling then: RequestMetrics has each request's own).
* Decode throughput: tokens generated after the first step / time after it.
* Bandwidth achieved: bytes of weights read per step (all parameters except
  the embedding table, of which a step reads only B rows, summed over all
  model-parallel ranks) x decode steps per second.
* Peak memory: on CPU the process's resident-set high-water mark (VmHWM);
  on GPU the allocator's peak during the call. Per rank.
"""

import json
import os
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional


@dataclass(frozen=True)
class GenerationMetrics:
    batch_size: int
    prompt_tokens: int  # summed over rows
    generated_tokens: int  # summed over rows, stop tokens included
    decode_steps: int  # L
    seconds: float  # T
    first_token_seconds: float
    weight_bytes: int  # read per step, all ranks
    peak_memory_bytes: int
    model_parallel_size: int = 1

    @property
    def per_token_latency(self) -> float:
        return self.seconds / self.decode_steps if self.decode_steps else float("nan")

    @property
    def throughput(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else float("nan")

    @property
    def decode_seconds(self) -> float:
        return self.seconds - self.first_token_seconds

    @property
    def decode_tokens_per_s(self) -> float:
        first_step_tokens = min(self.batch_size, self.generated_tokens)
        if self.decode_steps < 2 or self.decode_seconds <= 0:
            return float("nan")
        return (self.generated_tokens - first_step_tokens) / self.decode_seconds

    @property
    def bandwidth_bytes_per_s(self) -> float:
        if self.decode_steps < 2 or self.decode_seconds <= 0:
            return float("nan")
        return self.weight_bytes * (self.decode_steps - 1) / self.decode_seconds

    def to_dict(self) -> dict:
        """Every field and derived figure, JSON-ready (seconds, tokens/s, bytes, bytes/s)."""
        return {
            **asdict(self),
            "latency_s": self.seconds,
            "per_token_latency_s": self.per_token_latency,
            "throughput_tokens_per_s": self.throughput,
            "time_to_first_token_s": self.first_token_seconds,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "bandwidth_bytes_per_s": self.bandwidth_bytes_per_s,
        }

    def report(self) -> str:
        """The README's block, plus the figures peers report."""
        return "\n".join([
            "------ Inference metrics ------",
            f"Generated tokens: {self.generated_tokens}",
            f"Latency: {self.seconds:.2f} (s).",
            f"Per-token latency: {self.per_token_latency:.2f} (s/token)",
            f"Throughput: {self.throughput:.2f} (tokens/s)",
            f"Time to first token: {self.first_token_seconds:.2f} (s)",
            f"Decode throughput: {self.decode_tokens_per_s:.2f} (tokens/s)",
            f"Peak memory: {self.peak_memory_bytes / 1e9:.2f} (GB)",
            f"Bandwidth achieved: {self.bandwidth_bytes_per_s / 1e9:.2f} (GB/s)",
            "-------------------------------",
        ])


def write_json(metrics, path) -> None:
    """Writes one metrics object, or a list of them, as JSON (to a temporary
    file in the same folder, then renamed). A path that cannot be written
    raises a ValueError that names it and says why."""
    data = [m.to_dict() for m in metrics] if isinstance(metrics, (list, tuple)) else metrics.to_dict()
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"--metrics_json {path} is a directory; give a file name, e.g. {os.path.join(path, 'metrics.json')}")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".metrics.", suffix=".tmp")
    except OSError as e:
        raise ValueError(f"--metrics_json {path}: cannot write in {folder} ({e.strerror}); "
                         "give a path in an existing, writable folder") from e
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except OSError as e:
        os.unlink(tmp)
        raise ValueError(f"--metrics_json {path}: cannot write it ({e.strerror})") from e


def cpu_peak_rss_bytes() -> int:
    """This process's resident-set high-water mark."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    return peak if sys.platform == "darwin" else peak * 1024


def device_probes(device) -> dict:
    """MetricsRecorder's `synchronize` and `peak_memory` for `device` (a torch.device).

    On a GPU the allocator's peak is reset here, at the start of the call, and
    read at its end (`torch.cuda.max_memory_allocated`): the memory the call
    needed, not the host process's. On CPU the resident-set high-water mark,
    which the kernel does not let a process reset: the peak since it started.
    """
    if device.type != "cuda":
        return {"synchronize": lambda: None, "peak_memory": cpu_peak_rss_bytes}
    import torch

    torch.cuda.reset_peak_memory_stats(device)
    return {"synchronize": lambda: torch.cuda.synchronize(device),
            "peak_memory": lambda: torch.cuda.max_memory_allocated(device)}


class MetricsRecorder:
    """Timestamps one generate call.

    `synchronize` (torch.cuda.synchronize on GPU) runs only at the first token
    and at the end, never once per token; `clock` and `peak_memory` can be
    replaced in tests.
    """

    def __init__(self, batch_size: int, prompt_tokens: int, weight_bytes: int, model_parallel_size: int = 1,
                 clock: Callable[[], float] = time.perf_counter, synchronize: Callable[[], None] = lambda: None,
                 peak_memory: Callable[[], int] = cpu_peak_rss_bytes):
        self.batch_size, self.prompt_tokens = batch_size, prompt_tokens
        self.weight_bytes, self.model_parallel_size = weight_bytes, model_parallel_size
        self.clock, self.synchronize, self.peak_memory = clock, synchronize, peak_memory
        self.start = clock()
        self.first_token_time: Optional[float] = None
        self.steps = 0

    def step(self, gave_tokens: bool = True) -> None:
        """Call after each step; `gave_tokens`: whether it sampled any (a
        pipeline lane's first turn only launches its passes). The first step
        that does is the first token's time."""
        self.steps += 1
        if gave_tokens and self.first_token_time is None:
            self.synchronize()
            self.first_token_time = self.clock()

    def finish(self, generated_tokens: int) -> GenerationMetrics:
        self.synchronize()
        end = self.clock()
        first = (self.first_token_time if self.first_token_time is not None else end) - self.start
        return GenerationMetrics(
            batch_size=self.batch_size, prompt_tokens=self.prompt_tokens, generated_tokens=generated_tokens,
            decode_steps=self.steps, seconds=end - self.start, first_token_seconds=first,
            weight_bytes=self.weight_bytes, peak_memory_bytes=self.peak_memory(),
            model_parallel_size=self.model_parallel_size,
        )


@dataclass(frozen=True)
class RequestMetrics:
    """What one request cost, from the engine's view (seconds from its submission).

    Time in queue ends when the request gets a KV-cache row; time to first
    token includes it and the prefill. Decode throughput counts the tokens
    after the first over the time after it.
    """

    prompt_tokens: int
    generated_tokens: int  # stop token included
    queue_seconds: float
    time_to_first_token_s: float
    seconds: float
    # Speculative decoding (engine/speculative.py): tokens proposed for this
    # request and how many of them the model accepted; 0 and 0 without it.
    proposed_tokens: int = 0
    accepted_tokens: int = 0

    @classmethod
    def of(cls, submitted: float, admitted: Optional[float], first_token: Optional[float], end: float,
           prompt_tokens: int, generated_tokens: int, proposed_tokens: int = 0,
           accepted_tokens: int = 0) -> "RequestMetrics":
        return cls(prompt_tokens, generated_tokens,
                   queue_seconds=(admitted if admitted is not None else end) - submitted,
                   time_to_first_token_s=(first_token if first_token is not None else end) - submitted,
                   seconds=end - submitted, proposed_tokens=proposed_tokens, accepted_tokens=accepted_tokens)

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed tokens; NaN when nothing was proposed."""
        return self.accepted_tokens / self.proposed_tokens if self.proposed_tokens else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        decode_seconds = self.seconds - self.time_to_first_token_s
        if self.generated_tokens < 2 or decode_seconds <= 0:
            return float("nan")
        return (self.generated_tokens - 1) / decode_seconds

    def to_dict(self) -> dict:
        return {**asdict(self), "decode_tokens_per_s": self.decode_tokens_per_s,
                "acceptance_rate": self.acceptance_rate}
