"""An OpenAI-compatible HTTP server over the decoding engine (`llama serve`).

Needs the `server` extra (`pip install -e ".[server]"`: FastAPI, uvicorn,
prometheus_client); `import llama` never imports it. Shaped like vLLM's
entrypoints/openai: a router per endpoint family over a handler layer that
takes a validated request and the shared state, and needs no HTTP.

    app.py                  create_app: the state, the middleware, the routers, the error handlers
    routes/                 one APIRouter per endpoint family, thin adapters over the handlers:
        health.py           GET /health, GET /metrics
        models.py           GET /v1/models, GET /v1/models/{name}
        chat.py             POST /v1/chat/completions
        completions.py      POST /v1/completions
    serving.py              ServerState (on app.state.server); Submission: one HTTP request's
                            engine requests, their events, metrics and cancellation; SSE
    serving_chat.py         chat_completion(state, request): the answer or its SSE lines; CallGate
    serving_completions.py  completion(state, request): the same for text completions
    translate.py            OpenAI messages and tools <-> our dialogs and Llama 3.1 tool calls;
                            sampling_params: the one place OpenAI's sampling defaults are applied
    protocol.py             pydantic models of the requests; OpenAI's error JSON
    guard.py                ASGI middleware: API key, body size limit; validation messages
    worker.py               the engine thread: the only caller of Engine.submit/step/cancel
    prometheus.py           /metrics in Prometheus text format
    run.py                  uvicorn on rank 0 (llama/cli/serve.py builds the model and calls it)
"""
