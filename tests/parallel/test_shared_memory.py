"""The shared-memory exchange's local rules (its use between processes is
tested under torchrun in test_distributed.py): when it is allowed, the file's
layout, and the order in which parts are summed."""

import pytest
import torch

from llama.parallel import shared_memory


def test_llama_shm_turns_it_off_and_bad_values_are_named(monkeypatch):
    monkeypatch.setattr(shared_memory.platform, "machine", lambda: "x86_64")
    monkeypatch.setenv("LLAMA_SHM", "0")
    assert shared_memory.enabled_here() is False
    monkeypatch.setenv("LLAMA_SHM", "1")
    assert shared_memory.enabled_here() is True
    monkeypatch.setenv("LLAMA_SHM", "maybe")
    with pytest.raises(ValueError, match=r"LLAMA_SHM='maybe' is not understood: set it to 0"):
        shared_memory.enabled_here()


def test_only_on_x86(monkeypatch):
    """Other CPUs may reorder the part's stores after the counter's: gloo there."""
    monkeypatch.delenv("LLAMA_SHM", raising=False)
    monkeypatch.setattr(shared_memory.platform, "machine", lambda: "aarch64")
    assert shared_memory.enabled_here() is False


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8, 15, 16, 64])
def test_layout_lines_do_not_overlap(world):
    layout = shared_memory._Layout(world)
    assert layout.line % 64 == 0 and layout.data % 4096 == 0
    spans = []
    for r in range(world):
        spans.append((layout.counter(r), layout.counter(r) + 8))
        spans += [(layout.flag(r, w), layout.flag(r, w) + 4) for w in range(world)]
    assert all(r * layout.line <= a and b <= (r + 1) * layout.line for r in range(world)
               for a, b in spans[r * (world + 1):(r + 1) * (world + 1)])
    spans.sort()
    assert all(b <= a2 for (_, b), (a2, _) in zip(spans, spans[1:]))
    assert spans[-1][1] <= layout.token and layout.token + 16 <= layout.data
    assert layout.size == layout.data + world * 2 * shared_memory.CAPACITY


def test_parts_are_summed_as_recursive_doubling_sums_them():
    parts = [torch.tensor([v], dtype=torch.float32) for v in (1e8, 1.0, -1e8, 1.0)]
    # (t0 + t1) + (t2 + t3), not ((t0 + t1) + t2) + t3: the two differ in fp32
    assert shared_memory._pairwise_sum(parts).item() == 0.0  # (1e8 + 1) rounds to 1e8, and so does (-1e8 + 1)
    assert (((parts[0] + parts[1]) + parts[2]) + parts[3]).item() == 1.0
    three = [torch.tensor([v]) for v in (1.0, 2.0, 3.0)]
    assert shared_memory._pairwise_sum(three).item() == 6.0


def test_ranks_on_cores_of_their_own_spin_longer(monkeypatch):
    """Spinning takes a CPU from no one while ranks x threads fit the CPUs:
    then a wait spins for 2 ms before it sleeps; else for the adapted 0.2 ms or less."""
    group = object.__new__(shared_memory.SharedMemoryGroup)  # the policy alone, no file
    group.world, group._cpus, group._spin_s = 2, 2, 0.00005
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert group.spin_budget() == shared_memory._SPIN_OWN_CORES_S == 0.002
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # 4 threads on 2 CPUs
    assert group.spin_budget() == 0.00005
    group.world, group._cpus = 3, 4
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert group.spin_budget() == 0.002
