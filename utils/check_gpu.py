"""Checks the GPU path end to end; for someone with a CUDA GPU (our CI has none).

    python utils/check_gpu.py                   # every check, on a small random model
    python utils/check_gpu.py --skip mp2        # with one GPU

1. parity: greedy tokens and teacher-forced logprobs on the GPU (float32, and
   the dtype the GPU gets by default) against CPU float32.
2. int8: `quantize="int8"` on the GPU: the GPU's memory peak while building
   stays below the unquantized weights (they are quantized on the CPU first),
   and its tokens agree with the unquantized GPU run. Times the int8 matmul
   (dequantized per call) against plain F.linear, and ATen's
   `_weight_int8pack_mm` where this torch has a CUDA kernel for it.
3. attention: which scaled_dot_product_attention kernels (flash, efficient,
   cudnn, math) take the model's prefill calls (causal, and with a packed
   mask; default dtype and float32; enable_gqa=True). Only informative.
4. mp2: `torchrun --nproc_per_node 2` with nccl (two GPUs): the same greedy
   tokens as one GPU in float32.
5. metrics: the metrics block of a GPU run; peak memory is the allocator's.

Exits 0 when every check passed, 1 when one failed, 2 without a CUDA device.
Paste the output into the issue.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere

import torch  # noqa: E402

CHECKS = ("parity", "int8", "attention", "mp2", "metrics")
PROMPTS = [[128000, 791, 9888, 374, 264], [128000, 40, 1093, 311, 1518, 264, 1317, 11, 1317, 1648]]
SHAPE = dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4)
# Largest teacher-forced logprob difference accepted: bf16/fp16 against fp32, int8 against its unquantized run
# (measured on CPU with this model and prompts: bf16 0.13, int8 against bf16 0.26).
LOW_PRECISION_DIFF, INT8_DIFF = 0.3, 0.6


def make_model(out: Path, tokenizer: Path) -> Path:
    from utils.make_random_checkpoint import make_random_checkpoint, random_params

    return make_random_checkpoint(out, random_params("llama3", vocab_size=128256, **SHAPE), tokenizer,
                                  dtype=torch.float32, force=True)


def run(ckpt: Path, device: str, dtype: str, quantize=None, gen_len: int = 16, forced=None):
    """On `device`: (greedy tokens per prompt, the logprobs of each token of `forced` given the
    ones before it (default: the prompts and their greedy tokens), the Llama)."""
    from llama import Llama

    gen = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=64, max_batch_size=len(PROMPTS),
                      device=device, dtype=dtype, quantize=quantize)
    gen.tokenizer.stop_tokens = frozenset()  # random weights: every row generates gen_len tokens
    tokens, _ = gen.generate(PROMPTS, gen_len, temperature=0)
    forced = forced or [p + t for p, t in zip(PROMPTS, tokens)]
    _, logprobs = gen.generate(forced, 0, temperature=0, logprobs=True, echo=True)
    return tokens, logprobs, gen


def compare(tokens, lps, ref_tokens, ref_lps) -> dict:
    """How far a run is from a reference: the same greedy tokens, how many first tokens agree
    (after a first difference greedy runs go apart), the largest teacher-forced logprob difference."""
    same_prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(tokens, ref_tokens)]
    return {"same_tokens": tokens == ref_tokens, "first_tokens_agree": min(same_prefix),
            "max_logprob_diff": max(abs(x - y) for a, b in zip(lps, ref_lps) for x, y in zip(a, b))}


def parity(ckpt: Path, device: str, dtype: str, reference_device: str = "cpu", gen_len: int = 16) -> dict:
    """Greedy tokens and teacher-forced logprobs on `device` in `dtype` against `reference_device` in float32."""
    ref_tokens, ref_lps, _ = run(ckpt, reference_device, "float32", gen_len=gen_len)
    forced = [p + t for p, t in zip(PROMPTS, ref_tokens)]
    tokens, lps, _ = run(ckpt, device, dtype, gen_len=gen_len, forced=forced)
    return {"device": device, "dtype": dtype, **compare(tokens, lps, ref_tokens, ref_lps),
            "tokens": tokens, "reference_tokens": ref_tokens}


def _verdict(r: dict, max_diff: float, same_tokens: bool = False) -> str:
    """fp32 must give the same greedy tokens; rounded runs (bf16, fp16, int8) may part ways after a
    near-tie, so for them only the teacher-forced logprobs count (broken kernels give whole nats)."""
    return "ok" if r["max_logprob_diff"] < max_diff and (r["same_tokens"] or not same_tokens) else "FAILED"


def check_parity(ckpt: Path) -> bool:
    from llama.parallel.distributed import choose_dtype

    default, why = choose_dtype(None, torch.device("cuda"))
    ok = True
    for dtype in ("float32", str(default).replace("torch.", "")):
        r = parity(ckpt, "cuda", dtype)
        fp32 = dtype == "float32"
        verdict = _verdict(r, 1e-2 if fp32 else LOW_PRECISION_DIFF, same_tokens=fp32)
        print(f"  parity {dtype:9s} GPU vs CPU float32: same greedy tokens {r['same_tokens']} (first "
              f"{r['first_tokens_agree']} agree), max |teacher-forced logprob diff| {r['max_logprob_diff']:.2e}  "
              f"{verdict}" + (f"  (default dtype here: {why})" if dtype != "float32" else ""))
        ok &= verdict == "ok"
    return ok


def check_int8(ckpt: Path) -> bool:
    from llama.parallel.distributed import choose_dtype

    dtype = str(choose_dtype(None, torch.device("cuda"))[0]).replace("torch.", "")
    full_tokens, full_lps, full = run(ckpt, "cuda", dtype)
    full_bytes = sum(p.nbytes for p in full.model.parameters())
    del full
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    forced = [p + t for p, t in zip(PROMPTS, full_tokens)]
    tokens, lps, q = run(ckpt, "cuda", dtype, quantize="int8", forced=forced)
    build_peak = torch.cuda.max_memory_allocated()
    r = compare(tokens, lps, full_tokens, full_lps)
    passed = build_peak < full_bytes and _verdict(r, INT8_DIFF) == "ok"
    print(f"  int8 ({dtype} activations) vs {dtype}: first {r['first_tokens_agree']} greedy tokens agree, max "
          f"|teacher-forced logprob diff| {r['max_logprob_diff']:.2e}; GPU peak while building and generating "
          f"{build_peak / 1e6:.0f} MB against {full_bytes / 1e6:.0f} MB of {dtype} weights  {'ok' if passed else 'FAILED'}")
    del q
    time_int8_matmul(getattr(torch, dtype))
    return passed


def _time(fn, repeat: int = 50) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat  # ms


def time_int8_matmul(dtype: torch.dtype) -> None:
    from llama.kernels.linear import Int8Matmul, dequantized_linear

    aten = torch._C._dispatch_has_kernel_for_dispatch_key("aten::_weight_int8pack_mm", "CUDA")
    print(f"  int8 matmul, ms per call (ATen _weight_int8pack_mm has a CUDA kernel in this torch: {aten}):")
    for n, k in ((4096, 4096), (14336, 4096)):
        w = torch.randn(n, k) / k**0.5
        layer = Int8Matmul(w).cuda()
        w = w.to("cuda", dtype)
        for rows in (1, 8, 512):
            x = torch.randn(rows, k, device="cuda", dtype=dtype)
            line = (f"    {n}x{k}, {rows:3d} rows: F.linear {dtype} {_time(lambda: torch.nn.functional.linear(x, w)):.3f}, "
                    f"int8 dequantized {_time(lambda: dequantized_linear(x, layer.qweight, layer.scales)):.3f}")
            if aten:
                try:
                    ms = _time(lambda: torch.ops.aten._weight_int8pack_mm(x, layer.qweight, layer.scales.to(dtype)))
                    line += f", _weight_int8pack_mm {ms:.3f}"
                except RuntimeError as e:
                    line += f", _weight_int8pack_mm failed ({str(e).splitlines()[0][:100]})"
            print(line)


def check_attention() -> bool:
    """Which SDPA kernels take the model's prefill calls; informative, never fails."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from llama.parallel.distributed import choose_dtype

    heads, kv_heads, head_dim, seq = 32, 8, 128, 512
    backends = [b for b in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH") if hasattr(SDPBackend, b)]
    print("  attention kernels that take the prefill calls (enable_gqa=True, 32 query / 8 KV heads, 512 tokens):")
    for dtype in dict.fromkeys((choose_dtype(None, torch.device("cuda"))[0], torch.float32)):
        q = torch.randn(1, heads, seq, head_dim, device="cuda", dtype=dtype)
        k, v = (torch.randn(1, kv_heads, seq, head_dim, device="cuda", dtype=dtype) for _ in range(2))
        packed = torch.ones(seq, seq, dtype=torch.bool, device="cuda").tril()  # a packed prefill's mask
        for name, mask in (("causal", None), ("masked", packed)):
            took = []
            for backend in backends:
                try:
                    with warnings.catch_warnings(), sdpa_kernel([getattr(SDPBackend, backend)]):
                        warnings.simplefilter("ignore")  # each refusing kernel warns why
                        torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                                         enable_gqa=True)
                    took.append(backend.lower())
                except (RuntimeError, NotImplementedError, ValueError):
                    pass
            print(f"    {str(dtype).replace('torch.', ''):9s} {name}: {', '.join(took) or 'none'}")
    return True


def check_mp2(ckpt: Path) -> bool:
    if torch.cuda.device_count() < 2:
        print("  mp2: skipped, needs 2 GPUs (this machine has 1)")
        return True
    one, _, _ = run(ckpt, "cuda", "float32")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "tokens.json"
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", __file__,
                            "--mp_worker", str(ckpt), str(out)], capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            print(f"  mp2: torchrun failed (exit {r.returncode}):\n{r.stderr[-3000:]}  FAILED")
            return False
        two = json.loads(out.read_text())
    passed = two == one
    print(f"  mp2 (nccl, 2 GPUs, float32): the same greedy tokens as one GPU: {passed}  {'ok' if passed else 'FAILED'}")
    return passed


def mp_worker(ckpt: str, out: str) -> None:
    tokens, _, _ = run(Path(ckpt), "cuda", "float32")
    if int(os.environ.get("RANK", 0)) == 0:
        Path(out).write_text(json.dumps(tokens))
    torch.distributed.destroy_process_group()


def check_metrics(ckpt: Path) -> bool:
    from llama import Llama

    gen = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=64, max_batch_size=2, device="cuda")
    gen.tokenizer.stop_tokens = frozenset()
    gen.generate(PROMPTS, 16, temperature=0)
    m = gen.last_metrics
    total = torch.cuda.get_device_properties(gen.device).total_memory
    passed = 0 < m.peak_memory_bytes < total and m.decode_steps == 16
    print("  metrics of a GPU run:\n" + "\n".join("    " + line for line in m.report().splitlines())
          + f"\n  peak memory is the allocator's ({m.peak_memory_bytes / 1e6:.1f} MB of {total / 1e9:.0f} GB)  "
          + ("ok" if passed else "FAILED"))
    return passed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, default=REPO / "checkpoints" / "llama3_tokenizer.model",
                        help="Llama 3 tokenizer.model (fetched from PyPI's llama-models wheel if missing)")
    parser.add_argument("--skip", nargs="*", default=[], choices=CHECKS)
    parser.add_argument("--mp_worker", nargs=2, help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    if a.mp_worker:
        mp_worker(*a.mp_worker)
        return 0
    if not torch.cuda.is_available():
        print(f"error: no CUDA device: this torch ({torch.__version__}) sees no GPU, so there is nothing to check; "
              "run this on a machine with an NVIDIA GPU and a CUDA build of torch", file=sys.stderr)
        return 2
    from utils.fetch_llama3_tokenizer import fetch_llama3_tokenizer

    tokenizer = fetch_llama3_tokenizer(a.tokenizer)
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} x "
          f"{torch.cuda.get_device_name(0)} (compute capability {'.'.join(map(str, torch.cuda.get_device_capability(0)))})")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_model(Path(tmp) / "model", tokenizer)
        for name in CHECKS:
            if name in a.skip:
                continue
            t0 = time.perf_counter()
            print(f"{name}:")
            checks = {"parity": check_parity, "int8": check_int8, "attention": lambda _: check_attention(),
                      "mp2": check_mp2, "metrics": check_metrics}
            results[name] = checks[name](ckpt)
            print(f"  ({time.perf_counter() - t0:.1f} s)")
    failed = [name for name, ok in results.items() if not ok]
    print("all checks passed" if not failed else f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
