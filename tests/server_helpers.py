"""Helpers for the server tests: a real uvicorn server in a thread, SSE parsing."""

import contextlib
import json
import socket
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(app):
    """Serves `app` with uvicorn on 127.0.0.1:<free port> in a thread; yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def sse_events(lines):
    """The JSON payloads of an SSE stream's `data:` lines, then "[DONE]" as a string."""
    out = []
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def stream_in_background(url, body, headers=None):
    """Starts the streaming chat completion `body` on a thread of its own and
    returns once its first line arrived (or the thread ended): (thread, got);
    got["events"] holds sse_events of the whole stream once the thread ends."""
    import httpx

    got = {}

    def stream():
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
            lines = r.iter_lines()
            got["first"] = next(lines)
            got["events"] = sse_events([got["first"], *lines])

    thread = threading.Thread(target=stream)
    thread.start()
    while "first" not in got and thread.is_alive():
        time.sleep(0.01)
    return thread, got


def wait_healthy(proc, url, timeout=120):
    """Waits until the server process `proc` answers 200 on /health; AssertionError
    with its output if it exits or does not become healthy within `timeout` s."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {proc.stdout.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("server did not become healthy: " + proc.stdout.read())
