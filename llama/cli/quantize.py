"""`llama quantize`: stores a checkpoint's linear weights quantized, once
(llama/weights/quantizer.py), so that every later start maps them instead of
quantizing the full-precision model in memory."""

import argparse
import time
from pathlib import Path

from ..weights.quantized import METHODS


def add_quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt_dir", required=True, type=Path, help="the full-precision checkpoint directory")
    p.add_argument("--out", required=True, type=Path, help="output checkpoint directory")
    p.add_argument("--quantize", required=True, choices=METHODS,
                   help="int8: q8_0 (8.5 bits a weight); int4: q4_1 (5 bits a weight), output layer q8_0")
    p.add_argument("--tokenizer", type=Path, help="tokenizer.model to copy (default: the input's, if any)")
    p.add_argument("--force", action="store_true", help="write into a non-empty output directory")


def quantize(a: argparse.Namespace) -> None:
    from ..weights.quantizer import quantize_checkpoint

    start = time.perf_counter()
    out = quantize_checkpoint(a.ckpt_dir, a.out, a.quantize, tokenizer_path=a.tokenizer, force=a.force,
                              show_progress=True)
    print(f"quantized {a.ckpt_dir} ({a.quantize}) to {out} in {time.perf_counter() - start:.1f} s")
