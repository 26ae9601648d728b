"""benchmarks/cluster_rehearsal.py's arithmetic (decode steps from the
client figures, the 70B prediction) and benchmarks/delay_link.py's hub
(packets to their destination's device, after the delay), without root."""

import os
import socket
import threading
import time

import pytest

from benchmarks import cluster_rehearsal as rehearsal
from benchmarks import delay_link


def load(clients, tokens, seconds, ttft):
    return {"clients": clients, "requests": clients, "tokens": tokens, "seconds": seconds, "ttft_p50_s": ttft,
            "tokens_per_s": tokens / seconds}


def test_decode_steps_leave_the_prefill_out_and_predict_follows_the_model():
    # one node: 1 client 0.1 s a token after 0.5 s of prefill; 8 clients 0.45 s a step after 2 s
    runs = [{"stages": 1, "peak_bytes": [1], "loads": [load(1, 11, 1.5, 0.5), load(8, 88, 6.5, 2.0)]}]
    s = rehearsal.summary(runs, weights=10**9)
    assert s["step_1_s"] == pytest.approx(0.1) and s["step_most_s"] == pytest.approx(0.45)
    assert s["bandwidth_bytes_per_s"] == pytest.approx(1e10)
    text = rehearsal.predict(s, "1b", nodes=(2,), links_gbit=(1,))
    # K = (0.45 - 0.1) / 7 = 0.05, R = 0.05, both scaled to 70B by bytes and by parameters
    w1, p1 = rehearsal.stored_int4(rehearsal.SHAPES["1b"])
    w70, p70 = rehearsal.stored_int4(rehearsal.LLAMA_70B)
    r, k = 0.05 * w70 / w1, 0.05 * p70 / p1
    hops = lambda b: 2 * (1e-4 + b * 8192 * 2 * 8 / 1e9)  # noqa: E731
    row = text.splitlines()[-1].split()
    assert float(row[4]) == pytest.approx(r + k + hops(1), abs=0.01)
    assert float(row[7]) == pytest.approx(8 / (r + 8 * k + hops(8)), abs=0.01)
    assert float(row[8]) == pytest.approx(8 / (r + 4 * k + hops(4)), abs=0.01)
    assert 40e9 < w70 < 48e9 and 69e9 < p70 < 71e9  # Llama 3.1 70B's linear layers and output


def _packet_pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return a.detach(), b.detach()


def test_the_hub_delivers_to_the_destinations_device_after_the_delay():
    # Sequenced-packet socket pairs keep each write one read, as a TUN device does (a pipe would merge them).
    (r0, w0), (r1, w1), (r2, w2) = (_packet_pair() for _ in range(3))  # node 0 sends on w0; nodes 1, 2 read r1, r2
    outs = {bytes([10, 215, 0, 2]): delay_link.Delayed(w1, 0.05), bytes([10, 215, 0, 3]): delay_link.Delayed(w2, 0.05)}
    threading.Thread(target=delay_link.hub, args=(r0, outs), daemon=True).start()
    packet = bytes([0x45]) + bytes(15) + bytes([10, 215, 0, 3]) + b"payload"
    start = time.monotonic()
    os.write(w0, bytes([0x45]) + bytes(15) + bytes([10, 215, 0, 9]) + b"nobody")  # no such node: dropped
    os.write(w0, packet)
    assert os.read(r2, 100) == packet
    assert time.monotonic() - start >= 0.05
    os.set_blocking(r1, False)
    with pytest.raises(BlockingIOError):
        os.read(r1, 100)
