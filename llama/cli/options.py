"""Flags the `llama` subcommands share, each defined once: the model to load
(checkpoint, tokenizer, device, dtype, threads, sizes) and sampling."""

import argparse
import sys
from pathlib import Path
from typing import Optional

from ..parallel.distributed import DTYPES
from ..kernels.linear import QUANTIZATIONS


def add_model_args(p: argparse.ArgumentParser, max_seq_len: int = 2048, max_batch_size: int = 1) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--ckpt_dir", metavar="DIR", required=True,
                   help="checkpoint directory (params.json, consolidated.*.pth)")
    g.add_argument("--tokenizer_path", metavar="FILE",
                   help="tokenizer.model (default: found in --ckpt_dir, or its parent for Llama 2)")
    g.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    g.add_argument("--dtype", choices=sorted(DTYPES),
                   help="default: bfloat16 where the CPU or GPU computes it natively, else float32 on a CPU and "
                        "float16 on a GPU; float16 on GPUs only")
    g.add_argument("--quantize", choices=[q for q in QUANTIZATIONS if q], help="int8 (about half the memory of bf16) or int4 (about a third; our CPU kernels only) linear layers")
    g.add_argument("--threads", metavar="N", type=int,
                   help="CPU threads per process (default: the physical cores this process may run on, divided "
                        "among the processes on this node); on a shared machine fewer threads can be much faster")
    g.add_argument("--compile", action="store_true",
                   help="decode through a torch.compile'd transformer block: fewer, fused operations per token; "
                        "the first start compiles for tens of seconds (cached on disk) and needs a C++ compiler")
    g.add_argument("--pipeline_stages", metavar="P", type=int, default=1,
                   help="under torchrun: split the layers into P stages (world size / P processes each, "
                        "tensor-parallel within a stage), for nodes behind slow links (default 1)")
    g.add_argument("--pipeline_overlap", choices=["on", "off"], default="on",
                   help="with --pipeline_stages P: on splits the KV-cache rows into P lanes whose decoding passes "
                        "flow through the stages one behind the other, so every stage works at once with several "
                        "requests (needs --max_batch_size a multiple of P, else the stages take turns); off: the "
                        "stages take turns (default on)")
    g.add_argument("--max_seq_len", metavar="N", type=int, default=max_seq_len,
                   help=f"prompt plus answer, in tokens (sizes the KV cache; default {max_seq_len})")
    g.add_argument("--max_batch_size", metavar="N", type=int, default=max_batch_size,
                   help=f"sequences generated together (default {max_batch_size})")
    add_speculation_args(p)


def add_speculation_args(p: argparse.ArgumentParser) -> None:
    """Speculative decoding (llama/engine/speculative.py); off by default."""
    g = p.add_argument_group("speculative decoding")
    g.add_argument("--speculate", choices=["ngram", "off"], default="off",
                   help="ngram: propose the tokens that followed the last few tokens' earlier occurrence in the "
                        "prompt or answer, and verify them in one pass (fast where the answer copies its input; "
                        "a request stops proposing where few are accepted) (default off)")
    g.add_argument("--draft_ckpt_dir", metavar="DIR",
                   help="speculate with this smaller model of the same vocabulary as the proposer (one process only)")
    g.add_argument("--speculate_tokens", metavar="K", type=int, default=4,
                   help="tokens proposed per step and request (default 4)")


def check_speculation_args(a: argparse.Namespace) -> None:
    """The speculation flags, checked before any model loads."""
    from ..engine.speculative import check_tokens

    if getattr(a, "speculate", "off") == "off" and getattr(a, "draft_ckpt_dir", None) is None:
        return
    if a.speculate != "off" and a.draft_ckpt_dir is not None:
        raise ValueError("--speculate ngram and --draft_ckpt_dir are two proposers: give one of them")
    check_tokens(a.speculate_tokens)
    if a.draft_ckpt_dir is not None:
        try:
            check_ckpt_dir(a.draft_ckpt_dir)
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(str(e).replace("--ckpt_dir", "--draft_ckpt_dir")) from None


def apply_speculation(generator, a: argparse.Namespace) -> None:
    """Turns on the speculative decoding the flags ask for (a draft model is
    built like the target: same tokenizer, sizes, device, dtype, kernels)."""
    from ..engine.speculative import Speculator, check_single_process

    if a.draft_ckpt_dir is not None:
        from ..builder import build
        from ..weights.stages import find_tokenizer

        check_single_process()  # before loading a second model
        draft = build(a.draft_ckpt_dir, str(find_tokenizer(a.ckpt_dir, a.tokenizer_path)), a.max_seq_len,
                      a.max_batch_size, seed=getattr(a, "seed", 1), device=a.device, dtype=a.dtype,
                      quantize=a.quantize, threads=a.threads).model
        generator.engine.set_speculation(Speculator.draft(draft, generator.model, a.speculate_tokens))
    elif a.speculate == "ngram":
        generator.engine.set_speculation(Speculator.ngram(a.speculate_tokens))


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """The sampling flags; `sampling_kwargs` hands them to the generator."""
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", metavar="T", type=float, default=0.6, help="0 for greedy decoding (default 0.6)")
    g.add_argument("--top_p", metavar="P", type=float, default=0.9, help="nucleus sampling threshold (default 0.9)")
    g.add_argument("--top_k", metavar="K", type=int, default=0, help="keep the K most likely tokens (default 0: off)")
    g.add_argument("--min_p", metavar="P", type=float, default=0.0,
                   help="drop tokens less likely than P x the most likely one (default 0: off)")
    g.add_argument("--repetition_penalty", metavar="R", type=float, default=1.0,
                   help="divide the logits of tokens already seen by R (default 1: off)")
    g.add_argument("--presence_penalty", metavar="X", type=float, default=0.0,
                   help="OpenAI's presence penalty, -2..2 (default 0)")
    g.add_argument("--frequency_penalty", metavar="X", type=float, default=0.0,
                   help="OpenAI's frequency penalty, -2..2 (default 0)")
    g.add_argument("--stop", metavar="TEXT", action="append", default=[],
                   help="end the answer before this text (repeat for several)")
    g.add_argument("--max_gen_len", metavar="N", type=int,
                   help="most tokens per answer (default: until the model stops or max_seq_len is reached)")
    # Seeds torch's generator at build; each answer draws its own seed from it, the same on every rank.
    g.add_argument("--seed", metavar="N", type=int, default=1, help="sampling seed, the same on every rank (default 1)")


# The seeds the engine takes (SamplingParams.seed): torch's generators take any
# 64-bit value, but a request's seed is a non-negative signed 64-bit integer.
MAX_SEED = 2**63 - 1


def sampling_kwargs(a: argparse.Namespace) -> dict:
    """The keyword arguments of chat_completion_stream / generate_stream for the sampling
    flags (max_gen_len and a SamplingParams); a bad value is a ValueError naming the flag."""
    from ..engine.sampling import SamplingParams

    if a.max_gen_len is not None and a.max_gen_len < 1:
        raise ValueError(f"--max_gen_len must be a positive number of tokens, got {a.max_gen_len} "
                         "(leave it out to answer until the model stops or max_seq_len is reached)")
    if not 0 <= a.seed <= MAX_SEED:
        raise ValueError(f"--seed must be an integer from 0 to {MAX_SEED} (2**63 - 1), got {a.seed}")

    params = SamplingParams(
        temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, min_p=a.min_p,
        repetition_penalty=a.repetition_penalty, presence_penalty=a.presence_penalty,
        frequency_penalty=a.frequency_penalty, stop=tuple(a.stop),
    )
    return dict(max_gen_len=a.max_gen_len, sampling=params)


def check_ckpt_dir(ckpt_dir: str) -> None:
    """--ckpt_dir is a directory: a mistyped name says so (before the tokenizer,
    looked up in it, would be reported missing), and a GGUF file gets the
    command that converts it."""
    path = Path(ckpt_dir)
    if path.is_dir():
        return
    if path.is_file():
        try:
            with open(path, "rb") as f:
                gguf = f.read(4) == b"GGUF"
        except OSError:
            gguf = False
        if gguf or path.suffix.lower() == ".gguf":
            raise ValueError(f"--ckpt_dir {path} is a GGUF file, not a checkpoint directory: convert it once with "
                             f"`llama convert --gguf {path} --out {path.with_suffix('')}`, then pass "
                             f"--ckpt_dir {path.with_suffix('')}")
        raise ValueError(f"--ckpt_dir {path} is a file, not a checkpoint directory (params.json, "
                         "consolidated.*.pth, tokenizer.model)")
    raise FileNotFoundError(f"--ckpt_dir {path}: directory not found (check the path; `llama info DIR` shows "
                            "what a checkpoint directory holds)")


def build_generator(a: argparse.Namespace):
    """Loads the model as the flags say, once the flags are checked."""
    from ..weights.stages import find_tokenizer
    from ..generation import Llama

    if hasattr(a, "temperature"):
        sampling_kwargs(a)  # a bad sampling flag fails before the model loads
    check_ckpt_dir(a.ckpt_dir)
    check_speculation_args(a)
    generator = Llama.build(
        ckpt_dir=a.ckpt_dir, tokenizer_path=str(find_tokenizer(a.ckpt_dir, a.tokenizer_path)),
        max_seq_len=a.max_seq_len, max_batch_size=a.max_batch_size, seed=getattr(a, "seed", 1),
        device=a.device, dtype=a.dtype, quantize=a.quantize, threads=a.threads, compile=a.compile,
        pipeline_stages=a.pipeline_stages,
    )
    if getattr(a, "pipeline_overlap", "on") == "off":
        generator.engine.set_overlap(False)
    if hasattr(a, "speculate"):
        apply_speculation(generator, a)
    return generator


def read_stdin(what: str) -> Optional[str]:
    """All of stdin without its trailing newlines, or None if stdin is a
    terminal (nothing piped in). `echo "question" | llama chat` then asks
    exactly what `--prompt "question"` asks: a newline left at the end of a
    message is a token the model reads as part of it (and answers worse)."""
    if sys.stdin is None or sys.stdin.isatty():
        return None
    text = sys.stdin.read()
    if not text.strip():
        raise ValueError(f"stdin is empty: give {what}")
    return text.rstrip("\r\n")


def check_prompt(prompt: Optional[str], what: str) -> Optional[str]:
    """An empty --prompt is refused (it would answer nothing in particular)."""
    if prompt is not None and not prompt.strip():
        raise ValueError(f"--prompt is empty: give {what}")
    return prompt
