"""How much memory is left on a device, for planning before allocating.

Building a model asks this before it reads a weight: whether the KV cache
fits (builder.check_cache_memory) and whether float32 weights would fit for
the default dtype on a CPU (builder.fp32_need). A plan made from the
answer refuses a setting with the numbers in seconds, where running out of
memory would fail minutes later (or get the process killed).

On CUDA the answer is the driver's free memory on that device; on Linux
CPUs, /proc/meminfo's MemAvailable (memory the kernel can give without
swapping, page cache included), else the free physical pages. Where the
system does not say (another device type, no /proc, no sysconf), the answer
is None and callers skip the check rather than guess: a plan is an early,
friendlier error, never a reason to refuse a setting that might fit.
"""

import os
from typing import Optional

import torch


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes that can still be allocated on `device` (None if this system does not say)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
