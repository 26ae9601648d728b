"""The kernel cache as trusted code (llama/kernels/cache.py through
native.library()): a library someone planted never runs, a damaged one is
rebuilt, links are not followed, a directory others can write is refused
with a message that names it, who can write it and the fix (and the command
runs on PyTorch's kernels), and killed builds leave nothing for long.

The build itself is replaced by a copy of kernels.c compiled once per
module (a real build takes a second or two); the compiler's own run is
tested in test_native_kernels.py. Loading anything that might be hostile
(a planted constructor, a truncated library that would SIGBUS) happens in
a subprocess."""

import hashlib
import json
import os
import platform
import pwd
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from llama.kernels import cache, native

REPO = Path(__file__).resolve().parents[2]
CPU_FLAGS = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
CAN_BUILD = (bool(shutil.which("cc") or shutil.which("gcc")) and " avx2 " in CPU_FLAGS and " fma " in CPU_FLAGS
             and platform.machine().lower() in ("x86_64", "amd64"))
pytestmark = pytest.mark.skipif(not CAN_BUILD, reason="no C compiler or no x86 AVX2+FMA: no kernel cache to test")

PLANTED_C = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    const char *marker = getenv("PLANTED_MARKER");
    FILE *f = marker ? fopen(marker, "w") : NULL;
    if (f) { fputs("the planted library ran\n", f); fclose(f); }
}
int llama_kernels_version(void) { return 5; }
"""
FOREIGN_C = "int foreign(void) { return 1; }\n"

# One process loads native.library() from each cache directory given, with
# the build replaced by a copy of the prebuilt library, and says what it got.
RUNNER = r"""
import json, os, shutil, sys, time
import torch
from llama.kernels import native
prebuilt, compiles, results = sys.argv[1], [], []
native._compile = lambda cc, out: (compiles.append(out), shutil.copyfile(prebuilt, out))
for directory in sys.argv[2:]:
    os.environ["LLAMA_NATIVE_CACHE"] = directory
    native.library.cache_clear()
    compiles.clear()
    start = time.perf_counter()
    lib = native.library()
    seconds = time.perf_counter() - start
    works = False
    if lib is not None:
        x, w = torch.randn(3, 64), torch.randn(16, 64)
        works = bool(torch.allclose(native.linear(x, w), x @ w.T, atol=1e-4))
    results.append({"status": native.status(), "works": works, "compiles": len(compiles), "seconds": seconds})
# VmHWM: this process's own peak (ru_maxrss would keep the forking pytest's across exec)
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"results": results, "peak_mb": peak_kb / 1024}))
"""


def _cc(source: str, out: Path) -> Path:
    c = out.with_suffix(".c")
    c.write_text(source)
    subprocess.run([shutil.which("cc") or "gcc", "-shared", "-fPIC", str(c), "-o", str(out)], check=True)
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(kernels.c compiled once, a library with a constructor that writes
    $PLANTED_MARKER, a foreign library, the name the cache gives our build)."""
    d = tmp_path_factory.mktemp("built")
    prebuilt = d / "kernels.so"
    native._compile(native._compiler(), str(prebuilt))
    directory = d / "discover"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLAMA_NATIVE_CACHE", str(directory))
        mp.setattr(native, "_compile", lambda cc, out: shutil.copyfile(prebuilt, out))
        native.library.cache_clear()
        assert native.library() is not None, native.status()
    native.library.cache_clear()
    (name,) = os.listdir(directory)
    assert name.endswith(f"-{hashlib.sha256(prebuilt.read_bytes()).hexdigest()}.so")
    return prebuilt, _cc(PLANTED_C, d / "planted.so"), _cc(FOREIGN_C, d / "foreign.so"), name


@pytest.fixture
def use_cache(monkeypatch, tmp_path, built):
    """use_cache(directory) -> native.library(), built by copying the
    prebuilt library; returns the list of builds (their output paths)."""
    builds = []

    def compile_(cc, out):
        builds.append(out)
        shutil.copyfile(built[0], out)

    monkeypatch.setattr(native, "_compile", compile_)

    def use(directory):
        monkeypatch.setenv("LLAMA_NATIVE_CACHE", str(directory))
        native.library.cache_clear()
        native.library()
        return builds

    yield use
    monkeypatch.undo()
    native.library.cache_clear()


def _load_elsewhere(built, *directories, marker=None):
    """RUNNER in a subprocess: (its per-directory results, its peak memory in MB)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), PLANTED_MARKER=str(marker or "/nonexistent/marker"))
    out = subprocess.run([sys.executable, "-c", RUNNER, str(built[0]), *map(str, directories)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]  # no SIGBUS, no traceback
    report = json.loads(out.stdout.splitlines()[-1])
    return report["results"], report["peak_mb"]


def _private(path: Path) -> Path:
    path.mkdir(mode=0o700)
    path.chmod(0o700)
    return path


def test_a_planted_library_never_runs_and_ours_load(built, tmp_path):
    prebuilt, planted, _, name = built
    stem = name[:len("kernels-") + 16]
    marker = tmp_path / "marker"
    at_our_name = _private(tmp_path / "ours")
    shutil.copyfile(planted, at_our_name / name)  # where our build is cached, with our digest in the name
    at_old_name = _private(tmp_path / "old")
    shutil.copyfile(planted, at_old_name / f"{stem}.so")  # the name the cache used before it checked digests
    results, _ = _load_elsewhere(built, at_our_name, at_old_name, marker=marker)
    assert not marker.exists(), "the planted library ran"
    for result in results:
        assert result["status"] in ("AVX-512", "AVX2") and result["works"] and result["compiles"] == 1, result
    assert sorted(os.listdir(at_our_name)) == [name]  # the planted file is gone, ours is in its place
    assert (at_our_name / name).read_bytes() == prebuilt.read_bytes()
    assert sorted(os.listdir(at_old_name)) == sorted([f"{stem}.so", name])  # never loaded, left alone


def test_damaged_libraries_are_rebuilt_never_loaded(built, tmp_path):
    """Cut short (mapping it would SIGBUS), empty, foreign, a FIFO (reading
    it would block), a 100 GB sparse file: each is removed and rebuilt."""
    prebuilt, _, foreign, name = built
    cases = {}
    for case in ("truncated", "empty", "foreign", "fifo", "huge"):
        cases[case] = _private(tmp_path / case)
    (cases["truncated"] / name).write_bytes(prebuilt.read_bytes()[:len(prebuilt.read_bytes()) // 2])
    (cases["empty"] / name).write_bytes(b"")
    shutil.copyfile(foreign, cases["foreign"] / name)
    os.mkfifo(cases["fifo"] / name)
    with open(cases["huge"] / name, "wb") as f:
        f.truncate(100 << 30)
    results, peak_mb = _load_elsewhere(built, *cases.values())
    for case, result in zip(cases, results):
        assert result["status"] in ("AVX-512", "AVX2") and result["works"], (case, result)
        assert result["compiles"] == 1, (case, result)
        assert sorted(os.listdir(cases[case])) == [name], case
        assert (cases[case] / name).read_bytes() == prebuilt.read_bytes(), case
        assert result["seconds"] < 5, (case, result)
    assert peak_mb < 600, peak_mb  # torch's import (~300 MB) included; the checks read at most 1 MiB at a time


def test_a_link_at_the_librarys_name_is_not_followed(built, tmp_path):
    prebuilt, planted, _, name = built
    marker = tmp_path / "marker"
    target = tmp_path / "elsewhere.so"
    shutil.copyfile(planted, target)
    directory = _private(tmp_path / "cache")
    os.symlink(target, directory / name)
    # A link to a true copy of our library, outside the cache (whoever can
    # write there could swap it): not followed either, though it would match.
    genuine = tmp_path / "genuine.so"
    shutil.copyfile(prebuilt, genuine)
    to_genuine = _private(tmp_path / "to_genuine")
    os.symlink(genuine, to_genuine / name)
    results, _ = _load_elsewhere(built, directory, to_genuine, marker=marker)
    assert not marker.exists(), "the library behind the link ran"
    for d, result in zip((directory, to_genuine), results):
        assert result["works"] and result["compiles"] == 1, result
        assert not (d / name).is_symlink() and (d / name).read_bytes() == prebuilt.read_bytes()
    assert target.read_bytes() == planted.read_bytes()  # the links' targets were not written through
    assert genuine.read_bytes() == prebuilt.read_bytes()


def _refused(use_cache, caplog, directory: Path, *expected: str) -> str:
    before = sorted(os.listdir(directory)) if directory.is_dir() else None
    with caplog.at_level("WARNING", logger="llama"):
        builds = use_cache(directory)
    status = native.status()
    assert native.library() is None and status.startswith("none: "), status
    for text in expected:
        assert text in status, (text, status)
    assert "LLAMA_NATIVE_CACHE" in status, status  # the fix that always works
    assert f"Using PyTorch's kernels: {status}" in caplog.text
    assert builds == []
    if before is not None:
        assert sorted(os.listdir(directory)) == before  # nothing opened, removed or written there
    return status


def test_a_cache_others_can_write_is_refused_and_the_command_runs_without_it(built, use_cache, caplog, tmp_path,
                                                                           make_ckpt):
    _, planted, _, name = built
    world = _private(tmp_path / "world")
    shutil.copyfile(planted, world / name)
    world.chmod(0o777)
    _refused(use_cache, caplog, world, f"the kernel cache {world} is writable by", "everyone", "(mode 0777)",
             f"`chmod 700 {world}`")
    group = _private(tmp_path / "group")
    group.chmod(0o770)
    _refused(use_cache, caplog, group, f"the kernel cache {group} is writable by the group ", "(mode 0770)",
             f"`chmod 700 {group}`")
    # The command still works, on PyTorch's kernels, and says so.
    from llama import Llama
    ckpt = make_ckpt("llama3")
    caplog.clear()
    with caplog.at_level("INFO", logger="llama"):
        llama = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=32, max_batch_size=1,
                            device="cpu", dtype="float32")
    assert "PyTorch's kernels" in caplog.text
    assert llama.text_completion(["Hi"], max_gen_len=2, temperature=0)[0]["generation"] is not None


def test_a_cache_of_another_user_is_refused(use_cache, caplog, tmp_path):
    if os.getuid() != 0:
        pytest.skip("giving a directory to another user needs root")
    nobody = pwd.getpwnam("nobody")
    theirs = _private(tmp_path / "theirs")
    os.chown(theirs, nobody.pw_uid, nobody.pw_gid)
    _refused(use_cache, caplog, theirs, f"the kernel cache {theirs} belongs to nobody (uid {nobody.pw_uid}), "
                                        "not to you (root (uid 0))")
    # ... and so is a cache inside a directory another user owns: they could swap it.
    parent = tmp_path / "their_parent"
    parent.mkdir(mode=0o755)
    _private(parent / "cache")
    os.chown(parent, nobody.pw_uid, nobody.pw_gid)
    _refused(use_cache, caplog, parent / "cache", f"is inside {parent}, which belongs to nobody")


def test_a_cache_under_a_shared_parent_is_refused_unless_the_parent_is_sticky(use_cache, caplog, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    _private(shared / "cache")
    _refused(use_cache, caplog, shared / "cache", f"the kernel cache {shared / 'cache'} is inside {shared}, "
                                                   "writable by the group ", "and everyone and not sticky (mode 0777)")
    shared.chmod(0o1777)  # like /tmp: others cannot rename or delete what is ours in it
    use_cache(shared / "cache")
    assert native.library() is not None, native.status()


def test_a_cache_that_is_a_file_is_refused(use_cache, caplog, tmp_path):
    file = tmp_path / "file"
    file.write_text("not a directory")
    _refused(use_cache, caplog, file, f"the kernel cache {file} is not a directory", "remove it")
    assert file.read_text() == "not a directory"


def test_a_new_cache_is_private_and_a_second_load_does_not_build(built, use_cache, tmp_path):
    directory = tmp_path / "a" / "b" / "cache"
    builds = use_cache(directory)
    assert native.library() is not None, native.status()
    for path in (tmp_path / "a", tmp_path / "a" / "b", directory):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    assert len(builds) == 1 and os.listdir(directory) == [built[3]]
    use_cache(directory)  # a later process (library() is cached per process: cleared here)
    assert native.library() is not None and len(builds) == 1  # loaded from the cache, not built again
    results, _ = _load_elsewhere(built, directory)
    assert results[0]["works"] and results[0]["compiles"] == 0, results


def test_the_temporaries_of_killed_builds_are_removed(built, use_cache, tmp_path):
    directory = _private(tmp_path / "cache")
    stale = ["kernels-0123456789abcdef.1a2b3c4d.tmp", "kernels-0123456789abcdef.tmp"]
    for name in stale:
        (directory / name).write_bytes(b"\x7fELF half a library")
    (directory / "notes.txt").write_text("not ours")
    builds = use_cache(directory)
    assert native.library() is not None and len(builds) == 1
    assert sorted(os.listdir(directory)) == sorted([built[3], "notes.txt"])
    (directory / stale[0]).write_bytes(b"")  # killed after the library was cached: the next start removes it too
    use_cache(directory)
    assert native.library() is not None and len(builds) == 1
    assert sorted(os.listdir(directory)) == sorted([built[3], "notes.txt"])


def test_a_failed_build_leaves_nothing_and_says_why(use_cache, monkeypatch, tmp_path):
    def failing(cc, out):
        Path(out).write_bytes(b"half")
        raise RuntimeError("kernels.c:1: error: something")

    directory = _private(tmp_path / "cache")
    use_cache(directory)
    assert native.library() is not None
    library = directory / os.listdir(directory)[0]
    library.unlink()  # this process has it mapped: writing it in place would SIGBUS the test run
    library.write_bytes(b"damaged")
    monkeypatch.setattr(native, "_compile", failing)
    native.library.cache_clear()
    assert native.library() is None
    assert "building llama/kernels/kernels.c with" in native.status() and "kernels.c:1: error: something" in native.status()
    assert os.listdir(directory) == []  # the damaged library removed, the half-written one too


def test_the_cache_module_loads_only_what_it_checked(built, tmp_path):
    """cache.load directly: the digest is in the name, and the library loaded
    is the open file that was hashed (/proc/self/fd), not whatever the name
    holds later."""
    prebuilt = built[0]
    directory = tmp_path / "cache"
    lib, path = cache.load(str(directory), "kernels-0000000000000000", lambda out: shutil.copyfile(prebuilt, out))
    digest = hashlib.sha256(prebuilt.read_bytes()).hexdigest()
    assert path == str(directory / f"kernels-0000000000000000-{digest}.so")
    assert lib.llama_kernels_version() == native.VERSION
    assert lib._name.startswith("/proc/self/fd/") or not os.path.isdir("/proc/self/fd")
    directory.chmod(0o757)
    with pytest.raises(cache.Untrusted, match="chmod 700"):
        cache.load(str(directory), "kernels-0000000000000000", lambda out: None)


def test_a_lock_held_too_long_is_reported_and_the_command_runs_without_our_kernels(built, use_cache, tmp_path,
                                                                                   monkeypatch):
    """A process that holds the cache's lock and never lets go (a hung build,
    one stopped in a debugger) used to hang every later command with no word;
    now the wait is bounded and says why the kernels are not used."""
    import fcntl

    directory = _private(tmp_path / "cache")
    holder = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)  # another open file: flock conflicts with it
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        monkeypatch.setattr(cache, "LOCK_WAIT_S", 0.2)
        builds = use_cache(directory)
        assert native.library() is None and builds == []
        assert f"another process has held the kernel cache {directory} for 0.2 s" in native.status()
        assert "set LLAMA_NATIVE_CACHE to another private directory" in native.status()
    finally:
        os.close(holder)  # the lock goes with it
    use_cache(directory)
    assert native.library() is not None, native.status()  # free again: built and loaded
