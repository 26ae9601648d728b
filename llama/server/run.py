"""The HTTP server's process: uvicorn serving `create_app` on rank 0.

SIGTERM (or Ctrl-C) stops accepting connections, lets running requests
finish for up to `shutdown_timeout` seconds, cancels the rest, releases the
other ranks and returns. A lost rank fails the engine thread: requests get
503 and `run_server` raises the distributed error.
"""

import contextlib
import signal
from typing import Optional

import uvicorn

from .app import create_app


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises SIGTERM once it has shut down (the process then dies of
        the signal); for a service SIGTERM is the normal stop, so it exits 0."""

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                captured = getattr(self, "_captured_signals", None)
                if captured is not None:
                    captured[:] = [s for s in captured if s != signal.SIGTERM]

    return Server


def run_server(generator, name: str, *, host: str, port: int, api_key: Optional[str], max_queue: int,
               shutdown_timeout: float, idle_step_s: Optional[float]) -> None:
    """Serves `generator` (a `Llama`) as model `name` until SIGTERM; raises what failed the engine."""
    fatal = []
    server = None

    def on_fatal(error: BaseException) -> None:
        fatal.append(error)
        if server is not None:
            server.should_exit = True

    app = create_app(generator, name, api_key=api_key, max_queue=max_queue, idle_step_s=idle_step_s,
                     on_fatal=on_fatal)
    config = uvicorn.Config(app, host=host, port=port, log_level="info", lifespan="on",
                            timeout_graceful_shutdown=shutdown_timeout)
    server = _server_class()(config)
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
