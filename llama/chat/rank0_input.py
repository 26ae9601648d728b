"""What rank 0 reads (a typed line, the date, a tool result), every rank gets.

Under torchrun every rank runs the same generation steps, so whatever enters
a dialog from outside the model is taken from rank 0. The other ranks wait
for it on a gloo group with a heartbeat, so a rank that dies while rank 0's
user is typing is noticed. Used by the interactive chat (llama/chat/session.py)
and the terminal layer (terminal.py).
"""

import functools
import signal
import sys
import threading
from datetime import timedelta
from typing import Optional


def from_rank0(value):
    """`value` as rank 0 has it, on every rank. Every rank must call this at
    the same point; without a multi-process group it returns `value`."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=_waiting_group())
    return box[0]


@functools.lru_cache(maxsize=None)
def _waiting_group():
    """A gloo group (CPU objects, whatever the model's backend) with the
    program's usual timeout (LLAMA_DIST_TIMEOUT). The other ranks can still
    wait here as long as rank 0's user takes to type: `read_line_rank0` makes
    every rank meet every couple of seconds meanwhile, so each wait is short,
    and a rank that dies or hangs is noticed within the timeout."""
    import torch.distributed as dist

    from ..parallel.distributed import dist_timeout_s

    return dist.new_group(backend="gloo", timeout=timedelta(seconds=dist_timeout_s()))


def _heartbeat_s() -> float:
    from ..parallel.distributed import dist_timeout_s

    return max(0.05, min(2.0, dist_timeout_s() / 4))


def _read_line(prompt: str) -> Optional[str]:
    # Bytes that are not UTF-8 (a pasted Latin-1 text) become U+FFFD, not a traceback.
    if getattr(sys.stdin, "errors", "replace") != "replace" and hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")
    # Not input(prompt): on a terminal that writes the prompt to stderr.
    print(prompt, end="", flush=True)
    try:
        return input()
    except EOFError:
        return None


def read_line_rank0(prompt: str) -> Optional[str]:
    """A line typed on rank 0, on every rank; None at end of input (Ctrl-D).

    Under torchrun every rank meets in a small all-reduce every couple of
    seconds while rank 0's user types (rank 0's main thread reads the line as
    always, so Ctrl-C and line editing behave as in one process; a helper
    thread takes part in the all-reduces). An all-reduce needs every rank's
    answer, so a rank that died (connection closed) or hangs (the group's
    timeout) ends the wait with gloo's error, which the CLI reports as lost
    contact; rank 0's read is interrupted for it (SIGUSR1).
    """
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return _read_line(prompt)
    if dist.get_rank() != 0:
        while not _all_reduce_flag(0):
            pass
        return from_rank0(None)
    if not hasattr(signal, "pthread_kill"):  # no way to interrupt the read: plain broadcast
        line = _read_line(prompt)
        _all_reduce_flag(1)
        return from_rank0(line)
    stop, failure = threading.Event(), []
    main = threading.main_thread().ident

    def heartbeat():
        try:
            while not stop.wait(_heartbeat_s()):
                _all_reduce_flag(0)
        except Exception as e:  # a lost rank: hand gloo's error to the main thread
            failure.append(e)
            signal.pthread_kill(main, signal.SIGUSR1)

    def interrupted(signum, frame):
        if failure:
            raise failure[0]

    previous = signal.signal(signal.SIGUSR1, interrupted)
    beat = threading.Thread(target=heartbeat, daemon=True, name="chat-heartbeat")
    beat.start()
    try:
        line = _read_line(prompt)
    finally:
        stop.set()
        beat.join()
        signal.signal(signal.SIGUSR1, previous)
    if failure:
        raise failure[0]
    _all_reduce_flag(1)
    return from_rank0(line)


def _all_reduce_flag(flag: int) -> int:
    """The largest `flag` over all ranks, on the waiting group."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([flag], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_waiting_group())
    return int(t.item())
