"""POST /v1/chat/completions over `serving_chat.chat_completion`.

The route first refuses (400, naming `n`) a request that could never fit the
server (`translate.check_size`), so that the handler's 429 means only "the
queue is full now"."""

from fastapi import APIRouter, Depends, Request

from ..protocol import ChatCompletionRequest
from ..serving import ServerState
from ..serving_chat import CHAT_PATH, chat_completion
from ..translate import check_size
from . import respond, server_state

router = APIRouter()


@router.post(CHAT_PATH)
async def chat_completions(req: ChatCompletionRequest, http: Request, state: ServerState = Depends(server_state)):
    check_size(req, 1, state.worker.capacity)
    return respond(await chat_completion(state, req, http.is_disconnected))
