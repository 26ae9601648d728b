"""Which rank was lost: every rank's heartbeat in the job's key-value store.

When a rank dies, its peers learn it only from their own failed exchange,
and gloo's error names at most a socket address (every rank of a node has
the same one) or nothing at all (a timeout). So each rank, once the
process group is up (`start`, from `init_distributed`, torchrun only),

- posts who it is, once: `llama/live/<restart>/who/<rank>` = its host
  name, pid, pipeline stage and local rank (JSON);
- counts a heartbeat, from a daemon thread, every BEAT_S seconds:
  `llama/live/<restart>/beat/<rank>` (one small `add` to the store).

The store is torchrun's own (its agent hosts it at MASTER_ADDR:MASTER_PORT;
without torchrun's agent, rank 0's process group hosts it there), reached
through a client connection of this module's own, so the heartbeat never
contends with the process group's traffic. <restart> is torchrun's restart
count: a restarted job does not read the keys of the one before.

At a communication error a rank asks `lost_ranks()`: it reads every rank's
counter for up to LOOK_S seconds; a rank whose counter moved is alive, one
whose counter stood still the whole time is lost (its process exited or was
killed, its node went away, or it is stuck with Python's lock held), unless
it posted `llama/live/<restart>/left/<rank>` first: a rank that leaves on a
fault it noticed itself says so (`leaving`), so it is not blamed. `explain`
turns the error into a `LostRank` whose message names the rank, its stage,
host and pid, and the error that revealed it. Only the failure path pays
the LOOK_S wait; serving pays one store round trip per rank per BEAT_S.

Limits: a single-node torchrun job stops its other workers (SIGTERM) as soon
as one fails, so ranks stopped that way within LOOK_S may be named too
(torchrun's summary names the first); the ranks of other nodes are not
stopped, and only the dead one is named. A rank that hangs while its
heartbeat goes on (a deadlock in a collective) is not lost: the error then
comes from LLAMA_DIST_TIMEOUT and `explain` says that no rank's heartbeat
stopped.

Failure modes: no store (plain python, or the store's host is gone) makes
`lost_ranks` return None and `explain` fall back to the error's own text
(with the peer address gloo names, if any); nothing here ever raises into
the caller's failure path.
"""

import atexit
import json
import logging
import os
import re
import socket
import threading
import time
from datetime import timedelta
from typing import Dict, List, Optional

logger = logging.getLogger("llama")

# A heartbeat every BEAT_S seconds; a rank whose counter does not move for LOOK_S is lost.
BEAT_S = 0.2
LOOK_S = 1.0
# How long one store operation may take before the store counts as gone.
STORE_TIMEOUT_S = 5.0

_state: Dict[str, object] = {}  # rank, world, store, lock, thread, stop (one per process)


class LostRank(RuntimeError):
    """A communication error, with the rank(s) found lost (`ranks`) named in its message."""

    def __init__(self, message: str, ranks: List[int]):
        super().__init__(message)
        self.ranks = ranks


def _prefix() -> str:
    return f"llama/live/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def _connect(timeout_s: float = STORE_TIMEOUT_S):
    """A client of the job's store at MASTER_ADDR:MASTER_PORT, or None."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        return None
    try:
        import torch.distributed as dist

        return dist.TCPStore(addr, int(port), is_master=False, timeout=timedelta(seconds=timeout_s))
    except Exception as e:  # noqa: BLE001 - liveness is a diagnosis, never a reason to fail
        logger.debug("no liveness store: %s", e)
        return None


def start(rank: int, world: int, stage: int = 0, stages: int = 1) -> bool:
    """Posts this rank's identity and starts its heartbeat (once per process);
    False where there is no store to post in (then nothing runs)."""
    if _state or world < 2:
        return bool(_state)
    store = _connect()
    if store is None:
        return False
    who = {"host": socket.gethostname(), "pid": os.getpid(), "stage": stage, "stages": stages,
           "local_rank": int(os.environ.get("LOCAL_RANK", 0))}
    try:
        store.set(f"{_prefix()}/who/{rank}", json.dumps(who))
        store.add(f"{_prefix()}/beat/{rank}", 1)
    except Exception as e:  # noqa: BLE001
        logger.debug("could not post liveness: %s", e)
        return False
    done = threading.Event()
    _state.update(rank=rank, world=world, store=store, lock=threading.Lock(), stop=done)
    thread = threading.Thread(target=_beat, args=(store, f"{_prefix()}/beat/{rank}", done), name="llama-heartbeat",
                              daemon=True)
    _state["thread"] = thread
    thread.start()
    # Joined before the interpreter finalizes: a thread still inside the store's C++ client then can abort the exit.
    atexit.register(stop, 1.0)
    return True


def _beat(store, key: str, done: threading.Event) -> None:
    lock = _state["lock"]
    while not done.wait(BEAT_S):
        try:
            with lock:
                store.add(key, 1)
        except Exception:  # noqa: BLE001 - the store's host is gone: nobody can ask any more
            return


def stop(wait_s: float = 2 * BEAT_S + STORE_TIMEOUT_S) -> None:
    """Ends the heartbeat (at exit, and in tests)."""
    if _state:
        _state["stop"].set()
        _state["thread"].join(wait_s)
        _state.clear()


def leaving(reason: str) -> None:
    """This rank leaves on a fault it noticed: the others must not count it as lost."""
    if not _state:
        return
    try:
        with _state["lock"]:
            _state["store"].set(f"{_prefix()}/left/{_state['rank']}", reason[:500])
    except Exception:  # noqa: BLE001
        pass


def lost_ranks(look_s: float = LOOK_S) -> Optional[List[int]]:
    """The ranks whose heartbeat stood still for `look_s` seconds and that did
    not say they were leaving (this rank excluded); None without a store."""
    if not _state:
        return None
    store, lock, me, world = _state["store"], _state["lock"], _state["rank"], _state["world"]
    others = [r for r in range(world) if r != me]
    try:
        with lock:
            first = {r: store.add(f"{_prefix()}/beat/{r}", 0) for r in others}
        still = set(others)
        deadline = time.monotonic() + look_s
        while still and time.monotonic() < deadline:
            time.sleep(min(BEAT_S / 2, max(0.0, deadline - time.monotonic())))
            with lock:
                still = {r for r in still if store.add(f"{_prefix()}/beat/{r}", 0) == first[r]}
        with lock:
            left = {r for r in still if store.check([f"{_prefix()}/left/{r}"])}
    except Exception as e:  # noqa: BLE001
        logger.debug("liveness check failed: %s", e)
        return None
    return sorted(still - left)


def who(rank: int) -> Optional[dict]:
    """What `rank` posted about itself (host, pid, stage, stages, local_rank), or None."""
    if not _state:
        return None
    key = f"{_prefix()}/who/{rank}"
    try:
        with _state["lock"]:
            if not _state["store"].check([key]):
                return None
            return json.loads(_state["store"].get(key))
    except Exception:  # noqa: BLE001
        return None


def describe(rank: int) -> str:
    """'rank 1 (stage 1 of 2, host h, pid 7)', with what is known."""
    info = who(rank)
    if info is None:
        return f"rank {rank}"
    parts = [f"stage {info['stage']} of {info['stages']}"] if info.get("stages", 1) > 1 else []
    parts += [f"host {info['host']}", f"pid {info['pid']}"]
    return f"rank {rank} ({', '.join(parts)})"


_PEER = re.compile(r"\[([0-9A-Za-z.:%-]+)\]:(\d+)")


def peer_address(error: BaseException) -> Optional[str]:
    """The peer address gloo names in `error` ('127.0.0.1:14991'), if any."""
    m = _PEER.search(str(error))
    return f"{m.group(1)}:{m.group(2)}" if m else None


_SOURCE = re.compile(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\] ")


def first_line(error: BaseException) -> str:
    """The error's first line, without gloo's source location and advice."""
    text = str(error).strip()
    if not text:
        return type(error).__name__
    line = _SOURCE.sub("", text.splitlines()[0])
    return line.split(" This is typically caused by")[0][:300]


# What gloo says when a peer dies ("Connection reset by peer", "Connection
# closed by peer", "Broken pipe") or hangs ("Timed out waiting ... for recv").
# Not every error of gloo's: a local set-up error (an unknown interface) is
# no lost rank, and distributed.SetupError reports those at start-up.
_PEER_LOST = ("Connection reset", "Connection closed", "Connection refused", "Broken pipe", "Timed out",
              "timed out", "Socket Timeout", "NCCL")


def is_communication_error(error: BaseException) -> bool:
    """Whether `error` says that an exchange with another rank failed."""
    if isinstance(error, LostRank):
        return True
    try:
        import torch.distributed as dist

        if isinstance(error, dist.DistError):
            return True
    except (ImportError, AttributeError):
        pass
    return isinstance(error, Exception) and any(s in str(error) for s in _PEER_LOST)


def explain(error: BaseException, look_s: float = LOOK_S) -> BaseException:
    """`error` (a failed exchange) as a LostRank naming the lost rank(s); the
    error itself when it already is one or is no communication error. Waits
    up to `look_s` (see the module's docstring); never raises."""
    if isinstance(error, LostRank) or not is_communication_error(error):
        return error
    leaving(f"saw: {first_line(error)}")
    try:
        lost = lost_ranks(look_s)
    except Exception:  # noqa: BLE001
        lost = None
    cause = first_line(error)
    if lost:
        names = ", ".join(describe(r) for r in lost)
        what = "lost " + names + (", whose heartbeat stopped" if len(lost) == 1 else ", whose heartbeats stopped")
        message = (f"{what}: it exited, was killed or stopped, or its node went away (see its output; the error here: "
                   f"{cause})")
    elif lost is not None:
        message = (f"a rank stopped answering, but every rank's heartbeat goes on: one hangs or is very slow, or "
                   f"the network between them failed (the error here: {cause})")
    else:
        peer = peer_address(error)
        message = (f"the rank at {peer} stopped answering" if peer else "another rank stopped answering") + \
            f" ({cause})"
    out = LostRank(message, lost or [])
    out.__cause__ = error
    return out
