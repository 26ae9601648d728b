"""One buffer for the weights that decoding streams, backed by 2 MB pages
where Linux allows it.

Decoding reads every weight of the model once per token. With the usual
4 KB pages, each page costs a TLB miss and the CPU's hardware prefetchers
stop at its boundary. Linux backs memory marked with madvise(MADV_HUGEPAGE)
by 2 MB pages (transparent huge pages, when
/sys/kernel/mm/transparent_hugepage/enabled is `madvise` or `always`) at
the moment it is first written. The arena below is that memory, written by
copying the weights in, in the order decoding reads them: fewer TLB misses
and longer prefetch runs make the matmuls faster, by more the fewer bytes a
weight has (int8 gains most, fp32 least; the README's Speed section has the
figures).

Where huge pages are off or the memory for the copy is short (`why_not`),
the weights stay where they are. Where Linux has no free huge page, the
arena has ordinary pages: only the copy is spent.
"""

import ctypes
import logging
import math
import sys
from pathlib import Path
from typing import Optional

import torch

logger = logging.getLogger("llama")

HUGE_PAGE = 2 << 20  # bytes: x86-64's and most arm64 kernels' transparent huge page
MADV_HUGEPAGE = 14  # <linux/mman.h>
ALIGN = 64  # each tensor on a cache line of its own


def advise_huge_pages(address: int, length: int) -> bool:
    """madvise(MADV_HUGEPAGE) on [address, address + length), both multiples
    of HUGE_PAGE: whether Linux accepted it (False on other systems)."""
    if not sys.platform.startswith("linux") or length <= 0:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise(address, length, MADV_HUGEPAGE) == 0


def padded(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


class HugePageArena:
    """`nbytes` of CPU memory, starting on a huge page, its whole huge pages
    advised for huge pages (`huge`: whether Linux took the advice); `copy(t)` places a copy of `t` in the next free bytes. The copies
    are views of one buffer, which lives as long as any of them."""

    def __init__(self, nbytes: int):
        self.buffer = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)  # untouched: pages come on first write
        self.start = self.offset = -self.buffer.data_ptr() % HUGE_PAGE
        self.stop = self.start + nbytes
        self.huge = advise_huge_pages(self.buffer.data_ptr() + self.start, nbytes // HUGE_PAGE * HUGE_PAGE)

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        return self.take(t.shape, t.dtype).copy_(t)

    def take(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """The next free bytes as an uninitialized tensor of `shape` and `dtype`, for the caller to write."""
        nbytes = math.prod(shape) * dtype.itemsize
        if self.offset + nbytes > self.stop:
            raise ValueError(f"the arena has {self.stop - self.offset} bytes left, not {nbytes}")
        out = self.buffer[self.offset:self.offset + nbytes].view(dtype).view(shape)
        self.offset += padded(nbytes)
        return out


def return_freed_memory() -> None:
    """Gives memory that glibc's malloc holds freed back to the system
    (malloc_trim): tensors below its mmap threshold (up to 32 MB) go back to
    its heap when freed, where they would count as resident memory until
    reused. Nothing elsewhere."""
    if sys.platform.startswith("linux"):
        trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc's; not in musl
        if trim is not None:
            trim(0)


THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def why_not(nbytes: int) -> Optional[str]:
    """Why `nbytes` should not be moved into a HugePageArena here, or None:
    no transparent huge pages to gain (another OS, or set to `never`), or
    less available memory than the copy needs with a fifth to spare (the
    originals are freed only as their copies replace them, and pages mapped
    from the checkpoint file stay resident while they are read)."""
    try:
        setting = THP_SETTING.read_text()
        available = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                         if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return "no transparent huge pages here"
    if "[never]" in setting:
        return f"transparent huge pages are off ({THP_SETTING}: never)"
    if nbytes > 0.8 * available:
        return f"{nbytes / 1e9:.1f} GB of weights to copy, {available / 1e9:.1f} GB of memory available"
    return None


def gather(tensors) -> Optional[HugePageArena]:
    """A HugePageArena sized for `tensors` (CPU, contiguous), or None if
    there are none or the move does not pay here (`why_not`, logged)."""
    return reserve([t.numel() * t.element_size() for t in tensors])


def reserve(sizes) -> Optional[HugePageArena]:
    """A HugePageArena for tensors of `sizes` bytes, or None as `gather`."""
    total = sum(padded(n) for n in sizes)
    if not total:
        return None
    reason = why_not(total)
    if reason is not None:
        logger.info("Weights stay in their own pages: %s", reason)
        return None
    return HugePageArena(total)
