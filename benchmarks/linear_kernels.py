"""Which matmul kernel reads weights fastest on this CPU? One table per
instruction set: kernel, weight format, shape, and for each batch size and
thread count the GB/s of weight bytes read and the % of the read bandwidth
measured in the same run (torch.sum over 1 GB with that many threads).

    python benchmarks/linear_kernels.py                     # native ISA, then forced AVX2
    python benchmarks/linear_kernels.py --isa native --models smollm2 --threads 2

Decoding one token is a matrix-vector product per weight: its speed is the
bandwidth the kernel reaches. This is the measurement behind llama/kernels/linear.py's
`choose_matmul`; the row "chosen (linear.py)" is the module it picks, timed
through its forward (reshapes and casts included).

`--isa avx2` runs the same measurement in a child process with ATen, oneDNN,
MKL, fbgemm and our kernels all limited to AVX2 (ATEN_CPU_CAPABILITY=avx2,
ONEDNN_MAX_CPU_ISA=AVX2, MKL_ENABLE_INSTRUCTIONS=AVX2,
FBGEMM_ENABLE_INSTRUCTIONS=AVX2, LLAMA_NATIVE_ARCH=haswell): what an AVX2-only CPU runs, on this machine's
memory. The "Model" lines weight each kernel by the matmuls of one decoded
token (every layer's four matmuls plus the output layer).
"""

import argparse
import copy
import math
import os
import re
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's llama package, run from anywhere
warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")

AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
            "MKL_ENABLE_INSTRUCTIONS": "AVX2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
            "LLAMA_NATIVE_ARCH": "haswell"}  # our kernels (llama/kernels/native.py) built for AVX2+FMA

# (out, in) features of each matmul of one decoded token, and how many per token.
MODELS = {
    # SmolLM2-135M: dim 576, 30 layers, 9 heads (3 KV) of 64, hidden 1536, vocabulary 49,152.
    "smollm2": [("wqkv", 960, 576, 30), ("wo", 576, 576, 30), ("w13", 3072, 576, 30),
                ("w2", 576, 1536, 30), ("output", 49152, 576, 1)],
    # benchmarks/benchmark.py's default model: dim 2048, 8 layers, 16 heads (8 KV) of 128, hidden 5632.
    "0.9b": [("wqkv", 4096, 2048, 8), ("wo", 2048, 2048, 8), ("w13", 11264, 2048, 8),
             ("w2", 2048, 5632, 8), ("output", 128256, 2048, 1)],
    # Two of Llama 3 8B's weights (wo, and w1 of w13), one of each: the K-quant kernels' table
    # (python benchmarks/linear_kernels.py --models 8b --batch 1 --only "ours|chosen").
    "8b": [("wo", 4096, 4096, 1), ("w1", 14336, 4096, 1)],
}


def seconds_per_call(fn, min_time: float, rounds: int = 5) -> float:
    """The best of `rounds` rounds of about min_time / rounds each (the least
    disturbed by other processes on a shared machine)."""
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(rounds):
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < min_time / rounds:
            fn()
            n += 1
        best = min(best, (time.perf_counter() - start) / n)
    return best


def read_bandwidth(nbytes: int = 1 << 30) -> float:
    """GB/s of torch.sum over a buffer far bigger than any cache."""
    x = torch.ones(nbytes // 4)
    return nbytes / seconds_per_call(lambda: x.sum(), 2.0, rounds=10) / 1e9


def nbytes_of(state) -> int:
    if isinstance(state, torch.Tensor):
        return state.nbytes
    return sum(nbytes_of(s) for s in state) if isinstance(state, (tuple, list)) else 0


@dataclass
class Kernel:
    name: str
    weights: str  # format of the weights read
    act: torch.dtype  # activations in
    prepare: Callable  # (w32) -> factory; factory() -> one copy of the weight state
    call: Callable  # (x, state) -> y
    applies: Callable = lambda n, k: True
    bytes_of: Callable = nbytes_of


def _q8(w32):
    scales = (w32.abs().amax(1) / 127).clamp(min=1e-12)
    return torch.round(w32 / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


def _dynamic_x_int8(x):
    """Per-row symmetric int8 activations: (q, scale[m, 1])."""
    s = (x.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-12)
    return torch.round(x / s).to(torch.int8), s


def _fbgemm_factory(w32):
    q8, scales = _q8(w32)
    qw = torch._make_per_channel_quantized_tensor(q8, scales.double(), torch.zeros(len(scales), dtype=torch.long), 0)
    return lambda: (torch.ops.quantized.linear_prepack(qw, None),)


def _int4_factory(group: int, act: torch.dtype):
    def factory(w32):
        from benchmarks.matmuls import quantize_int4
        packed, sz = quantize_int4(w32, group)
        return lambda: (packed.clone(), sz.to(act))
    return factory


def _kquant_factory(kind: str):
    """Random super-blocks of `kind` (q4_k, q5_k, q6_k) for an (n, k) weight: speed does not depend on the values."""
    def factory(w32):
        import numpy as np
        from llama.weights.quantized import BLOCK_TYPES
        n, k = w32.shape
        cols, size = BLOCK_TYPES[kind]
        blocks = np.random.default_rng(0).integers(0, 256, size=(n, k // cols, size), dtype=np.uint8)
        d = np.full((n, k // cols, 2), 1e-3, dtype=np.float16).view(np.uint8)
        if kind == "q6_k":
            blocks[..., 208:210] = d[..., :2]  # d last
        else:
            blocks[..., 0:4] = d  # d, dmin first
        w = torch.from_numpy(blocks.reshape(n, -1))
        return lambda: (w.clone(),)
    return factory


def our_kquant_kernels() -> List[Kernel]:
    """native.linear on GGUF K-quant super-blocks (kernels.c's tile_k), where our kernels build."""
    from llama.kernels import native
    if native.library() is None:
        return []
    return [Kernel(f"ours (native.linear), {label} x", kind, act, _kquant_factory(kind),
                   (lambda kind: lambda x, s: native.linear(x, s[0], None, kind))(kind), applies=lambda n, k: k % 256 == 0)
            for kind in ("q4_k", "q5_k", "q6_k") for act, label in ((torch.bfloat16, "bf16"), (torch.float32, "fp32"))]


def candidate_kernels() -> List[Kernel]:
    f32, b16 = torch.float32, torch.bfloat16
    pointwise = torch.ops.mkldnn._linear_pointwise
    clone = lambda *ts: (lambda: tuple(t.clone() for t in ts))  # noqa: E731
    ks = [
        Kernel("F.linear", "fp32", f32, lambda w: clone(w), lambda x, s: F.linear(x, s[0])),
        Kernel("oneDNN packed", "fp32", f32, lambda w: lambda: (torch.ops.mkldnn._reorder_linear_weight(w, 1),),
               lambda x, s: pointwise(x, s[0], None, "none", [], "")),
        Kernel("MKL packed", "fp32", f32, lambda w: lambda: (torch.ops.mkl._mkl_reorder_linear_weight(w, 1), w),
               lambda x, s: torch.ops.mkl._mkl_linear(x, s[0], s[1], None, 1), bytes_of=lambda s: s[1].nbytes),
        Kernel("torch.mv / mm", "fp32", f32, lambda w: clone(w),
               lambda x, s: torch.mv(s[0], x[0])[None] if x.shape[0] == 1 else torch.mm(x, s[0].t())),
        Kernel("F.linear", "bf16", b16, lambda w: clone(w.bfloat16()), lambda x, s: F.linear(x, s[0])),
        Kernel("oneDNN packed", "bf16", b16,
               lambda w: (lambda wb: lambda: (torch.ops.mkldnn._reorder_linear_weight(wb, 1),))(w.bfloat16()),
               lambda x, s: pointwise(x, s[0], None, "none", [], "")),
        Kernel("upcast, oneDNN fp32 (ref.)", "fp32", b16, lambda w: lambda: (torch.ops.mkldnn._reorder_linear_weight(w, 1),),
               lambda x, s: pointwise(x.float(), s[0], None, "none", [], "").to(x.dtype)),
        Kernel("weight-only, bf16 x", "int8", b16,
               lambda w: (lambda q, s: clone(q, s.bfloat16()))(*_q8(w)),
               lambda x, s: torch.ops.aten._weight_int8pack_mm(x, s[0], s[1])),
        Kernel("weight-only, fp32 x", "int8", f32, lambda w: clone(*_q8(w)),
               lambda x, s: torch.ops.aten._weight_int8pack_mm(x, s[0], s[1])),
        Kernel("dynamic fbgemm", "int8", f32, _fbgemm_factory,
               lambda x, s: torch.ops.quantized.linear_dynamic(x, s[0], False),
               bytes_of=lambda s: s[0].unpack()[0].numel()),
        Kernel("dynamic _int_mm", "int8", f32, lambda w: (lambda q, s: clone(q.t().contiguous().t(), s))(*_q8(w)),
               lambda x, s: (lambda qx, sx: torch._int_mm(qx, s[0].t()) * sx * s[1])(*_dynamic_x_int8(x))),
    ]
    for g in (32, 128):
        for act, label in ((b16, "bf16"), (f32, "fp32")):
            ks.append(Kernel(f"group {g}, {label} x", "int4", act, _int4_factory(g, act),
                             (lambda g: lambda x, s: torch.ops.aten._weight_int4pack_mm_for_cpu(x, s[0], g, s[1]))(g),
                             applies=(lambda g: lambda n, k: k % g == 0)(g)))
    return ks


def chosen_kernels() -> List[Kernel]:
    """linear.py's choice per (dtype, quantization), through its module
    (int4 where our kernels run: it has no other)."""
    from llama.kernels import native
    from llama.kernels.linear import choose_matmul

    out = []
    choices = [("fp32", torch.float32, None), ("bf16", torch.bfloat16, None), ("int8", torch.bfloat16, "int8")]
    for label, act, quantize in choices + ([("int4", torch.bfloat16, "int4")] if native.library() else []):
        def factory(w, act=act, quantize=quantize):
            module = choose_matmul(w.to(act), quantize)
            module.numel = w.numel()  # for bytes_of
            if quantize is None:  # oneDNN's packed tensors cannot be deep-copied; packing again is cheap
                return lambda: (setattr(m := choose_matmul(w.to(act, copy=True)), "numel", w.numel()) or m,)
            return lambda: (copy.deepcopy(module),)
        per_weight = {"fp32": 4, "bf16": 2, "int8": 1, "int4": 0.625}[label]  # int4: with its fp16 scale and min
        out.append(Kernel("chosen (linear.py), bf16 x" if quantize else "chosen (linear.py)", label, act, factory,
                          lambda x, s: s[0](x), bytes_of=lambda s, b=per_weight: int(b * s[0].numel)))
    return out


def measure(shapes, batches, threads, budget: int, min_time: float, only: str) -> Dict[Tuple, float]:
    """(kernel name, weights, shape name, n, k, m, t) -> seconds per call, and bytes read per call."""
    results = {}
    kernels = [k for k in candidate_kernels() + chosen_kernels() + our_kquant_kernels() if re.search(only, f"{k.name} {k.weights}", re.I)]
    for shape_name, n, k, _ in shapes:
        w32 = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) / k ** 0.5
        for kern in kernels:
            if not kern.applies(n, k):
                continue
            try:
                factory = kern.prepare(w32)
                first = factory()
                nbytes = kern.bytes_of(first)
                # Enough copies that each call reads its weight from memory, not from the cache.
                copies = [first] + [factory() for _ in range(min(4095, math.ceil(budget / nbytes) - 1))]
            except (RuntimeError, NotImplementedError) as e:
                print(f"  {kern.name} {kern.weights} {n}x{k}: unavailable ({str(e).splitlines()[0][:80]})", file=sys.stderr)
                continue
            for m in batches:
                x = torch.randn(m, k).to(kern.act)
                it = iter(range(1 << 62))

                def fn():
                    return kern.call(x, copies[next(it) % len(copies)])
                for t in threads:
                    torch.set_num_threads(t)
                    results[(kern.name, kern.weights, shape_name, n, k, m, t)] = (seconds_per_call(fn, min_time), nbytes)
            copies = first = None  # free the pool before the next kernel
    return results


def report(isa: str, models, batches, threads, budget, min_time, only) -> None:
    bw = {}
    for t in threads:
        torch.set_num_threads(t)
        bw[t] = read_bandwidth()
    cols = [(m, t) for m in batches for t in threads]
    print(f"\n## ISA {isa}: torch {torch.__version__}, ATen {torch.backends.cpu.get_cpu_capability()}, "
          "read bandwidth " + ", ".join(f"{bw[t]:.1f} GB/s ({t} thr)" for t in threads))
    head = "| kernel | weights | shape (out x in) | " + " | ".join(f"M={m} T={t} GB/s (%bw)" for m, t in cols) + " |"
    for model in models:
        shapes = MODELS[model]
        res = measure(shapes, batches, threads, budget, min_time, only)
        print(f"\n### {model}\n\n{head}\n|" + "---|" * (3 + len(cols)))
        names = list(dict.fromkeys((key[0], key[1]) for key in res))
        for name, wfmt in names:
            for shape_name, n, k, _ in shapes:
                cells = []
                for m, t in cols:
                    r = res.get((name, wfmt, shape_name, n, k, m, t))
                    cells.append(f"{r[1] / r[0] / 1e9:6.1f} ({100 * r[1] / r[0] / 1e9 / bw[t]:3.0f}%)" if r else "-")
                if any(c != "-" for c in cells):
                    print(f"| {name} | {wfmt} | {shape_name} {n}x{k} | " + " | ".join(cells) + " |")
        print(f"\nModel {model}: one token's matmuls (ms per token at M, threads; GB/s of weights)\n")
        print("| kernel | weights | " + " | ".join(f"M={m} T={t}" for m, t in cols) + " |\n|" + "---|" * (2 + len(cols)))
        for name, wfmt in names:
            cells = []
            for m, t in cols:
                rs = [(res.get((name, wfmt, s, n, k, m, t)), c) for s, n, k, c in shapes]
                if any(r is None for r, _ in rs):
                    cells.append("-")
                    continue
                sec = sum(r[0] * c for r, c in rs)
                cells.append(f"{1e3 * sec:6.2f} ms {sum(r[1] * c for r, c in rs) / sec / 1e9:5.1f}")
            print(f"| {name} | {wfmt} | " + " | ".join(cells) + " |")
    sys.stdout.flush()


def quality_candidates():
    """name -> (model dtype, matmul factory from a float weight)."""
    from benchmarks.matmuls import Int4Matmul, Int8DynamicMatmul
    from llama.kernels.linear import Int8Matmul, PlainMatmul

    f32, b16 = torch.float32, torch.bfloat16
    c = {"plain fp32 (reference)": (f32, PlainMatmul),
         "int8 weight-only, bf16 x": (b16, lambda w: Int8Matmul(w, b16)),
         "int8 weight-only, fp32 x": (f32, lambda w: Int8Matmul(w, f32)),
         "int8 dynamic fbgemm, fp32 model": (f32, Int8DynamicMatmul),
         "int8 dynamic fbgemm, bf16 model": (b16, Int8DynamicMatmul)}
    for g in (32, 64, 128):
        for dt, label in ((b16, "bf16"), (f32, "fp32")):
            c[f"int4 group {g} (int8 where it does not divide), {label} model"] = (
                dt, (lambda g, dt: lambda w: Int4Matmul(w, g, dt) if w.shape[1] % g == 0 else Int8Matmul(w, dt))(g, dt))
    return c


def agreement(ckpt: str, text: Path, positions: int, only: str) -> None:
    """Teacher-forced on `text`: each candidate's top-1 agreement with the bf16
    model (F.linear) over `positions` positions, and perplexities."""
    import llama.kernels.linear as linear
    from llama import Llama

    tokenizer = str(Path(ckpt) / "tokenizer.model")
    chosen = linear.choose_matmul
    linear.choose_matmul = lambda w, quantize=None, cpu=None: linear.PlainMatmul(w)
    try:
        models = {dt: Llama.build(ckpt, tokenizer, max_seq_len=positions + 1, max_batch_size=1, device="cpu",
                                  dtype=str(dt).replace("torch.", "")) for dt in (torch.bfloat16, torch.float32)}
    finally:
        linear.choose_matmul = chosen
    tokens = torch.tensor([models[torch.float32].tokenizer.encode(text.read_text(), bos=True, eos=False)[:positions + 1]])
    if tokens.shape[1] < positions + 1:
        raise SystemExit(f"{text} has only {tokens.shape[1]} tokens; --positions {positions} needs more")
    originals = {dt: {id(m): m.matmul for m in g.model.modules() if isinstance(m, linear.KernelLinear)}
                 for dt, g in models.items()}

    def run(dt, factory=None):
        model = models[dt].model
        for m in model.modules():
            if isinstance(m, linear.KernelLinear):
                m.matmul = originals[dt][id(m)] if factory is None else factory(originals[dt][id(m)].weight.data)
        with torch.inference_mode():
            logits = model.forward(tokens, 0).float()[0, :-1]
        return logits.argmax(-1), torch.nn.functional.cross_entropy(logits, tokens[0, 1:]).exp().item()

    ref, ref_ppl = run(torch.bfloat16)
    print(f"\n## Agreement with bf16 (F.linear), {positions} positions of {text.name} teacher-forced, {ckpt}, "
          f"ATen {torch.backends.cpu.get_cpu_capability()}\n\nbf16 perplexity {ref_ppl:.4f}\n")
    print("| candidate | top-1 agreement | perplexity | vs bf16 |\n|---|---|---|---|")
    for name, (dt, factory) in quality_candidates().items():
        if not re.search(only, name, re.I):
            continue
        top1, ppl = run(dt, factory)
        print(f"| {name} | {100 * (top1 == ref).float().mean().item():.1f}% | {ppl:.4f} | {100 * (ppl / ref_ppl - 1):+.2f}% |")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--isa", nargs="+", default=["native", "avx2"], choices=["native", "avx2"])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--budget_mb", type=int, default=1024, help="weight copies per kernel (more than the caches)")
    parser.add_argument("--min_time", type=float, default=0.3, help="seconds per measurement")
    parser.add_argument("--only", default="", help="only kernels whose 'name weights' matches this regular expression")
    parser.add_argument("--agreement", metavar="CKPT_DIR",
                        help="instead of speed: each quantized kernel's top-1 agreement with bf16 on this checkpoint")
    parser.add_argument("--text", type=Path, default=Path(__file__).resolve().parents[1] / "README.md")
    parser.add_argument("--positions", type=int, default=512)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = parser.parse_args()
    flags = set()
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    if not a.child:
        print("CPU flags: " + " ".join(sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))))
    for isa in a.isa:
        if (a.child or isa == "native") and a.agreement:
            agreement(a.agreement, a.text, a.positions, a.only)
        elif a.child or isa == "native":
            report(isa if not a.child else "avx2", a.models, a.batch, a.threads, a.budget_mb << 20, a.min_time, a.only)
            continue
        args = [sys.executable, __file__, "--child", "--isa", "avx2", "--models", *a.models,
                "--threads", *map(str, a.threads), "--batch", *map(str, a.batch), "--budget_mb", str(a.budget_mb),
                "--min_time", str(a.min_time), "--only", a.only, "--text", str(a.text), "--positions", str(a.positions)]
        args += ["--agreement", a.agreement] if a.agreement else []
        subprocess.run(args, env={**os.environ, **AVX2_ENV}, check=True)


if __name__ == "__main__":
    main()
