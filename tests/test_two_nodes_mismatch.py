"""Two nodes (two torchrun launches on 127.0.0.1) that were given different
checkpoints or settings stop at build time, on both nodes, with the node and
what differs named, instead of generating garbage (issue 13)."""

import json
import shutil
import subprocess
import time

import pytest

from conftest import REPO
from llama.fingerprint import describe, differences
from test_distributed import free_port, worker_cmd

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
    ckpt = make_ckpt("llama3", shards=2)
    procs, outputs, _ = run_two_nodes([ckpt, ckpt], tmp_path, extra=({}, {"max_seq_len": 96}))
    assert all(p.returncode != 0 for p in procs), "\n".join(outputs)
    assert "rank 1 on node 1" in outputs[0] and "differs in max_seq_len" in outputs[0]


def test_describe_and_differences(make_ckpt, tmp_path):
    ckpt = make_ckpt("llama3", shards=2)
    a = describe(ckpt, ckpt / "tokenizer.model", dtype="float32")
    copy = tmp_path / "copy"
    shutil.copytree(ckpt, copy)
    (copy / "checklist.chk").unlink()  # a copy made by hand: the missing checklist is not a difference
    assert differences(a, describe(copy, copy / "tokenizer.model", dtype="float32")) == []
    (copy / "consolidated.01.pth").write_bytes(b"short")
    assert differences(a, describe(copy, copy / "tokenizer.model", dtype="bfloat16")) == ["dtype", "shard sizes"]
