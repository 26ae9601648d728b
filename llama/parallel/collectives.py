"""The collectives inference needs, fast for decoding on CPU clusters.

A decoding step all-reduces two small vectors per layer (B x dim values). gloo's
all_reduce takes about 1 ms for 8 KB between two processes on one machine,
measured here, against about 0.25 ms for one paired send/receive: with two
reductions per layer that is most of the cost of model parallelism. So:

* ranks that all run on one host (x86, LLAMA_SHM not 0) exchange through
  shared memory (shared_memory.py): microseconds per exchange, any size
  (large reductions in chunks);
* other gloo groups: small tensors by recursive doubling (log2(N) rounds of
  pairwise exchange); large ones (prefill) keep torch's all_reduce;
* NCCL keeps torch's collectives.

The engine's per-step plan (a few bytes from rank 0) goes through the same
shared memory where it can (`broadcast_from_first`).

Every rank ends with bit-identical sums (each round adds the same two
operands, and float addition commutes; shared memory adds the parts in the
same pairs), which keeps sampling in lockstep.
"""

from collections import deque
from typing import Deque, Dict, Optional, Tuple

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel.initialize import get_model_parallel_group

from . import shared_memory
from .distributed import dist_timeout_s

# Above this many elements the ring all-reduce's bandwidth wins over latency.
SMALL = 1 << 18


# Receives posted ahead, AHEAD per (peer, shape, dtype): gloo sends a
# payload only once the receiver has said it is ready, so a receive posted
# only when the exchange starts costs a full round trip. Posted several
# exchanges ahead (the next layers', the next step's), the ready notice has
# long arrived when the peer sends, and an exchange costs the one-way
# latency. Each kind of exchange has its own tag, given in order of first
# use: every rank runs the same exchanges in the same order, so the tags
# agree without being sent.
AHEAD = 4
_posted: Dict[Tuple, Deque[Tuple[torch.Tensor, object]]] = {}
_tags: Dict[Tuple, int] = {}


# Only decoding's shapes are posted ahead ((rows, 1, dim) activations and
# (rows, k) arg-max pairs, at most this many elements): a posted receive can
# never be withdrawn, so the shapes that get them must be few and small.
AHEAD_MAX_ELEMENTS = 1 << 15


def _exchange(t: torch.Tensor, peer: int, group) -> torch.Tensor:
    key = (id(group), peer, tuple(t.shape), t.dtype)
    tag = _tags.setdefault(key, len(_tags) + 1)
    queue = _posted.setdefault(key, deque())
    decoding = t.numel() <= AHEAD_MAX_ELEMENTS and (t.dim() < 3 or t.shape[-2] == 1)
    while len(queue) < (AHEAD + 1 if decoding else 1):
        buffer = torch.empty_like(t)
        queue.append((buffer, dist.irecv(buffer, peer, group, tag=tag)))
    send = dist.isend(t, peer, group, tag=tag)
    received, request = queue.popleft()
    request.wait()
    send.wait()
    return received


# The model-parallel group and its shared memory (None: not all on one host,
# or turned off), found at the group's first collective.
_local: Tuple[object, Optional[shared_memory.SharedMemoryGroup]] = (None, None)


def _shared_memory(group) -> Optional[shared_memory.SharedMemoryGroup]:
    global _local
    if _local[0] is not group:
        shm = None
        if dist.get_backend(group) == "gloo":
            shm = shared_memory.connect(group, dist_timeout_s())
        _local = (group, shm)
    return _local[1]


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over the model-parallel group (what RowParallelLinear needs)."""
    group = get_model_parallel_group()
    world = dist.get_world_size(group)
    if world == 1:
        return t
    shm = _shared_memory(group)
    if shm is not None:
        return shm.all_reduce(t)
    return gloo_all_reduce(t, group)


def gloo_all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    """all_reduce without shared memory: recursive doubling on gloo for small
    tensors (and a power-of-two world), torch's all_reduce otherwise."""
    world = dist.get_world_size(group)
    power_of_two = world & (world - 1) == 0
    if dist.get_backend(group) != "gloo" or t.numel() > SMALL or not power_of_two:
        dist.all_reduce(t, group=group)
        return t
    rank, t = dist.get_rank(group), t.contiguous()
    step = 1
    while step < world:
        partner = dist.get_global_rank(group, rank ^ step)
        t = t + _exchange(t, partner, group)
        step *= 2
    return t


def broadcast_from_first(t: torch.Tensor, group) -> torch.Tensor:
    """`group`'s rank 0's `t` on every rank (a few bytes: the engine's plan
    of each step). Through the model-parallel group's shared memory where
    that group is all of `group`'s ranks (one host, no pipeline stages): a
    step's plan then costs no gloo round trip. Else dist.broadcast."""
    mp = get_model_parallel_group()
    if dist.get_world_size(group) == dist.get_world_size(mp) > 1:  # the same ranks, rank 0 first in both
        shm = _shared_memory(mp)
        if shm is not None and shm.fits(t):
            return shm.exchange(t)[0].clone()
    dist.broadcast(t, src=dist.get_global_rank(group, 0), group=group)
    return t


def all_gather_last_dim(t: torch.Tensor) -> torch.Tensor:
    """Concatenation of every rank's `t` along the last dimension
    (ColumnParallelLinear's gathered output, ParallelEmbedding's lookup).
    Small tensors on gloo: recursive doubling as in `all_reduce`, each round
    exchanging the blocks gathered so far."""
    group = get_model_parallel_group()
    world = dist.get_world_size(group)
    if world == 1:
        return t
    shm = _shared_memory(group)
    if shm is not None and shm.fits(t):
        return shm.all_gather_last_dim(t)
    return gloo_all_gather_last_dim(t, group)


def gloo_all_gather_last_dim(t: torch.Tensor, group) -> torch.Tensor:
    """all_gather_last_dim without shared memory."""
    world = dist.get_world_size(group)
    if dist.get_backend(group) == "gloo" and t.numel() * world <= SMALL and world & (world - 1) == 0:
        rank, have = dist.get_rank(group), t.contiguous()  # `have`: the blocks of ranks rank & ~(step - 1) ...
        step = 1
        while step < world:
            other = _exchange(have, dist.get_global_rank(group, rank ^ step), group)
            have = torch.cat([have, other] if rank & step == 0 else [other, have], dim=-1).contiguous()
            step *= 2
        return have
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def vocab_parallel_argmax(local: torch.Tensor) -> torch.Tensor:
    """torch.argmax over the last dimension of logits split by vocabulary
    across the ranks (rank r holds ids r*V/N ..), exchanging each rank's
    (max, index) instead of the logits: 16 bytes a row, not 4V/N.

    Exact, ties included: argmax takes the lowest index among equal maxima,
    and so does this (the lowest rank among those with the maximum, then that
    rank's own lowest index). Returns (rows,) int64.
    """
    group = get_model_parallel_group()
    world = dist.get_world_size(group)
    best, index = local.max(dim=-1)  # first occurrence of the maximum, as argmax
    if world == 1:
        return index
    index = index + dist.get_rank(group) * local.shape[-1]
    pairs = torch.stack([best.double(), index.double()], dim=-1)  # (rows, 2): ids < 2**53 are exact
    every = all_gather_last_dim(pairs).view(*pairs.shape[:-1], world, 2)  # (rows, world, 2), rank order
    winner = torch.argmax(every[..., 0], dim=-1)  # the lowest rank holding the maximum
    return every[..., 1].gather(-1, winner[..., None])[..., 0].long()

