#!/usr/bin/env python
"""Starts torchrun for this node of a multi-node job (one launcher per node).

Under SLURM (one task per node, e.g. `srun --ntasks-per-node=1`), the node
list gives the master address (its first host), SLURM_NNODES the number of
nodes and SLURM_NODEID this node's rank. Elsewhere (plain SSH) pass them:

    python utils/cluster_launch.py --nnodes 2 --node_rank 1 --master_addr 10.0.0.1 -- \\
        example_text_completion.py --ckpt_dir ... --tokenizer_path ...

`--dry_run` prints the torchrun command instead of running it. A node that
never joins stops the others after --rdzv_timeout seconds (torchrun's static
rendezvous; its own default is 600).
"""

import argparse
import os
import re
import shlex
import sys
from typing import List, Mapping, Optional, Tuple


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "cn[07-09,12],gpu1" -> "cn07"."""
    m = re.match(r"([^,\[]+)(?:\[([^\],\-]+))?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot read the SLURM node list {nodelist!r}; pass --master_addr")
    return m.group(1) + (m.group(2) or "")


def torchrun_command(argv: List[str], env: Mapping[str, str], python: str = sys.executable) -> Tuple[List[str], bool]:
    """The torchrun command for this node, and whether --dry_run was given."""
    parser = argparse.ArgumentParser(prog="cluster_launch.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nnodes", type=int, help="default: SLURM_NNODES")
    parser.add_argument("--node_rank", type=int, help="default: SLURM_NODEID")
    parser.add_argument("--master_addr", help="default: the first host of SLURM_JOB_NODELIST")
    parser.add_argument("--master_port", type=int, default=int(env.get("LLAMA_MASTER_PORT", 29500)))
    parser.add_argument("--nproc_per_node", type=int, default=1, help="model-parallel processes on each node")
    parser.add_argument("--rdzv_timeout", type=int, default=120, help="seconds to wait for every node to join")
    parser.add_argument("--dry_run", action="store_true", help="print the torchrun command, run nothing")
    parser.add_argument("program", nargs=argparse.REMAINDER, help="-- then the script and its arguments")
    args = parser.parse_args(argv)
    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not program:
        parser.error("give the program to run after --, e.g. -- example_text_completion.py --ckpt_dir ...")

    def need(value, var: str, flag: str):
        if value is not None:
            return value
        if var not in env:
            parser.error(f"{flag} is needed (not under SLURM: {var} is not set)")
        return env[var]

    nnodes = int(need(args.nnodes, "SLURM_NNODES", "--nnodes"))
    node_rank = int(need(args.node_rank, "SLURM_NODEID", "--node_rank"))
    master = args.master_addr or first_host(need(None, "SLURM_JOB_NODELIST", "--master_addr"))
    cmd = [python, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--node_rank", str(node_rank),
           "--nproc_per_node", str(args.nproc_per_node), "--master_addr", master,
           "--master_port", str(args.master_port), "--rdzv_conf", f"timeout={args.rdzv_timeout}"]
    return cmd + program, args.dry_run


def main(argv: Optional[List[str]] = None) -> None:
    cmd, dry_run = torchrun_command(sys.argv[1:] if argv is None else argv, os.environ)
    if dry_run or os.environ.get("LLAMA_LAUNCH_DRY_RUN"):
        print(shlex.join(cmd), flush=True)
        return
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
