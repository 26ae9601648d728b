"""Inference speed on this machine, ours beside Hugging Face transformers, in one run.

    python benchmarks/benchmark.py                  # ~0.9B-parameter Llama 3 shape, 2 threads
    python benchmarks/benchmark.py --json out.json  # also write every figure
    python benchmarks/benchmark.py --peer llama.cpp # SmolLM2 beside llama.cpp: benchmarks/peer_benchmark.py

Builds (once, cached) a random Meta-format checkpoint, then measures: the
memory read bandwidth; our prefill and decode tokens/s at batch 1 and 8 in
bf16, int8, int4 and fp32 (each the median of --rounds generations, taking
turns in each round) and int8's and int4's agreement with bf16; transformers'
LlamaForCausalLM on the same weights, dtype and threads; model parallelism
(2 processes x 1 thread against 1 process x 2 threads, jobs taking turns);
and Llama.build time against reading the checkpoint file once. Prints a
report: the setup, a speed table (tokens/s, weight bandwidth, transformers
beside us), int8 quality, model parallelism and loading time.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from benchmarks.hf_reference import hf_model_from_meta  # noqa: E402
from benchmarks.linear_kernels import read_bandwidth  # noqa: E402
from llama import Llama  # noqa: E402
from llama.kernels import native  # noqa: E402
from utils.fetch_llama3_tokenizer import fetch_llama3_tokenizer  # noqa: E402
from utils.make_random_checkpoint import make_random_checkpoint, random_params  # noqa: E402

CACHE = Path(os.environ.get("LLAMA_BENCH_CACHE", Path.home() / ".cache" / "llama-bench"))


def checkpoint(a) -> Path:
    tokenizer = fetch_llama3_tokenizer(CACHE / "llama3_tokenizer.model")
    name = f"llama3_d{a.dim}_l{a.n_layers}_h{a.n_heads}_kv{a.n_kv_heads}"
    ckpt = CACHE / name
    if not (ckpt / "checklist.chk").is_file():
        params = random_params("llama3", a.dim, a.n_layers, a.n_heads, a.n_kv_heads, 128256, multiple_of=256)
        make_random_checkpoint(ckpt, params, tokenizer, dtype=torch.bfloat16, force=True)
    return ckpt


def build(ckpt: Path, dtype: str, max_batch: int, seq: int, quantize=None) -> Llama:
    gen = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=seq, max_batch_size=max_batch,
                      device="cpu", dtype=dtype, quantize=quantize, threads=torch.get_num_threads())
    gen.tokenizer.stop_tokens = frozenset()  # random weights: always generate the full length
    return gen


def prompts(batch: int, length: int):
    g = torch.Generator().manual_seed(batch)
    return torch.randint(0, 128000, (batch, length), generator=g).tolist()


def one_generation(gen: Llama, batch: int, a) -> dict:
    m = gen.generate(prompts(batch, a.prompt_len), a.gen_len, temperature=0).metrics
    return {"prefill_tok_s": batch * a.prompt_len / m.first_token_seconds, "decode_tok_s": m.decode_tokens_per_s,
            "bandwidth_GB_s": m.bandwidth_bytes_per_s / 1e9, "weight_GB": m.weight_bytes / 1e9}


def ours(gens: Dict[str, Llama], batches, a) -> Dict[str, dict]:
    """{"ours_NAME_bBATCH": figures} for each of our builds and batch sizes,
    each figure the median of `a.rounds` generations. The builds take turns
    within every round, so that their ratios see the same machine (this one's
    speed moves by 10-30% from minute to minute)."""
    for gen in gens.values():
        for batch in batches:
            gen.generate(prompts(batch, 8), 4, temperature=0)  # warm up
    runs = {(name, batch): [] for name in gens for batch in batches}
    for _ in range(a.rounds):
        for (name, batch), figures in runs.items():
            figures.append(one_generation(gens[name], batch, a))
    return {f"ours_{name}_b{batch}": {key: statistics.median(r[key] for r in figures) for key in figures[0]}
            for (name, batch), figures in runs.items()}


@torch.inference_mode()
def transformers_speed(model, batch: int, a) -> dict:
    def run(tokens, steps):
        t0 = time.perf_counter()
        out = model(tokens, use_cache=True)
        t1 = time.perf_counter()
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            out = model(nxt, past_key_values=cache, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return t1 - t0, time.perf_counter() - t1

    run(torch.tensor(prompts(batch, 8)), 3)  # warm up
    prefill, decode = run(torch.tensor(prompts(batch, a.prompt_len)), a.gen_len - 1)
    return {"prefill_tok_s": batch * a.prompt_len / prefill, "decode_tok_s": batch * (a.gen_len - 1) / decode}


@torch.inference_mode()
def greedy_sequences(gen: Llama, a) -> torch.Tensor:
    """Four prompts followed by the model's own greedy continuation."""
    batch = prompts(4, 16)
    tokens, _ = gen.generate(batch, a.gen_len, temperature=0)
    return torch.tensor([p + t for p, t in zip(batch, tokens)])


def top1_agreement(ref: torch.Tensor, other: torch.Tensor) -> float:
    """Share of generated positions where both models' top-1 token agree
    (teacher-forced on the same sequence; position i predicts token i+1)."""
    gen_part = slice(16 - 1, ref.shape[1] - 1)
    return (ref[:, gen_part].argmax(-1) == other[:, gen_part].argmax(-1)).float().mean().item()


def _drop_page_cache() -> bool:
    """Empties the OS page cache (needs root), so files are read from disk."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def build_vs_read(ckpt: Path, dtype: str) -> dict:
    """Llama.build against reading the checkpoint file once, both from a cold
    page cache when this process may empty it (root), else both warm."""
    shard = ckpt / "consolidated.00.pth"
    cold = _drop_page_cache()
    t0 = time.perf_counter()
    with open(shard, "rb", buffering=0) as f:
        while f.read(64 << 20):
            pass
    read = time.perf_counter() - t0
    _drop_page_cache()
    t0 = time.perf_counter()
    Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=64, max_batch_size=1, device="cpu", dtype=dtype,
                threads=torch.get_num_threads())
    return {"read_s": read, "build_s": time.perf_counter() - t0, "file_GB": shard.stat().st_size / 1e9,
            "page_cache": "cold" if cold else "warm"}


def mp2(ckpt: Path, a) -> dict:
    """Batch-1 decode tok/s of MP=2 (2 processes x 1 thread) and of MP=1 (1
    process x 2 threads), {dtype: {"mp2": ..., "mp1": ...}}: each the median
    of `a.rounds` jobs of one generation, the two layouts' jobs taking turns
    (a process layout cannot change within a job; measured minutes apart,
    this machine's drift outweighed the difference between them)."""
    runs = {"mp2": [], "mp1": []}
    for _ in range(a.rounds):
        for layout, figures in runs.items():
            figures.append(_mp_job(ckpt, a, layout))
    return {dtype: {layout: statistics.median(r[dtype] for r in figures) for layout, figures in runs.items()}
            for dtype in runs["mp2"][0]}


def _mp_job(ckpt: Path, a, layout: str) -> dict:
    worker = [__file__, "--mp_worker", str(ckpt), "--prompt_len", str(a.prompt_len), "--gen_len", str(a.gen_len),
              "--rounds", "1"]
    if layout == "mp2":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *worker]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
    else:
        cmd, env = [sys.executable, *worker, "--threads", "2"], os.environ
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def mp_worker(ckpt: Path, a) -> None:
    """One job of mp2: batch-1 decode tok/s in fp32 and bf16, printed by rank 0."""
    if "WORLD_SIZE" not in os.environ:  # MP=1: one process with a.threads threads
        torch.set_num_threads(a.threads)
    res = {}
    for dtype in ("float32", "bfloat16"):
        gen = build(ckpt, dtype, 1, a.prompt_len + a.gen_len + 8)
        res[dtype] = ours({dtype: gen}, [1], a)[f"ours_{dtype}_b1"]["decode_tok_s"]
        del gen
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(res))


def main() -> None:
    if "--peer" in sys.argv[1:]:  # a different benchmark, with its own options
        from benchmarks.peer_benchmark import main as peer_main

        return peer_main(sys.argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--n_layers", type=int, default=8)
    parser.add_argument("--n_heads", type=int, default=16)
    parser.add_argument("--n_kv_heads", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt_len", type=int, default=128)
    parser.add_argument("--gen_len", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="generations per figure of ours (the median is kept)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["transformers", "int8", "int4", "mp2", "build"])
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--mp_worker", type=Path, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.mp_worker:
        return mp_worker(a.mp_worker, a)
    torch.set_num_threads(a.threads)
    ckpt = checkpoint(a)
    res = {"config": {k: v for k, v in vars(a).items() if k not in ("json", "mp_worker", "skip")}}
    bandwidths = [read_bandwidth()]  # it varies from run to run here: measure it three times
    seq = a.prompt_len + a.gen_len + 8
    gens = {"bfloat16": build(ckpt, "bfloat16", 8, seq)}
    for q in QUANTIZED:
        if q not in a.skip and (q != "int4" or native.library() is not None):  # int4: our kernels only
            gens[q] = build(ckpt, "bfloat16", 8, seq, quantize=q)
    # decoding's int8 x int8 (or int4) products (activations quantized per 32, as Q8_0), or weights widened
    res["int8_decoding"] = "int8 dot products" if native.int8_dot() else "bf16 activations"
    gens["float32"] = build(ckpt, "float32", 8, seq)
    res.update(ours(gens, (1, 8), a))
    bandwidths.append(read_bandwidth())
    seqs = greedy_sequences(gens["bfloat16"], a)  # bf16's greedy output: the quality yardstick
    logits = {name: gen.model.forward(seqs, 0) for name, gen in gens.items()}
    for q in QUANTIZED:
        if q in gens:
            bf16, quant = logits["bfloat16"], logits[q]
            res[f"{q}_quality"] = {"top1_agreement": top1_agreement(bf16, quant),
                                   "max_abs_logit_error": (quant - bf16).abs().max().item(),
                                   "logit_range": (bf16.max() - bf16.min()).item(),
                                   # for scale: how much bf16 itself moves the top-1 token of this model
                                   "bf16_vs_fp32_top1_agreement": top1_agreement(logits["float32"], bf16)}
    del gens, logits
    if "transformers" not in a.skip:
        for dtype in ("bfloat16", "float32"):
            hf = hf_model_from_meta(ckpt, 128256, getattr(torch, dtype), "sdpa")
            for batch in (1, 8):
                res[f"hf_{dtype}_b{batch}"] = transformers_speed(hf, batch, a)
            del hf
    bandwidths.append(read_bandwidth())
    res["read_bandwidth_GB_s"] = sorted(bandwidths)[len(bandwidths) // 2]
    res["read_bandwidth_samples_GB_s"] = bandwidths
    if "mp2" not in a.skip:
        res["mp_decode_tok_s"] = mp2(ckpt, a)
    if "build" not in a.skip:
        res["build"] = {d: build_vs_read(ckpt, d) for d in ("bfloat16", "float32")}
    print_table(res, a)
    if a.json:
        a.json.write_text(json.dumps(res, indent=2) + "\n")


DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "int8": "int8", "int4": "int4"}
QUANTIZED = ("int8", "int4")


def print_table(res: dict, a) -> None:
    """The report: setup, a speed table, then quality, model parallelism and loading."""
    names = {**DTYPE_NAMES, **{q: f"{q} ({res.get('int8_decoding', 'bf16 activations')})" for q in QUANTIZED}}
    bw = res["read_bandwidth_GB_s"]
    samples = ", ".join(f"{b:.1f}" for b in res["read_bandwidth_samples_GB_s"])
    print("\nLlama inference benchmark (CPU)\n")
    print(f"  Model     Llama 3 shape: dim {a.dim}, {a.n_layers} layers, {a.n_heads} heads ({a.n_kv_heads} KV), "
          f"vocabulary 128,256; random weights")
    print(f"  Machine   {a.threads} threads; memory read bandwidth {bw:.1f} GB/s (median of {samples})")
    print(f"  Workload  {a.prompt_len}-token prompts, {a.gen_len} tokens generated greedily per row; "
          f"ours: median of {a.rounds} generations\n")

    has_hf = any(k.startswith("hf_") for k in res)
    head = f"  {'weights':<26}{'batch':>6}{'prefill':>10}{'decode':>9}{'weights read':>15}"
    units = f"  {'':<26}{'':>6}{'tok/s':>10}{'tok/s':>9}{'GB/s (% bw)':>15}"
    if has_hf:
        head += f"{'transformers':>23}{'decode':>10}"
        units += f"{'prefill / decode tok/s':>23}{'speed-up':>10}"
    print(head)
    print(units)
    for key in [k for k in res if k.startswith("ours_")]:
        r, hf = res[key], res.get(key.replace("ours_", "hf_"))
        dtype, batch = key[5:].rsplit("_b", 1)
        row = (f"  {names.get(dtype, dtype):<26}{batch:>6}{r['prefill_tok_s']:10.1f}{r['decode_tok_s']:9.2f}"
               f"{r['bandwidth_GB_s']:9.1f} ({100 * r['bandwidth_GB_s'] / bw:3.0f}%)")
        if hf:
            hf_pair = f"{hf['prefill_tok_s']:.1f} / {hf['decode_tok_s']:.2f}"
            row += f"{hf_pair:>23}{r['decode_tok_s'] / hf['decode_tok_s']:9.2f}x"
        print(row)

    for name in QUANTIZED:
        if f"{name}_quality" in res:
            q = res[f"{name}_quality"]
            print(f"\nQuality of {name} (teacher-forced on bf16's greedy output; random weights: "
                  "the real model's figures come from benchmarks/quant_quality.py)")
            print(f"  same top-1 token as bf16   {100 * q['top1_agreement']:.1f}% of positions "
                  f"(bf16 against fp32: {100 * q.get('bf16_vs_fp32_top1_agreement', float('nan')):.1f}%)")
            print(f"  largest logit difference   {q['max_abs_logit_error']:.3f} (logits span {q['logit_range']:.1f})")
    if "mp_decode_tok_s" in res:
        print("\nModel parallelism, batch 1 decode: 2 processes x 1 thread against 1 process x 2 threads "
              f"(medians of {a.rounds} jobs each, taking turns)")
        for d, v in res["mp_decode_tok_s"].items():
            print(f"  {DTYPE_NAMES.get(d, d):<6} {v['mp2']:7.2f} tok/s against {v['mp1']:.2f} tok/s "
                  f"({v['mp2'] / v['mp1']:.2f}x)")
    if res.get("build"):
        print("\nLoading (Llama.build against reading the checkpoint file once)")
        for d, b in res["build"].items():
            print(f"  {DTYPE_NAMES.get(d, d):<6} {b['build_s']:6.2f} s against {b['read_s']:.2f} s for "
                  f"{b['file_GB']:.2f} GB ({b['build_s'] / b['read_s']:.2f}x; {b['page_cache']} page cache)")


if __name__ == "__main__":
    main()
