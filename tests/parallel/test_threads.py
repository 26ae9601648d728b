"""--threads and its default: physical cores of the CPU affinity, divided among the local ranks."""

import logging
import re

import pytest
import torch

from conftest import build_tiny
from llama.parallel import threads as th


def fake_sysfs(root, topology):
    """/sys/devices/system/cpu with cpuN/topology/{physical_package_id,core_id} for each cpu: (package, core)."""
    for cpu, (package, core) in topology.items():
        d = root / f"cpu{cpu}" / "topology"
        d.mkdir(parents=True)
        (d / "physical_package_id").write_text(f"{package}\n")
        (d / "core_id").write_text(f"{core}\n")
    return root


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def eight_cpus(monkeypatch, tmp_path):
    """Logical CPUs 0-7: two packages of two cores with two hyper-threads each; this process may use all."""
    topology = {0: (0, 0), 1: (0, 1), 2: (1, 0), 3: (1, 1), 4: (0, 0), 5: (0, 1), 6: (1, 0), 7: (1, 1)}
    monkeypatch.setattr(th.os, "sched_getaffinity", lambda pid: set(topology))
    monkeypatch.setattr(th, "SYSFS_CPU", fake_sysfs(tmp_path / "cpu", topology))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    return tmp_path / "cpu"


def test_physical_cores_count_package_and_core(eight_cpus):
    assert th.physical_cores(range(8), eight_cpus) == 4  # hyper-threads of one core count once
    assert th.physical_cores([0, 4], eight_cpus) == 1  # two threads of core 0 in package 0
    assert th.physical_cores([0, 2], eight_cpus) == 2  # core 0 of each package: two cores
    assert th.physical_cores([0, 1, 2, 3], eight_cpus.parent / "missing") == 4  # unreadable: logical count


def test_default_is_physical_cores_of_the_affinity_per_local_rank(eight_cpus, monkeypatch):
    assert th.default_threads(sysfs=eight_cpus) == 4
    assert th.default_threads({"LOCAL_WORLD_SIZE": "2"}, eight_cpus) == 2
    assert th.default_threads({"LOCAL_WORLD_SIZE": "8"}, eight_cpus) == 1  # never 0
    monkeypatch.setattr(th.os, "sched_getaffinity", lambda pid: {0, 1, 4, 5})  # taskset -c 0,1,4,5
    assert th.default_threads(sysfs=eight_cpus) == 2
    assert th.default_threads(sysfs=eight_cpus.parent / "missing") == 4  # no topology: logical CPUs


def test_omp_num_threads_counts_only_when_the_user_set_it():
    assert th.omp_threads({"OMP_NUM_THREADS": "3"}) == 3
    assert th.omp_threads({}) is None
    assert th.omp_threads({"OMP_NUM_THREADS": "many"}) is None
    # torchrun's own setting for several processes per node is not the user's choice
    torchrun = {"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x"}
    assert th.omp_threads(torchrun) is None
    assert th.omp_threads({**torchrun, "OMP_NUM_THREADS": "2"}) == 2


@pytest.mark.parametrize("bad", [0, -1, True, 2.5, "2"])
def test_bad_thread_counts_are_refused_naming_the_flag(bad, eight_cpus):
    with pytest.raises(ValueError, match=rf"--threads must be a positive integer, got {bad!r}; leave it unset"):
        th.check_threads(bad)


def test_more_threads_than_cpus_is_refused(eight_cpus):
    with pytest.raises(ValueError, match=r"--threads 9 is more than the 8 CPU\(s\) this process may use; give at most 8"):
        th.check_threads(9)
    with pytest.raises(ValueError, match=r"OMP_NUM_THREADS 9 is more than"):
        th.check_threads(9, "OMP_NUM_THREADS")


def test_set_threads_applies_the_count(eight_cpus, monkeypatch, restore_threads, caplog):
    assert th.set_threads(3) == 3 and torch.get_num_threads() == 3
    assert th.set_threads(None) == 4 and torch.get_num_threads() == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert th.set_threads(None) == 2 and torch.get_num_threads() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with caplog.at_level(logging.WARNING, logger="llama"):
        th.set_threads(3)
    assert "4 processes on this node x 3 threads each is more than its 8 CPUs" in caplog.text


def test_build_applies_threads_and_says_so(make_ckpt, restore_threads, caplog):
    ckpt = make_ckpt("llama3")
    torch.set_num_threads(2)
    with caplog.at_level(logging.INFO, logger="llama"):
        from llama import Llama

        Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=32, max_batch_size=1, device="cpu",
                    dtype="float32", threads=1)
    assert torch.get_num_threads() == 1
    assert re.search(r"float32 \(as asked\), (our AVX(-512|2)|PyTorch's) kernels, 1 thread, rank 0 of 1", caplog.text)


def test_build_default_threads(make_ckpt, monkeypatch, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(th, "default_threads", lambda: 1)
    torch.set_num_threads(2)
    build_tiny(make_ckpt("llama3"), max_seq_len=32, max_batch_size=1)
    assert torch.get_num_threads() == 1


def test_build_refuses_bad_threads_before_loading(tmp_path):
    from llama import Llama

    # the checkpoint directory does not exist: the thread count is checked first
    with pytest.raises(ValueError, match=r"--threads must be a positive integer, got 0"):
        Llama.build(str(tmp_path / "none"), "tokenizer.model", max_seq_len=32, max_batch_size=1, threads=0)
