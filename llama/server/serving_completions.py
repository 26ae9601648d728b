"""POST /v1/completions without HTTP: `completion(state, request)`.

Design: each prompt (a string, strings, token ids, or lists of them) is
submitted n times, one engine request per (prompt, choice) in that order, so
choice k*n + j is prompt k's j-th answer, as in OpenAI's API. Without
`stream` the answer is a text_completion dict; with it an async iterator of
SSE lines: the echoed prompt (if asked), a chunk per token, the usage chunk
if asked, and `[DONE]`.

Invariants: `echo` repeats the prompt's text without its special tokens
(the BOS the server adds is not part of what the client sent). Logprobs
follow OpenAI's legacy definition: `text_offset[k]` is where token k starts
in the choice's `text`; with `echo` the entries start with the echoed prompt
tokens (the engine's prompt logprobs), the first of them null (OpenAI gives
the first token no logprob), their top_logprobs null (the engine computes
the chosen prompt tokens' logprobs only). Never a stop token.

Failure modes: `suffix` and a `best_of` other than n are refused with 400
(this server has no infilling and no server-side best-of); prompts x n
beyond MAX_CHOICES or the server's capacity is a 400 naming the field,
checked before any prompt is tokenized (`translate.check_size`); the prompt
checks, like every other check, raise APIError before anything is streamed.
A streamed echo chunk carries no logprobs (the engine reports prompt
logprobs with the last event); ask without `stream` for them.
"""

import time
import uuid
from typing import AsyncIterator, List, Union

from ..engine.engine import Request
from .protocol import APIError, CompletionRequest
from .serving import IsDisconnected, ServerState, Submission, sse_stream, usage
from .translate import check_size, finish_reason, sampling_params

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
    check_size(req, req.prompt_count(), state.worker.capacity)
    prompts = prompt_tokens(req.prompt, state.tokenizer)
    for k, p in enumerate(prompts):
        state.check_prompt(p, "prompt" if len(prompts) == 1 else f"prompt[{k}]")
    special = set(state.tokenizer.special_tokens.values())
    # Per choice: the echoed prompt tokens' positions in the prompt (special tokens are not echoed).
    shown = [[k for k, t in enumerate(p) if t not in special] if req.echo else [] for p in prompts for _ in params]
    choice_prompts = [p for p in prompts for _ in params]
    echo = [state.tokenizer.decode([p[k] for k in ks]) if ks else "" for p, ks in zip(choice_prompts, shown)]
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": state.model_name, "system_fingerprint": None}
    with_prompt_lps = req.echo and req.logprobs is not None and not req.stream
    sub = Submission(state, [Request(tuple(p), sp, prompt_logprobs=with_prompt_lps) for p in prompts for sp in params],
                     start)
    n_prompt = sum(len(p) for p in prompts)
    if req.stream:
        return sse_stream(sub, COMPLETIONS_PATH, _chunks(state, req, sub, head, echo, n_prompt))
    done = await sub.collect(is_disconnected)
    choices = []
    for i, c in enumerate(done):
        tokens, lps, tops = list(c.tokens), c.logprobs, c.top_logprobs
        if with_prompt_lps:
            ks, p = shown[i], choice_prompts[i]
            tokens = [p[k] for k in ks] + tokens
            lps = [None if j == 0 else c.prompt_logprobs[k] for j, k in enumerate(ks)] + list(lps or ())
            tops = [None] * len(ks) + [tp or () for tp in (tops or [()] * len(c.tokens))]
        choices.append({"index": i, "text": echo[i] + c.text, "finish_reason": finish_reason(c.stop_reason, False),
                        "logprobs": _logprobs(state, req, tokens, lps, tops)})
    state.metrics.requests.labels(COMPLETIONS_PATH, "200").inc()
    return {**head, "choices": choices, "usage": usage(n_prompt, done)}


async def _chunks(state: ServerState, req: CompletionRequest, sub: Submission, head: dict, echo: List[str],
                  n_prompt: int) -> AsyncIterator[dict]:
    """The text_completion payloads of a streamed answer."""
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    offset = [len(text) for text in echo]  # where each choice's next token starts in its text
    for i, text in enumerate(echo):
        if text:
            yield {**head, "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": None}]}
    while not sub.finished:
        i, event = await sub.next()
        finish = None if event.stop_reason is None else finish_reason(event.completion.stop_reason, False)
        if event.text or finish:
            lp = None
            if event.logprob is not None and event.token not in state.tokenizer.stop_tokens:
                lp = _logprobs(state, req, [event.token], [event.logprob], [event.top_logprobs or ()], offset[i])
            offset[i] += len(event.text)
            out = {**head, "choices": [{"index": i, "text": event.text, "logprobs": lp, "finish_reason": finish}]}
            if include_usage:
                out["usage"] = None
            yield out
    if include_usage:
        yield {**head, "choices": [], "usage": usage(n_prompt, sub.completions)}


def _logprobs(state: ServerState, req: CompletionRequest, tokens, lps, tops, start: int = 0):
    """OpenAI's legacy logprobs object of `tokens` (None unless the client asked):
    `text_offset[k]` is where token k starts, counting from `start`. A None
    entry of `tops` (an echoed prompt token) is a null top_logprobs entry."""
    if req.logprobs is None:
        return None
    decode = state.tokenizer.decode
    texts = [decode([t]) for t in tokens]
    offsets, at = [], start
    for s in texts:
        offsets.append(at)
        at += len(s)
    top_maps = [None if tp is None else {decode([t]): v for t, v in tp}
                for tp in (tops if tops is not None else [()] * len(tokens))]
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
