"""POST /v1/chat/completions without HTTP: `chat_completion(state, request)`.

Design: the dialog (with the Llama 3.1 tool system prompt when tools are
offered) is encoded once and submitted as n engine requests, one per choice
(`translate.sampling_params`). Without `stream` the answer is a dict, OpenAI's
chat.completion; with it an async iterator of SSE lines: a first chunk with
the role per choice, content deltas as tokens arrive, then per choice its tool
calls and finish_reason, the usage chunk if asked, and `[DONE]`.

Invariants: with tools offered, text that may still turn out to be a tool
call (`CallGate`) is held back until the answer's end decides; what was
streamed is always the beginning of the final content, so `rest` completes
it. Logprobs are streamed only without tools (a held-back token has none).

Failure modes: every check that can fail (model name, sampling fields, the
dialog, the prompt's length, n beyond the server's capacity, a full queue) raises APIError before anything
is streamed; an engine failure mid-stream is the stream's last event.
"""

import time
import uuid
from typing import AsyncIterator, Optional, Union

from ..engine.engine import Request
from .protocol import APIError, ChatCompletionRequest
from .serving import IsDisconnected, ServerState, Submission, sse_stream, usage
from .translate import answer, check_size, dialog_of, finish_reason, sampling_params, tools_offered

CHAT_PATH = "/v1/chat/completions"


async def chat_completion(state: ServerState, req: ChatCompletionRequest,
                          is_disconnected: IsDisconnected = None) -> Union[dict, AsyncIterator[str]]:
    """The answer to `req`: a chat.completion dict, or (`req.stream`) its SSE
    lines. Raises APIError for anything wrong before the answer starts."""
    start = time.perf_counter()
    state.check_model(req.model)
    params = sampling_params(req)
    check_size(req, 1, state.worker.capacity)  # 400 for what can never fit: 429 means only "the queue is full now"
    tools_on = bool(tools_offered(req))
    try:
        prompt = state.formatter.encode_dialog_prompt(dialog_of(req, state.formatter))
    except ValueError as e:
        raise APIError(400, str(e), "messages") from None
    state.check_prompt(prompt, "messages")
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.model_name,
            "system_fingerprint": None}
    sub = Submission(state, [Request(tuple(prompt), p) for p in params], start)
    if req.stream:
        return sse_stream(sub, CHAT_PATH, _chunks(state, req, sub, head, len(prompt), tools_on))
    completions = await sub.collect(is_disconnected)
    choices = [_choice(state, req, i, c, tools_on) for i, c in enumerate(completions)]
    state.metrics.requests.labels(CHAT_PATH, "200").inc()
    return {**head, "object": "chat.completion", "choices": choices, "usage": usage(len(prompt), completions)}


def _choice(state: ServerState, req: ChatCompletionRequest, index: int, c, tools_on: bool) -> dict:
    content, calls = answer(c, state.formatter, tools_on)
    message = {"role": "assistant", "content": content if content or not calls else None, "refusal": None}
    if calls:
        message["tool_calls"] = calls
    logprobs = None
    if req.logprobs:
        tops = c.top_logprobs or [None] * len(c.tokens)
        logprobs = {"content": [state.token_info(t, lp, top) for t, lp, top in zip(c.tokens, c.logprobs, tops)],
                    "refusal": None}
    return {"index": index, "message": message, "logprobs": logprobs,
            "finish_reason": finish_reason(c.stop_reason, bool(calls))}


async def _chunks(state: ServerState, req: ChatCompletionRequest, sub: Submission, head: dict, n_prompt: int,
                  tools_on: bool) -> AsyncIterator[dict]:
    """The chat.completion.chunk payloads of a streamed answer."""
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(index, delta, finish=None, logprobs=None):
        out = {**head, "object": "chat.completion.chunk",
               "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
        if include_usage:
            out["usage"] = None
        return out

    gates = [CallGate(state.tool_tag) for _ in range(sub.n)]
    for i in range(sub.n):
        yield chunk(i, {"role": "assistant", "content": ""})
    while not sub.finished:
        i, event = await sub.next()
        text = event.text
        if tools_on:  # text that may still turn out to be a tool call is held back
            text = gates[i].feed(event.token, text)
        if text:
            lp = None
            if req.logprobs and event.logprob is not None and not tools_on:
                lp = {"content": [state.token_info(event.token, event.logprob, event.top_logprobs)]}
            yield chunk(i, {"content": text}, logprobs=lp)
        if event.stop_reason is not None:
            content, calls = answer(event.completion, state.formatter, tools_on)
            rest = gates[i].rest(content) if tools_on else ""
            if rest:
                yield chunk(i, {"content": rest})
            if calls:
                yield chunk(i, {"tool_calls": [{"index": k, **call} for k, call in enumerate(calls)]})
            yield chunk(i, {}, finish_reason(event.completion.stop_reason, bool(calls)))
    if include_usage:
        yield {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(n_prompt, sub.completions)}


class CallGate:
    """Streams an answer's text unless it may be a tool call.

    A call is all text after <|python_tag|>, or an answer that starts with
    "{" or "<function" (JSON or function-tag syntax): from the tag on, or while
    the answer's first characters could start a call, text is held back; the
    end of the answer decides (`rest`)."""

    def __init__(self, tag: Optional[int]):
        self.tag, self.held, self.sent, self.tagged = tag, "", "", False

    def feed(self, token: Optional[int], text: str) -> str:
        if self.tagged or (token is not None and token == self.tag):
            self.tagged = True
            return ""
        self.held += text
        start = self.held.lstrip()
        if not start or (not self.sent and ("<function".startswith(start[:9]) or start.startswith(("{", "<function")))):
            return ""
        out, self.held = self.held, ""
        self.sent += out
        return out

    def rest(self, content: str) -> str:
        """What remains to send of the final `content` (what was sent is its beginning)."""
        return content[len(self.sent):] if content.startswith(self.sent) else ""
