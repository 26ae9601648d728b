"""Local network set-up mistakes are reported as what they are, with the fix,
not as a lost rank (issue 15): an interface that does not exist, a host name
that resolves to a loopback address, the other node never connecting."""

import os
import socket
import subprocess
import time

import pytest

from conftest import REPO
from llama.cli.run import _is_communication_error
from llama.parallel.distributed import SetupError, check_gloo_interface
from dist_helpers import free_port, worker_cmd

TWO_NODES = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "10.1.2.3"}


def test_unknown_interface_is_named_with_the_fix():
    with pytest.raises(SetupError, match=r"GLOO_SOCKET_IFNAME=lo,eth9 names eth9, which is not a network interface "
                                         r"of this host \(.* has .*lo.*\): set it to the interface that reaches"):
        check_gloo_interface({**TWO_NODES, "GLOO_SOCKET_IFNAME": "lo,eth9"})
    check_gloo_interface({**TWO_NODES, "GLOO_SOCKET_IFNAME": "lo"})  # an interface this host has


def test_host_name_resolving_to_loopback(monkeypatch):
    monkeypatch.setattr(socket, "gethostbyname", lambda name: "127.0.1.1")
    with pytest.raises(SetupError, match=r"resolves to 127.0.1.1, a loopback address, so the other nodes could not "
                                         r"connect to it: set GLOO_SOCKET_IFNAME"):
        check_gloo_interface(TWO_NODES)
    check_gloo_interface({**TWO_NODES, "MASTER_ADDR": "127.0.0.1"})  # every node on this host: loopback is right
    check_gloo_interface({**TWO_NODES, "LOCAL_WORLD_SIZE": "2"})  # one node


def test_gloo_errors_that_are_not_a_lost_rank():
    unknown = RuntimeError("[enforce fail at gloo/transport/tcp/device.cc:84] ifa != nullptr. Unable to find "
                           "address for: eth9")
    assert not _is_communication_error(unknown)
    assert _is_communication_error(RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer"))
    assert _is_communication_error(RuntimeError("Timed out waiting 600000ms for recv operation to complete"))


@pytest.mark.slow
def test_bad_gloo_socket_ifname_on_one_node(make_ckpt, tmp_path):
    """Node 1 names an interface it lacks: it says so at once; node 0 says it
    could not connect within the start-up bound (LLAMA_DIST_TIMEOUT, 1 s
    here: node 1 never joins, so any bound proves the message)."""
    ckpt, port = make_ckpt("llama3", shards=2), free_port()
    env = {**os.environ, "LLAMA_DIST_TIMEOUT": "1"}
    procs = [subprocess.Popen(worker_cmd(ckpt, tmp_path / "x.pt", 1, node=n, port=port), cwd=REPO,
                              env={**env, **({"GLOO_SOCKET_IFNAME": "eth9"} if n else {})},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for n in (0, 1)]
    start = time.time()
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode != 0 for p in procs), "\n".join(outputs)
    assert "error: GLOO_SOCKET_IFNAME=eth9 names eth9, which is not a network interface of this host" in outputs[1]
    assert "error: could not connect to the other ranks within 1 s of starting" in outputs[0], outputs[0]
    assert "lost contact" not in "".join(outputs)
    assert time.time() - start < 60
