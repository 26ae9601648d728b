"""Reading a file whose name came from a user or from another file
(--tokenizer_path, params.json, a tokenizer sidecar, pipeline.json,
manifest.json, a dialog given to /load). No torch; imports nothing of llama.

Design: one function, `read_user_bytes`, opens the name once and judges the
file it got, not the name: `os.open` with O_NONBLOCK (so a FIFO with no
writer cannot hang the open), then `fstat` on the descriptor, which sees
the file a symbolic link leads to. Only a regular file is read; anything
else is refused naming what it is ("a FIFO", "a character device", "a
directory", "a socket"), so `/dev/zero`, a pipe or a terminal never reach a
parser. At most `cap + 1` bytes are read whatever the size said (a file
growing while it is read, or a /proc-like file reporting size 0, still
stops at the cap), so the memory a hostile file can cost is bounded by its
kind's cap before any parser sees a byte.

Invariants: the bytes returned come from one open of one regular file and
number at most the cap of its kind; every refusal is the caller's error type
(a ValueError subclass) whose message names the file, what is wrong and
the caller's fix; a missing file is a FileNotFoundError naming the file.

Failure modes: a permission error or a symbolic-link loop becomes the
caller's error type with the system's reason; a file replaced between two
reads by other code is not this module's concern (it reads once).
"""

import errno
import os
import stat
from pathlib import Path
from typing import Optional, Type

MiB = 1 << 20

# The most bytes a file of each kind may hold, with the reason.
LIMITS = {
    # Llama 3's 128k-token tiktoken file is 2.2 MB, a Llama 2 SentencePiece
    # model 0.5 MB, SmolLM2's 49k BPE 0.8 MB; a 256k vocabulary (the largest
    # any released model has) is about 5 MB in either format. 16 MiB is three
    # times that.
    "tokenizer": 16 * MiB,
    # params.json is ~200 bytes, a sidecar a few KB, manifest.json ~150 bytes
    # per shard, pipeline.json ~100 bytes.
    "json": 1 * MiB,
    # A dialog that can be chatted with fits the longest Llama context,
    # 131,072 tokens. A token is ~4 bytes of text; even written with
    # ensure_ascii (6 bytes per \uXXXX escape, ~1.5 characters per token
    # for CJK text) a full context is ~1.2 MiB of JSON. 4 MiB is three times
    # that, and bounds the worst file (a list of small nested lists, ~50
    # bytes of Python objects per byte of JSON) to ~200 MB while it is parsed.
    "dialog": 4 * MiB,
}
_NOUN = {"json": "JSON"}


def _what(mode: int) -> str:
    """What a file that is not a regular file is, in words."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def read_user_bytes(path, kind: str, fix: str, missing: str = "", error: Type[ValueError] = ValueError,
                    max_bytes: Optional[int] = None) -> bytes:
    """The bytes of the regular file `path` (symbolic links followed), at most
    LIMITS[kind] (or `max_bytes`) of them.

    FileNotFoundError: no such file (message: the path, then `missing`).
    `error` (with `fix` at the end): a directory, FIFO, device or socket; a
    file over the cap; a file that cannot be opened (permissions, link loop).
    """
    path = Path(path)
    cap = LIMITS[kind] if max_bytes is None else max_bytes
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        if os.path.islink(path):
            raise FileNotFoundError(f"{path} is a symbolic link to {os.readlink(path)}, which does not exist"
                                    + (f": {missing}" if missing else f"; {fix}")) from None
        raise FileNotFoundError(f"{path} not found" + (f": {missing}" if missing else "")) from None
    except OSError as e:
        if e.errno == errno.ENXIO:  # opening a socket
            raise error(f"{path} is a socket, not a regular file; {fix}") from None
        raise error(f"{path} cannot be opened ({e.strerror}); {fix}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{path} is {_what(info.st_mode)}, not a regular file; {fix}")
        noun = _NOUN.get(kind, kind)
        if info.st_size > cap:
            raise error(f"{path} is {info.st_size:,} bytes, more than the {cap:,} a {noun} file can need; {fix}")
        chunks, total = [], 0
        while total <= cap:  # until EOF, or one byte past the cap
            chunk = os.read(fd, min(cap + 1 - total, 4 * MiB))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    finally:
        os.close(fd)
    if total > cap:
        raise error(f"{path} grew past the {cap:,} bytes a {noun} file can need while it was read; {fix}")
    return b"".join(chunks)
