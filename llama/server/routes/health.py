"""GET /health (for load balancers: no API key, 503 once the engine failed)
and GET /metrics (Prometheus text format)."""

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from ..serving import ServerState
from . import server_state

router = APIRouter()


@router.get("/health")
async def health(state: ServerState = Depends(server_state)):
    status, body = state.health()
    return body if status == 200 else JSONResponse(body, status_code=status)


@router.get("/metrics")
async def metrics(state: ServerState = Depends(server_state)):
    return Response(state.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")
