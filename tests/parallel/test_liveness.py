"""parallel/liveness.py in one process: a store of our own stands in for
torchrun's; the other ranks' heartbeats are counted by the test."""

from datetime import timedelta

import pytest
import torch.distributed as dist

from llama.parallel import liveness
from server_helpers import free_port

GLOO_RESET = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
              "[127.0.0.1]:63667: Connection reset by peer. This is typically caused by a remote worker hanging")


@pytest.fixture
def job(monkeypatch):
    """This process as rank 0 of 4, beating into a fresh store; yields the store."""
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=5))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert liveness.start(0, 4, stage=0, stages=2)
    yield store
    liveness.stop()


def test_a_silent_rank_is_lost_and_named(job):
    job.set("llama/live/0/who/2", '{"host": "node1", "pid": 77, "stage": 1, "stages": 2, "local_rank": 0}')
    job.set("llama/live/0/left/3", "saw: Connection reset by peer")  # rank 3 left on the fault itself
    import threading

    stop = threading.Event()

    def rank1_beats():  # rank 1 lives; ranks 2 and 3 are silent
        while not stop.wait(0.05):
            job.add("llama/live/0/beat/1", 1)
    t = threading.Thread(target=rank1_beats)
    t.start()
    try:
        assert liveness.lost_ranks(look_s=0.5) == [2]
        err = liveness.explain(RuntimeError(GLOO_RESET), look_s=0.5)
    finally:
        stop.set()
        t.join()
    assert isinstance(err, liveness.LostRank) and err.ranks == [2]
    assert str(err).startswith("lost rank 2 (stage 1 of 2, host node1, pid 77), whose heartbeat stopped")
    assert "Read error [127.0.0.1]:63667: Connection reset by peer." in str(err)
    assert "pair.cc" not in str(err) and "typically" not in str(err)
    assert liveness.explain(err) is err  # already explained: no second look
    assert job.check(["llama/live/0/left/0"])  # this rank said it leaves on the fault it saw


def test_own_heartbeat_moves_and_other_errors_pass_through(job):
    before = job.add("llama/live/0/beat/0", 0)
    assert liveness.lost_ranks(look_s=3 * liveness.BEAT_S) == [1, 2, 3]
    assert job.add("llama/live/0/beat/0", 0) > before  # our own thread beats
    bad_input = ValueError("request 3 differs between ranks in params.seed")
    assert liveness.explain(bad_input) is bad_input  # not a lost rank: left as it is


def test_without_a_store_the_error_text_is_the_fallback(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert not liveness.start(0, 2)
    assert liveness.lost_ranks() is None
    err = liveness.explain(RuntimeError(GLOO_RESET))
    assert str(err).startswith("the rank at 127.0.0.1:63667 stopped answering (Read error")
    err = liveness.explain(RuntimeError("Timed out waiting 8000ms for recv operation to complete"))
    assert str(err) == "another rank stopped answering (Timed out waiting 8000ms for recv operation to complete)"
