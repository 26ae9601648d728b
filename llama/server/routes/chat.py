"""POST /v1/chat/completions over `serving_chat.chat_completion`."""

from fastapi import APIRouter, Depends, Request

from ..protocol import ChatCompletionRequest
from ..serving import ServerState
from ..serving_chat import CHAT_PATH, chat_completion
from . import respond, server_state

router = APIRouter()


@router.post(CHAT_PATH)
async def chat_completions(req: ChatCompletionRequest, http: Request, state: ServerState = Depends(server_state)):
    return respond(await chat_completion(state, req, http.is_disconnected))
