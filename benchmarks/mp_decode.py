#!/usr/bin/env python
"""Model parallelism on one host at equal total threads: batch-1 decode
ms/token of one process with N threads against N processes of one thread,
exchanging through shared memory and through gloo (LLAMA_SHM=0), run
interleaved round after round.

    python benchmarks/mp_decode.py --ckpt_dir /path/to/ckpt            # N = 2
    python benchmarks/mp_decode.py --ckpt_dir ckpt --nproc 3 --threads 2  # MP=3 (SmolLM2: 9 heads), 2 threads for MP=1
    python benchmarks/mp_decode.py --bench_model                       # benchmark.py's 0.9B random model (built once)
    python benchmarks/mp_decode.py --ckpt_dir ckpt --temperature 0.8   # sampled decoding (top_p 0.9)
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def worker(a) -> None:
    import torch
    import torch.distributed as dist

    from llama import Llama

    gen = Llama.build(a.ckpt_dir, str(Path(a.ckpt_dir) / "tokenizer.model"), max_seq_len=a.prompt_len + a.tokens + 8,
                      max_batch_size=1, device="cpu", dtype=a.dtype)
    torch.set_num_threads(a.worker_threads)
    gen.tokenizer.stop_tokens = frozenset()  # always the full length (random weights may stop anywhere)
    prompt = [torch.randint(0, 1000, (a.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()]
    gen.generate(prompt, 4, temperature=a.temperature)  # warm up
    best = float("inf")
    for _ in range(2):
        result = gen.generate(prompt, a.tokens, temperature=a.temperature, top_p=0.9)
        m = result.metrics
        best = min(best, 1000 / m.decode_tokens_per_s)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print("RESULT " + json.dumps({"ms_per_token": best}), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_variant(a, nproc: int, threads: int, shm: str) -> float:
    args = [__file__, "--worker", "--ckpt_dir", str(a.ckpt_dir), "--dtype", a.dtype, "--tokens", str(a.tokens),
            "--prompt_len", str(a.prompt_len), "--temperature", str(a.temperature), "--worker_threads", str(threads)]
    if nproc == 1:
        cmd = [sys.executable] + args
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port())] + args
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "LLAMA_SHM": shm}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not lines:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][7:])["ms_per_token"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_dir", type=Path)
    parser.add_argument("--bench_model", action="store_true", help="benchmark.py's random 0.9B model")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--threads", type=int, help="threads of the one process (default: nproc)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt_len", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker_threads", type=int, default=1, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.worker:
        return worker(a)
    if a.bench_model:
        from benchmarks.benchmark import checkpoint

        a.ckpt_dir = checkpoint(argparse.Namespace(dim=2048, n_layers=8, n_heads=16, n_kv_heads=8))
    if a.ckpt_dir is None:
        parser.error("give --ckpt_dir or --bench_model")
    threads = a.threads or a.nproc
    variants = {f"MP=1 x {threads} threads": (1, threads, "1"),
                f"MP={a.nproc} x 1 thread, shared memory": (a.nproc, 1, "1"),
                f"MP={a.nproc} x 1 thread, gloo (LLAMA_SHM=0)": (a.nproc, 1, "0")}
    times = {name: [] for name in variants}
    for r in range(a.rounds):
        for name, (nproc, t, shm) in variants.items():
            times[name].append(run_variant(a, nproc, t, shm))
            print(f"  round {r + 1}: {name}: {times[name][-1]:.1f} ms/token", file=sys.stderr, flush=True)
    print(f"\nBatch-1 decode, {a.ckpt_dir.name}, {a.dtype}, temperature {a.temperature}, {a.tokens} tokens "
          f"(median of {a.rounds} interleaved rounds; best of 2 runs in each)\n")
    base = statistics.median(times[next(iter(variants))])
    for name, v in times.items():
        ms = statistics.median(v)
        print(f"  {name:<40}{ms:8.1f} ms/token   {base / ms:5.2f}x MP=1   (rounds: {', '.join(f'{x:.1f}' for x in v)})")


if __name__ == "__main__":
    main()
