"""Two nodes (two torchrun launches on 127.0.0.1) that were given different
checkpoints or settings stop at build time, on both nodes, with the node and
what differs named, instead of generating garbage (issue 13)."""

import json
import socket
import shutil
import subprocess
import time

import pytest

from conftest import REPO
from llama.parallel.fingerprint import describe, differences
from dist_helpers import free_port, node_folder, worker_cmd

pytestmark = pytest.mark.slow


def run_two_nodes(ckpts, tmp_path, extra=({}, {})):
    port = free_port()
    procs = [subprocess.Popen(worker_cmd(ckpt, tmp_path / "x.pt", 1, node=n, port=port, **extra[n]), cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n, ckpt in enumerate(ckpts)]
    start = time.time()
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    return procs, outputs, time.time() - start


def test_nodes_with_different_checkpoints_fail_fast_naming_the_node(make_ckpt, tmp_path):
    a = make_ckpt("llama3", shards=2)
    b = tmp_path / "b"
    shutil.copytree(make_ckpt("llama3", shards=2), b)
    params = json.loads((b / "params.json").read_text())
    (b / "params.json").write_text(json.dumps({**params, "rope_theta": 10000.0}))  # same shapes, another model
    procs, outputs, elapsed = run_two_nodes([a, b], tmp_path)
    assert all(p.returncode != 0 for p in procs), "\n".join(outputs)
    for out in outputs:
        assert "exitcode  : 2" in out, out  # the worker's clean error exit (torchrun then reports it)
        assert "error: the nodes do not load the same checkpoint: compared with rank 0 on node 0" in out, out
        assert "rank 1 on node 1 " in out and f"({b}) differs in params.json" in out, out
    assert elapsed < 60


def test_nodes_with_different_settings_are_named(make_ckpt, tmp_path):
    """Node 1 is given another max_seq_len and another dtype: both settings
    are named, in whichever order, on both nodes."""
    ckpt = make_ckpt("llama3", shards=2)
    other = {"max_seq_len": 96, "dtype": "bfloat16"}
    procs, outputs, elapsed = run_two_nodes([ckpt, ckpt], tmp_path, extra=({}, other))
    assert [p.returncode != 0 for p in procs] == [True, True], "\n".join(outputs)
    assert "rank 1 on node 1" in outputs[0]
    for out in outputs:
        assert "exitcode  : 2" in out and " differs in " in out, out
        assert "max_seq_len (rank 0 vs rank 1: 64 vs 96)" in out, out
        assert "dtype (rank 0 vs rank 1: " in out and "bfloat16" in out, out
    assert elapsed < 60


def test_describe_and_differences(make_ckpt, tmp_path):
    ckpt = make_ckpt("llama3", shards=2)
    a = describe(ckpt, ckpt / "tokenizer.model", dtype="float32")
    copy = tmp_path / "copy"
    shutil.copytree(ckpt, copy)
    (copy / "checklist.chk").unlink()  # a copy made by hand: the missing checklist is not a difference
    assert differences(a, describe(copy, copy / "tokenizer.model", dtype="float32")) == []
    (copy / "consolidated.01.pth").write_bytes(b"short")
    assert differences(a, describe(copy, copy / "tokenizer.model", dtype="bfloat16")) == ["dtype", "shard sizes"]


def test_a_node_without_the_shard_its_rank_needs_stops_every_node(make_ckpt, tmp_path):
    src = make_ckpt("llama3", shards=2)
    a = node_folder(src, tmp_path / "node_a", 0)
    b = node_folder(src, tmp_path / "node_b", 0)  # node 1 was given node 0's shard
    procs, outputs, elapsed = run_two_nodes([a, b], tmp_path)
    assert all(p.returncode != 0 for p in procs), "\n".join(outputs)
    msg = f"{b} lacks consolidated.01.pth, which rank 1 of 2 needs (this checkpoint has 2 shards"
    assert msg in outputs[1], outputs[1]
    assert f"rank 1 on node 1 ({socket.gethostname()}) cannot load its part of {b}: {msg}" in outputs[0], outputs[0]
    assert elapsed < 60


def _without_checklists(ckpt, dst):
    shutil.copytree(ckpt, dst)
    for name in ("checklist.chk", "manifest.json"):
        (dst / name).unlink()
    return dst


def test_nodes_with_other_weights_of_the_same_shape_are_named(make_ckpt, tmp_path):
    a = _without_checklists(make_ckpt("llama3", shards=2), tmp_path / "a")
    b = _without_checklists(make_ckpt("llama3", shards=2, seed=1), tmp_path / "b")
    assert describe(a, a / "tokenizer.model")["shard sizes"] == describe(b, b / "tokenizer.model")["shard sizes"]
    procs, outputs, elapsed = run_two_nodes([a, b], tmp_path)
    assert all(p.returncode != 0 for p in procs), "\n".join(outputs)
    for out in outputs:
        assert f"({b}) differs in weights (replicated norms)" in out, out
    assert elapsed < 60


# A dtype given to one node only: test_nodes_with_different_settings_are_named.
@pytest.mark.parametrize("option, value, field", [("temperature", 0.5, "differs between ranks in params.temperature"),
                                                  ("max_gen_len", 5, "differs between ranks in params.max_tokens")])
def test_nodes_given_other_options_or_requests_all_stop_naming_the_field(option, value, field, make_ckpt, tmp_path):
    ckpt = make_ckpt("llama3", shards=2)
    procs, outputs, elapsed = run_two_nodes([ckpt, ckpt], tmp_path, extra=({}, {option: value}))
    assert [p.returncode != 0 for p in procs] == [True, True], "\n".join(outputs)
    for out in outputs:
        assert field in out and "exitcode  : 2" in out, out
    assert elapsed < 60
