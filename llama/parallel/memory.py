"""How much memory is left on a device, for planning before allocating.

Building a model asks this before it reads a weight: whether the KV cache
fits (builder.check_cache_memory) and whether float32 weights would fit for
the default dtype on a CPU (builder.fp32_need). A plan made from the
answer refuses a setting with the numbers in seconds, where running out of
memory would fail minutes later (or get the process killed).

On CUDA the answer is the driver's free memory on that device. On a Linux
CPU it is the smallest of what limits this process:
- the machine: /proc/meminfo's MemAvailable (memory the kernel can give
  without swapping, page cache included), else the free physical pages;
- the process's address space: RLIMIT_AS (`ulimit -v`) minus what the
  process already maps (VmSize in /proc/self/status); an allocation past it
  fails with an allocator error whatever the machine has free;
- its control group (every container): memory.max minus memory.current for
  cgroup v2, memory.limit_in_bytes minus memory.usage_in_bytes for v1 (the
  usage less the inactive page cache of memory.stat, which the kernel drops
  before it refuses memory, the way container runtimes count a working set), for
  the process's cgroup and each one above it (a parent's limit binds the
  children too); "max" (v2) or a limit near 2**63 (v1) means none. Past it
  the kernel's OOM killer ends the process without a message.

Where the system does not say (another device type, no /proc, no sysconf),
that limit is left out, and if none is known the answer is None: callers
then skip the check rather than guess. A plan is an early, friendlier error,
never a reason to refuse a setting that might fit.

The /proc and /sys paths are module constants so that tests point them at
files of their own.
"""

import os
import resource
from pathlib import Path
from typing import List, Optional, Tuple

import torch

MEMINFO = "/proc/meminfo"
PROC_STATUS = "/proc/self/status"
PROC_CGROUP = "/proc/self/cgroup"
CGROUP_ROOT = "/sys/fs/cgroup"

# What limits the memory left (the second item of available_memory_and_limit).
MACHINE = "memory available on this machine"
ADDRESS_SPACE = "the address space limit (ulimit -v)"
CGROUP = "the memory limit of this process's cgroup (a container's limit: memory.max)"
GPU = "free GPU memory"

# cgroup v1 writes "no limit" as the largest page-aligned signed 64-bit value.
_V1_UNLIMITED = 2**62


def _read(path) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read(1 << 20)  # these files are a few KB; never read more than 1 MB
    except (OSError, UnicodeDecodeError):
        return None


def _kib_field(path: str, name: str) -> Optional[int]:
    """The `name:  N kB` line of a /proc file, in bytes."""
    for line in (_read(path) or "").splitlines():
        if line.startswith(name + ":"):
            try:
                return int(line.split()[1]) * 1024
            except (IndexError, ValueError):
                return None
    return None


def _machine_available() -> Optional[int]:
    free = _kib_field(MEMINFO, "MemAvailable")
    if free is not None:
        return free
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _address_space_left() -> Optional[int]:
    """RLIMIT_AS's soft limit minus the process's mapped size (None: no limit)."""
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    except (ValueError, OSError):
        return None
    if soft == resource.RLIM_INFINITY or soft < 0:
        return None
    mapped = _kib_field(PROC_STATUS, "VmSize")
    return max(soft - (mapped or 0), 0)


def _int_file(path: Path) -> Optional[int]:
    text = _read(path)
    if text is None:
        return None
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        return None  # "max" (v2): no limit; anything else unreadable counts as none


def _cgroup_folders() -> List[Tuple[Path, str, str]]:
    """(folder, limit file, usage file) of this process's memory cgroup and
    each one above it, v2 first, from /proc/self/cgroup."""
    root, found = Path(CGROUP_ROOT), []
    for line in (_read(PROC_CGROUP) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":  # v2: one unified hierarchy
            base, files = root, ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):  # v1: the memory controller's own hierarchy
            base, files = root / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        rel = Path(path.strip()).relative_to("/") if path.strip().startswith("/") else Path(path.strip())
        if ".." in rel.parts:
            continue
        folder = base / rel
        while True:
            found.append((folder, *files))
            if folder == base:
                break
            folder = folder.parent
    return found


def _inactive_file(folder: Path) -> int:
    """The page cache the kernel would drop first for this cgroup (memory.stat's
    inactive_file; v1: total_inactive_file), counted in its usage but no real use."""
    for line in (_read(folder / "memory.stat") or "").splitlines():
        name, _, value = line.partition(" ")
        if name in ("inactive_file", "total_inactive_file"):
            try:
                return max(int(value), 0)
            except ValueError:
                return 0
    return 0


def _cgroup_left() -> Optional[int]:
    """The least room under any memory limit of this process's cgroups (None: no limit)."""
    left = None
    for folder, limit_file, usage_file in _cgroup_folders():
        limit = _int_file(folder / limit_file)
        if limit is None or limit >= _V1_UNLIMITED:
            continue
        used = max((_int_file(folder / usage_file) or 0) - _inactive_file(folder), 0)
        room = max(limit - used, 0)
        left = room if left is None else min(left, room)
    return left


def cpu_memory_limits() -> List[Tuple[int, str]]:
    """Each known limit on this process's CPU memory as (bytes left, what sets it)."""
    limits = [
        (_machine_available(), MACHINE),
        (_address_space_left(), ADDRESS_SPACE),
        (_cgroup_left(), CGROUP),
    ]
    return [(n, what) for n, what in limits if n is not None]


def available_memory_and_limit(device: torch.device) -> Tuple[Optional[int], Optional[str]]:
    """(bytes that can still be allocated on `device`, what limits it); (None, None) if this system does not say."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], GPU
    if device.type != "cpu":
        return None, None
    limits = cpu_memory_limits()
    if not limits:
        return None, None
    return min(limits, key=lambda item: item[0])


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes that can still be allocated on `device` (None if this system does not say)."""
    return available_memory_and_limit(device)[0]
