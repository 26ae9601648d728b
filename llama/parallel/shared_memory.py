"""Collectives through shared memory, for the ranks of a gloo group that all
run on one host.

A paired send/receive over gloo between two local processes costs about
0.25 ms, and a decoding step makes two per layer. Here each rank instead
writes its part into a file in /dev/shm that every rank of the group has
mapped, then a sequence counter; the others wait for that counter and read
the part in place.

Layout of the file: per rank a line of whole cache lines holding its
counter and its "I sleep on your counter" flags (no two ranks write one
line), a check token, then two buffers per rank of `CAPACITY` bytes.
Exchange s writes buffer s % 2. Before a rank reuses a buffer (exchange
s + 2) it has seen every other rank's counter reach s + 1, so they have all
finished reading exchange s: two buffers suffice.

Waiting: a rank spins on the peer's counter, then sleeps on it with a futex;
a writer that sees a sleeper's flag wakes it. Where every rank of the group
has cores of its own (ranks x torch threads <= the CPUs this process may
run on), spinning takes a CPU from no one, and a rank spins for up to 2 ms:
a sleep and wake-up costs more than a typical wait between two ranks'
halves of a layer (0.2 ms, adapted, made a 2-rank bf16 decoding step sleep
about eight times a token; 2 ms cut the sleeps 3-5 fold and the step time
by 5-16% in interleaved runs). Otherwise it spins for up to 0.2 ms (less
while spinning does not catch the peer, as on a busy machine where the
peer waits for the CPU the spinner holds).

Memory ordering: the part is written (by torch, in C), then the counter
(one aligned 8-byte store); a reader loads the counter, then the part. x86
keeps stores in order and loads in order (TSO), so a reader that sees the
counter sees the part. Other architectures need fences that Python cannot
issue, so there `connect` returns None and the caller keeps gloo.

A peer that dies is noticed by a lock: every rank holds a POSIX lock on one
byte of the file, which the kernel releases when the process ends; a rank
that has waited 50 ms tries to take its peer's lock, and getting it means
the peer is gone. A peer that hangs is given up on after the distributed
timeout (LLAMA_DIST_TIMEOUT). Both raise torch.distributed.DistError, which
the command line reports as "lost contact with another rank".

The file is unlinked as soon as every rank has mapped it (the mappings
stay), so nothing is left in /dev/shm once the processes end, even killed
ones (only a process killed during the set-up itself, between creating the
file and the others mapping it, can leave one).
"""

import ctypes
import fcntl
import mmap
import os
import platform
import socket
import sys
import time
import uuid
from typing import List, Optional

import torch
import torch.distributed as dist

DIRECTORY = "/dev/shm"
# Bytes of one buffer: the largest part one exchange carries (a decoding
# step's activations are a few KB; larger reductions go in chunks this size).
CAPACITY = 1 << 20
_TOKEN_BYTES = 16

# Waiting: spin on the counter this long (the peer is usually about to
# write it), then sleep on it (a futex: the writer wakes sleepers) in slices
# of at most _SLICE_S, checking the peers' locks and the timeout between them.
_SPIN_S = 0.0002
_SPIN_OWN_CORES_S = 0.002  # every rank on cores of its own
_SLICE_S = 0.005

_FUTEX_WAIT, _FUTEX_WAKE, _SYS_FUTEX = 0, 1, 202  # x86-64 Linux


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _futex_call():
    libc = ctypes.CDLL(None, use_errno=True)
    call = libc.syscall
    call.restype = ctypes.c_long
    call.argtypes = [ctypes.c_long, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                     ctypes.c_void_p, ctypes.c_int]
    return call


def enabled_here() -> bool:
    """Whether this process may use shared memory: LLAMA_SHM is not 0, the
    CPU orders stores and loads as this module needs (x86), and /dev/shm exists."""
    setting = os.environ.get("LLAMA_SHM", "1").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return False
    if setting not in ("1", "true", "yes", "on", ""):
        raise ValueError(f"LLAMA_SHM={setting!r:.40} is not understood: set it to 0 (exchange over gloo "
                         "only) or 1 (shared memory between the ranks of one host, the default)")
    return (platform.machine().lower() in ("x86_64", "amd64") and sys.platform.startswith("linux")
            and os.path.isdir(DIRECTORY))


def _host() -> tuple:
    """What two processes on the same running machine have in common."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = None
    return socket.gethostname(), boot


class _Layout:
    """Where things are in the file of a group of `world` ranks: per rank a
    line (its counter, then a flag per peer: "I sleep on your counter"),
    then a check token, then two buffers per rank from DATA on."""

    def __init__(self, world: int):
        self.line = 64 * -(-(8 + 4 * world) // 64)  # whole cache lines: no two ranks write one line
        self.token = world * self.line
        self.data = 4096 * -(-(self.token + _TOKEN_BYTES) // 4096)
        self.size = self.data + world * 2 * CAPACITY

    def counter(self, r: int) -> int:
        return r * self.line

    def flag(self, sleeper: int, writer: int) -> int:
        return sleeper * self.line + 8 + 4 * writer


class SharedMemoryGroup:
    """Every rank's part of one exchange, through a mapped file (see the module's docstring)."""

    def __init__(self, fd: int, mm: mmap.mmap, rank: int, world: int, global_ranks: List[int], timeout_s: float):
        self.fd, self.mm, self.rank, self.world = fd, mm, rank, world
        self.global_ranks, self.timeout_s = global_ranks, timeout_s
        self.capacity = CAPACITY
        self.layout = _Layout(world)
        self._q, self._i = memoryview(mm).cast("q"), memoryview(mm).cast("i")  # counters, flags
        with torch.inference_mode(False):  # views of it are written inside inference mode and outside
            self._bytes = torch.frombuffer(mm, dtype=torch.uint8)
        self._address = self._bytes.data_ptr()
        self._futex = _futex_call()
        self._seq = 0
        self._spin_s = _SPIN_S
        self._cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self._views = {}  # (rank, buffer, dtype, shape) -> tensor over the file
        self._my_counter = self.layout.counter(rank) // 8
        self._sleepers = [self.layout.flag(r, rank) // 4 for r in range(world) if r != rank]

    def fits(self, t: torch.Tensor) -> bool:
        return t.numel() * t.element_size() <= self.capacity

    def _view(self, rank: int, buffer: int, dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
        key = (rank, buffer, dtype, shape)
        view = self._views.get(key)
        if view is None:
            if len(self._views) > 256:  # prefill shapes vary: keep the cache small
                self._views.clear()
            start = self.layout.data + (rank * 2 + buffer) * self.capacity
            n = shape.numel() * dtype.itemsize
            with torch.inference_mode(False):
                view = self._views[key] = self._bytes[start:start + n].view(dtype).view(shape)
        return view

    def exchange(self, t: torch.Tensor) -> List[torch.Tensor]:
        """Every rank's `t` (same shape and dtype on every rank, at most
        `capacity` bytes), in rank order. The tensors are views of the file,
        valid until this rank's next exchange: read them before then."""
        self._seq += 1
        seq, buffer = self._seq, self._seq % 2
        self._view(self.rank, buffer, t.dtype, t.shape).copy_(t)
        self._q[self._my_counter] = seq  # after the part: x86 keeps stores in order
        if any(self._i[f] for f in self._sleepers):
            self._futex(_SYS_FUTEX, self._address + self.layout.counter(self.rank), _FUTEX_WAKE, 2**31 - 1,
                        None, None, 0)
        parts = []
        for r in range(self.world):
            if r != self.rank:
                self._wait(r, seq)
            parts.append(self._view(r, buffer, t.dtype, t.shape))
        return parts

    def _wait(self, r: int, seq: int) -> None:
        """Returns once rank r's counter reaches seq: spins a little, then sleeps.

        A sleeper raises its flag before its last look at the counter; the
        writer looks at the flag after writing the counter and wakes it. x86
        may let the writer's look pass its own store, so rarely a wake-up is
        missed: the sleeper then wakes at the end of its slice (5 ms)."""
        q, index = self._q, self.layout.counter(r) // 8
        if q[index] >= seq:
            return
        start = time.monotonic()
        spin_s = self.spin_budget()
        try:
            spins = 0
            while q[index] < seq:
                spins += 1
                if spins % 32 == 0 and time.monotonic() - start > spin_s:
                    break
            else:
                return
            self._sleep(r, seq, start)
        finally:
            # Spin longer while spinning would catch the peer, shorter while
            # it would not: on a busy machine the peer waits for a CPU, and
            # spinning takes one.
            if time.monotonic() - start <= _SPIN_S:
                self._spin_s = min(_SPIN_S, 2 * self._spin_s + 1e-5)
            else:
                self._spin_s /= 2

    def spin_budget(self) -> float:
        """How long a wait spins before it sleeps (see the module's docstring)."""
        if self.world * torch.get_num_threads() <= self._cpus:
            return _SPIN_OWN_CORES_S
        return self._spin_s

    def _sleep(self, r: int, seq: int, start: float) -> None:
        q, index = self._q, self.layout.counter(r) // 8
        flag = self.layout.flag(self.rank, r) // 4
        address = self._address + self.layout.counter(r)
        expected = ctypes.c_int(seq - 1).value  # the counter's low 32 bits while the part is not there
        slice_ = _Timespec(0, int(_SLICE_S * 1e9))
        try:
            self._i[flag] = 1
            while q[index] < seq:
                self._futex(_SYS_FUTEX, address, _FUTEX_WAIT, expected, ctypes.byref(slice_), None, 0)
                if q[index] >= seq:
                    break
                waited = time.monotonic() - start
                if waited > 0.05:
                    self._check_alive(r)
                if waited > self.timeout_s:
                    raise dist.DistError(
                        f"Timed out after {self.timeout_s:.0f} s waiting for rank {self.global_ranks[r]} in a "
                        "shared-memory exchange (LLAMA_DIST_TIMEOUT)")
        finally:
            self._i[flag] = 0

    def _check_alive(self, r: int) -> None:
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, r)
        except OSError:
            return  # the peer holds its lock: it is alive
        fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, r)
        raise dist.DistError(f"Connection closed by peer: rank {self.global_ranks[r]} exited during a "
                             "shared-memory exchange")

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks, the same bits on every rank: the parts are added
        pairwise in rank order ((t0 + t1) + (t2 + t3) for four), as recursive
        doubling adds them. Larger tensors go in chunks of `capacity` bytes."""
        if self.fits(t):
            return _pairwise_sum(self.exchange(t))
        flat, out = t.reshape(-1), torch.empty(t.numel(), dtype=t.dtype, device=t.device)
        step = self.capacity // t.element_size()
        for i in range(0, flat.numel(), step):
            out[i:i + step] = _pairwise_sum(self.exchange(flat[i:i + step]))
        return out.view(t.shape)

    def all_gather_last_dim(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.exchange(t), dim=-1)  # a copy: the views are reused


def _pairwise_sum(parts: List[torch.Tensor]) -> torch.Tensor:
    while len(parts) > 1:
        parts = [parts[i] + parts[i + 1] if i + 1 < len(parts) else parts[i].clone()
                 for i in range(0, len(parts), 2)]
    return parts[0]


def connect(group, timeout_s: float) -> Optional[SharedMemoryGroup]:
    """A SharedMemoryGroup for `group` if every rank of it runs on this host
    (same host name and boot id) and may use shared memory, else None. A
    collective: every rank of the group calls it, and all get a group or all None."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    global_ranks = [dist.get_global_rank(group, r) for r in range(world)]
    try:
        wanted = enabled_here()
    except ValueError as e:  # said on every rank, not only where it is set wrong
        wanted = str(e)
    everyone: List[Optional[tuple]] = [None] * world
    dist.all_gather_object(everyone, (_host(), wanted), group=group)
    problem = next((w for _, w in everyone if isinstance(w, str)), None)
    if problem is not None:
        raise ValueError(problem)
    if not all(w for _, w in everyone) or len({host for host, _ in everyone}) != 1:
        return None
    layout = _Layout(world)
    size = layout.size
    offer = [None, None]  # rank 0: the file's path and a token written in it
    fd = None
    if rank == 0:
        path, token = os.path.join(DIRECTORY, f"llama-{os.getpid()}-{uuid.uuid4().hex}"), os.urandom(_TOKEN_BYTES)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.posix_fallocate(fd, 0, size)  # no room: an error now, not SIGBUS on first touch
            os.pwrite(fd, token, layout.token)
            offer = [path, token]
        except OSError:
            if fd is not None:
                os.close(fd)
                os.unlink(path)
            fd = None
    try:
        dist.broadcast_object_list(offer, src=global_ranks[0], group=group)
        path, token = offer
        if path is None:
            return None
        mm = None
        try:
            if fd is None:
                fd = os.open(path, os.O_RDWR)
            mm = mmap.mmap(fd, size)
            ok = mm[layout.token:layout.token + _TOKEN_BYTES] == token  # the same file, not a namesake
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, rank)  # held until this process ends
        except (OSError, ValueError):
            ok = False
        said: List[Optional[bool]] = [None] * world
        dist.all_gather_object(said, ok, group=group)  # every rank has mapped the file (or failed)
    finally:
        if rank == 0 and offer[0] is not None:
            os.unlink(offer[0])
    if not all(said):
        if mm is not None:
            mm.close()
        if fd is not None:
            os.close(fd)
        return None
    return SharedMemoryGroup(fd, mm, rank, world, global_ranks, timeout_s)
