"""The FastAPI app: OpenAI's chat and text completion endpoints over one
`EngineWorker`, plus /v1/models, /health and /metrics.

Design: `create_app` only assembles. The shared state (`ServerState`: the
worker, the model, the metrics) lives on `app.state.server`; the endpoints
are routers (routes/), each a thin adapter over a handler (serving_*.py)
that tests can call without HTTP; the Guard middleware checks the API key
and body size before any of them; the exception handlers below turn every
error into OpenAI's error JSON and count it in /metrics.

Invariants: the lifespan starts the engine thread and stops it, which
releases any torchrun followers; nothing but the worker touches the engine
(`ServerState.check_prompt` reads only its sizes).

Failure modes: an unexpected exception is logged with its traceback and
answered 500 naming it, and so is one request's failure in the engine
thread (the engine goes on); the engine thread's fatal failure is 503 (see
serving.py and worker.py) and calls `on_fatal` once, so `run_server` can
exit. A client that disconnected gets nothing (499 in the log and
/metrics, as nginx counts it), without a traceback.
"""

import asyncio
import contextlib
import logging
from typing import Callable, Optional

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .guard import Guard, validation_message
from .protocol import APIError, error_body
from .routes import chat, completions, health, models
from .serving import ClientGone, ServerState

logger = logging.getLogger("llama.server")

MAX_BODY_BYTES = 8 << 20


def create_app(generator, model_name: str, api_key: Optional[str] = None, max_queue: int = 64,
               idle_step_s: Optional[float] = None, max_body: int = MAX_BODY_BYTES,
               on_fatal: Optional[Callable[[BaseException], None]] = None,
               explain_fatal: Optional[Callable[[Exception], BaseException]] = None) -> FastAPI:
    """The app serving `generator` (a `Llama`) as `model_name`. The lifespan
    starts the engine thread and stops it (releasing any torchrun followers).
    `explain_fatal` rewrites the engine's fatal error before anyone sees it
    (EngineWorker.explain: under torchrun, naming the lost rank)."""
    app = FastAPI(title="llama", lifespan=_lifespan, docs_url=None, redoc_url=None)
    app.state.server = ServerState.build(generator, model_name, max_queue, idle_step_s, on_fatal)
    app.state.server.worker.explain = explain_fatal
    app.add_middleware(Guard, api_key=api_key, max_body=max_body)
    for module in (health, models, chat, completions):
        app.include_router(module.router)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(ClientGone, _client_gone)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
    worker = app.state.server.worker
    worker.start()
    yield
    await asyncio.get_running_loop().run_in_executor(None, worker.stop)


def _count(request, status: int) -> None:
    request.app.state.server.metrics.requests.labels(request.url.path, str(status)).inc()


async def _api_error(request, exc: APIError):
    _count(request, exc.status)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


# nginx's status for "client closed request": never seen by the client, only counted.
CLIENT_CLOSED = 499


async def _client_gone(request, exc: ClientGone):
    logger.info("%s: the client disconnected; its requests were cancelled", request.url.path)
    _count(request, CLIENT_CLOSED)
    return Response(status_code=CLIENT_CLOSED)


async def _invalid(request, exc: RequestValidationError):
    message, param = validation_message(exc)
    _count(request, 400)
    return JSONResponse(error_body(400, message, param), status_code=400)


async def _http_error(request, exc: StarletteHTTPException):
    return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)


async def _unexpected(request, exc: Exception):
    logger.exception("error answering %s", request.url.path)
    _count(request, 500)
    return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}: {exc}"), status_code=500)
