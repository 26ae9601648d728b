"""What the command-line programs share (the `llama` command and the example
scripts): logging on rank 0 and clean errors.

A bad input (missing file, malformed checkpoint, impossible setting) ends with
one message and a non-zero exit, not a traceback. Under torchrun every rank
usually meets the same error; rank 0 prints it and the other ranks stay quiet
(see `report_error`), so the message appears once above torchrun's summary.

No torch at import (torch.distributed is imported where it is used): the
`llama` command imports this module before anything else, and a Ctrl-C
during the seconds torch takes to import must reach `cli.main.main`'s
handler rather than print a traceback.
"""

import contextlib
import logging
import os
import sys
import time
from datetime import timedelta

# Exit codes: 2 a bad input (as argparse's usage errors), 3 a lost rank, 130 Ctrl-C.
BAD_INPUT, LOST_RANK, INTERRUPTED = 2, 3, 130

# How long a rank other than 0 waits to learn whether rank 0 met the same
# error (and printed it) before printing its own.
_SAME_ERROR_WAIT_S = 5.0


def rank_and_world():
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def setup_logging() -> None:
    """INFO on rank 0, warnings only elsewhere; the metrics block is printed by the programs themselves."""
    rank, _ = rank_and_world()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    logging.getLogger("llama.metrics").setLevel(logging.WARNING)


def _is_communication_error(e: BaseException) -> bool:
    from ..parallel.liveness import is_communication_error

    return is_communication_error(e)


def _job_store():
    """torchrun's key-value store (its agent hosts it at MASTER_ADDR:MASTER_PORT), or None."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    try:
        import torch.distributed as dist

        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=timedelta(seconds=_SAME_ERROR_WAIT_S))
    except Exception:  # noqa: BLE001 - no store: every rank prints its own message
        return None


def report_error(message: str) -> None:
    """Prints `error: message` on stderr, once per job rather than once per rank.

    Rank 0 prints it and posts it in torchrun's store. Another rank prints its
    own message only if rank 0 did not post the same one within a few seconds
    (an error of that rank alone), or if it is the first rank of another node
    (whose console would otherwise show nothing). Waiting also lets rank 0 exit
    first, so torchrun names rank 0 as the root cause and stops the others.
    """
    rank, world = rank_and_world()
    if world == 1:
        print(f"error: {message}", file=sys.stderr, flush=True)
        return
    store = _job_store()
    key = f"llama/error/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    if rank == 0:
        with contextlib.suppress(Exception):
            if store is not None:
                store.set(key, message)
        print(f"[rank 0] error: {message}", file=sys.stderr, flush=True)
        return
    said = None
    with contextlib.suppress(Exception):
        deadline = time.monotonic() + _SAME_ERROR_WAIT_S
        while store is not None and time.monotonic() < deadline:  # polled: store.wait logs a warning on timeout
            if store.check([key]):
                said = store.get(key).decode()
                break
            time.sleep(0.1)
    other_node = os.environ.get("GROUP_RANK", "0") != "0" and os.environ.get("LOCAL_RANK", "0") == "0"
    if said != message or other_node:
        print(f"[rank {rank}] error: {message}", file=sys.stderr, flush=True)
    else:
        time.sleep(_SAME_ERROR_WAIT_S)  # torchrun stops this rank once rank 0 has exited


def _lost_rank_message(e: BaseException) -> str:
    """Names the lost rank where the ranks' heartbeats tell it (parallel/liveness.py)."""
    from ..parallel.distributed import DEFAULT_TIMEOUT_S
    from ..parallel.liveness import explain

    return (f"lost contact with another rank: {explain(e)}. Check the other workers' output. A hung rank is "
            f"given up on after {DEFAULT_TIMEOUT_S:.0f} s (set LLAMA_DIST_TIMEOUT to change this).")


def run_clean(fn, *args, **kwargs):
    """Calls fn; a bad input, a lost rank or Ctrl-C end the process with one message and a non-zero exit."""
    _, world = rank_and_world()
    try:
        result = fn(*args, **kwargs)
    except (FileNotFoundError, ValueError) as e:
        report_error(str(e))
        sys.exit(BAD_INPUT)
    except RuntimeError as e:
        if world == 1 or not _is_communication_error(e):
            raise
        report_error(_lost_rank_message(e))
        sys.exit(LOST_RANK)
    except KeyboardInterrupt:
        interrupted()
    dist = sys.modules.get("torch.distributed")  # a process group exists only if fn imported it
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return result


def interrupted() -> None:
    """Ctrl-C: one line on stderr and exit 130, as shells expect (on a terminal,
    on a line of its own after the ^C the terminal echoed)."""
    tty = sys.stderr is not None and sys.stderr.isatty()
    print(f"{chr(10) if tty else ''}interrupted", file=sys.stderr, flush=True)
    sys.exit(INTERRUPTED)


def run(main) -> None:
    """Runs `main` as a fire CLI (the example scripts), with `run_clean`'s error handling."""
    import fire

    setup_logging()
    run_clean(fire.Fire, main)
