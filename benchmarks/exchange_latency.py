#!/usr/bin/env python
"""Latency of one all-reduce between two processes on this host: shared
memory (llama/parallel/shared_memory.py) against the gloo paired exchange (recursive
doubling, receives posted ahead) and gloo's own all_reduce, interleaved.

    python benchmarks/exchange_latency.py               # starts 2 processes (torchrun), 1 thread each
    python benchmarks/exchange_latency.py --rounds 9 --calls 300

Prints microseconds per exchange (median over rounds) for decoding's shapes:
one row of SmolLM2-135M (dim 576) and of the 0.9B benchmark model (dim 2048),
fp32 and bf16, batch 1 and 8, and a 1 MB prefill-sized reduction.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = [((1, 1, 576), torch.float32), ((1, 1, 2048), torch.float32), ((1, 1, 2048), torch.bfloat16),
          ((8, 1, 2048), torch.float32), ((1, 128, 2048), torch.float32)]


def worker(a) -> None:
    import torch.distributed as dist
    from fairscale.nn.model_parallel.initialize import get_model_parallel_group

    from llama.parallel import collectives
    from llama.parallel.distributed import init_distributed

    init_distributed("cpu")
    group = get_model_parallel_group()
    collectives.all_reduce(torch.zeros(1))  # sets up shared memory, if this host allows it
    shm = collectives._shared_memory(group)
    if shm is None:
        raise SystemExit("shared memory is not available here (LLAMA_SHM=0, not x86, or ranks on several hosts)")
    ways = {"shared memory": shm.all_reduce,
            "gloo paired": lambda t: collectives.gloo_all_reduce(t, group),
            "gloo all_reduce": lambda t: (dist.all_reduce(t, group=group), t)[1]}
    rows = []
    for shape, dtype in SHAPES:
        t = torch.randn(shape).to(dtype)
        times = {name: [] for name in ways}
        for _ in range(a.rounds):
            for name, fn in ways.items():
                for _ in range(20):  # warm up (and post gloo's receives ahead)
                    fn(t.clone())
                dist.barrier(group=group)
                start = time.perf_counter()
                for _ in range(a.calls):
                    fn(t.clone())
                times[name].append((time.perf_counter() - start) / a.calls * 1e6)
        rows.append((shape, dtype, {n: statistics.median(v) for n, v in times.items()}))
    if dist.get_rank() == 0:
        print(f"\nOne all-reduce between 2 processes on this host, microseconds (median of {a.rounds} rounds "
              f"of {a.calls} calls, 1 thread each)\n")
        print(f"  {'shape':<16}{'dtype':<10}{'KB':>7}" + "".join(f"{n:>17}" for n in ways) + f"{'gloo / shm':>12}")
        for shape, dtype, t in rows:
            kb = torch.Size(shape).numel() * dtype.itemsize / 1024
            print(f"  {str(tuple(shape)):<16}{str(dtype)[6:]:<10}{kb:7.1f}" + "".join(f"{t[n]:17.1f}" for n in ways)
                  + f"{t['gloo paired'] / t['shared memory']:11.1f}x")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.worker:
        torch.set_num_threads(1)
        return worker(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", __file__, "--worker",
           "--rounds", str(a.rounds), "--calls", str(a.calls)]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


if __name__ == "__main__":
    main()
