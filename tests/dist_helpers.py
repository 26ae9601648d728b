"""Launching tests/dist_worker.py under plain python or torchrun, shared by the
multi-process tests."""

import copy
import shutil
import socket
import subprocess
import sys

import torch

from conftest import REPO

WORKER = str(REPO / "tests" / "dist_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_cmd(ckpt, out, nproc=None, node=None, port=None, **kw):
    """plain python (nproc None), torchrun on one node, or node `node` of two."""
    args = [WORKER, "--ckpt_dir", str(ckpt), "--tokenizer_path", str(ckpt / "tokenizer.model"), "--out", str(out)]
    args += [f"--{k}={v}" for k, v in kw.items()]
    if nproc is None:
        return [sys.executable] + args
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    if node is not None:
        cmd += ["--nnodes", "2", "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port)]
    else:
        cmd += ["--master_port", str(free_port())]
    return cmd + args


def run_worker(ckpt, tmp_path, nproc=None, env=None, **kw):
    """Runs the worker to the end (see worker_cmd) and returns what rank 0 saved."""
    out = tmp_path / f"out_{nproc}_{len(list(tmp_path.iterdir()))}.pt"
    r = subprocess.run(worker_cmd(ckpt, out, nproc, **kw), cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    return torch.load(out, weights_only=True)


_ONE_PROCESS = {}


def one_process_result(ckpt, tmp_path):
    """run_worker(ckpt, tmp_path): one plain process reading every shard, the
    reference the multi-process runs are compared with. Run once per
    checkpoint folder in a session, whichever test asks first: make_ckpt's
    folders never change once made (tests that alter one alter a copy)."""
    key = str(ckpt)
    if key not in _ONE_PROCESS:
        _ONE_PROCESS[key] = run_worker(ckpt, tmp_path)
    return copy.deepcopy(_ONE_PROCESS[key])


def node_folder(src, dst, shard, extra=()):
    """What one node of a two-node run needs: params.json, the tokenizer and its own shard."""
    dst.mkdir()
    for name in ("params.json", "tokenizer.model", f"consolidated.{shard:02d}.pth", *extra):
        shutil.copy(src / name, dst / name)
    return dst


def _worker_pid(launcher_pid: int) -> int:
    """The python worker torchrun started (its only child)."""
    children = subprocess.run(["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True).stdout.split()
    assert len(children) == 1, children
    return int(children[0])
