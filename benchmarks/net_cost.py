#!/usr/bin/env python
"""Decoding speed (ms/token, batch 1, greedy) of a model-parallel run: launch
it under torchrun, once per node, and compare runs with and without added
network delay (benchmarks/delay_link.py) to get the network's cost per token.

    torchrun --nnodes 2 --node_rank 0 --master_addr 10.215.0.1 benchmarks/net_cost.py --ckpt_dir ckpt/

With --main, `llama` is imported from PYTHONPATH (another checkout, to
compare), not from this one.
"""

import sys
import time
from pathlib import Path

import torch.distributed as dist

if __name__ == "__main__" and "--main" not in sys.argv:  # this checkout's llama, unless told to import another
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama import Llama  # noqa: E402
from llama.weights.stages import find_tokenizer  # noqa: E402
from llama.cli.run import run  # noqa: E402


def main(ckpt_dir: str, tokens: int = 48, dtype: str = "float32", temperature: float = 0.0, main: bool = False,
         pipeline_stages: int = 1, repeats: int = 2):
    build = {"pipeline_stages": pipeline_stages} if pipeline_stages > 1 else {}  # --main: a checkout without stages
    gen = Llama.build(ckpt_dir, str(find_tokenizer(ckpt_dir)), max_seq_len=tokens + 16, max_batch_size=1,
                      device="cpu", dtype=dtype, **build)
    prompt = [gen.tokenizer.encode("The llama", bos=True, eos=False)]
    gen.generate(prompt, 4, temperature=temperature)  # warm-up
    best = float("inf")
    for _ in range(repeats):  # the best run: on a busy machine the others are the neighbours' cost
        start = time.perf_counter()
        out, _ = gen.generate(prompt, tokens, temperature=temperature, top_p=0.9)
        best = min(best, (time.perf_counter() - start) / len(out[0]))
    if dist.get_rank() == 0:
        print(f"RESULT {Path(sys.modules['llama'].__file__).parent.parent.name} dtype={dtype} "
              f"temperature={temperature} world={dist.get_world_size()} pipeline_stages={pipeline_stages}: "
              f"{best * 1000:.1f} ms/token ({len(out[0])} tokens)", flush=True)


if __name__ == "__main__":
    run(main)
