"""Real torchrun launches on CPU (gloo): model parallelism gives the same
tokens and logits as one process, for any checkpoint MP on any world size,
on one node or two, and a dead or hung rank makes the others exit. Ranks on
one host exchange through shared memory (LLAMA_SHM=0: gloo only), which
leaves no file in /dev/shm."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO
from dist_helpers import (WORKER, _worker_pid, free_port, node_folder, one_process_result, run_worker,  # noqa: F401
                          worker_cmd)

pytestmark = pytest.mark.slow

@pytest.fixture(autouse=True)
def no_shared_memory_file_left():
    before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    yield
    after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    assert not {f for f in after - before if f.startswith("llama-")}


@pytest.fixture(scope="module")
def reference(make_ckpt, tmp_path_factory):
    """MP=1 results, one process, per family."""
    tmp = tmp_path_factory.mktemp("ref")
    return {fam: one_process_result(make_ckpt(fam), tmp) for fam in ("llama2", "llama3")}


def assert_same(result, ref, world_size, shared_memory=True):
    assert result["world_size"] == world_size
    # True: shared memory gave exactly the gloo path's sums and gathers; None: not used
    assert result["shared_memory"] is (True if shared_memory and world_size > 1 else None)
    assert result["argmax_ties"]
    assert result["tokens"] == ref["tokens"]
    assert result["joined"] == ref["joined"]  # requests joining a running batch, rank 0 deciding
    assert result["followed"] == ref["followed"]  # requests given to rank 0 only, the others following
    # seeded sampling: the same tokens from the candidates as from the full logits (and as one process) ...
    assert result["sampled"]["tokens"] == result["sampled"]["full"] == ref["sampled"]["tokens"]
    if world_size > 1:  # ... exchanging 1 KB a row (64 candidates), not the logits (4 * 128256 / N bytes)
        assert result["sampled"]["planned"] > 0  # "full" above is a second run, every step on the full logits
        sizes = result["sampled"]["bytes"]
        assert sizes and sum(s == 1040 for s in sizes) >= 0.8 * len(sizes), sizes  # one row a step
    torch.testing.assert_close(result["logits"], ref["logits"], atol=1e-4, rtol=1e-4)  # fp32 reduction order


def test_compiled_mp2_equals_mp1(make_ckpt, reference, tmp_path):
    """Compiled decoding (llama/kernels/compiled.py) with collectives inside the opaque linear layers."""
    assert_same(run_worker(make_ckpt("llama3"), tmp_path, nproc=2, compile=True), reference["llama3"], 2)


# llama3's MP=2 run is the one without shared memory (LLAMA_SHM=0: gloo only): llama3's 2-rank runs with
# shared memory are those of an MP=1 checkpoint on two workers, compiled or not, and of two nodes.
@pytest.mark.parametrize("family, shm", [("llama2", "1"), ("llama3", "0")], ids=["llama2", "llama3-without_shm"])
def test_mp2_equals_mp1(family, shm, make_ckpt, reference, tmp_path):
    result = run_worker(make_ckpt(family, shards=2), tmp_path, nproc=2, env={**os.environ, "LLAMA_SHM": shm})
    assert_same(result, reference[family], 2, shared_memory=shm == "1")
    assert result["parallel_native_steps"] > 0 or not result["native"]  # half a block per call (our kernels)


def test_mp1_checkpoint_on_two_and_four_workers(make_ckpt, reference, tmp_path):
    ckpt = make_ckpt("llama3")
    assert_same(run_worker(ckpt, tmp_path, nproc=2), reference["llama3"], 2)
    # 4 workers, 2 KV heads: each KV head is replicated on two ranks.
    assert_same(run_worker(ckpt, tmp_path, nproc=4), reference["llama3"], 4)


def test_mp2_checkpoint_on_one_worker(make_ckpt, reference, tmp_path):
    for family in ("llama2", "llama3"):
        assert_same(one_process_result(make_ckpt(family, shards=2), tmp_path), reference[family], 1)


def test_two_nodes_each_holding_only_its_own_shard(make_ckpt, reference, tmp_path):
    """Two torchrun launches ("nodes" on this host), each given a folder with
    only its own shard (node 1's a copy made by hand: no manifest, no
    checklist): the results of one process reading the whole checkpoint,
    MP=1 and MP=2."""
    src = make_ckpt("llama3", shards=2)
    one_process = one_process_result(src, tmp_path)  # one process, every shard
    a = node_folder(src, tmp_path / "node_a", 0, extra=("manifest.json", "checklist.chk"))
    b = node_folder(src, tmp_path / "node_b", 1)
    port, out = free_port(), tmp_path / "two_nodes.pt"
    procs = [subprocess.Popen(worker_cmd(ckpt, out, 1, node=n, port=port), cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for n, ckpt in enumerate((a, b))]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outputs)
    result = torch.load(out, weights_only=True)
    assert_same(result, reference["llama3"], 2)
    assert result["tokens"] == one_process["tokens"]
    torch.testing.assert_close(result["logits"], one_process["logits"], atol=1e-4, rtol=1e-4)


def _start_two_nodes_and_wait_for_progress(ckpt, tmp_path, env):
    port, progress = free_port(), tmp_path / "progress"
    kw = {"max_gen_len": 400, "max_seq_len": 512, "step_delay": 0.05, "progress": str(progress)}
    procs = [subprocess.Popen(worker_cmd(ckpt, tmp_path / "x.pt", 1, node=n, port=port, **kw), cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for n in (0, 1)]
    deadline = time.time() + 120
    while not (progress.exists() and int(progress.read_text() or 0) >= 3):
        assert time.time() < deadline and procs[0].poll() is None, "generation did not start"
        time.sleep(0.1)
    return procs


# LLAMA_DIST_TIMEOUT of the lost-rank runs: how long rank 0 waits for a hung rank. Short, so the hung
# case ends soon, yet well above any wait between live ranks of a tiny model (start-up included).
LOST_RANK_TIMEOUT_S = 6


@pytest.mark.parametrize("how, bound, shm", [("killed", 30, "1"), ("hung", 40, "1"), ("killed", 30, "0")])
def test_other_rank_exits_when_one_dies_or_hangs(how, bound, shm, make_ckpt, tmp_path):
    """Rank 1 (node 1) is killed, or frozen, mid-generation: rank 0 must exit
    non-zero with a clear message within the bound (LLAMA_DIST_TIMEOUT=6 s
    for the hung case), not wait forever. Both "nodes" run on this host, so
    they exchange through shared memory unless LLAMA_SHM=0."""
    env = {**os.environ, "LLAMA_DIST_TIMEOUT": str(LOST_RANK_TIMEOUT_S), "LLAMA_SHM": shm}
    procs = _start_two_nodes_and_wait_for_progress(make_ckpt("llama3"), tmp_path, env)
    workers = [_worker_pid(p.pid) for p in procs]  # torchrun puts them in sessions of their own
    start = time.time()
    os.kill(workers[1], signal.SIGKILL if how == "killed" else signal.SIGSTOP)
    try:
        output = procs[0].communicate(timeout=bound)[0]
        elapsed = time.time() - start
    finally:
        for pid in workers + [p.pid for p in procs]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # already exited
                pass
        for p in procs:
            p.wait()
    assert procs[0].returncode != 0
    assert f"shared memory: {shm == '1'}" in output, output
    assert "[rank 0] error: lost contact with another rank" in output, output
    assert elapsed < bound
    if how == "hung":
        assert elapsed > LOST_RANK_TIMEOUT_S - 1  # it waited for the configured timeout, not less
