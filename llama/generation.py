"""`Llama`: build a model from a Meta checkpoint and generate text with it.

The public API is that of Meta's reference repositories (`Llama.build`,
`generate`, `text_completion`, `chat_completion`, same result dicts), plus
`device`/`dtype` parameters, token streaming and per-request sampling
parameters. Every call runs on the decoding engine (`llama/engine/engine.py`): the
prompts are prefilled together and each row decodes at its own position.
"""

import dataclasses
import logging
from typing import Iterator, List, Optional, Sequence, Tuple, TypedDict, Union

import torch

from . import builder
from .engine.engine import Completion, Engine, Request, TokenEvent
from .engine.metrics import GenerationMetrics, MetricsRecorder, device_probes
from .engine.sampling import SamplingParams
from .model import Transformer
from .parallel.distributed import is_rank0
from .text.chat_format import ChatFormat
from .text.messages import Dialog, Message, StopReason
from .text.tokenizer import Tokenizer

__all__ = ["ChatPrediction", "CompletionPrediction", "GenerationResult", "Llama", "SamplingParams", "TokenEvent"]

logger = logging.getLogger("llama")
# The metrics block of every generation, logged (INFO) on rank 0; a program
# that prints the block itself can silence just this logger.
metrics_logger = logging.getLogger("llama.metrics")

Sampling = Union[None, SamplingParams, Sequence[SamplingParams]]


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: List[str]  # with logprobs=True
    logprobs: List[float]  # with logprobs=True
    metrics: dict  # GenerationMetrics.to_dict() of the batch
    request_metrics: dict  # RequestMetrics.to_dict() of this prompt
    stop_reason: StopReason


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: List[str]  # with logprobs=True
    logprobs: List[float]  # with logprobs=True
    metrics: dict  # GenerationMetrics.to_dict() of the batch
    request_metrics: dict  # RequestMetrics.to_dict() of this dialog


class GenerationResult(tuple):
    """`(tokens, logprobs)` as Meta's `generate` returns them, plus `.metrics`."""

    metrics: Optional[GenerationMetrics]

    def __new__(cls, tokens, logprobs, metrics: Optional[GenerationMetrics] = None):
        result = super().__new__(cls, (tokens, logprobs))
        result.metrics = metrics
        return result


class Llama:
    @staticmethod
    def build(
        ckpt_dir: str,
        tokenizer_path: str,
        max_seq_len: int,
        max_batch_size: int,
        model_parallel_size: Optional[int] = None,
        seed: int = 1,
        device: Optional[str] = None,
        dtype: Optional[str] = None,
        quantize: Optional[str] = None,
        threads: Optional[int] = None,
        compile: bool = False,
        pipeline_stages: int = 1,
    ) -> "Llama":
        """Loads a Meta checkpoint for inference on this process's model-parallel rank.

        Args:
            ckpt_dir: Directory with params.json and consolidated.*.pth. Any
                number of shards works if the world size can be split from it.
            tokenizer_path: tokenizer.model, SentencePiece (Llama 2) or tiktoken (Llama 3).
            max_seq_len: Longest prompt plus generation, in tokens (sizes the KV cache).
            max_batch_size: Most prompts generated together (sizes the KV cache).
            model_parallel_size: Defaults to the number of processes (torchrun's
                WORLD_SIZE, or 1 under plain python).
            seed: Sampling seed; must be the same on every rank.
            device: "cpu" or "cuda"; default CUDA if available.
            dtype: "bfloat16", "float32" or "float16". Default: bfloat16 where
                the device computes it natively (a GPU of compute capability
                8.0 or later; a CPU with AMX-BF16, AVX512-BF16 or Arm BF16),
                else float16 on a GPU and float32 on a CPU (bfloat16 there
                too if float32 weights would not fit in memory). The
                "Loaded" log line says which and why.
            quantize: "int8" for int8 linear layers (a scale per 32 input
                columns on our CPU kernels, per output channel elsewhere),
                "int4" for 4-bit ones (a scale and a min per 32 columns, the
                output layer int8; our CPU kernels only), or None. Applied
                to each rank's shard after loading, on the CPU, so that a
                model that fits a GPU only in int8 loads.
            threads: CPU threads this process computes with
                (torch.set_num_threads). Default: the physical cores this
                process may run on (its CPU affinity) divided among the
                processes on this node (torchrun's LOCAL_WORLD_SIZE), at
                least 1. More than the CPUs it may use is refused.
            compile: Decode through a torch.compile'd transformer block
                (llama/kernels/compiled.py): fewer, fused operations per token. The
                first start compiles for tens of seconds (cached on disk
                afterwards) and needs a C++ compiler on CPU.
            pipeline_stages: Split the layers into this many contiguous stages
                (llama/engine/runner.py), each on world size / stages ranks that
                split its layers tensor-parallel; for nodes behind slow links.
                `ckpt_dir` may be a whole checkpoint or one split with
                utils/shard_model_checkpoint.py --pipeline_stages.

        Returns:
            A ready `Llama`.

        Raises:
            FileNotFoundError, ValueError: with a message naming the bad input.
        """
        built = builder.build(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, model_parallel_size, seed,
                              device, dtype, quantize, threads, compile, pipeline_stages)
        return Llama(built.model, built.tokenizer, built.weight_bytes_per_step)

    def __init__(self, model: Transformer, tokenizer: Tokenizer, weight_bytes_per_step: Optional[int] = None):
        """A facade over a built `model` (see `build`). `weight_bytes_per_step`:
        the weight bytes one decoding step reads over all ranks, for the
        metrics; by default this rank's times the world size (right unless
        pipeline stages hold different layers: `build` passes the sum)."""
        self.model = model
        self.tokenizer = tokenizer
        self.formatter = ChatFormat.for_tokenizer(tokenizer)
        self.engine = Engine(model, tokenizer)
        self.last_metrics: Optional[GenerationMetrics] = None  # of the last call, even one broken off
        if weight_bytes_per_step is None:
            weight_bytes_per_step = builder.local_weight_bytes(model) * _world_size()
        self.weight_bytes_per_step = weight_bytes_per_step

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def generate(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
        *,
        sampling: Sampling = None,
    ) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """Generates continuations of tokenized prompts.

        Prompts may differ in length, and there may be more of them than
        max_batch_size (the rest wait for a free row). Each row stops at its
        first stop token (not included in the output), a stop string, or after
        `max_gen_len` tokens.

        Args:
            prompt_tokens: One list of token ids per prompt.
            max_gen_len: Most tokens to generate per prompt.
            temperature: 0 means greedy; higher flattens the distribution.
            top_p: Nucleus sampling threshold.
            logprobs: Also return the log-probability of each returned token.
            echo: Include the prompt tokens (and their logprobs) in the output.
            sampling: A `SamplingParams` for every prompt, or one per prompt;
                it replaces temperature, top_p and logprobs (and max_gen_len
                where its max_tokens is set).

        Returns:
            (tokens per prompt, logprobs per prompt or None), a tuple that
            also carries the call's `GenerationMetrics` as `.metrics`.
        """
        requests = self._requests(prompt_tokens, max_gen_len, sampling, temperature, top_p, logprobs, echo)
        completions = self._complete(requests)
        want_logprobs = any(r.params.wants_logprobs for r in requests)
        tokens = [(c.prompt_tokens if echo else []) + c.tokens for c in completions]
        lps = [((c.prompt_logprobs or []) if echo else []) + (c.logprobs or []) for c in completions]
        return GenerationResult(tokens, lps if want_logprobs else None, self.last_metrics)

    def generate_stream(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        *,
        sampling: Sampling = None,
    ) -> Iterator[TokenEvent]:
        """Like `generate`, but yields each new token as soon as it is decoded.

        Events come in decoding order, one per row and step while the row is
        still generating; `event.row` is the prompt's index. A row's last
        event carries its `stop_reason` and its `completion` (with per-request
        metrics); on a stop token, the event's token is that stop token and
        its text only what was held back, if anything. Joining a row's texts
        gives the decoded generation, cut before a stop string. Closing the
        generator early cancels the rows still running and frees their slots.
        """
        requests = self._requests(prompt_tokens, max_gen_len, sampling, temperature, top_p, logprobs, False)
        for event in self._run(requests):
            if event.token is not None:
                yield event

    def _requests(self, prompt_tokens, max_gen_len, sampling: Sampling, temperature, top_p, logprobs,
                  echo) -> List[Request]:
        """One engine request per prompt, with Meta's arguments checked."""
        if isinstance(prompt_tokens, (str, bytes)) or not prompt_tokens:
            raise ValueError("no prompts given: pass a list with one list of token ids per prompt")
        if max_gen_len is not None and (not isinstance(max_gen_len, int) or isinstance(max_gen_len, bool)
                                        or max_gen_len < 0):
            raise ValueError(f"max_gen_len must be a non-negative integer, got {max_gen_len!r}")
        if sampling is None:
            params = [SamplingParams(temperature=temperature, top_p=top_p, logprobs=logprobs, max_tokens=max_gen_len)]
        elif isinstance(sampling, SamplingParams):
            params = [sampling]
        else:
            params = list(sampling)
            if len(params) != len(prompt_tokens) or not all(isinstance(p, SamplingParams) for p in params):
                raise ValueError(f"sampling must be one SamplingParams or a list of {len(prompt_tokens)} "
                                 f"(one per prompt), got {sampling!r:.100}")
        params = [p if p.max_tokens is not None else dataclasses.replace(p, max_tokens=max_gen_len) for p in params]
        if len(params) == 1:
            params = params * len(prompt_tokens)
        for i, tokens in enumerate(prompt_tokens):
            self.engine.check_prompt(tokens, f"prompt {i}")
        return [Request(tuple(t), p, prompt_logprobs=echo and p.wants_logprobs) for t, p in zip(prompt_tokens, params)]

    def _run(self, requests: Sequence[Request]) -> Iterator[TokenEvent]:
        """Submits `requests`, steps the engine until every one has ended, and
        yields their events with `row` set to the request's index. On the way
        out (finished, or the consumer stopped early) the rows still running
        are cancelled and `last_metrics` is set for this call."""
        ids = [self.engine.submit(request) for request in requests]  # checked by _requests: cannot fail
        recorder = MetricsRecorder(
            len(requests), sum(len(r.prompt_tokens) for r in requests), self.weight_bytes_per_step, _world_size(),
            **device_probes(self.device),
        )
        index = {rid: i for i, rid in enumerate(ids)}
        pending, generated = set(ids), 0
        try:
            while pending:
                events = self.engine.step()
                recorder.step(gave_tokens=any(e.token is not None for e in events))
                for event in events:
                    row = index.get(event.row)
                    if row is None:
                        continue  # another caller's request
                    if event.stop_reason is not None:
                        pending.discard(event.row)
                        generated += event.completion.metrics.generated_tokens
                    event.row = row  # the engine's events are fresh objects: renumber in place
                    yield event
        finally:
            for rid in pending:
                self.engine.cancel(rid)
            self.last_metrics = recorder.finish(generated)
            if is_rank0():
                metrics_logger.info("%s", self.last_metrics.report())

    def _complete(self, requests: Sequence[Request]) -> List[Completion]:
        """Runs `requests` to the end; one Completion per request, in order."""
        completions: List[Optional[Completion]] = [None] * len(requests)
        for event in self._run(requests):
            if event.completion is not None:
                completions[event.row] = event.completion
        return completions

    def text_completion(
        self,
        prompts: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
        *,
        sampling: Sampling = None,
    ) -> List[CompletionPrediction]:
        """Completes each text prompt.

        Args:
            prompts: Texts to continue (a bos token is prepended).
            temperature, top_p, logprobs, echo, sampling: as in `generate`.
            max_gen_len: Default: until the context (max_seq_len) is full.

        Returns:
            One {"generation": str} per prompt (plus "tokens" and "logprobs" if
            asked), with "stop_reason", the batch's "metrics" and the prompt's
            "request_metrics".
        """
        if isinstance(prompts, str):
            raise ValueError("prompts must be a list of strings, got one string; wrap it in a list")
        prompt_tokens = [self.tokenizer.encode(x, bos=True, eos=False) for x in prompts]
        requests = self._requests(prompt_tokens, max_gen_len, sampling, temperature, top_p, logprobs, echo)
        completions = self._complete(requests)
        metrics = self.last_metrics.to_dict()
        out = []
        for c, request in zip(completions, requests):
            tokens = (c.prompt_tokens + c.tokens) if echo else c.tokens
            text = self.tokenizer.decode(tokens) if echo else c.text
            lps = ((c.prompt_logprobs or []) if echo else []) + (c.logprobs or [])
            result = self._prediction(text, tokens, lps if request.params.wants_logprobs else None, metrics, c)
            result["stop_reason"] = c.stop_reason
            out.append(result)
        return out

    def chat_completion(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        *,
        sampling: Sampling = None,
    ) -> List[ChatPrediction]:
        """Generates the assistant's next message for each dialog.

        Args:
            dialogs: Lists of {"role", "content"} messages in the model family's
                order (optional system first, then user/assistant turns, ending
                with user; Llama 3 also takes ipython tool results, and
                assistant messages with "tool_calls", see `Message`).
            temperature, top_p, logprobs, sampling: as in `generate`.
            max_gen_len: Default: until the context (max_seq_len) is full.

        Returns:
            One {"generation": message} per dialog (plus "tokens" and
            "logprobs" if asked), the message being {"role": "assistant",
            "content": str, "tool_calls": [ToolCall, ...], "stop_reason":
            StopReason}: END_OF_MESSAGE means the model waits for the result
            of its tool calls (send it as an "ipython" message), OUT_OF_TOKENS
            that the answer was cut off, STOP_STRING that a stop string ended it.
        """
        prompt_tokens = [self.formatter.encode_dialog_prompt(d) for d in dialogs]
        requests = self._requests(prompt_tokens, max_gen_len, sampling, temperature, top_p, logprobs, False)
        completions = self._complete(requests)
        metrics = self.last_metrics.to_dict()
        return [
            self._prediction(self._message(c), c.tokens, c.logprobs if r.params.wants_logprobs else None, metrics, c)
            for c, r in zip(completions, requests)
        ]

    def chat_completion_stream(
        self,
        dialog: Dialog,
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        *,
        sampling: Optional[SamplingParams] = None,
    ) -> Iterator[TokenEvent]:
        """Streams the assistant's next message for one dialog, token by token
        (see `generate_stream`); `formatter.decode_assistant_message` turns the
        tokens and the last event's stop_reason into the message."""
        yield from self.generate_stream([self.formatter.encode_dialog_prompt(dialog)], max_gen_len, temperature,
                                        top_p, sampling=sampling)

    def _message(self, c: Completion) -> Message:
        if c.stop_reason == StopReason.STOP_STRING:  # the text is cut inside a token: no tool-call parsing
            return {"role": "assistant", "content": c.text, "tool_calls": [], "stop_reason": c.stop_reason}
        return self.formatter.decode_assistant_message(c.tokens, c.stop_reason)

    def _prediction(self, generation, tokens: List[int], logprobs: Optional[List[float]], metrics: dict,
                    completion: Completion) -> dict:
        """Meta's result dict, plus the batch's "metrics" and the request's "request_metrics"."""
        result = {"generation": generation, "metrics": metrics, "request_metrics": completion.metrics.to_dict()}
        if logprobs is not None:
            result.update(tokens=[self.tokenizer.decode([x]) for x in tokens], logprobs=logprobs)
        return result


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1

