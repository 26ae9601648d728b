"""`llama serve` / `python -m llama.serve`: load the model and serve it.

Under torchrun every rank loads its shard; rank 0 serves HTTP and runs the
engine thread, the other ranks follow its steps (`Engine.follow`) until it
shuts down. SIGTERM (or Ctrl-C) stops accepting connections, lets running
requests finish for up to --shutdown_timeout seconds, cancels the rest,
releases the other ranks and exits 0. A lost rank fails the engine thread:
requests get 503 and the server exits with the distributed error.
"""

import argparse
import contextlib
import os
import signal
from pathlib import Path

from ..cli import rank_and_world
from ..distributed import dist_timeout_s

API_KEY_ENV = "LLAMA_API_KEY"


def add_serve_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)")
    g.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    g.add_argument("--api_key", default=None,
                   help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}, if set; else no key)")
    g.add_argument("--model_name", default=None, help="the model's name in the API (default: the --ckpt_dir folder name)")
    g.add_argument("--max_queue", metavar="N", type=int, default=64,
                   help="requests that may wait for a free slot; beyond that the server answers 429 (default 64)")
    g.add_argument("--shutdown_timeout", metavar="S", type=float, default=30.0,
                   help="on SIGTERM, seconds that running requests get to finish (default 30)")


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


def _check(a: argparse.Namespace) -> None:
    if not 0 < a.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {a.port}")
    if a.max_queue < 0:
        raise ValueError(f"--max_queue must be 0 or more, got {a.max_queue}")
    if a.shutdown_timeout < 0:
        raise ValueError(f"--shutdown_timeout must be 0 or more seconds, got {a.shutdown_timeout}")


def serve(a: argparse.Namespace) -> None:
    _check(a)
    try:
        import uvicorn

        from .app import create_app
    except ImportError as e:
        raise ValueError(f"llama serve needs the {e.name} package: pip install -e \".[server]\" "
                         "(FastAPI, uvicorn, prometheus_client)") from None
    from ..commands.options import build_generator

    generator = build_generator(a)
    rank, world = rank_and_world()
    if rank != 0:
        generator.engine.follow()
        return
    api_key = a.api_key if a.api_key is not None else os.environ.get(API_KEY_ENV) or None
    name = a.model_name or Path(a.ckpt_dir).resolve().name
    fatal = []
    server = None

    def on_fatal(error: BaseException) -> None:
        fatal.append(error)
        if server is not None:
            server.should_exit = True

    # The other ranks wait in follow(): an idle rank 0 steps well within the distributed timeout.
    idle = min(5.0, dist_timeout_s() / 4) if world > 1 else None
    app = create_app(generator, name, api_key=api_key, max_queue=a.max_queue, idle_step_s=idle, on_fatal=on_fatal)
    config = uvicorn.Config(app, host=a.host, port=a.port, log_level="info", lifespan="on",
                            timeout_graceful_shutdown=a.shutdown_timeout)
    server = _server_class()(config)
    try:
        server.run()
    finally:
        worker = app.state.worker
        if not worker.started:  # the server never started (port taken?): release the other ranks
            generator.engine.shutdown()
            generator.engine.step()
    if fatal:
        raise fatal[0]
    if not server.started:
        raise ValueError(f"could not serve on {a.host}:{a.port} (see the message above)")
