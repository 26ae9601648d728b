"""The handler layer's shared pieces: the server's state and one HTTP
request's engine requests on their way through the engine thread.

Design: `ServerState` is everything a handler needs (the engine worker, the
model's name, tokenizer and chat format, the metrics); the app keeps one on
`app.state.server` and the routes pass it in, so a handler is a plain async
function of (state, validated request) that tests can call without HTTP.
`Submission` submits a request's n engine requests together (all or none)
and receives their events on one asyncio queue: the worker's sink hops from
the engine thread to the event loop with `call_soon_threadsafe`.

Invariants: whatever ends a submission early (a client that went away, an
error, a dropped stream) goes through `Submission.cancel_unfinished`, so no
KV-cache slot outlives its client beyond the next engine step. Prompt
tokens count in /metrics when submitted; generated tokens as their events
arrive (the stop token itself is not counted).

Failure modes: a full server raises APIError 429 with Retry-After (nothing
was submitted); a failed engine thread 503, at submission or on the next
event; an exception while serving one request (in the engine thread or in
a handler) 500 for that request alone, as JSON or, once a stream has
started, as its last event before `[DONE]`. A client that disconnects is
noticed within `DISCONNECT_POLL_S` even while tokens flow: its requests
are cancelled and the handler raises `ClientGone`, which the app answers
quietly (nobody is there to read it). When the shutdown's drain time runs
out, `ServerState.abort` ends every open submission with a 503, so a
stream still ends with an error event and `[DONE]`.
"""

import asyncio
import json
import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, List, Optional, Tuple

from ..engine.engine import Engine, Request, TokenEvent
from .prometheus import ServerMetrics
from .protocol import APIError, error_body
from .worker import EngineFailed, EngineWorker, Overloaded, RequestFailed

logger = logging.getLogger("llama.server")

# How often a waiting handler asks whether its client is still there (one
# non-blocking look at the ASGI receive channel).
DISCONNECT_POLL_S = 0.25


class ClientGone(Exception):
    """The client disconnected; its requests were cancelled and nobody reads the answer."""

# Awaitable "has the client gone?" (Starlette's Request.is_disconnected); None: never asked.
IsDisconnected = Optional[Callable[[], Awaitable[bool]]]


@dataclass(eq=False)
class ServerState:
    """What every handler shares; built once per app."""

    model_name: str
    worker: EngineWorker
    metrics: ServerMetrics
    engine: Engine
    tokenizer: Any
    formatter: Any
    tool_tag: Optional[int]  # <|python_tag|>'s id, None where the tokenizer has none
    created: int  # the models' "created" time
    # Submissions not finished yet, for `abort`; only touched on the event loop.
    live: "weakref.WeakSet[Submission]" = field(default_factory=weakref.WeakSet)

    @classmethod
    def build(cls, generator, model_name: str, max_queue: int = 64, idle_step_s: Optional[float] = None,
              on_fatal: Optional[Callable[[BaseException], None]] = None) -> "ServerState":
        """The state serving `generator` (a `Llama`); its worker thread is not started yet."""
        engine, tokenizer = generator.engine, generator.tokenizer
        tool_tag = tokenizer.special_tokens.get("<|python_tag|>") if hasattr(tokenizer, "special_tokens") else None
        worker = EngineWorker(engine, max_queue, idle_step_s)
        worker.on_error = on_fatal
        return cls(model_name, worker, ServerMetrics(worker), engine, tokenizer, generator.formatter, tool_tag,
                   int(time.time()))

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           "model", "model_not_found")

    def check_prompt(self, tokens, param: str) -> None:
        try:
            self.engine.check_prompt(tokens)  # reads only the model's sizes: safe outside the engine thread
        except ValueError as e:
            code = "context_length_exceeded" if "max_seq_len" in str(e) else None
            raise APIError(400, str(e), param, code) from None

    def abort(self, message: str) -> None:
        """Ends every unfinished submission with a 503 `message` (on the event loop):
        a waiting handler raises it, a stream sends it as its last event."""
        for sub in list(self.live):
            sub.queue.put_nowait((None, None, APIError(503, message)))

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "llama"}

    def health(self) -> Tuple[int, dict]:
        """(status, body) of /health: 503 once the engine thread has failed."""
        if self.worker.error is not None:
            return 503, {"status": "error", **error_body(503, f"the model is unavailable: {self.worker.error}")}
        return 200, {"status": "ok", "model": self.model_name}

    def token_info(self, token: int, lp: float, top) -> dict:
        """A chat logprobs entry: the token, its logprob and bytes, its top alternatives."""
        text = self.tokenizer.decode([token])
        info = {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8")), "top_logprobs": []}
        for t, v in top or ():
            s = self.tokenizer.decode([t])
            info["top_logprobs"].append({"token": s, "logprob": v, "bytes": list(s.encode("utf-8"))})
        return info


class Submission:
    """One HTTP request's engine requests, submitted together at construction
    (raises APIError 429 or 503, submitting nothing); `completions[i]` is
    request i's Completion once it finished. `start` is when the HTTP request
    arrived: the time to first token counts from there."""

    def __init__(self, state: ServerState, requests: List[Request], start: float):
        self.state, self.n, self.start = state, len(requests), start
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.last_token: dict = {}  # index -> when its latest token arrived
        self.completions: list = [None] * self.n
        self._next_look = 0.0  # when `next` looks for a disconnect again
        try:
            self.handles = state.worker.submit(requests, [self._sink(i) for i in range(self.n)])
        except Overloaded as e:
            raise APIError(429, f"the server is busy: {e}; retry later", code="overloaded",
                           headers={"Retry-After": "1"}) from None
        except EngineFailed as e:
            raise APIError(503, f"the model is unavailable: {e}") from None
        state.live.add(self)
        state.metrics.prompt_tokens.inc(sum(len(r.prompt_tokens) for r in requests))

    def _sink(self, index: int):
        def put(event, error):  # runs in the engine thread
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event, error))
        return put

    @property
    def finished(self) -> bool:
        return all(c is not None for c in self.completions)

    async def next(self, is_disconnected: IsDisconnected = None) -> Tuple[int, TokenEvent]:
        """The next (index, event). Raises APIError: 500 if serving this request
        failed, 503 if the engine failed or the server is closing; ClientGone
        once `is_disconnected` says the client went away (asked at most every
        DISCONNECT_POLL_S, also while tokens keep coming)."""
        while True:
            if is_disconnected is not None and time.monotonic() >= self._next_look:
                self._next_look = time.monotonic() + DISCONNECT_POLL_S
                if await is_disconnected():
                    raise ClientGone("the client disconnected")
            try:
                wait = None if is_disconnected is None else max(0.0, self._next_look - time.monotonic())
                index, event, error = await asyncio.wait_for(self.queue.get(), wait)
                break
            except asyncio.TimeoutError:
                continue
        if isinstance(error, APIError):
            raise error
        if isinstance(error, RequestFailed):
            raise APIError(500, f"the server failed while answering this request ({error}); "
                           "other requests are not affected, a retry may succeed", code="internal_error")
        if error is not None:
            raise APIError(503, f"the model failed while answering: {error}")
        self._measure(index, event)
        if event.stop_reason is not None:
            self.completions[index] = event.completion
            if event.completion is not None and event.completion.metrics.proposed_tokens:
                self.state.metrics.acceptance.observe(event.completion.metrics.acceptance_rate)
        return index, event

    def _measure(self, index: int, event: TokenEvent) -> None:
        metrics = self.state.metrics
        if event.token is not None and not (event.stop_reason is not None
                                            and event.token in self.state.tokenizer.stop_tokens):
            metrics.generated_tokens.inc()
        if event.token is not None:
            now, last = time.perf_counter(), self.last_token.get(index)
            if last is None:
                metrics.ttft.observe(now - self.start)
            else:
                metrics.per_token.observe(now - last)
            self.last_token[index] = now

    async def collect(self, is_disconnected: IsDisconnected = None) -> list:
        """Every request's Completion; cancels the rest if anything goes wrong."""
        try:
            while not self.finished:
                await self.next(is_disconnected)
        finally:
            self.cancel_unfinished()
        return self.completions

    def cancel_unfinished(self) -> None:
        self.state.live.discard(self)
        if not self.finished:
            self.state.worker.cancel(self.handles)


def usage(prompt_tokens: int, completions) -> dict:
    out = sum(len(c.tokens) for c in completions)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": out, "total_tokens": prompt_tokens + out}


def sse(payload) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def sse_stream(sub: Submission, endpoint: str, chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    """The Server-Sent Events of `chunks`, then `data: [DONE]`. Anything that
    fails mid-stream (the engine, this request's row, translating its tokens,
    the server closing) ends it with OpenAI's error JSON as the last event
    before `[DONE]` (the 200 status is already sent); a stream that ends
    early, because the client went away or anything failed, cancels the
    requests still running."""
    metrics = sub.state.metrics
    try:
        try:
            async for payload in chunks:
                yield sse(payload)
        except APIError as e:
            yield sse(e.body())
            status = e.status
        except Exception as e:  # noqa: BLE001 - a bug answering this request fails this request only
            logger.exception("error streaming %s", endpoint)
            yield sse(error_body(500, f"internal error: {type(e).__name__}: {e}", code="internal_error"))
            status = 500
        else:
            status = 200
        yield "data: [DONE]\n\n"
        metrics.requests.labels(endpoint, str(status)).inc()
    finally:
        sub.cancel_unfinished()
