"""The cluster launch recipe (utils/slurm_llama.sbatch, utils/cluster_launch.py):
the torchrun commands it generates from a SLURM environment, or from flags."""

import os
import shlex
import stat
import subprocess
import sys

import pytest

from conftest import REPO
from utils.cluster_launch import first_host, torchrun_command

SLURM = {"SLURM_JOB_NODELIST": "cn[07-08]", "SLURM_NNODES": "2", "SLURM_NODEID": "1"}


def test_first_host_of_a_node_list():
    assert first_host("cn[07-09,12],gpu1") == "cn07"
    assert first_host("gpu1,gpu2") == "gpu1"
    assert first_host("node-a") == "node-a"


def test_command_from_slurm_environment():
    cmd, dry = torchrun_command(["--nproc_per_node", "2", "--", "example_text_completion.py", "--ckpt_dir", "m"],
                                SLURM, python="py")
    assert cmd == ["py", "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", "1", "--nproc_per_node", "2",
                   "--master_addr", "cn07", "--master_port", "29500", "--rdzv_conf", "timeout=120",
                   "example_text_completion.py", "--ckpt_dir", "m"]
    assert not dry


def test_plain_ssh_flags_and_missing_facts(capsys):
    cmd, _ = torchrun_command(["--nnodes", "3", "--node_rank", "2", "--master_addr", "10.0.0.1", "--master_port",
                               "29600", "--", "x.py"], {}, python="py")
    assert cmd[3:14] == ["--nnodes", "3", "--node_rank", "2", "--nproc_per_node", "1", "--master_addr", "10.0.0.1",
                         "--master_port", "29600", "--rdzv_conf"]
    with pytest.raises(SystemExit):
        torchrun_command(["--", "x.py"], {})
    assert "--nnodes is needed (not under SLURM: SLURM_NNODES is not set)" in capsys.readouterr().err


def test_batch_script_runs_one_launcher_per_node(tmp_path):
    """The sbatch script under a fake srun that starts its command once per
    node, as SLURM would with one task per node."""
    srun = tmp_path / "srun"
    srun.write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
                    'for n in 0 1; do SLURM_NODEID=$n "$@"; done\n')
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, **SLURM, "PATH": f"{tmp_path}:{os.environ['PATH']}", "LLAMA_PYTHON": sys.executable,
           "LLAMA_LAUNCH_DRY_RUN": "1", "SLURM_SUBMIT_DIR": str(REPO), "LLAMA_NPROC_PER_NODE": "2"}
    r = subprocess.run(["bash", str(REPO / "utils" / "slurm_llama.sbatch"), "example_text_completion.py",
                        "--ckpt_dir", "/shared/m x"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = [shlex.split(line) for line in r.stdout.splitlines()]
    assert [cmd[cmd.index("--node_rank") + 1] for cmd in lines] == ["0", "1"]
    for cmd in lines:
        assert cmd[1:3] == ["-m", "torch.distributed.run"]
        assert cmd[cmd.index("--master_addr") + 1] == "cn07" and cmd[cmd.index("--nnodes") + 1] == "2"
        assert cmd[cmd.index("--nproc_per_node") + 1] == "2"
        assert cmd[-3:] == ["example_text_completion.py", "--ckpt_dir", "/shared/m x"]
