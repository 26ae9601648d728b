"""Which matmul kernel reads weights fastest on this CPU? Prints GB/s of weight
bytes per kernel, shape and batch size, beside the machine's read bandwidth.

    python benchmarks/linear_kernels.py --threads 2

Decoding one token is a matrix-vector product per weight: its speed is the
bandwidth the kernel reaches. This is the measurement behind llama/linear.py.
"""

import argparse
import time

import torch
import torch.nn.functional as F


def seconds_per_call(fn, min_time: float = 0.3) -> float:
    for _ in range(3):
        fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_time:
        fn()
        n += 1
    return (time.perf_counter() - start) / n


def read_bandwidth(nbytes: int = 1 << 30) -> float:
    """GB/s of torch.sum over a buffer far bigger than any cache."""
    x = torch.ones(nbytes // 4)
    return nbytes / seconds_per_call(lambda: x.sum(), 1.0) / 1e9


def kernels(w32: torch.Tensor, m: int, copies: int):
    """name -> (callable, bytes of weight one call reads).

    Each callable cycles through `copies` copies of its weight, so that the
    weights come from memory, as in decoding, not from the CPU cache."""
    k = w32.shape[1]
    x32 = torch.randn(m, k)
    x16 = x32.bfloat16()
    scales = (w32.abs().amax(1) / 127).clamp(min=1e-12)
    q8 = torch.round(w32 / scales[:, None]).clamp(-127, 127).to(torch.int8)
    s16 = scales.bfloat16()
    pointwise = torch.ops.mkldnn._linear_pointwise

    def cycle(weights, call):
        it = iter(range(1 << 62))
        return lambda: call(weights[next(it) % len(weights)])

    w32s = [w32.clone() for _ in range(copies)]
    w16s = [w32.bfloat16() for _ in range(copies)]
    p32s = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in w32s]
    p16s = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in w16s]
    q8s = [q8.clone() for _ in range(copies)]
    return {
        "F.linear fp32": (cycle(w32s, lambda w: F.linear(x32, w)), w32.nbytes),
        "oneDNN packed fp32": (cycle(p32s, lambda w: pointwise(x32, w, None, "none", [], "")), w32.nbytes),
        "F.linear bf16": (cycle(w16s, lambda w: F.linear(x16, w)), w32.nbytes // 2),
        "oneDNN packed bf16": (cycle(p16s, lambda w: pointwise(x16, w, None, "none", [], "")), w32.nbytes // 2),
        "int8 weight-only": (cycle(q8s, lambda w: torch.ops.aten._weight_int8pack_mm(x16, w, s16)), q8.nbytes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--shapes", nargs="+", default=["4096x4096", "14336x4096", "2048x2048", "5632x2048", "1536x576", "576x1536"],
                        help="out x in features")
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    print(f"threads {a.threads}; memory read bandwidth {read_bandwidth():.1f} GB/s (torch.sum over 1 GB)")
    for m in a.batch:
        for shape in a.shapes:
            n, k = (int(v) for v in shape.split("x"))
            w = torch.randn(n, k)
            copies = max(1, (512 << 20) // w.nbytes)  # 512 MB of fp32 copies: far more than any cache
            figures = [f"{name} {nbytes / seconds_per_call(fn) / 1e9:5.1f}"
                       for name, (fn, nbytes) in kernels(w, m, copies).items()]
            print(f"batch {m:2d}, {shape:>10}: " + " | ".join(figures) + "  (GB/s of weights)")


if __name__ == "__main__":
    main()
