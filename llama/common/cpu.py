"""The one CPU probe: what /proc/cpuinfo and sysfs say about this machine's
CPUs (instruction-set flags, model, physical cores). No torch, nothing of llama.

Design: plain functions over text, so that callers and tests can pass the
text of another machine's /proc/cpuinfo (`cpuinfo=`) or another sysfs tree
(`sysfs=`) instead of this one's. Each caller decides what a flag means to
it: the kernels (which AVX-512 / VNNI / BF16 instructions the matmuls may
use, and the CPU identity that keys the compiled-kernel cache) and the
parallel wing (whether bf16 arithmetic is native here, how many threads).

Invariants: the first CPU's flags line speaks for all (the kernel lists one
per logical CPU, all equal on the machines this runs on); x86 calls it
`flags`, aarch64 `Features`, and both are read. Physical cores are distinct
(package id, core id) pairs, so hyper-threads of one core count once.

Failure modes: nothing raises. Without /proc/cpuinfo (not Linux) the
cpuinfo functions return None and the caller falls back (to torch's own
probes, to platform.processor()); without a readable sysfs topology
`physical_cores` counts logical CPUs.
"""

from pathlib import Path
from typing import FrozenSet, Iterable, Optional

CPUINFO = Path("/proc/cpuinfo")
SYSFS_CPU = Path("/sys/devices/system/cpu")
_FLAG_KEYS = ("flags", "features")  # x86, aarch64


def cpuinfo_text(path: Optional[Path] = None) -> Optional[str]:
    """The text of /proc/cpuinfo (or `path`), None where it cannot be read."""
    try:
        return Path(CPUINFO if path is None else path).read_text()
    except OSError:
        return None


def cpu_flags(cpuinfo: Optional[str] = None) -> Optional[FrozenSet[str]]:
    """The first CPU's flags (x86 `flags`, aarch64 `Features`), from `cpuinfo`
    or this machine's /proc/cpuinfo; None when there is no such text or line."""
    text = cpuinfo_text() if cpuinfo is None else cpuinfo
    for line in (text or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in _FLAG_KEYS:
            return frozenset(value.split())
    return None


def cpu_id(cpuinfo: Optional[str] = None) -> Optional[str]:
    """The CPU's model and flags lines, one of each, as /proc/cpuinfo writes
    them (a library built with -march=native runs only where they match);
    None without /proc/cpuinfo."""
    text = cpuinfo_text() if cpuinfo is None else cpuinfo
    if text is None:
        return None
    keep = [line for line in text.splitlines() if line.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(dict.fromkeys(keep))  # one of each: every core lists them


def physical_cores(cpus: Iterable[int], sysfs: Optional[Path] = None) -> int:
    """How many distinct physical cores (package, core id) the logical `cpus`
    are; the number of logical CPUs when the topology cannot be read."""
    cpus, sysfs = list(cpus), SYSFS_CPU if sysfs is None else sysfs
    cores = set()
    try:
        for cpu in cpus:
            topology = Path(sysfs) / f"cpu{cpu}" / "topology"
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
    except OSError:
        return max(1, len(cpus))
    return max(1, len(cores))
