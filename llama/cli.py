"""What the example scripts share: logging on rank 0, fire, and clean errors."""

import logging
import os
import sys

import torch.distributed as dist


def run(main) -> None:
    """Runs `main` as a fire CLI. A bad input (missing file, malformed
    checkpoint, impossible setting) ends with its message, not a traceback."""
    import fire

    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    try:
        fire.Fire(main)
    except (FileNotFoundError, ValueError) as e:
        prefix = f"[rank {rank}] " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
        print(f"{prefix}error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
