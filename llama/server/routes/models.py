"""GET /v1/models and GET /v1/models/{name}: the one model this server serves."""

from fastapi import APIRouter, Depends

from ..serving import ServerState
from . import server_state

router = APIRouter()


@router.get("/v1/models")
async def list_models(state: ServerState = Depends(server_state)):
    return {"object": "list", "data": [state.model_card()]}


@router.get("/v1/models/{name:path}")
async def get_model(name: str, state: ServerState = Depends(server_state)):
    state.check_model(name)
    return state.model_card()
