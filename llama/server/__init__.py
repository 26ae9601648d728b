"""An OpenAI-compatible HTTP server over the decoding engine (`llama serve`).

Needs the `server` extra (`pip install -e ".[server]"`: FastAPI, uvicorn,
prometheus_client); `import llama` never imports it. The pieces:

    worker.py    the engine thread: the only caller of Engine.submit/step/cancel
    protocol.py  pydantic models of the requests; OpenAI's error JSON
    translate.py OpenAI messages and tools <-> our dialogs and Llama 3.1 tool calls
    guard.py     ASGI middleware: API key, body size limit; validation messages
    app.py       the FastAPI app: endpoints, streaming, errors, metrics
    prometheus.py /metrics in Prometheus text format
    run.py       uvicorn on rank 0 (llama/cli/serve.py builds the model and calls it)
"""
