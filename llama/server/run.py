"""The HTTP server's process: uvicorn serving `create_app` on rank 0.

Design: uvicorn runs its h11 protocol (pure Python, always installed, and
the one whose header limit uvicorn exposes) with the connection limits
below; `Server` turns SIGTERM into a drain that ends cleanly.

Connection limits (`Limits`), so that idle or slow clients cannot use up
the descriptors:

- keep_alive_timeout: a connection with no request in progress is closed
  after this many seconds: between requests (uvicorn's `timeout_keep_alive`)
  and, here too, before its first byte (uvicorn arms its timer only after a
  response, so a connection that never sends stayed open for ever).
- request_timeout: a request must arrive in full (headers and body) within
  this many seconds of its first byte; a half-sent one is dropped (408
  when its headers never completed; the app sees a disconnect otherwise).
- max_connections: open connections; one beyond is closed at once, and a
  request arriving at the cap is answered 503 (uvicorn's `limit_concurrency`).
- headers: at most H11_MAX_HEADER_BYTES of request line and headers
  (h11's `max_incomplete_event_size`); more is answered 400.

Shutdown: SIGTERM (or Ctrl-C) stops accepting connections and lets running
requests finish for up to `shutdown_timeout` seconds; then every open
request is ended with a 503 (`ServerState.abort`): a stream gets OpenAI's
error JSON as an event and `data: [DONE]` before its connection closes, a
waiting request its 503 JSON. uvicorn cancels whatever still runs
ABORT_GRACE_S later. The lifespan then cancels the engine's rows and
releases the other ranks, and `run_server` returns.

Failure modes: a lost rank fails the engine thread: in-flight requests get
503 (a stream: an error event and `[DONE]`), naming the lost rank where
`explain_fatal` can (`llama serve` passes parallel/liveness.py's). The
server then stays up `fatal_linger_s` seconds more, answering every request
503 and /health 503 with the same message, so that a load balancer or a
person looking sees why; then it shuts down and `run_server` raises that
error (the command exits 3). `llama serve` lingers min(5 s,
LLAMA_DIST_TIMEOUT / 4), so the process is gone well within the timeout
after the failure showed. A port in use is a ValueError.
"""

import asyncio
import contextlib
import signal
import threading
from typing import Optional

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .app import create_app
from .limits import Limits

# Request line and headers of one request (uvicorn's own default).
H11_MAX_HEADER_BYTES = 16 * 1024
# After the drain's abort, how long the streams get to send their last event.
ABORT_GRACE_S = 2.0


_TIMEOUT_BODY = b"the request did not arrive in full in time"
_TIMEOUT_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY))


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the idle timer armed from the start, a
    deadline for each request to arrive in full, and a hard connection cap.
    `request_timeout` is set on a subclass per server (`protocol_for`)."""

    request_timeout: float = Limits.request_timeout

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._read_timer: Optional[asyncio.TimerHandle] = None
        if self.limit_concurrency is not None and len(self.connections) > self.limit_concurrency:
            self.logger.warning("refused a connection: %d are open (--max_connections)", len(self.connections) - 1)
            transport.close()
            return
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def data_received(self, data: bytes) -> None:
        if self._read_timer is None and self.conn.their_state is h11.IDLE:
            self._read_timer = self.loop.call_later(self.request_timeout, self._read_timed_out)
        super().data_received(data)
        if self._read_timer is not None and self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            self._read_timer.cancel()  # the request is in (or the connection is done for)
            self._read_timer = None

    def connection_lost(self, exc) -> None:
        if getattr(self, "_read_timer", None) is not None:
            self._read_timer.cancel()
            self._read_timer = None
        super().connection_lost(exc)

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        self.logger.info("dropped a request that did not arrive in full within %gs", self.request_timeout)
        if self.conn.their_state is h11.IDLE:  # its headers never completed: nothing else answers it
            self.transport.write(_TIMEOUT_408)
        elif self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # the app's next receive is a disconnect
            self.cycle.message_event.set()
        self.transport.close()


def protocol_for(limits: Limits) -> type:
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"request_timeout": limits.request_timeout})


def server_config(app, host: str, port: int, limits: Limits, shutdown_timeout: float, **kw) -> uvicorn.Config:
    """uvicorn's Config for `app` with `limits` (see the module's docstring)."""
    return uvicorn.Config(app, host=host, port=port, http=protocol_for(limits),
                          timeout_keep_alive=limits.keep_alive_timeout, limit_concurrency=limits.max_connections,
                          h11_max_incomplete_event_size=H11_MAX_HEADER_BYTES,
                          timeout_graceful_shutdown=shutdown_timeout + ABORT_GRACE_S, **kw)


class Server(uvicorn.Server):
    """uvicorn's server, with a shutdown that ends open requests cleanly
    after `drain_s` and a SIGTERM that exits 0.

    uvicorn re-raises SIGTERM once it has shut down (the process then dies of
    the signal); for a service SIGTERM is the normal stop, so it exits 0."""

    def __init__(self, config: uvicorn.Config, state, drain_s: float):
        super().__init__(config)
        self.state, self.drain_s = state, drain_s

    async def shutdown(self, sockets=None) -> None:
        message = (f"the server is shutting down and this request did not finish within its "
                   f"{self.drain_s:g} s drain time; retry on another server")
        timer = asyncio.get_running_loop().call_later(self.drain_s, self.state.abort, message)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            yield
            captured = getattr(self, "_captured_signals", None)
            if captured is not None:
                captured[:] = [s for s in captured if s != signal.SIGTERM]


def run_server(generator, name: str, *, host: str, port: int, api_key: Optional[str], max_queue: int,
               shutdown_timeout: float, idle_step_s: Optional[float], limits: Limits = Limits(),
               explain_fatal=None, fatal_linger_s: float = 0.0) -> None:
    """Serves `generator` (a `Llama`) as model `name` until SIGTERM; raises
    what failed the engine (after `explain_fatal`), `fatal_linger_s` seconds
    after it failed (see the module's docstring)."""
    limits.check()
    fatal = []
    server = None

    def exit_now() -> None:
        if server is not None:
            server.should_exit = True

    def on_fatal(error: BaseException) -> None:
        fatal.append(error)
        if fatal_linger_s > 0:
            timer = threading.Timer(fatal_linger_s, exit_now)
            timer.daemon = True
            timer.start()
        else:
            exit_now()

    app = create_app(generator, name, api_key=api_key, max_queue=max_queue, idle_step_s=idle_step_s,
                     on_fatal=on_fatal, explain_fatal=explain_fatal)
    config = server_config(app, host, port, limits, shutdown_timeout, log_level="info", lifespan="on")
    server = Server(config, app.state.server, shutdown_timeout)
    try:
        server.run()
    finally:
        worker = app.state.server.worker
        if not worker.started:  # the server never started (port taken?): release the other ranks
            generator.engine.shutdown()
            generator.engine.step()
    if fatal:
        raise fatal[0]
    if not server.started:
        raise ValueError(f"could not serve on {host}:{port} (see the message above)")
