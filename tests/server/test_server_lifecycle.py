"""No request can take the server down (issue 25, item 1): one request's
failure is its own 500 while the others go on, a client that leaves frees
its slot within a second without a traceback, idle and half-sent
connections are closed, and a shutdown past its drain time ends each open
stream with an error event and [DONE]. Real uvicorn on 127.0.0.1 in a
thread, with the connection limits `llama serve` uses."""

import contextlib
import logging
import socket
import threading
import time

import httpx
import pytest
import torch

from conftest import build_tiny
from llama.engine.engine import Engine
from llama.server import worker as worker_module
from llama.server.app import create_app
from llama.server.run import Limits, Server, server_config
from llama.server.serving import ServerState
from server_helpers import free_port, sse_events

MODEL = "tiny-life"
NEVER = "never-appears-xyz"


@pytest.fixture(scope="module")
def llama3(make_ckpt):
    return build_tiny(make_ckpt("llama3"), max_seq_len=256, max_batch_size=4)


@contextlib.contextmanager
def serving(app, limits=Limits(), drain_s=30.0):
    """`app` under run.py's Server on a free port in a thread; yields (url, server)."""
    port = free_port()
    config = server_config(app, "127.0.0.1", port, limits, drain_s, log_level="warning", lifespan="on")
    server = Server(config, app.state.server, drain_s)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", server, thread
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def live(llama3):
    app = create_app(llama3, MODEL, max_queue=8)
    with serving(app) as (url, _, _):
        yield url, app.state.server


@pytest.fixture
def asgi_errors():
    """What uvicorn logs as errors ("Exception in ASGI application") during the test."""
    records = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append
    log = logging.getLogger("uvicorn.error")
    log.addHandler(handler)
    yield records
    log.removeHandler(handler)


def slow_endless(monkeypatch):
    """Steps take 20 ms and no answer ever stops on its own."""
    step = Engine.step

    def slow_step(self):
        time.sleep(0.02)
        return step(self)
    monkeypatch.setattr(Engine, "step", slow_step)
    monkeypatch.setattr(Engine, "_sample", lambda self, rows, logits: torch.full((len(rows),), 9906))


def body(n, **kw):
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": n, "temperature": 0,
            **kw}


def post(url, **kw):
    return httpx.post(f"{url}/v1/chat/completions", json=body(**kw), timeout=60)


def server_error(r):
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "server_error"
    return err


def settle(state, deadline_s=5.0):
    deadline = time.monotonic() + deadline_s
    while state.worker.inflight and time.monotonic() < deadline:
        time.sleep(0.01)
    return state.worker.inflight == 0


class Streamer(threading.Thread):
    """A streamed chat request in a thread; `events` once it ended, `first` once a line came."""

    def __init__(self, url, **kw):
        super().__init__(daemon=True)
        self.url, self.kw, self.events, self.first = url, kw, None, threading.Event()
        self.start()

    def run(self):
        with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=body(stream=True, **self.kw),
                          timeout=60) as r:
            lines = []
            for line in r.iter_lines():
                lines.append(line)
                self.first.set()
            self.events = sse_events(lines)


# -- one request's failure is its own ---------------------------------------------------------------------


def test_a_request_failing_in_the_worker_gets_500_and_the_others_go_on(live, monkeypatch, asgi_errors):
    url, state = live
    submit = Engine.submit

    def broken_for_7(self, request):
        if request.params.max_tokens == 7:
            raise RuntimeError("injected: this request breaks submit")
        return submit(self, request)
    monkeypatch.setattr(Engine, "submit", broken_for_7)
    running = Streamer(url, n=40)
    assert running.first.wait(30)
    err = server_error(post(url, n=7))
    assert "injected" in err["message"] and "other requests are not affected" in err["message"]
    running.join(60)
    assert running.events[-1] == "[DONE]" and running.events[-2]["choices"][0]["finish_reason"] is not None
    assert post(url, n=3).status_code == 200  # a later request succeeds
    assert httpx.get(f"{url}/health").status_code == 200 and state.worker.error is None
    assert settle(state) and not asgi_errors


def test_a_row_failing_in_a_step_gets_500_and_the_engine_goes_on(live, monkeypatch):
    url, state = live
    advance = Engine._advance

    def broken_for_7(self, seq, token, lp, top):
        if seq.request.params.max_tokens == 7 and len(seq.tokens) == 2:
            raise FloatingPointError("injected: a bug while stepping this row")
        return advance(self, seq, token, lp, top)
    monkeypatch.setattr(Engine, "_advance", broken_for_7)
    failed = state.worker.failed_requests
    assert "FloatingPointError" in server_error(post(url, n=7))["message"]
    assert state.worker.failed_requests == failed + 1
    assert not state.engine.running and state.engine.free_slots == state.engine.max_batch_size
    # Streamed, the failure is the stream's last event before [DONE].
    events = Streamer(url, n=7)
    events.join(60)
    assert events.events[-1] == "[DONE]" and events.events[-2]["error"]["type"] == "server_error"
    ok = post(url, n=5)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    assert state.worker.error is None and settle(state)


def test_rows_sharing_a_failing_step_fail_and_the_queue_goes_on(llama3, monkeypatch):
    """A step cannot say which of its rows failed: the rows it was stepping
    get 500, a request still waiting in the queue is answered in full."""
    app = create_app(llama3, MODEL, max_queue=8)
    state = app.state.server
    advance = Engine._advance

    def broken_for_7(self, seq, token, lp, top):
        if seq.request.params.max_tokens == 7 and len(seq.tokens) == 3:
            raise ValueError("injected")
        return advance(self, seq, token, lp, top)
    monkeypatch.setattr(Engine, "_advance", broken_for_7)
    with serving(app) as (url, _, _):
        with httpx.Client(timeout=60) as c:
            asks = [dict(n=7)] * 4 + [dict(n=4)]  # 4 slots: the fifth waits in the queue
            got = [None] * len(asks)

            def ask(i):
                got[i] = c.post(f"{url}/v1/chat/completions", json=body(**asks[i]))
            threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
            for t in threads[:4]:
                t.start()
            deadline = time.monotonic() + 30  # the fifth joins only behind the four: it must wait in the queue
            while state.worker.inflight < 4 and time.monotonic() < deadline:
                time.sleep(0.005)
            threads[4].start()
            for t in threads:
                t.join(60)
        assert [r.status_code for r in got[:4]] == [500] * 4
        assert got[4].status_code == 200
        assert state.worker.error is None and settle(state)


def test_translation_failure_is_500_json_or_the_streams_last_event(live, monkeypatch):
    url, state = live

    def broken(self, token, lp, top):
        raise KeyError("injected: translating this request's logprobs")
    monkeypatch.setattr(ServerState, "token_info", broken)
    assert "KeyError" in server_error(post(url, n=3, logprobs=True))["message"]
    s = Streamer(url, n=3, logprobs=True)
    s.join(60)
    assert s.events[-1] == "[DONE]" and s.events[-2]["error"]["code"] == "internal_error"
    assert post(url, n=3).status_code == 200
    assert settle(state) and not state.engine.running


def test_a_lost_rank_or_an_unattributable_failure_stays_fatal():
    dist_error = getattr(torch.distributed, "DistError", None)
    assert worker_module.is_fatal(RuntimeError("any"), distributed=True)
    assert worker_module.is_fatal(KeyboardInterrupt(), distributed=False)
    assert not worker_module.is_fatal(RuntimeError("a bug in one row"), distributed=False)
    if dist_error is not None:
        assert worker_module.is_fatal(dist_error("Connection reset by peer"), distributed=False)


# -- clients that leave ---------------------------------------------------------------------------------


def test_a_non_streaming_client_that_leaves_frees_its_slot_within_a_second(live, monkeypatch, asgi_errors):
    url, state = live
    slow_endless(monkeypatch)
    worker = state.worker
    port = int(url.rsplit(":", 1)[1])
    payload = httpx.Request("POST", f"{url}/v1/chat/completions", json=body(200, stop=[NEVER]))
    raw = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
           f"content-length: {len(payload.content)}\r\n\r\n").encode() + payload.content
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(raw)
    deadline = time.monotonic() + 10
    while worker.running != 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert worker.running == 1 and worker.inflight == 1
    steps = worker.steps
    s.close()
    left = time.monotonic()
    while (worker.inflight or state.engine.running) and time.monotonic() - left < 3:
        time.sleep(0.01)
    assert worker.inflight == 0 and not state.engine.running
    assert state.engine.free_slots == state.engine.max_batch_size
    assert time.monotonic() - left < 1.0
    assert worker.steps - steps < 60  # 200 tokens would take 200 steps
    assert not asgi_errors  # no "Exception in ASGI application"
    metrics = httpx.get(f"{url}/metrics").text
    assert 'code="499"' in metrics or 'status="499"' in metrics


# -- connections ---------------------------------------------------------------------------------------


def closed_within(sock, seconds):
    """Whether the server closes `sock` within `seconds`; what it sent before."""
    sock.settimeout(seconds)
    got = b""
    start = time.monotonic()
    try:
        while time.monotonic() - start < seconds:
            chunk = sock.recv(4096)
            if not chunk:
                return True, got
            got += chunk
    except (socket.timeout, TimeoutError):
        return False, got
    except ConnectionResetError:
        return True, got
    return False, got


def test_idle_and_half_sent_connections_are_dropped(llama3):
    app = create_app(llama3, MODEL, max_queue=2)
    limits = Limits(keep_alive_timeout=0.3, request_timeout=0.5, max_connections=3)
    with serving(app, limits) as (url, _, _):
        port = int(url.rsplit(":", 1)[1])
        connect = lambda: socket.create_connection(("127.0.0.1", port))  # noqa: E731
        idle = connect()  # never sends a byte
        t = time.monotonic()
        closed, _ = closed_within(idle, 3)
        assert closed and time.monotonic() - t < 2

        kept = connect()  # a keep-alive connection, idle after its answer
        kept.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        closed, got = closed_within(kept, 3)
        assert closed and got.startswith(b"HTTP/1.1 200")

        half = connect()  # headers never complete, though bytes keep coming
        half.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        t = time.monotonic()
        for _ in range(4):
            time.sleep(0.2)
            with contextlib.suppress(OSError):
                half.sendall(b"x-slow: 1\r\n")
        closed, got = closed_within(half, 3)
        assert closed and got.startswith(b"HTTP/1.1 408") and time.monotonic() - t < 3

        half_body = connect()  # headers complete, the body never does
        half_body.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                          b"content-length: 100\r\n\r\n{\"model\":")
        t = time.monotonic()
        closed, _ = closed_within(half_body, 3)
        assert closed and time.monotonic() - t < 2

        many = [connect() for _ in range(3)]  # the cap is 3 open connections: the fourth is closed at once
        extra = connect()
        closed, _ = closed_within(extra, 0.2)
        assert closed
        for s in many + [idle, kept, half, half_body, extra]:
            s.close()
        assert httpx.get(f"{url}/health").status_code == 200  # once they were dropped, the server answers


def test_shutdown_past_the_drain_time_ends_each_stream_with_an_error_and_done(llama3, monkeypatch, asgi_errors):
    slow_endless(monkeypatch)
    app = create_app(llama3, MODEL, max_queue=2)
    state = app.state.server
    with serving(app, drain_s=0.3) as (url, server, thread):
        streams = [Streamer(url, n=200, stop=[NEVER]) for _ in range(2)]
        for s in streams:
            assert s.first.wait(30)
        server.should_exit = True  # what SIGTERM does
        for s in streams:
            s.join(20)
        thread.join(20)
    for s in streams:
        assert s.events[-1] == "[DONE]"
        err = s.events[-2]["error"]
        assert "shutting down" in err["message"] and err["type"] == "server_error"
        assert len(s.events) < 150  # cut well before its 200 tokens
    assert not thread.is_alive() and not state.engine.running
    assert not asgi_errors
