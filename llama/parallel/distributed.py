"""Process group, device and dtype setup, and rank-0 printing.

Works under `torchrun` (one process per model-parallel rank, on one node or
many) and under plain `python` (a one-process group, no rendezvous needed).
"""

import contextlib
import functools
import io
import logging
import ipaddress
import math
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel.initialize import (
    get_model_parallel_world_size,
    get_pipeline_parallel_ranks,
    initialize_model_parallel,
    model_parallel_is_initialized,
)

from ..common.cpu import cpu_flags
from . import liveness

logger = logging.getLogger("llama")

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}

# How long a collective may wait for a peer before this rank gives up, so that a
# hung rank does not block the others forever (a dead one is noticed at once:
# its connections close). Generous, because the first collective also waits
# for the slowest rank to finish loading its weights.
_TIMEOUT_FALLBACK_S = 600.0


# How long start-up (every rank's first connection to the others) may take
# before a rank says which set-up problem is likely: torchrun's own
# rendezvous has already brought the nodes' launchers together, so the
# workers start within seconds of each other.
START_TIMEOUT_S = 60.0


class SetupError(ValueError):
    """This node cannot join the others (its network set-up), with the fix."""


def dist_timeout_s() -> float:
    """LLAMA_DIST_TIMEOUT (seconds, default 600), checked: a positive, finite number."""
    text = os.environ.get("LLAMA_DIST_TIMEOUT")
    if text is None:
        return _TIMEOUT_FALLBACK_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"LLAMA_DIST_TIMEOUT={text!r:.40} is not a number of seconds; set it to a positive "
                         f"number such as 600, or unset it (default {_TIMEOUT_FALLBACK_S:.0f} s)")
    return value


try:
    DEFAULT_TIMEOUT_S = dist_timeout_s()
except ValueError:  # reported by init_distributed, not as a traceback at import
    DEFAULT_TIMEOUT_S = _TIMEOUT_FALLBACK_S


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    # Pipeline stages (llama/engine/runner.py): rank = stage x mp_size + mp_rank,
    # so a stage's tensor-parallel ranks are consecutive (one node under torchrun).
    stages: int = 1
    stage: int = 0

    @property
    def mp_size(self) -> int:
        """Tensor-parallel ranks per stage (the world size without pipeline stages)."""
        return self.world_size // self.stages

    @property
    def mp_rank(self) -> int:
        return self.rank % self.mp_size


def resolve_device(device: Optional[str]) -> torch.device:
    """`None` means CUDA if this machine has it, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r}; use 'cpu' or 'cuda'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but this PyTorch sees no CUDA GPU; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported; use 'cpu' or 'cuda'")
    return dev


def cpu_bf16_feature(cpuinfo: Optional[str] = None) -> Optional[str]:
    """The CPU feature that makes bf16 arithmetic native here, or None.

    x86: `amx_bf16` or `avx512_bf16` in /proc/cpuinfo's flags; aarch64: `bf16`
    in its Features. Without /proc/cpuinfo (not Linux), torch's own probes of
    AMX and AVX512-BF16. `cpuinfo` replaces the file's text (tests).
    """
    flags = cpu_flags(cpuinfo)  # the first CPU's line speaks for all
    if flags is None:
        return _torch_cpu_bf16_feature()
    return next((f for f in ("amx_bf16", "avx512_bf16", "bf16") if f in flags), None)


def _torch_cpu_bf16_feature() -> Optional[str]:
    probes = (("amx_bf16", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported"))
    for flag, probe in probes:
        fn = getattr(torch.cpu, probe, None)
        if fn is not None and fn():
            return flag
    return None


def cuda_bf16_native(device: torch.device) -> bool:
    """Whether this GPU computes bf16 natively (compute capability 8.0, Ampere, or
    later). V100 and T4 only emulate it, which torch's plain
    `is_bf16_supported()` counts as support."""
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # a torch without the keyword
        return torch.cuda.get_device_capability(device)[0] >= 8


def choose_dtype(dtype: Optional[str], device: torch.device, fp32_bytes: Optional[int] = None,
                 free_bytes: Optional[int] = None) -> Tuple[torch.dtype, str]:
    """The dtype to compute in and why, as the "Loaded" line says it.

    `None` chooses by the hardware: bfloat16 where the device computes it
    natively (a GPU of compute capability 8.0 or later; a CPU with AMX-BF16,
    AVX512-BF16 or Arm's BF16), else float16 on a GPU and float32 on a CPU.
    On such a CPU, bfloat16 after all if the float32 weights (`fp32_bytes`)
    would not fit in the `free_bytes` of memory left.
    """
    if dtype is not None:
        torch_dtype = resolve_dtype(dtype, device)
        if torch_dtype == torch.bfloat16 and device.type == "cpu" and cpu_bf16_feature() is None:
            return torch_dtype, "as asked; this CPU has no native bf16, float32 may be faster"
        return torch_dtype, "as asked"
    if device.type == "cuda":
        if cuda_bf16_native(device):
            return torch.bfloat16, "native bf16 on this GPU"
        return torch.float16, "this GPU has no native bf16"
    feature = cpu_bf16_feature()
    if feature is not None:
        return torch.bfloat16, f"native bf16 on this CPU: {feature}"
    if fp32_bytes is not None and free_bytes is not None and fp32_bytes > free_bytes:
        return torch.bfloat16, (f"this CPU has no native bf16, but float32 weights ({fp32_bytes / 1024**3:.1f} GiB) "
                                f"would not fit in the {free_bytes / 1024**3:.1f} GiB free")
    return torch.float32, "no native bf16 on this CPU"


def resolve_dtype(dtype: Optional[str], device: torch.device) -> torch.dtype:
    """`None` means the hardware's choice (`choose_dtype`); a name is checked."""
    if dtype is None:
        return choose_dtype(None, device)[0]
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    if dtype == "float16" and device.type == "cpu":
        # CPU fp16 matmuls fall back to a slow single-threaded kernel.
        raise ValueError("float16 on CPU is very slow; use bfloat16 (half the memory of float32) or float32")
    return DTYPES[dtype]


def init_distributed(device: Optional[str], model_parallel_size: Optional[int] = None,
                     timeout_s: Optional[float] = None, pipeline_stages: int = 1) -> DistInfo:
    """Joins (or reuses) the process group and the fairscale model-parallel group.

    Under torchrun the group spans every process (world size = model-parallel
    size x pipeline_stages; fairscale's pipeline groups link the stages). Without
    torchrun it is a group of one. Calling this again in the same process reuses
    the groups (with the same number of stages).
    """
    if timeout_s is None:
        timeout_s = dist_timeout_s()
    dev = resolve_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"local rank {local_rank} has no GPU of its own: this machine has {torch.cuda.device_count()}; "
                "launch at most that many processes per node (--nproc_per_node)"
            )
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)

    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        timeout = timedelta(seconds=timeout_s)
        if "MASTER_ADDR" in os.environ:  # launched by torchrun (or set up by hand)
            if backend == "gloo":
                check_gloo_interface(os.environ)
            _join(backend, timeout)
        else:
            # Plain `python`: a one-process group needs no rendezvous.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    world_size = dist.get_world_size()
    stages = check_pipeline_stages(pipeline_stages, world_size)
    mp_size = world_size // stages
    if model_parallel_size is not None and model_parallel_size != mp_size:
        raise ValueError(
            f"model_parallel_size={model_parallel_size} but {world_size} processes were launched"
            + (f" for {stages} pipeline stages ({mp_size} per stage)" if stages > 1 else "")
            + "; every process holds one model-parallel shard, so launch that many processes "
            "(torchrun --nproc_per_node / --nnodes) or leave model_parallel_size unset"
        )
    if model_parallel_is_initialized():
        if get_model_parallel_world_size() != mp_size or len(get_pipeline_parallel_ranks()) != stages:
            raise RuntimeError(f"this process already set up model parallelism for {get_model_parallel_world_size()} "
                               f"ranks x {len(get_pipeline_parallel_ranks())} stages, not {mp_size} x {stages}")
    else:
        if world_size > 1:  # nodes that disagree would build mismatched groups and hang: say so first
            said: list = [None] * world_size
            dist.all_gather_object(said, stages)
            if len(set(said)) > 1:
                other = next(r for r, s in enumerate(said) if s != said[0])
                raise ValueError(f"the ranks were given different numbers of pipeline stages: rank 0 has "
                                 f"{said[0]}, rank {other} has {said[other]}; pass the same --pipeline_stages "
                                 "on every node")
        # fairscale prints three "> initializing ..." lines on rank 0; they read
        # like generated answers in the examples' output, so keep them out of it.
        with contextlib.redirect_stdout(io.StringIO()), _new_groups_with_timeout(timedelta(seconds=timeout_s)):
            initialize_model_parallel(mp_size, stages)
    rank = dist.get_rank()
    if world_size > 1 and "MASTER_ADDR" in os.environ:  # each rank's heartbeat, to name a lost one (liveness.py)
        liveness.start(rank, world_size, rank // mp_size, stages)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, stages=stages,
                    stage=rank // mp_size)


def check_pipeline_stages(stages, world_size: int) -> int:
    """`stages` checked against the number of processes: each stage needs the same number of them."""
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise ValueError(f"pipeline_stages must be a positive integer, got {stages!r}")
    if world_size % stages:
        raise ValueError(
            f"pipeline_stages={stages} does not divide the {world_size} processes launched: each stage runs on "
            f"the same number of processes, so launch a multiple of {stages} (torchrun --nproc_per_node x "
            f"--nnodes), or choose a number of stages that divides {world_size}")
    return stages


def _is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return addr == "localhost"


def check_gloo_interface(env) -> None:
    """Set-up mistakes found before connecting: a GLOO_SOCKET_IFNAME that is no
    interface of this host, or (with nodes on other hosts) a host name that
    resolves to a loopback address, which gloo would then announce to them."""
    names = env.get("GLOO_SOCKET_IFNAME")
    have = sorted(name for _, name in socket.if_nameindex())
    if names:
        unknown = [n for n in names.split(",") if n not in have]
        if unknown:
            raise SetupError(
                f"GLOO_SOCKET_IFNAME={names} names {', '.join(unknown)}, which is not a network interface of this host "
                f"({socket.gethostname()} has {', '.join(have)}): set it to the interface that reaches the other "
                "nodes (see `ip -brief address`), or unset it")
        return
    several_nodes = int(env.get("WORLD_SIZE", 1)) > int(env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", 1)))
    if not several_nodes or _is_loopback(env.get("MASTER_ADDR", "")):
        return  # one host, or every node on this one (tests): loopback is right
    try:
        mine = socket.gethostbyname(socket.gethostname())
    except OSError:
        return  # gloo then picks an interface itself
    if _is_loopback(mine):
        raise SetupError(
            f"this host's name {socket.gethostname()!r} resolves to {mine}, a loopback address, so the other nodes "
            f"could not connect to it: set GLOO_SOCKET_IFNAME to the interface that reaches them (one of "
            f"{', '.join(n for n in have if n != 'lo')}), or fix the name's entry in /etc/hosts")


def _join(backend: str, timeout: timedelta) -> None:
    """init_process_group, with start-up failures named as what they are.

    Joining waits at most START_TIMEOUT_S (or the shorter LLAMA_DIST_TIMEOUT)
    for the other ranks; collectives then get the full timeout.
    """
    start = min(timeout, timedelta(seconds=START_TIMEOUT_S))
    try:
        dist.init_process_group(backend, timeout=start)
    except (RuntimeError, dist.DistError) as e:
        text = str(e)
        if "Unable to find address" in text:
            raise SetupError(f"gloo cannot use the network interface named in GLOO_SOCKET_IFNAME "
                             f"({text.splitlines()[0][-120:]}): set it to one this host has, or unset it") from e
        raise SetupError(
            f"could not connect to the other ranks within {start.total_seconds():.0f} s of starting "
            f"(master {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}; "
            f"{text.splitlines()[0][:200] if text else type(e).__name__}). Another node may have failed at start-up "
            "(see its output), or cannot reach this one: check that every node runs the same command with the same "
            "--master_addr, that no firewall blocks the ports, and that GLOO_SOCKET_IFNAME names the interface "
            "that reaches the other nodes") from e
    if start != timeout:
        dist.distributed_c10d._set_pg_timeout(timeout)


@contextlib.contextmanager
def _new_groups_with_timeout(timeout: timedelta):
    """Gives the process groups fairscale creates our timeout.

    fairscale calls dist.new_group() without one, and new groups then wait
    30 minutes (torch's default), not the timeout of the default group: every
    model-parallel collective runs on fairscale's group, so a hung rank would
    block the others for half an hour.
    """
    original = dist.new_group
    dist.new_group = functools.partial(original, timeout=timeout)
    try:
        yield
    finally:
        dist.new_group = original


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print_rank0(*args, **kwargs) -> None:
    """print() on global rank 0 only (LOCAL_RANK 0 would print once per node)."""
    if is_rank0():
        print(*args, **kwargs)
