"""How much a weight quantization changes a real model's predictions.

    python benchmarks/quant_quality.py --ckpt_dir checkpoints/SmolLM2-135M-Instruct
    python benchmarks/quant_quality.py --ckpt_dir ... --quantize int8 --positions 512

Teacher-forces a fixed English text (benchmarks/data/pride_and_prejudice_ch1.txt:
chapter 1 of Jane Austen's Pride and Prejudice, 1813, public domain) through
the model in fp32, bf16 and bf16 with `quantize` (any name Llama.build
accepts, e.g. "int8"), and reports, over `positions` next-token predictions,
the share whose top-1 token equals bf16's (and fp32's) and the perplexity of
each model on the text. fp32 is there for scale: how much bf16 itself moves
the top-1 token.
"""

import argparse
import inspect
import math
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from llama import Llama  # noqa: E402

TEXT = REPO / "benchmarks" / "data" / "pride_and_prejudice_ch1.txt"


def build(ckpt_dir, dtype: str, quantize: Optional[str], max_seq_len: int, threads: Optional[int] = None,
          compile: bool = False) -> Llama:
    """Llama.build through its public keywords, with `threads` where Llama.build has that parameter."""
    kwargs = dict(max_seq_len=max_seq_len, max_batch_size=1, device="cpu", dtype=dtype, quantize=quantize)
    if compile:
        kwargs["compile"] = True
    if threads is not None and "threads" in inspect.signature(Llama.build).parameters:
        kwargs["threads"] = threads
    return Llama.build(str(ckpt_dir), str(Path(ckpt_dir) / "tokenizer.model"), **kwargs)


@torch.inference_mode()
def teacher_forced_logits(gen: Llama, tokens: Sequence[int], steps: bool = False) -> torch.Tensor:
    """Float logits (len(tokens), vocab): row i predicts token i + 1. In one
    pass (the prefill kernels), or with `steps` one token at a time through
    the KV cache (the decoding kernels, what generation runs)."""
    if not steps:
        return gen.model.forward(torch.tensor([list(tokens)]), 0)[0].float()
    return torch.cat([gen.model.forward(torch.tensor([[t]]), i)[0].float() for i, t in enumerate(tokens)])


def top1_agreement(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Share of positions where both logits (positions, vocab) have the same arg-max."""
    return (reference.argmax(-1) == other.argmax(-1)).float().mean().item()


def perplexity(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """exp of the mean negative log-likelihood of `targets` (positions,) under `logits` (positions, vocab)."""
    return math.exp(torch.nn.functional.cross_entropy(logits.float(), targets).item())


def text_tokens(gen: Llama, text: str, positions: int):
    """The text's first positions + 1 tokens (beginning-of-text marker as the tokenizer adds it)."""
    tokens = gen.tokenizer.encode(text, bos=True, eos=False)
    if len(tokens) < positions + 1:
        raise ValueError(f"the text has {len(tokens)} tokens; {positions} positions need {positions + 1}: "
                         "pass a longer --text or fewer --positions")
    return tokens[: positions + 1]


def quantization_quality(ckpt_dir, quantize: str = "int8", text_path: Path = TEXT, positions: int = 512,
                         threads: Optional[int] = None) -> Dict:
    """Top-1 agreement with bf16 and perplexity of fp32, bf16 and bf16 + `quantize`,
    teacher-forced in one pass and, under "decoding", one token a step.

    Builds one model at a time (the largest, fp32, is freed before the next)."""
    logits, stepped, tokens = {}, {}, None
    for name, dtype, quant in (("fp32", "float32", None), ("bf16", "bfloat16", None), (quantize, "bfloat16", quantize)):
        gen = build(ckpt_dir, dtype, quant, positions + 1, threads)
        if tokens is None:
            tokens = text_tokens(gen, Path(text_path).read_text(encoding="utf-8"), positions)
        logits[name] = teacher_forced_logits(gen, tokens)[:-1]  # the last row predicts past the text
        stepped[name] = teacher_forced_logits(gen, tokens, steps=True)[:-1]
        del gen
    return quality_figures(logits, stepped, tokens, quantize, Path(text_path).name)


def quality_figures(logits: Dict[str, torch.Tensor], stepped: Dict[str, torch.Tensor], tokens: Sequence[int],
                    quantize: str, text: str) -> Dict:
    """The report's figures from teacher-forced logits {"fp32", "bf16", quantize: (positions, vocab)}
    of `tokens` (positions + 1), in one pass and one token a step (also llamacpp_peer's)."""
    targets = torch.tensor(list(tokens[1:]))

    def figures(table: Dict[str, torch.Tensor]) -> Dict:
        return {
            "agreement_with_bf16": {name: top1_agreement(table["bf16"], table[name]) for name in table if name != "bf16"},
            "agreement_with_fp32": {name: top1_agreement(table["fp32"], table[name]) for name in table if name != "fp32"},
            "perplexity": {name: perplexity(value, targets) for name, value in table.items()},
        }

    return {"quantize": quantize, "text": text, "positions": len(targets), **figures(logits),
            "decoding": figures(stepped)}


def main() -> None:
    from benchmarks.peer_report import quality_table

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt_dir", default=str(REPO / "checkpoints" / "SmolLM2-135M-Instruct"))
    ap.add_argument("--quantize", default="int8")
    ap.add_argument("--text", type=Path, default=TEXT)
    ap.add_argument("--positions", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print("\n".join(quality_table(quantization_quality(a.ckpt_dir, a.quantize, a.text, a.positions, a.threads))))


if __name__ == "__main__":
    main()
