"""The engine thread: the only caller of `Engine.submit`, `step` and `cancel`
(the engine is not thread-safe).

HTTP handlers hand it submissions and cancellations through a locked inbox;
it steps the engine while there is work and passes each `TokenEvent` to the
request's sink (a callable, run in this thread: the app's sink hops to the
event loop with `loop.call_soon_threadsafe`). Under torchrun the other ranks
wait in `Engine.follow()`, so an idle leader still steps every
`idle_step_s` seconds to stay within the distributed timeout.

Failure modes: an exception while serving one request fails that request
alone (`RequestFailed`, a 500) and the engine goes on. `engine.submit`
runs per request, so its failure names its request. A failing
`engine.step` cannot say which row failed: the requests it was stepping
(every one no longer waiting in the queue) are cancelled and failed, the
queue and later requests go on. A failure is fatal instead, failing every
request (`EngineFailed`, 503) and calling `on_error` so the server exits,
when it may have left the ranks out of step or the engine unusable: under
torchrun (a lost rank, a collective that failed), a `torch.distributed`
error, a BaseException that is not an Exception, a failing step that no
request can be blamed for, or `MAX_FAILED_STEPS` failing steps in a row. Before a fatal error is
reported, `explain` (when set) may replace it: `llama serve` under torchrun
sets it to parallel/liveness.py's `explain`, so the requests, /health and
the exit message name the rank that was lost (its stage, host and pid).
"""

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch.distributed as dist

from ..engine.engine import Engine, Request, TokenEvent

logger = logging.getLogger("llama.server")

Sink = Callable[[Optional[TokenEvent], Optional[BaseException]], None]


class Overloaded(Exception):
    """Every KV-cache slot and queue place is taken."""


class EngineFailed(Exception):
    """The engine thread stopped on an error (under torchrun: a lost rank)."""


class RequestFailed(Exception):
    """Serving this request raised `cause`; the engine goes on with the others."""

    def __init__(self, cause: BaseException):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause = cause


# Steps that fail one after the other before the engine counts as broken.
MAX_FAILED_STEPS = 3


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_fatal(error: BaseException, distributed: bool) -> bool:
    """Whether `error` from the engine must stop the server rather than one request."""
    dist_error = getattr(dist, "DistError", None)  # torch >= 2.2: lost peers, store and backend errors
    return distributed or not isinstance(error, Exception) or (dist_error is not None and isinstance(error, dist_error))


@dataclass(eq=False)
class Handle:
    """One submitted request, as the HTTP side knows it."""

    request: Request
    sink: Sink
    rid: Optional[int] = None  # the engine's id, once submitted
    cancelled: bool = False
    done: bool = False
    submitted: float = field(default_factory=time.perf_counter)


class EngineWorker:
    """Runs `engine` in a thread of its own.

    Args:
        engine: The model's Engine (rank 0's under torchrun).
        max_queue: Requests that may wait for a slot beyond the engine's
            max_batch_size running ones; `submit` raises Overloaded beyond that.
        idle_step_s: Under torchrun, the longest pause between steps (None: no idle steps).
    """

    def __init__(self, engine: Engine, max_queue: int, idle_step_s: Optional[float] = None):
        self.engine = engine
        self.capacity = engine.max_batch_size + max_queue
        self.idle_step_s = idle_step_s
        self._cond = threading.Condition()
        self._inbox: List[tuple] = []
        self._handles: Dict[int, Handle] = {}  # engine id -> handle, engine thread only
        self._inflight = 0  # submitted and not finished, guarded by _cond
        self._stop = False
        self.error: Optional[BaseException] = None
        self.running = 0  # rows decoding after the last step (for /metrics)
        self.waiting = 0  # requests queued in the engine or the inbox
        self.steps = 0
        self.failed_requests = 0  # failed alone by an exception (for tests and logs)
        self._failed_steps = 0  # failing steps in a row
        self.distributed = _distributed()
        self._thread = threading.Thread(target=self._run, name="llama-engine", daemon=True)

    started = False

    def start(self) -> None:
        self.started = True
        self._thread.start()

    @property
    def inflight(self) -> int:
        return self._inflight

    def submit(self, requests: List[Request], sinks: List[Sink]) -> List[Handle]:
        """Queues `requests` together (all or none); raises Overloaded or EngineFailed."""
        with self._cond:
            if self.error is not None or self._stop:
                raise EngineFailed(str(self.error or "the server is shutting down"))
            if self._inflight + len(requests) > self.capacity:
                raise Overloaded(f"{self._inflight} requests are running or queued (capacity {self.capacity})")
            handles = [Handle(r, s) for r, s in zip(requests, sinks)]
            self._inflight += len(handles)
            self._inbox += [("submit", h) for h in handles]
            self._cond.notify()
        return handles

    def cancel(self, handles: List[Handle]) -> None:
        """Ends `handles` that are still running; their slots are free by the next step."""
        with self._cond:
            self._inbox += [("cancel", h) for h in handles if not h.done]
            self._cond.notify()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancels what is left, releases the other ranks, and joins the thread."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout)

    # -- the engine thread ------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001 - reported to every waiting request and to the server
            if self.explain is not None and isinstance(e, Exception):
                try:
                    e = self.explain(e)  # under torchrun: which rank was lost
                except Exception:  # noqa: BLE001 - the diagnosis must not hide the failure
                    logger.exception("could not explain the engine's failure")
            logger.error("engine thread stopped: %s", e)
            with self._cond:
                self.error = e
                pending = list(self._handles.values()) + [h for kind, h in self._inbox if kind == "submit"]
                self._inbox.clear()
            for h in pending:
                self._deliver(h, None, e)
            if self.on_error is not None:
                self.on_error(e)

    on_error: Optional[Callable[[BaseException], None]] = None
    # Turns the error that stopped the engine into the one reported (to requests,
    # /health and on_error): under torchrun, one naming the lost rank.
    explain: Optional[Callable[[Exception], BaseException]] = None

    def _loop(self) -> None:
        engine = self.engine
        last_step = time.monotonic()
        while True:
            with self._cond:
                while not (self._inbox or self._stop or engine.has_work()):
                    timeout = None
                    if self.idle_step_s is not None:
                        timeout = self.idle_step_s - (time.monotonic() - last_step)
                        if timeout <= 0:
                            break
                    self._cond.wait(timeout)
                inbox, self._inbox = self._inbox, []
                stopping = self._stop
            for kind, h in inbox:
                if kind == "submit":
                    try:
                        h.rid = engine.submit(h.request)  # checked by the app: fails only on a bug
                    except Exception as e:  # noqa: BLE001 - this request's own failure
                        self._fail_alone([h], e)
                        continue
                    self._handles[h.rid] = h
                    if h.cancelled:
                        engine.cancel(h.rid)
                elif h.rid is not None and h.rid in self._handles:
                    engine.cancel(h.rid)
                else:
                    h.cancelled = True
            if stopping:
                for rid in list(self._handles):
                    engine.cancel(rid)
            try:
                events = engine.step() if (engine.has_work() or self.idle_step_s is not None) else []
                self._failed_steps = 0
            except Exception as e:  # noqa: BLE001 - sorted below into one request's failure or a fatal one
                events = self._step_failed(e)
            last_step = time.monotonic()
            self.steps += 1
            # Counts first: a client that has its event may look at them at once.
            self.running, self.waiting = engine.n_running, len(engine.waiting)
            for event in events:
                h = self._handles.get(event.row)
                if h is None:
                    continue
                if event.stop_reason is not None:
                    del self._handles[event.row]
                self._deliver(h, event, None)
            if stopping and not engine.has_work():
                engine.shutdown()  # under torchrun: the next step releases the ranks in follow()
                engine.step()
                return

    def _step_failed(self, error: Exception) -> list:
        """Fails the requests `engine.step` was stepping when it raised `error`,
        or re-raises it (fatal: see the module's docstring)."""
        self._failed_steps += 1
        waiting = {seq.id for seq in self.engine.waiting}
        blamed = [h for rid, h in self._handles.items() if rid not in waiting]
        if is_fatal(error, self.distributed) or not blamed or self._failed_steps >= MAX_FAILED_STEPS:
            raise error
        logger.error("a step failed; failing the %d request(s) it was stepping, the engine goes on",
                     len(blamed), exc_info=error)
        for h in blamed:
            self.engine.cancel(h.rid)  # its last event, CANCELLED, finds no handle and is dropped
            del self._handles[h.rid]
        self._fail_alone(blamed, error, logged=True)
        return []

    def _fail_alone(self, handles: List[Handle], error: Exception, logged: bool = False) -> None:
        if not logged:
            logger.error("a request failed, the engine goes on", exc_info=error)
        self.failed_requests += len(handles)
        for h in handles:
            self._deliver(h, None, RequestFailed(error))

    def _deliver(self, h: Handle, event: Optional[TokenEvent], error: Optional[BaseException]) -> None:
        if event is None or event.stop_reason is not None:
            h.done = True
            with self._cond:
                self._inflight -= 1
        try:
            h.sink(event, error)
        except Exception:  # noqa: BLE001 - a closed event loop must not stop the engine
            logger.exception("could not deliver an event")
