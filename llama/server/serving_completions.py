"""POST /v1/completions without HTTP: `completion(state, request)`.

Design: each prompt (a string, strings, token ids, or lists of them) is
submitted n times, one engine request per (prompt, choice) in that order, so
choice k*n + j is prompt k's j-th answer, as in OpenAI's API. Without
`stream` the answer is a text_completion dict; with it an async iterator of
SSE lines: the echoed prompt (if asked), a chunk per token, the usage chunk
if asked, and `[DONE]`.

Invariants: `echo` repeats the prompt's text without its special tokens
(the BOS the server adds is not part of what the client sent); logprobs
entries cover the generated tokens only, never a stop token.

Failure modes: `suffix` and a `best_of` other than n are refused with 400
(this server has no infilling and no server-side best-of); the prompt
checks, like every other check, raise APIError before anything is streamed.
"""

import time
import uuid
from typing import AsyncIterator, List, Union

from ..engine.engine import Request
from .protocol import APIError, CompletionRequest
from .serving import IsDisconnected, ServerState, Submission, sse_stream, usage
from .translate import finish_reason, sampling_params

COMPLETIONS_PATH = "/v1/completions"


async def completion(state: ServerState, req: CompletionRequest,
                     is_disconnected: IsDisconnected = None) -> Union[dict, AsyncIterator[str]]:
    """The answer to `req`: a text_completion dict, or (`req.stream`) its SSE
    lines. Raises APIError for anything wrong before the answer starts."""
    start = time.perf_counter()
    state.check_model(req.model)
    params = sampling_params(req)
    if req.suffix:
        raise APIError(400, "suffix is not supported by this server", "suffix")
    if req.best_of not in (None, 1, len(params)):
        raise APIError(400, "best_of other than n is not supported by this server", "best_of")
    prompts = prompt_tokens(req.prompt, state.tokenizer)
    for k, p in enumerate(prompts):
        state.check_prompt(p, "prompt" if len(prompts) == 1 else f"prompt[{k}]")
    tokenizer = state.tokenizer
    echo = [tokenizer.decode([t for t in p if t not in tokenizer.special_tokens.values()]) if req.echo else ""
            for p in prompts for _ in params]
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": state.model_name, "system_fingerprint": None}
    sub = Submission(state, [Request(tuple(p), sp) for p in prompts for sp in params], start)
    n_prompt = sum(len(p) for p in prompts)
    if req.stream:
        return sse_stream(sub, COMPLETIONS_PATH, _chunks(state, req, sub, head, echo, n_prompt))
    done = await sub.collect(is_disconnected)
    choices = [{"index": i, "text": echo[i] + c.text, "finish_reason": finish_reason(c.stop_reason, False),
                "logprobs": _logprobs(state, req, c.tokens, c.logprobs, c.top_logprobs)} for i, c in enumerate(done)]
    state.metrics.requests.labels(COMPLETIONS_PATH, "200").inc()
    return {**head, "choices": choices, "usage": usage(n_prompt, done)}


async def _chunks(state: ServerState, req: CompletionRequest, sub: Submission, head: dict, echo: List[str],
                  n_prompt: int) -> AsyncIterator[dict]:
    """The text_completion payloads of a streamed answer."""
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    for i, text in enumerate(echo):
        if text:
            yield {**head, "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": None}]}
    while not sub.finished:
        i, event = await sub.next()
        finish = None if event.stop_reason is None else finish_reason(event.completion.stop_reason, False)
        if event.text or finish:
            lp = None
            if event.logprob is not None and event.token not in state.tokenizer.stop_tokens:
                lp = _logprobs(state, req, [event.token], [event.logprob], [event.top_logprobs])
            out = {**head, "choices": [{"index": i, "text": event.text, "logprobs": lp, "finish_reason": finish}]}
            if include_usage:
                out["usage"] = None
            yield out
    if include_usage:
        yield {**head, "choices": [], "usage": usage(n_prompt, sub.completions)}


def _logprobs(state: ServerState, req: CompletionRequest, tokens, lps, tops):
    """OpenAI's legacy logprobs object of `tokens` (None unless the client asked)."""
    if req.logprobs is None:
        return None
    decode = state.tokenizer.decode
    texts = [decode([t]) for t in tokens]
    offsets = [sum(len(s) for s in texts[:k]) for k in range(len(texts))]
    top_maps = [{decode([t]): v for t, v in (tp or ())} for tp in (tops or [None] * len(tokens))]
    return {"tokens": texts, "token_logprobs": lps, "top_logprobs": top_maps, "text_offset": offsets}


def prompt_tokens(prompt, tokenizer) -> List[List[int]]:
    """Token lists of a completion prompt: a string, strings, token ids, or lists of them."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty", "prompt")
    return [tokenizer.encode(p, bos=True, eos=False) if isinstance(p, str) else list(p) for p in prompt]
