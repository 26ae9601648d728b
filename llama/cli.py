"""What the example scripts share: logging on rank 0, fire, and clean errors."""

import logging
import os
import sys

import torch.distributed as dist

from .distributed import DEFAULT_TIMEOUT_S


def _is_communication_error(e: BaseException) -> bool:
    # gloo reports a dead or hung peer as a plain RuntimeError ("Connection
    # reset by peer", "Timed out waiting ... for recv"); NCCL as a DistError.
    text = str(e)
    return isinstance(e, dist.DistError) or any(s in text for s in ("gloo", "Connection reset", "Timed out", "NCCL"))


def run(main) -> None:
    """Runs `main` as a fire CLI. A bad input (missing file, malformed
    checkpoint, impossible setting) ends with its message, not a traceback, and
    so does losing another rank: this rank exits instead of hanging."""
    import fire

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    prefix = f"[rank {rank}] " if world > 1 else ""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    # The examples print the metrics block on stdout, next to the answers it measures.
    logging.getLogger("llama.metrics").setLevel(logging.WARNING)
    try:
        fire.Fire(main)
    except (FileNotFoundError, ValueError) as e:
        print(f"{prefix}error: {e}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as e:
        if world == 1 or not _is_communication_error(e):
            raise
        print(
            f"{prefix}error: lost contact with another rank ({str(e).splitlines()[0][:300]}). It stopped or hangs: "
            f"check the other workers' output. A hung rank is given up on after {DEFAULT_TIMEOUT_S:.0f} s "
            "(set LLAMA_DIST_TIMEOUT to change this).",
            file=sys.stderr,
        )
        sys.exit(3)
    if dist.is_initialized():
        dist.destroy_process_group()
