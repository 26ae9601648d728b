#!/usr/bin/env python
"""Starts torchrun for this node of a multi-node job (one launcher per node).

Under SLURM (one task per node, e.g. `srun --ntasks-per-node=1`), the node
list gives the master address (its first host), SLURM_NNODES the number of
nodes and SLURM_NODEID this node's rank. The node list is expanded by
`scontrol show hostnames` where scontrol runs, otherwise by expand_hostlist,
which reads SLURM's documented forms (`gpu[1-2]-ib`, `rack[1-2]-n[01-04]`,
`a[1,3-4],b7`) and refuses anything else with a message naming the list:
a wrong master would leave every node waiting on a host that does not exist. Elsewhere (plain SSH) pass them:

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
import shutil
import subprocess
import sys
from typing import List, Mapping, Optional, Tuple


_MAX_HOSTS = 1 << 16  # more would be a typo (n[1-1000000]), not a cluster


def expand_hostlist(nodelist: str) -> List[str]:
    """The hosts of a SLURM node list, in SLURM's order, read as SLURM does:
    comma lists ("a,b"), ranges and lists in brackets ("n[1-3,7]"), zero
    padding kept ("n[08-10]" -> n08 n09 n10), text after a bracket
    ("gpu[1-2]-ib" -> gpu1-ib gpu2-ib) and several bracket groups, the first
    varying slowest ("r[1-2]-n[1-2]" -> r1-n1 r1-n2 r2-n1 r2-n2).
    ValueError naming the list and what is wrong with it otherwise."""
    text = nodelist.strip()

    def bad(why: str) -> ValueError:
        return ValueError(f"cannot read the SLURM node list {nodelist!r}: {why}; pass --master_addr")

    if not text:
        raise bad("it is empty")
    hosts: List[str] = []
    for name in _split_outside_brackets(text, bad):
        # "gpu[1-2]-ib" -> ["gpu", "1-2", "-ib"]: literal, bracket, literal, ...
        parts = re.split(r"\[([^\[\]]*)\]", name)
        if any(c in part for part in parts[::2] for c in "[]"):
            raise bad(f"unbalanced or nested brackets in {name!r}")
        if any(c.isspace() for c in name):
            raise bad(f"space in the host name {name!r}")
        names = [""]
        for i, part in enumerate(parts):
            choices = [part] if i % 2 == 0 else _bracket_numbers(part, name, bad)
            names = [n + c for n in names for c in choices]
            if len(hosts) + len(names) > _MAX_HOSTS:
                raise bad(f"it names more than {_MAX_HOSTS:,} hosts")
        hosts += names
    return hosts


def _split_outside_brackets(text: str, bad) -> List[str]:
    """"a[1,2],b" -> ["a[1,2]", "b"]; refuses empty names ("a,,b")."""
    names, depth, start = [], 0, 0
    for i, c in enumerate(text + ","):
        depth += (c == "[") - (c == "]")
        if depth not in (0, 1):
            raise bad("unbalanced or nested brackets")
        if c == "," and depth == 0:
            if not text[start:i]:
                raise bad("an empty host name (two commas, or a comma at an end)")
            names.append(text[start:i])
            start = i + 1
    if depth:
        raise bad("a bracket is not closed")
    return names


def _bracket_numbers(inside: str, name: str, bad) -> List[str]:
    """"01-03,7" -> ["01", "02", "03", "7"]: each range padded to its first number's width."""
    out = []
    for item in inside.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise bad(f"[{inside}] in {name!r} is not a list of numbers and ranges like [1-4,7] or [01-08]")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise bad(f"the range {item} in {name!r} goes down")
        if int(hi) - int(lo) >= _MAX_HOSTS:
            raise bad(f"the range {item} in {name!r} names more than {_MAX_HOSTS:,} hosts")
        out += [str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1)]
    return out


def scontrol_hosts(nodelist: str, timeout: float = 10.0) -> Optional[List[str]]:
    """`scontrol show hostnames` of `nodelist` (SLURM's own reading), or None
    where scontrol is missing, fails, times out or prints nothing."""
    exe = shutil.which("scontrol")
    if exe is None:
        return None
    try:
        r = subprocess.run([exe, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    hosts = r.stdout.split()
    return hosts if r.returncode == 0 and hosts else None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "cn[07-09,12],gpu1" -> "cn07",
    "gpu[1-2]-ib" -> "gpu1-ib". Asks scontrol where it can, else reads the
    list itself (expand_hostlist)."""
    hosts = scontrol_hosts(nodelist)
    return hosts[0] if hosts else expand_hostlist(nodelist)[0]


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
    master = args.master_addr
    if master is None:
        try:
            master = first_host(need(None, "SLURM_JOB_NODELIST", "--master_addr"))
        except ValueError as e:
            parser.error(str(e))
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
