"""`llama serve`: the server's flags, the model built from them, and the HTTP
server started on rank 0 (llama/server/run.py); the other ranks follow rank
0's engine steps (`Engine.follow`) until it shuts down. With
--pipeline_stages (alone or times tensor parallelism) every stage's ranks
follow the same way: rank 0 (stage 0) decides each step's plan, every rank
runs it, and a cancelled request frees its rows on every stage at the next
step. A lost rank is named from the ranks' heartbeats
(llama/parallel/liveness.py) in the requests' errors, /health and the
exit message."""

import argparse
import os
from pathlib import Path

from ..engine.engine import PREFILL_CHUNK
from ..parallel import liveness
from ..parallel.distributed import dist_timeout_s
from ..server.limits import Limits
from .options import build_generator
from .run import rank_and_world

API_KEY_ENV = "LLAMA_API_KEY"
# The prefix cache's default budget: a few thousand tokens of an 8B model's
# keys and values (4 MiB per 32 tokens in bf16); held only as it fills.
PREFIX_CACHE_MB = 512


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
                   help="on SIGTERM, seconds that running requests get to finish; then each gets a 503 "
                        "(a stream: an error event and [DONE]) (default 30)")
    g.add_argument("--keep_alive_timeout", metavar="S", type=float, default=Limits.keep_alive_timeout,
                   help="close a connection idle this many seconds, before its first request too (default 5)")
    g.add_argument("--request_timeout", metavar="S", type=float, default=Limits.request_timeout,
                   help="drop a request whose headers and body do not arrive in full within S seconds (default 30)")
    g.add_argument("--prefix_cache_mb", metavar="MB", type=float, default=PREFIX_CACHE_MB,
                   help="MiB of KV-cache blocks kept for requests that start as earlier ones did (a conversation's "
                        "earlier turns, a shared system prompt): those prefill only the rest; least recently used "
                        f"blocks go first; 0 turns it off (default {PREFIX_CACHE_MB:g})")
    g.add_argument("--prefill_chunk", metavar="N", type=int, default=PREFILL_CHUNK,
                   help="prompt tokens prefilled per step while other requests decode: a longer prompt is prefilled "
                        "in chunks over several steps, so the running streams keep getting tokens; smaller keeps "
                        f"their steps shorter, larger admits a long prompt sooner (default {PREFILL_CHUNK})")
    g.add_argument("--max_connections", metavar="N", type=int, default=Limits.max_connections,
                   help="open connections at most; beyond, new ones are closed and requests get 503 (default 512)")


def _limits(a: argparse.Namespace) -> Limits:
    return Limits(a.keep_alive_timeout, a.request_timeout, a.max_connections)


def _check(a: argparse.Namespace) -> None:
    if not 0 < a.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {a.port}")
    if a.max_queue < 0:
        raise ValueError(f"--max_queue must be 0 or more, got {a.max_queue}")
    if not a.prefix_cache_mb >= 0:  # NaN too
        raise ValueError(f"--prefix_cache_mb must be 0 (no prefix cache) or more MiB, got {a.prefix_cache_mb}")
    if a.prefill_chunk < 1:
        raise ValueError(f"--prefill_chunk must be a positive number of prompt tokens per step, got {a.prefill_chunk}")
    if a.shutdown_timeout < 0:
        raise ValueError(f"--shutdown_timeout must be 0 or more seconds, got {a.shutdown_timeout}")
    _limits(a).check()


def serve(a: argparse.Namespace) -> None:
    _check(a)
    try:
        from ..server.run import run_server
    except ImportError as e:
        raise ValueError(f"llama serve needs the {e.name} package: pip install -e \".[server]\" "
                         "(FastAPI, uvicorn, prometheus_client)") from None
    generator = build_generator(a)
    try:  # on every rank: each holds its share of the same blocks
        generator.engine.set_prefix_cache(int(a.prefix_cache_mb * 2**20))
    except ValueError as e:
        raise ValueError(f"--prefix_cache_mb {a.prefix_cache_mb:g}: {e}") from None
    generator.engine.set_prefill_chunk(a.prefill_chunk)  # rank 0's is the one every rank runs
    rank, world = rank_and_world()
    if rank != 0:
        generator.engine.follow()
        return
    api_key = a.api_key if a.api_key is not None else os.environ.get(API_KEY_ENV) or None
    # The other ranks wait in follow(): an idle rank 0 steps well within the distributed timeout.
    # After a lost rank, the server answers 503 naming it as long again, then exits (llama/server/run.py).
    idle = min(5.0, dist_timeout_s() / 4) if world > 1 else None
    run_server(generator, a.model_name or Path(a.ckpt_dir).resolve().name, host=a.host, port=a.port,
               api_key=api_key, max_queue=a.max_queue, shutdown_timeout=a.shutdown_timeout, idle_step_s=idle,
               limits=_limits(a), explain_fatal=liveness.explain if world > 1 else None,
               fatal_linger_s=idle or 0.0)
