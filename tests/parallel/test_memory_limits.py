"""available_memory takes the process's real limits into account: the machine's
MemAvailable, RLIMIT_AS (`ulimit -v`) and the cgroup's memory limit (v2 and
v1, the process's cgroup and those above it); the KV-cache check then
refuses with the numbers instead of an allocator traceback."""

import os
import resource
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO
from llama.builder import check_cache_memory
from llama.parallel import memory
from llama.weights.args import ModelArgs
from llama.weights.checkpoint import CheckpointError

GIB = 1024**3


@pytest.fixture
def fake_proc(tmp_path, monkeypatch):
    """Points memory's /proc and /sys paths at tmp files: 64 GiB available, no
    cgroup and no address space limit unless a test writes one."""
    proc, sys_root = tmp_path / "proc", tmp_path / "cgroup"
    proc.mkdir()
    sys_root.mkdir()
    (proc / "meminfo").write_text(f"MemTotal: {128 * GIB // 1024} kB\nMemAvailable: {64 * GIB // 1024} kB\n")
    (proc / "status").write_text(f"Name: python\nVmSize: {GIB // 1024} kB\n")
    (proc / "cgroup").write_text("0::/\n")
    monkeypatch.setattr(memory, "MEMINFO", str(proc / "meminfo"))
    monkeypatch.setattr(memory, "PROC_STATUS", str(proc / "status"))
    monkeypatch.setattr(memory, "PROC_CGROUP", str(proc / "cgroup"))
    monkeypatch.setattr(memory, "CGROUP_ROOT", str(sys_root))
    monkeypatch.setattr(memory.resource, "getrlimit", lambda which: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    return proc, sys_root


def _cgroup_v2(sys_root, path, limit, current):
    folder = sys_root / path
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "memory.max").write_text(f"{limit}\n")
    (folder / "memory.current").write_text(f"{current}\n")


def test_without_limits_the_machine_decides(fake_proc):
    cpu = torch.device("cpu")
    assert memory.available_memory(cpu) == 64 * GIB
    assert memory.available_memory_and_limit(cpu) == (64 * GIB, memory.MACHINE)
    assert memory.available_memory(torch.device("meta")) is None


def test_cgroup_v2_memory_max_minus_current(fake_proc):
    proc, sys_root = fake_proc
    (proc / "cgroup").write_text("0::/user.slice/job\n")
    _cgroup_v2(sys_root, "user.slice/job", 4 * GIB, 1 * GIB)
    assert memory.available_memory_and_limit(torch.device("cpu")) == (3 * GIB, memory.CGROUP)
    # "max" means no limit: the machine decides again.
    (sys_root / "user.slice/job/memory.max").write_text("max\n")
    assert memory.available_memory(torch.device("cpu")) == 64 * GIB
    # A parent's limit binds the children too.
    _cgroup_v2(sys_root, "user.slice", 2 * GIB, GIB + GIB // 2)
    assert memory.available_memory(torch.device("cpu")) == GIB // 2
    # Usage past the limit (reclaimable cache) is no room at all, not a negative one.
    (sys_root / "user.slice/memory.current").write_text(f"{3 * GIB}\n")
    assert memory.available_memory(torch.device("cpu")) == 0
    # Inactive page cache counts as room: the kernel drops it before refusing memory.
    (sys_root / "user.slice/memory.stat").write_text(f"anon 1000\ninactive_file {GIB}\nactive_file 5\n")
    assert memory.available_memory(torch.device("cpu")) == 0
    (sys_root / "user.slice/memory.stat").write_text(f"anon 1000\ninactive_file {2 * GIB}\n")
    assert memory.available_memory(torch.device("cpu")) == GIB


def test_cgroup_v1_limit_and_unlimited(fake_proc):
    proc, sys_root = fake_proc
    (proc / "cgroup").write_text("5:cpu,cpuacct:/\n4:memory:/docker/abc\n0::/\n")
    folder = sys_root / "memory" / "docker" / "abc"
    folder.mkdir(parents=True)
    (folder / "memory.limit_in_bytes").write_text(f"{8 * GIB}\n")
    (folder / "memory.usage_in_bytes").write_text(f"{2 * GIB}\n")
    assert memory.available_memory_and_limit(torch.device("cpu")) == (6 * GIB, memory.CGROUP)
    (folder / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert memory.available_memory(torch.device("cpu")) == 64 * GIB


def test_unreadable_or_odd_files_leave_that_limit_out(fake_proc):
    proc, sys_root = fake_proc
    (proc / "cgroup").write_text("garbage\n0::/../../etc\n0::/gone\n")
    (proc / "meminfo").write_text("MemAvailable: lots kB\n")
    free = memory.available_memory(torch.device("cpu"))  # sysconf's free pages, no cgroup
    assert free is None or free > 0


def test_address_space_limit_minus_mapped_size(fake_proc, monkeypatch):
    monkeypatch.setattr(memory.resource, "getrlimit", lambda which: (3 * GIB, resource.RLIM_INFINITY))
    assert memory.available_memory_and_limit(torch.device("cpu")) == (2 * GIB, memory.ADDRESS_SPACE)


def test_address_space_limit_of_a_real_process():
    """Under a real RLIMIT_AS the answer is at most the limit less what the process maps."""
    code = ("import resource, torch; from llama.parallel import memory; "
            "free, what = memory.available_memory_and_limit(torch.device('cpu')); "
            "print(free, what == memory.ADDRESS_SPACE, resource.getrlimit(resource.RLIMIT_AS)[0])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (3 * GIB, 3 * GIB)))
    assert r.returncode == 0, r.stderr
    free, is_address_space, limit = r.stdout.split()
    assert int(limit) == 3 * GIB and 0 < int(free) < 3 * GIB
    with open("/proc/meminfo") as f:
        machine = int(next(line for line in f if line.startswith("MemAvailable:")).split()[1]) * 1024
    if machine > 3 * GIB:
        assert is_address_space == "True"


def test_cache_check_names_the_cgroup_limit(fake_proc):
    proc, sys_root = fake_proc
    _cgroup_v2(sys_root, "", 2 * GIB, GIB)  # a container: its cgroup is the namespace's root
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=10_000_000,
                     max_batch_size=1)
    with pytest.raises(CheckpointError) as e:
        check_cache_memory(args, 1, torch.device("cpu"), torch.float32)
    assert "but only 1.0 GiB is free on cpu; lower --max_seq_len or --max_batch_size, or raise the memory " \
           "limit of this process's cgroup (a container's limit: memory.max)" in str(e.value)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=2048, max_batch_size=1)
    check_cache_memory(args, 1, torch.device("cpu"), torch.float32)  # fits: no error


# `python -m llama ARGS`, writing its own peak memory (VmHWM, in KiB) to $PEAK_FILE at exit:
# ru_maxrss would keep the forking pytest's peak across exec.
WITH_PEAK = r"""
import atexit, os, runpy, sys
def record():
    kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    with open(os.environ["PEAK_FILE"], "w") as f:
        f.write(str(kb))
atexit.register(record)
sys.argv = ["llama"] + sys.argv[1:]
runpy.run_module("llama", run_name="__main__", alter_sys=True)
"""


def test_llama_under_ulimit_v_refuses_a_huge_cache_in_seconds(make_ckpt, tmp_path):
    """`llama complete --max_seq_len 10000000` under `ulimit -v 3G`: a 5.7 GiB
    cache used to be allocated and end in an allocator traceback; now one
    message, exit 2, in seconds and a few hundred MB."""
    ckpt = make_ckpt("llama3")
    out, err = tmp_path / "out", tmp_path / "err"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PEAK_FILE": str(tmp_path / "peak")}
    start = time.monotonic()
    with open(out, "w") as o, open(err, "w") as e:
        p = subprocess.Popen([sys.executable, "-c", WITH_PEAK, "complete", "--ckpt_dir", str(ckpt), "--prompt", "x",
                              "--max_seq_len", "10000000", "--device", "cpu", "--dtype", "float32", "--threads", "1"],
                             stdout=o, stderr=e, stdin=subprocess.DEVNULL, env=env, cwd=tmp_path,
                             preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (3 * GIB, 3 * GIB)))
        _, status, usage = os.wait4(p.pid, 0)  # this child's own usage
        p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - start
    stderr = err.read_text()
    assert p.returncode == 2, stderr
    assert "Traceback" not in stderr and "Loaded" not in stderr and out.read_text() == ""
    assert stderr.startswith("error: max_seq_len=10000000 and max_batch_size=1 need a KV cache of ")
    assert "GiB is free on cpu; lower --max_seq_len or --max_batch_size" in stderr
    free = float(stderr.split("but only ")[1].split(" GiB")[0])
    assert free < 3.0  # the address space limit, not the machine's free memory
    cpu_s = usage.ru_utime + usage.ru_stime
    assert cpu_s < 5.0 and wall < 20.0, (cpu_s, wall)  # wall time allows for a busy machine
    peak_kb = int((tmp_path / "peak").read_text())
    assert peak_kb < 500 * 1024, peak_kb
