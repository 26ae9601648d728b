"""The FastAPI app: OpenAI's chat and text completion endpoints over one
`EngineWorker`, plus /v1/models, /health and /metrics.

Each HTTP request submits its n engine requests together; their events come
back on one asyncio queue. A stream that the client drops is cancelled (its
KV-cache slot is free by the next step); so is a non-streaming request whose
client disconnected.
"""

import asyncio
import contextlib
import json
import logging
import time
import uuid
from typing import Callable, List, Optional

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.engine import Request
from .guard import Guard, validation_message
from .prometheus import ServerMetrics
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, error_body
from .translate import answer, dialog_of, finish_reason, sampling_params, seeds, tools_offered
from .worker import EngineFailed, EngineWorker, Overloaded

logger = logging.getLogger("llama.server")

MAX_BODY_BYTES = 8 << 20
_DISCONNECT_POLL_S = 1.0


class _Events:
    """The events of one HTTP request's engine requests, on its event loop."""

    def __init__(self, n: int):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.n = n

    def sink(self, index: int):
        def put(event, error):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event, error))
        return put


def create_app(generator, model_name: str, api_key: Optional[str] = None, max_queue: int = 64,
               idle_step_s: Optional[float] = None, max_body: int = MAX_BODY_BYTES,
               on_fatal: Optional[Callable[[BaseException], None]] = None) -> FastAPI:
    """The app serving `generator` (a `Llama`) as `model_name`. The lifespan
    starts the engine thread and stops it (releasing any torchrun followers)."""
    engine, tokenizer, formatter = generator.engine, generator.tokenizer, generator.formatter
    tool_tag = tokenizer.special_tokens.get("<|python_tag|>") if hasattr(tokenizer, "special_tokens") else None
    worker = EngineWorker(engine, max_queue, idle_step_s)
    worker.on_error = on_fatal
    metrics = ServerMetrics(worker)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, worker.stop)

    app = FastAPI(title="llama", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.worker, app.state.metrics = worker, metrics
    app.add_middleware(Guard, api_key=api_key, max_body=max_body)

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        metrics.requests.labels(request.url.path, str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        message, param = validation_message(exc)
        metrics.requests.labels(request.url.path, "400").inc()
        return JSONResponse(error_body(400, message, param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):
        logger.exception("error answering %s", request.url.path)
        metrics.requests.labels(request.url.path, "500").inc()
        return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}: {exc}"), status_code=500)

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                           "model", "model_not_found")

    def check_prompt(tokens, param: str) -> None:
        try:
            engine.check_prompt(tokens)  # reads only the model's sizes: safe outside the engine thread
        except ValueError as e:
            code = "context_length_exceeded" if "max_seq_len" in str(e) else None
            raise APIError(400, str(e), param, code) from None

    def submit(requests: List[Request]):
        events = _Events(len(requests))
        try:
            handles = worker.submit(requests, [events.sink(i) for i in range(len(requests))])
        except Overloaded as e:
            raise APIError(429, f"the server is busy: {e}; retry later", code="overloaded",
                           headers={"Retry-After": "1"}) from None
        except EngineFailed as e:
            raise APIError(503, f"the model is unavailable: {e}") from None
        metrics.prompt_tokens.inc(sum(len(r.prompt_tokens) for r in requests))
        return events, handles

    async def next_event(events: _Events, timing: dict, http: Optional[HTTPRequest] = None):
        """The next (index, event); raises APIError(503) if the engine failed and
        asyncio.CancelledError if the (non-streaming) client went away."""
        while True:
            try:
                index, event, error = await asyncio.wait_for(events.queue.get(), _DISCONNECT_POLL_S)
                break
            except asyncio.TimeoutError:
                if http is not None and await http.is_disconnected():
                    raise asyncio.CancelledError("client disconnected") from None
        if error is not None:
            raise APIError(503, f"the model failed while answering: {error}")
        if event.token is not None and not (event.stop_reason is not None and event.token in tokenizer.stop_tokens):
            metrics.generated_tokens.inc()
        now, last = time.perf_counter(), timing.get(index)
        if event.token is not None:
            if last is None:
                metrics.ttft.observe(now - timing["start"])
            else:
                metrics.per_token.observe(now - last)
            timing[index] = now
        return index, event

    async def collect(events, handles, timing, http):
        done = [None] * len(handles)
        try:
            while any(c is None for c in done):
                index, event = await next_event(events, timing, http)
                if event.stop_reason is not None:
                    done[index] = event.completion
        finally:
            if any(c is None for c in done):
                worker.cancel(handles)
        return done

    def usage(prompt_tokens: int, completions) -> dict:
        out = sum(len(c.tokens) for c in completions)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": out, "total_tokens": prompt_tokens + out}

    def token_info(token: int, lp: float, top) -> dict:
        text = tokenizer.decode([token])
        info = {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8")), "top_logprobs": []}
        for t, v in top or ():
            s = tokenizer.decode([t])
            info["top_logprobs"].append({"token": s, "logprob": v, "bytes": list(s.encode("utf-8"))})
        return info

    def sse(payload) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    # -- endpoints --------------------------------------------------------

    @app.get("/health")
    async def health():
        if worker.error is not None:
            return JSONResponse(error_body(503, f"the model is unavailable: {worker.error}"), status_code=503)
        return {"status": "ok", "model": model_name}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card():
        return {"id": model_name, "object": "model", "created": created, "owned_by": "llama"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        check_model(name)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, http: HTTPRequest):
        timing = {"start": time.perf_counter()}
        check_model(req.model)
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        tools_on = bool(tools_offered(req))
        try:
            prompt = formatter.encode_dialog_prompt(dialog_of(req, formatter))
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None
        check_prompt(prompt, "messages")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        requests = [Request(tuple(prompt), sampling_params(req, max_tokens, req.logprobs, req.top_logprobs or 0, s))
                    for s in seeds(req.seed, req.n)]
        rid, created_at = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        events, handles = submit(requests)
        head = {"id": rid, "created": created_at, "model": model_name, "system_fingerprint": None}

        if not req.stream:
            completions = await collect(events, handles, timing, http)
            choices = []
            for i, c in enumerate(completions):
                content, calls = answer(c, formatter, tools_on)
                message = {"role": "assistant", "content": content if content or not calls else None,
                           "refusal": None}
                if calls:
                    message["tool_calls"] = calls
                logprobs = None
                if req.logprobs:
                    tops = c.top_logprobs or [None] * len(c.tokens)
                    logprobs = {"content": [token_info(t, lp, top) for t, lp, top in zip(c.tokens, c.logprobs, tops)],
                                "refusal": None}
                choices.append({"index": i, "message": message, "logprobs": logprobs,
                                "finish_reason": finish_reason(c.stop_reason, bool(calls))})
            metrics.requests.labels(http.url.path, "200").inc()
            return {**head, "object": "chat.completion", "choices": choices,
                    "usage": usage(len(prompt), completions)}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(index, delta, finish=None, logprobs=None):
            out = {**head, "object": "chat.completion.chunk",
                   "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
            if include_usage:
                out["usage"] = None
            return out

        async def stream():
            completions = [None] * len(requests)
            gates = [_CallGate(tool_tag) for _ in requests]
            try:
                for i in range(len(requests)):
                    yield sse(chunk(i, {"role": "assistant", "content": ""}))
                while any(c is None for c in completions):
                    i, event = await next_event(events, timing)
                    text = event.text
                    if tools_on:  # text that may still turn out to be a tool call is held back
                        text = gates[i].feed(event.token, text)
                    if text:
                        lp = None
                        if req.logprobs and event.logprob is not None and not tools_on:
                            lp = {"content": [token_info(event.token, event.logprob, event.top_logprobs)]}
                        yield sse(chunk(i, {"content": text}, logprobs=lp))
                    if event.stop_reason is not None:
                        c = completions[i] = event.completion
                        content, calls = answer(c, formatter, tools_on)
                        rest = gates[i].rest(content) if tools_on else ""
                        if rest:
                            yield sse(chunk(i, {"content": rest}))
                        if calls:
                            yield sse(chunk(i, {"tool_calls": [{"index": k, **call} for k, call in enumerate(calls)]}))
                        yield sse(chunk(i, {}, finish_reason(c.stop_reason, bool(calls))))
                if include_usage:
                    yield sse({**head, "object": "chat.completion.chunk", "choices": [],
                               "usage": usage(len(prompt), completions)})
                yield "data: [DONE]\n\n"
                metrics.requests.labels(http.url.path, "200").inc()
            except APIError as e:
                yield sse(e.body())
                metrics.requests.labels(http.url.path, str(e.status)).inc()
            finally:
                if any(c is None for c in completions):
                    worker.cancel(handles)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions_endpoint(req: CompletionRequest, http: HTTPRequest):
        timing = {"start": time.perf_counter()}
        check_model(req.model)
        if req.suffix:
            raise APIError(400, "suffix is not supported by this server", "suffix")
        if req.best_of not in (None, 1, req.n):
            raise APIError(400, "best_of other than n is not supported by this server", "best_of")
        prompts = _prompts(req.prompt, tokenizer)
        for k, p in enumerate(prompts):
            check_prompt(p, "prompt" if len(prompts) == 1 else f"prompt[{k}]")
        top = req.logprobs or 0
        requests = [Request(tuple(p), sampling_params(req, req.max_tokens, req.logprobs is not None, top, s))
                    for p in prompts for s in seeds(req.seed, req.n)]
        echo = [tokenizer.decode([t for t in p if t not in tokenizer.special_tokens.values()]) if req.echo else ""
                for p in prompts for _ in range(req.n)]
        rid, created_at = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        events, handles = submit(requests)
        head = {"id": rid, "object": "text_completion", "created": created_at, "model": model_name,
                "system_fingerprint": None}
        n_prompt = sum(len(p) for p in prompts)

        def logprobs_of(tokens, lps, tops):
            if req.logprobs is None:
                return None
            texts = [tokenizer.decode([t]) for t in tokens]
            offsets = [sum(len(s) for s in texts[:k]) for k in range(len(texts))]
            top_maps = [{tokenizer.decode([t]): v for t, v in (tp or ())} for tp in (tops or [None] * len(tokens))]
            return {"tokens": texts, "token_logprobs": lps, "top_logprobs": top_maps, "text_offset": offsets}

        if not req.stream:
            done = await collect(events, handles, timing, http)
            choices = [{"index": i, "text": echo[i] + c.text, "finish_reason": finish_reason(c.stop_reason, False),
                        "logprobs": logprobs_of(c.tokens, c.logprobs, c.top_logprobs)} for i, c in enumerate(done)]
            metrics.requests.labels(http.url.path, "200").inc()
            return {**head, "choices": choices, "usage": usage(n_prompt, done)}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def stream():
            done = [None] * len(requests)
            try:
                for i, text in enumerate(echo):
                    if text:
                        yield sse({**head, "choices": [{"index": i, "text": text, "logprobs": None,
                                                        "finish_reason": None}]})
                while any(c is None for c in done):
                    i, event = await next_event(events, timing)
                    finish = None
                    if event.stop_reason is not None:
                        done[i] = event.completion
                        finish = finish_reason(event.completion.stop_reason, False)
                    if event.text or finish:
                        lp = None
                        if event.logprob is not None and event.token not in tokenizer.stop_tokens:
                            lp = logprobs_of([event.token], [event.logprob], [event.top_logprobs])
                        out = {**head, "choices": [{"index": i, "text": event.text, "logprobs": lp,
                                                    "finish_reason": finish}]}
                        if include_usage:
                            out["usage"] = None
                        yield sse(out)
                if include_usage:
                    yield sse({**head, "choices": [], "usage": usage(n_prompt, done)})
                yield "data: [DONE]\n\n"
                metrics.requests.labels(http.url.path, "200").inc()
            except APIError as e:
                yield sse(e.body())
            finally:
                if any(c is None for c in done):
                    worker.cancel(handles)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


class _CallGate:
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


def _prompts(prompt, tokenizer) -> List[List[int]]:
    """Token lists of a completion prompt: a string, strings, token ids, or lists of them."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty", "prompt")
    return [tokenizer.encode(p, bos=True, eos=False) if isinstance(p, str) else list(p) for p in prompt]
