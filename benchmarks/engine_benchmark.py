"""What the decoding engine buys: steps per batch, time to first token in a
mixed batch, and throughput of concurrent streams against one at a time.

    python benchmarks/engine_benchmark.py --ckpt_dir checkpoints/SmolLM2-135M-Instruct
    python benchmarks/engine_benchmark.py --ckpt_dir ... --dtypes float32 bfloat16 --rounds 3 --threads 2

Runs on the quick start's SmolLM2 checkpoint (any Meta-format checkpoint
works). Stop tokens are switched off so every row generates its full length,
and the measurements of each round are interleaved, so a machine whose speed
drifts affects both sides of a ratio alike. Prints medians over the rounds.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from example_text_completion import PROMPTS  # noqa: E402
from llama import Llama  # noqa: E402

LONG_TEXT = (
    "The llama is a domesticated South American camelid, widely used as a meat and pack animal by Andean "
    "cultures since the pre-Columbian era. Llamas are social animals and live with others as a herd. "
)


def build(ckpt: str, dtype: str, max_batch_size: int, max_seq_len: int) -> Llama:
    gen = Llama.build(ckpt, str(Path(ckpt) / "tokenizer.model"), max_seq_len=max_seq_len,
                      max_batch_size=max_batch_size, device="cpu", dtype=dtype, threads=torch.get_num_threads())
    gen.tokenizer.stop_tokens = frozenset()  # every row generates its full length
    return gen


def steps_for_text_example(gen: Llama, max_gen_len: int) -> dict:
    result = gen.generate([gen.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS], max_gen_len, temperature=0)
    return {"steps": result.metrics.decode_steps, "max_gen_len": max_gen_len}


def first_token_seconds(gen: Llama, prompts, row: int) -> float:
    """Seconds until prompt `row` of a batch has its first token (its request metrics)."""
    for event in gen.generate_stream(prompts, 1, temperature=0):
        if event.row == row:
            return event.completion.metrics.time_to_first_token_s
    raise RuntimeError("no first token")


def tokens_per_second(gen: Llama, prompts, max_gen_len: int, concurrent: bool) -> float:
    start = time.perf_counter()
    if concurrent:
        tokens, _ = gen.generate(prompts, max_gen_len, temperature=0)
    else:
        tokens = [gen.generate([p], max_gen_len, temperature=0)[0][0] for p in prompts]
    return sum(len(t) for t in tokens) / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt_dir", default=str(REPO / "checkpoints" / "SmolLM2-135M-Instruct"))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--gen_len", type=int, default=64)
    ap.add_argument("--long_tokens", type=int, default=600)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    print(f"# Decoding engine, {Path(a.ckpt_dir).name}, {a.threads} threads, median of {a.rounds} rounds")
    print("| dtype | text example: steps (max_gen_len 16) | TTFT long prompt alone | in a mixed batch | ratio "
          f"| {a.streams} streams tok/s | sequential tok/s | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype in a.dtypes:
        gen = build(a.ckpt_dir, dtype, max_batch_size=a.streams, max_seq_len=a.long_tokens + 128)
        tok = gen.tokenizer
        long_prompt = tok.encode(LONG_TEXT * 40, bos=True, eos=False)[: a.long_tokens]
        short = [tok.encode(p, bos=True, eos=False) for p in PROMPTS[:3]]
        streams = [tok.encode(f"Story {i}: {PROMPTS[i % len(PROMPTS)]}", bos=True, eos=False) for i in range(a.streams)]
        gen.generate(short, 4, temperature=0)  # warm up
        steps = steps_for_text_example(gen, 16)
        alone, mixed, conc, seq = [], [], [], []
        for _ in range(a.rounds):
            alone.append(first_token_seconds(gen, [long_prompt], 0))
            mixed.append(first_token_seconds(gen, short + [long_prompt], len(short)))
            conc.append(tokens_per_second(gen, streams, a.gen_len, concurrent=True))
            seq.append(tokens_per_second(gen, streams, a.gen_len, concurrent=False))
        m = {k: statistics.median(v) for k, v in (("alone", alone), ("mixed", mixed), ("conc", conc), ("seq", seq))}
        print(f"| {dtype} | {steps['steps']} (goal <= {steps['max_gen_len'] + 1}) | {m['alone'] * 1e3:.0f} ms "
              f"| {m['mixed'] * 1e3:.0f} ms | {m['mixed'] / m['alone']:.2f}x (goal <= 1.2x) | {m['conc']:.1f} "
              f"| {m['seq']:.1f} | {m['conc'] / m['seq']:.2f}x (goal >= 3x) |", flush=True)
        del gen


if __name__ == "__main__":
    main()
