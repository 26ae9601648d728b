"""POST /v1/completions over `serving_completions.completion`."""

from fastapi import APIRouter, Depends, Request

from ..protocol import CompletionRequest
from ..serving import ServerState
from ..serving_completions import COMPLETIONS_PATH, completion
from . import respond, server_state

router = APIRouter()


@router.post(COMPLETIONS_PATH)
async def completions(req: CompletionRequest, http: Request, state: ServerState = Depends(server_state)):
    return respond(await completion(state, req, http.is_disconnected))
