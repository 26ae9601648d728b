"""The HTTP endpoints, one FastAPI `APIRouter` per endpoint family:

    health.py       GET /health, GET /metrics
    models.py       GET /v1/models, GET /v1/models/{name}
    chat.py         POST /v1/chat/completions
    completions.py  POST /v1/completions

A route only adapts HTTP to the handler layer (serving_chat.py,
serving_completions.py, serving.py): it takes the validated request model and
the app's `ServerState` (`server_state`), calls the handler, and wraps its
answer (`respond`). Errors travel as APIError to the app's exception handlers.
"""

from typing import AsyncIterator, Union

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..serving import ServerState


def server_state(http: Request) -> ServerState:
    """The app's shared state (a FastAPI dependency)."""
    return http.app.state.server


def respond(answer: Union[dict, AsyncIterator[str]]):
    """A handler's answer as a response: a dict as JSON, SSE lines as an event stream."""
    if isinstance(answer, dict):
        return answer
    return StreamingResponse(answer, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
