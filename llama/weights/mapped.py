"""Pages of memory-mapped checkpoint files, given back once they are read.

torch.load(mmap=True) maps each shard file privately and read-only in
practice (nothing writes to a loaded checkpoint tensor). Reading a tensor
brings its pages in, and they count as the process's resident memory (VmRSS,
and its peak VmHWM) for as long as the mapping lives, although the kernel
could drop them at any time: a load that turns each tensor into something
else (quantized weights, a copy on huge pages) would hold the whole file on
top of what it made. `release(tensors)` drops the pages of tensors that are
done with (madvise MADV_DONTNEED): a later read of them reads the file again,
so nothing is lost.

The writer of quantized checkpoints (llama/weights/writer.py StreamedShard)
writes through a shared mapping of its output file: there, dropping a page
leaves its bytes in the page cache, to be written to the file as usual.

Invariant: only pages of mappings of checkpoint files (*.pth), as
/proc/self/maps lists them, are released (private ones are never written to here, so the file holds their
bytes; shared ones keep theirs in the page cache), and only whole pages
inside a tensor's bytes. On anonymous memory MADV_DONTNEED would zero the
pages: a tensor that was copied out of the files (a slice gathered from two
shards) is left alone.
Elsewhere than Linux, nothing happens.
"""

import ctypes
import mmap
import sys
from typing import Iterable, List, Tuple

import torch

MADV_DONTNEED = 4  # <sys/mman.h>
PAGE = mmap.PAGESIZE


def file_mappings() -> List[Tuple[int, int]]:
    """[start, end) of this process's mappings of checkpoint files (names
    with ".pth" in them: shards, and the writer's temporary ones)."""
    spans = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                if ".pth" not in line:
                    continue
                fields = line.split(maxsplit=5)
                if len(fields) < 6 or fields[4] == "0" or not fields[5].startswith("/"):
                    continue
                start, end = (int(x, 16) for x in fields[0].split("-"))
                spans.append((start, end))
    except OSError:
        return []
    return spans


def release(tensors: Iterable[torch.Tensor]) -> int:
    """Drops the resident pages of `tensors` that lie in private file
    mappings (see the module docstring); returns the bytes released."""
    if not sys.platform.startswith("linux"):
        return 0
    spans = file_mappings()
    if not spans:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    released = 0
    for t in tensors:
        if t.device.type != "cpu" or t.numel() == 0:
            continue
        start = -(-t.data_ptr() // PAGE) * PAGE
        stop = (t.data_ptr() + t.numel() * t.element_size()) // PAGE * PAGE
        if stop <= start or not any(lo <= start and stop <= hi for lo, hi in spans):
            continue
        if libc.madvise(start, stop - start, MADV_DONTNEED) == 0:
            released += stop - start
    return released
