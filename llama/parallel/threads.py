"""How many CPU threads each process computes with (`--threads`, `Llama.build(threads=...)`).

Default: the physical cores this process may run on (its CPU affinity, as
taskset, cgroups or Slurm set it), divided among the ranks of this job on
this node, at least 1. Why not torch's own default (one thread per logical
CPU of the machine): it ignores the affinity and the other ranks on the
node, so the threads outnumber the cores and take turns on them, and a
decoding step waits for the slowest of them; on a busy machine that makes
decoding several times slower than one thread. Hyper-threads are not
counted: decoding is a memory-bandwidth-bound matmul, which a second
hardware thread on the same core barely speeds up.

Precedence: an explicit count (`--threads`), then OMP_NUM_THREADS when the
user set it (not the 1 torchrun sets for several processes per node), then
the default.

Failure modes: a count that is not a positive integer, or more than the
logical CPUs this process may use, is refused with a ValueError naming the
flag or variable; several ranks whose threads together outnumber the CPUs
get a warning (they run, slower). Where the CPU topology cannot be read
(not Linux, no sysfs), each logical CPU counts as a core.
"""

import logging
import os
from pathlib import Path
from typing import Iterable, Mapping, Optional, Set

import torch

from ..common import cpu as cpu_probe

logger = logging.getLogger("llama")

SYSFS_CPU = Path("/sys/devices/system/cpu")


def allowed_cpus() -> Set[int]:
    """The logical CPUs this process may run on."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


def physical_cores(cpus: Iterable[int], sysfs: Optional[Path] = None) -> int:
    """How many distinct physical cores (package, core id) the logical `cpus`
    are; the number of logical CPUs when the topology cannot be read."""
    return cpu_probe.physical_cores(cpus, SYSFS_CPU if sysfs is None else sysfs)


def local_ranks(env: Mapping[str, str] = os.environ) -> int:
    """Processes of this job on this node: torchrun's LOCAL_WORLD_SIZE, 1 under plain python."""
    try:
        return max(1, int(env.get("LOCAL_WORLD_SIZE", 1)))
    except ValueError:
        return 1


def default_threads(env: Mapping[str, str] = os.environ, sysfs: Optional[Path] = None) -> int:
    """The physical cores of this process's affinity divided among the local ranks, at least 1."""
    return max(1, physical_cores(allowed_cpus(), sysfs) // local_ranks(env))


def omp_threads(env: Mapping[str, str] = os.environ) -> Optional[int]:
    """OMP_NUM_THREADS if the user set it, else None. torchrun sets it to 1 for
    several processes per node when it is unset; that 1 is not counted (pass
    --threads 1 to mean it)."""
    text = env.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        return None  # torch has already warned about it
    if value < 1 or (value == 1 and local_ranks(env) > 1 and "TORCHELASTIC_RUN_ID" in env):
        return None
    return value


def check_threads(threads, name: str = "--threads") -> int:
    """`threads` if it is a usable thread count; else a ValueError naming `name`.

    More threads than the logical CPUs this process may use is refused: the
    threads would take turns on the cores, which is several times slower.
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"{name} must be a positive integer, got {threads!r}; leave it unset for "
                         f"the default ({default_threads()} here: physical cores / processes on this node)")
    available = len(allowed_cpus())
    if threads > available:
        raise ValueError(f"{name} {threads} is more than the {available} CPU(s) this process may use; "
                         f"give at most {available}, or leave it unset for the default ({default_threads()} here)")
    return threads


def set_threads(threads: Optional[int]) -> int:
    """Makes torch compute with `threads` threads and returns the count. None:
    OMP_NUM_THREADS if the user set it, else `default_threads()`."""
    if threads is not None:
        n = check_threads(threads)
    elif omp_threads() is not None:
        n = check_threads(omp_threads(), "OMP_NUM_THREADS")
    else:
        n = default_threads()
    ranks, available = local_ranks(), len(allowed_cpus())
    if n * ranks > available:
        logger.warning("%d processes on this node x %d threads each is more than its %d CPUs: they will "
                       "take turns on the cores; fewer --threads is likely faster", ranks, n, available)
    torch.set_num_threads(n)
    try:
        # The inter-op pool (used by torch.jit forks, not by eager inference) can
        # only be sized before any parallel work and only once: else keep it.
        torch.set_num_interop_threads(n)
    except RuntimeError:
        pass
    return n
