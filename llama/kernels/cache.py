"""The kernel cache: a directory of compiled libraries that this process
loads, and so runs as its user. It is treated as trusted code, and nothing
in it is trusted that the user did not build.

Design. `load(directory, stem, build)` returns a ctypes.CDLL of the
library `stem`-<sha256>.so in `directory`, building it first with
`build(path)` when no library there hashes to the digest in its name. The
digest is part of the name, recorded by the same rename that publishes the
library: there is no second file to keep in step with it, and one build is
one file. Every step holds an exclusive flock on the directory itself (no
lock file is left behind), so two processes never build at once and a build
in progress is never taken for a killed one.

Invariants.
- The directory is private: owned by the user and writable by no group
  and no one else, created 0700 (missing parents too). Every directory
  above it (of its real path, links resolved) belongs to the user or root,
  and is writable only by its owner unless it is sticky (/tmp is fine as a
  parent: others cannot rename or delete what is ours there). Otherwise
  `Untrusted` is raised, naming the directory, who can write it, and the
  fix, and nothing in it is opened.
- A library is loaded only if its sha256 equals the digest in its name,
  written when it was built. It is opened with O_NOFOLLOW and O_NONBLOCK
  (a symbolic link is never followed, a FIFO never blocks), must be a
  regular file of the user, and at most MAX_LIBRARY bytes (a planted
  100 GB file is not read). One under our name that fails any of this is
  removed and the library rebuilt.
- The bytes loaded are the bytes checked: the library is opened once,
  hashed from that descriptor, and loaded through /proc/self/fd/N, which
  names that open file whatever happens to the name afterwards. The
  descriptor stays open for the life of the process: glibc's dlopen first
  matches a path it already loaded by name, so a number reused for a later
  library would return the earlier one. Where /proc is absent (macOS), the
  descriptor's bytes are copied, hashed as they are read, into a new
  private file that is loaded and unlinked (a new random name: no name
  match either). Copy-and-verify on Linux too would cost a write of the
  library at every start; /proc costs nothing.
- Builds write to a temporary `stem`.<random>.tmp created with O_EXCL in
  the directory, are hashed, and renamed into place (a rename replaces a
  link at the name, never writes through it). Temporaries left by killed
  builds (`kernels-*.tmp`) are removed by the next process that takes the
  lock: no one else can be building.

Failure modes. An untrusted directory raises `Untrusted` (the caller reports
it and runs without the library). A library that differs from the digest
in its name (planted, cut short, foreign, empty, a link, not a regular
file) is removed and rebuilt, never loaded; a directory under such a name
is left alone. A failing build raises what `build` raises (OSError,
RuntimeError) with nothing left behind. Two processes that both find the
library missing build it one after the other; the second finds the
first's and loads it.

Not promised: the digest tells a damaged or foreign file from the one
built, not the user's own build from a file someone with the user's
permissions wrote there (with a digest to match); keeping everyone else
out of the directory is what the ownership and mode checks are for.
"""

import ctypes
import fcntl
import hashlib
import os
import secrets
import stat
import time
from typing import Callable, List, Tuple

MAX_LIBRARY = 64 << 20  # a library larger than this is not ours (kernels.c builds to about 70 KB)
_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)  # O_NONBLOCK: a FIFO never blocks
_HELD: List[int] = []  # descriptors of loaded libraries, open for the process's life (see the docstring)


class Untrusted(Exception):
    """The kernel cache directory could be written by someone else: its message names it, who, and the fix."""


class Busy(Exception):
    """Another process held the cache's lock for LOCK_WAIT_S: its message names the directory and the fix."""


# How long `load` waits for another process's build: a cold build takes
# seconds to tens of seconds on a busy machine; a lock held longer belongs to
# a process that hangs or is stopped (a debugger), and waiting on it would
# hang every command with no word. Then the caller runs without our kernels.
LOCK_WAIT_S = 120.0


def _lock(dirfd: int, real: str) -> None:
    """An exclusive flock on the directory, waiting at most LOCK_WAIT_S."""
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(dirfd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when dirfd closes
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise Busy(f"another process has held the kernel cache {real} for {LOCK_WAIT_S:g} s (a build "
                           "that hangs, or a process stopped in a debugger): end it, or set LLAMA_NATIVE_CACHE to "
                           "another private directory") from None
            time.sleep(0.05)


def _user(uid: int) -> str:
    try:
        import pwd
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def _writers(st: os.stat_result) -> str:
    """Who besides the owner can write a directory with this stat."""
    who = []
    if st.st_mode & stat.S_IWGRP:
        try:
            import grp
            who.append(f"the group {grp.getgrgid(st.st_gid).gr_name}")
        except (ImportError, KeyError):
            who.append(f"the group {st.st_gid}")
    if st.st_mode & stat.S_IWOTH:
        who.append("everyone")
    return " and ".join(who)


def _make(path: str) -> None:
    """Create `path` and its missing parents, each 0700."""
    missing = []
    while not os.path.lexists(path):
        missing.append(path)
        path = os.path.dirname(path)
    for p in reversed(missing):
        try:
            os.mkdir(p, 0o700)  # the umask can only take bits away from 0700
        except FileExistsError:
            pass


def open_private(directory: str) -> Tuple[str, int]:
    """(real path, open descriptor) of `directory` once checked private (created
    0700 if missing); raises Untrusted otherwise."""
    if not hasattr(os, "getuid"):
        raise Untrusted("the kernel cache needs POSIX owners and permissions to be trusted")
    directory = os.path.abspath(os.path.expanduser(directory))
    fix = "set LLAMA_NATIVE_CACHE to a private directory of your own (e.g. ~/.cache/llama/native)"
    try:
        _make(directory)
    except OSError as e:
        raise Untrusted(f"cannot create the kernel cache {directory} ({e.strerror}): {fix}") from None
    real, uid = os.path.realpath(directory), os.getuid()
    parent = os.path.dirname(real)
    while True:
        st = os.stat(parent)
        if st.st_uid not in (uid, 0):
            raise Untrusted(f"the kernel cache {real} is inside {parent}, which belongs to {_user(st.st_uid)}, "
                            f"who could replace it with a library that runs as you: {fix}")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
            raise Untrusted(f"the kernel cache {real} is inside {parent}, writable by {_writers(st)} and not sticky "
                            f"(mode {stat.S_IMODE(st.st_mode):04o}), who could replace it with a library that runs "
                            f"as you: {fix}")
        if os.path.dirname(parent) == parent:
            break
        parent = os.path.dirname(parent)
    try:
        fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise Untrusted(f"the kernel cache {real} is not a directory ({e.strerror}): remove it, or {fix}") from None
    st = os.fstat(fd)
    problem = None
    if st.st_uid != uid:
        problem = (f"the kernel cache {real} belongs to {_user(st.st_uid)}, not to you ({_user(uid)}): a library "
                   f"there would run as you. Remove it (as its owner), or {fix}")
    elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problem = (f"the kernel cache {real} is writable by {_writers(st)} (mode {stat.S_IMODE(st.st_mode):04o}): "
                   f"a library planted there would run as you. Run `chmod 700 {real}` (the libraries in it are "
                   f"checked and rebuilt), or {fix}")
    if problem:
        os.close(fd)
        raise Untrusted(problem)
    return real, fd


def _regular(fd: int) -> bool:
    st = os.fstat(fd)
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and st.st_size <= MAX_LIBRARY


def _sha256(fd: int) -> str:
    h, offset = hashlib.sha256(), 0
    while chunk := os.pread(fd, 1 << 20, offset):
        h.update(chunk)
        offset += len(chunk)
    return h.hexdigest()


def _open(dirfd: int, name: str):
    """A descriptor of regular file `name` of the user (not through a link), or None."""
    try:
        fd = os.open(name, _OPEN, dir_fd=dirfd)
    except OSError:  # missing, a link (ELOOP), unreadable
        return None
    if not _regular(fd):
        os.close(fd)
        return None
    return fd


def _name(stem: str, digest: str) -> str:
    return f"{stem}-{digest}.so"


def _cached(dirfd: int, stem: str):
    """(descriptor, digest) of a library `stem`-<sha256>.so whose bytes hash to
    the digest in its name, or None. Libraries under such a name that do not
    (cut short, planted, foreign, empty, a link, not a file) are removed."""
    for name in sorted(os.listdir(dirfd)):
        digest = name[len(stem) + 1:-3]
        if not (name.startswith(f"{stem}-") and name.endswith(".so") and len(digest) == 64):
            continue
        fd = _open(dirfd, name)
        if fd is not None and _sha256(fd) == digest:
            return fd, digest
        if fd is not None:
            os.close(fd)
        try:
            if not stat.S_ISDIR(os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode):  # a directory: left alone
                _unlink(dirfd, name)
        except OSError:
            pass
    return None


def _temporary(dirfd: int, stem: str) -> Tuple[str, int]:
    """A new empty file `stem`.<random>.tmp, created exclusively (never through a planted link)."""
    name = f"{stem}.{secrets.token_hex(8)}.tmp"
    return name, os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dirfd)


def _unlink(dirfd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dirfd)
    except FileNotFoundError:
        pass


def _sweep(dirfd: int) -> None:
    """Remove the temporaries of killed builds (called under the lock: no build is running)."""
    for name in os.listdir(dirfd):
        if name.startswith("kernels-") and name.endswith(".tmp"):
            _unlink(dirfd, name)


def _build(real: str, dirfd: int, stem: str, build: Callable[[str], None]) -> Tuple[int, str]:
    """Build the library under a temporary name and rename it to `stem`-<its
    sha256>.so: (descriptor of what was built, its digest)."""
    library, fd = _temporary(dirfd, stem)
    os.close(fd)
    fd = None
    try:
        build(os.path.join(real, library))
        fd = _open(dirfd, library)
        if fd is None:
            raise RuntimeError(f"the build left no library at {os.path.join(real, library)}")
        digest = _sha256(fd)
        # a rename replaces a link at the name, never follows it
        os.replace(library, _name(stem, digest), src_dir_fd=dirfd, dst_dir_fd=dirfd)
        built, fd = fd, None
        return built, digest
    finally:
        if fd is not None:
            os.close(fd)
        _unlink(dirfd, library)


def _dlopen(real: str, dirfd: int, stem: str, fd: int, digest: str) -> ctypes.CDLL:
    """Load the open file `fd`, whose bytes hash to `digest` (see the docstring for why this way)."""
    if os.path.isdir("/proc/self/fd"):
        try:
            lib = ctypes.CDLL(f"/proc/self/fd/{fd}")
        except BaseException:
            os.close(fd)
            raise
        _HELD.append(fd)
        return lib
    copy, out = _temporary(dirfd, stem)
    try:
        h, offset = hashlib.sha256(), 0
        with os.fdopen(out, "wb") as f:
            while chunk := os.pread(fd, 1 << 20, offset):
                h.update(chunk)
                f.write(chunk)
                offset += len(chunk)
        if h.hexdigest() != digest:
            raise RuntimeError(f"{os.path.join(real, stem)}.so changed while it was loaded")
        return ctypes.CDLL(os.path.join(real, copy))
    finally:
        os.close(fd)
        _unlink(dirfd, copy)


def load(directory: str, stem: str, build: Callable[[str], None]) -> Tuple[ctypes.CDLL, str]:
    """(library, its path): `stem`-<sha256>.so from the private `directory`,
    built by `build(path)` unless one there matches the digest in its name.
    Raises Untrusted (the directory), Busy (its lock held too long), or what
    `build` or ctypes raise."""
    real, dirfd = open_private(directory)
    try:
        _lock(dirfd, real)
        _sweep(dirfd)
        found = _cached(dirfd, stem)
        fd, digest = found if found is not None else _build(real, dirfd, stem, build)
        return _dlopen(real, dirfd, stem, fd, digest), os.path.join(real, _name(stem, digest))
    finally:
        os.close(dirfd)
