"""A worker for the distributed tests: builds a model on however many ranks it
is launched with, generates greedily and (rank 0) saves tokens and logits."""

import sys
import time
from pathlib import Path
from typing import Optional

# Run as a script, Python puts tests/ first on sys.path, and `llama` would be
# whatever copy is installed (the main checkout): use this checkout's.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist

from llama import Llama
from llama.kernels import native
from llama.cli.run import run
from llama.engine.engine import Request
from llama.engine.sampling import SamplingParams

PROMPTS = ["The llama is a domesticated", "Model parallelism splits every layer across workers: each", "Hi"]


def main(ckpt_dir: str, tokenizer_path: str, out: str, max_gen_len: int = 12, max_seq_len: int = 64,
         step_delay: float = 0.0, progress: Optional[str] = None, temperature: float = 0.0,
         dtype: str = "float32", compile: bool = False, pipeline_stages: int = 1, tokens_only: bool = False):
    """tokens_only: the greedy tokens and the logits of one prompt (with the
    world size), for tests that compare only those; else every check below."""
    gen = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=max_seq_len, max_batch_size=len(PROMPTS),
                      device="cpu", dtype=dtype, compile=compile, pipeline_stages=pipeline_stages)
    parallel_steps = []  # decoding steps through our kernels' tensor-parallel path
    real = native.decode_layers_parallel
    native.decode_layers_parallel = lambda *a: parallel_steps.append(1) or real(*a)
    prompts = [gen.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    if step_delay:  # slow generation down, so a test can kill a rank in the middle of it
        gen.generate(prompts[:1], 1, temperature=0)
        if dist.get_rank() == 0:
            print(f"shared memory: {_shared_memory() is not None}", flush=True)
        for i, _ in enumerate(gen.generate_stream(prompts[:1], max_gen_len, temperature=0)):
            if progress and dist.get_rank() == 0:
                Path(progress).write_text(str(i + 1))
            time.sleep(step_delay)
    tokens, _ = gen.generate(prompts, max_gen_len, temperature=temperature)
    if tokens_only:
        logits = prompt_logits(gen, prompts[1], pipeline_stages)
        if dist.get_rank() == 0:
            torch.save({"tokens": tokens, "logits": logits, "world_size": dist.get_world_size()}, out)
        return
    joined = joining_requests(gen, prompts, max_gen_len)
    followed = rank0_only_requests(gen, prompts, max_gen_len)
    logits = prompt_logits(gen, prompts[1], pipeline_stages)
    ties = argmax_ties() if pipeline_stages == 1 else True  # the tie test needs one tensor-parallel group of all
    sampled = sampled_requests(gen, prompts, max_gen_len)
    shm = shared_memory_check()
    if dist.get_rank() == 0:
        torch.save({"argmax_ties": ties, "shared_memory": shm, "sampled": sampled, "tokens": tokens, "joined": joined, "followed": followed, "logits": logits, "world_size": dist.get_world_size(),
                    "native": native.library() is not None, "parallel_native_steps": len(parallel_steps)}, out)


def prompt_logits(gen, prompt, pipeline_stages):
    """Every position's logits of `prompt` (1, len, vocab); with stages, from the last stage."""
    if pipeline_stages == 1:
        return gen.model.forward(torch.tensor([prompt]), 0)
    return gen.engine.passes.prefill([prompt], rows=[0], all_logits=[True])[0][None]


def argmax_ties():
    """The arg-max exchanged between ranks equals torch.argmax on the full
    logits, ties across ranks included (the lowest id wins)."""
    from llama.parallel.collectives import vocab_parallel_argmax

    world, rank, vocab = dist.get_world_size(), dist.get_rank(), 16
    per = vocab // world
    full = torch.randn(6, vocab, generator=torch.Generator().manual_seed(0))
    full[0] = 1.0  # every id ties
    full[1, [3, vocab - 1]] = 9.0  # a tie between the first and the last rank
    full[2, -1] = 9.0
    full[3, [7, 8]] = 9.0  # a tie across a rank boundary (2 or 4 ranks)
    full[4, [9, 10]] = 9.0  # a tie inside one rank
    got = vocab_parallel_argmax(full[:, rank * per:(rank + 1) * per])
    return got.tolist() == torch.argmax(full, dim=-1).tolist()


def _shared_memory():
    from fairscale.nn.model_parallel.initialize import get_model_parallel_group

    from llama.parallel import collectives

    return collectives._shared_memory(get_model_parallel_group()) if dist.get_world_size() > 1 else None


def shared_memory_check():
    """None without shared memory; else whether its all-reduce and all-gather
    give exactly what the gloo path gives, and the pairwise sum in rank order
    (every rank's tensor is known here: each is drawn from its rank's seed),
    for decoding's shapes, bf16, and a reduction larger than one buffer."""
    from fairscale.nn.model_parallel.initialize import get_model_parallel_group

    from llama.parallel import collectives, shared_memory

    shm, group = _shared_memory(), get_model_parallel_group()
    if shm is None:
        return None
    world, rank, same = dist.get_world_size(), dist.get_rank(), []
    for shape, dtype in [((3, 1, 64), torch.float32), ((2, 1, 64), torch.bfloat16),
                         ((1, shm.capacity // 4 + 1000), torch.float32)]:
        every = [torch.randn(shape, generator=torch.Generator().manual_seed(r)).to(dtype) for r in range(world)]
        expected = shared_memory._pairwise_sum(every)
        got = collectives.all_reduce(every[rank].clone())
        same.append(torch.equal(got, expected))
        if every[rank].numel() <= collectives.SMALL:
            same.append(torch.equal(collectives.gloo_all_reduce(every[rank].clone(), group), got))
            gathered = collectives.all_gather_last_dim(every[rank])
            same.append(torch.equal(gathered, torch.cat(every, dim=-1)))
            same.append(torch.equal(collectives.gloo_all_gather_last_dim(every[rank], group), gathered))
    return all(same) and len(same) == 9


def sampled_requests(gen, prompts, max_gen_len):
    """Seeded sampled requests, each alone: their tokens, those of the same
    requests when every step gathers the full logits, and the bytes of each
    gather the engine makes (under torchrun: candidates, not the slices)."""
    from llama.parallel import collectives
    from llama.engine import vocab_parallel

    params = [SamplingParams(temperature=1.0, top_k=20, seed=4, max_tokens=max_gen_len),
              SamplingParams(temperature=0.3, top_p=0.9, seed=3, max_tokens=max_gen_len),
              SamplingParams(temperature=0.8, top_p=0.9, min_p=0.2, repetition_penalty=1.3, seed=5,
                             max_tokens=max_gen_len)]

    def run():
        out = []
        for p, prompt in zip(params, prompts):
            rid, tokens = gen.engine.submit(Request(prompt, p)), []
            while gen.engine.has_work():
                tokens += [e.token for e in gen.engine.step() if e.row == rid and e.token is not None]
            out.append(tokens)
        return out

    sizes, gather, plans = [], collectives.all_gather_last_dim, []
    plan = vocab_parallel.plan_from_candidates

    def counting(t):
        sizes.append(t.numel() * t.element_size())
        return gather(t)

    def planning(*args):
        plans.append(1)
        return plan(*args)
    collectives.all_gather_last_dim, vocab_parallel.plan_from_candidates = counting, planning
    try:
        tokens = run()
    finally:
        collectives.all_gather_last_dim, vocab_parallel.plan_from_candidates = gather, plan
    if not plans:  # no step planned from candidates (one process): a second run would take the very same path
        return {"tokens": tokens, "full": tokens, "bytes": sizes, "planned": 0}
    vocab_parallel.plan_from_candidates = lambda *args: None  # every step falls back to the full logits
    try:
        full = run()
    finally:
        vocab_parallel.plan_from_candidates = plan
    return {"tokens": tokens, "full": full, "bytes": sizes, "planned": len(plans)}


def joining_requests(gen, prompts, max_gen_len):
    """Requests that join a running batch at steps 0, 3 and 5 (one greedy, two
    seeded samples; the seeds are drawn on rank 0 for the one without): each
    rank steps the engine, rank 0's plan decides."""
    params = [SamplingParams(temperature=0, max_tokens=max_gen_len),
              SamplingParams(temperature=1.0, top_p=0.95, seed=7, max_tokens=max_gen_len),
              SamplingParams(temperature=1.0, top_k=20, max_tokens=max_gen_len)]
    engine, schedule, tokens, ids = gen.engine, {0: 0, 3: 1, 5: 2}, {}, []
    step = 0
    while step <= max(schedule) or engine.has_work():
        if step in schedule:
            i = schedule[step]
            ids.append(engine.submit(Request(prompts[i], params[i])))
        for e in engine.step():
            if e.token is not None:
                tokens.setdefault(e.row, []).append(e.token)
        step += 1
    return [tokens[i] for i in ids]


def rank0_only_requests(gen, prompts, max_gen_len):
    """As a server does: only rank 0 takes requests; the other ranks follow its
    steps until it shuts the engine down."""
    engine = gen.engine
    if dist.get_rank() != 0:
        engine.follow()
        return None
    tokens, ids = {}, [engine.submit(Request(p, SamplingParams(temperature=0.8, max_tokens=max_gen_len)))
                       for p in prompts[:2]]

    def step():
        for e in engine.step():
            if e.token is not None:
                tokens.setdefault(e.row, []).append(e.token)
    step()
    step()
    ids.append(engine.submit(Request(prompts[2], SamplingParams(temperature=0, max_tokens=max_gen_len))))
    while engine.has_work():
        step()
    step()  # an idle step: the followers run it too
    engine.shutdown()
    engine.step()
    return [tokens.get(i, []) for i in ids]


if __name__ == "__main__":
    run(main)
