"""Writes a Meta-format checkpoint with random weights.

For tests, benchmarks and trying the pipeline without Meta's download:

    python utils/make_random_checkpoint.py --out /tmp/tiny --family llama3 \\
        --tokenizer path/to/tokenizer.model --dim 256 --n_layers 4 --n_heads 8 --n_kv_heads 2

Weights are scaled so activations stay O(1) and logits are well spread (so
greedy decoding has no near-ties); the text they produce is gibberish.
"""

import argparse
from pathlib import Path
from typing import Optional

import torch

from llama.weights.args import ModelArgs
from llama.weights.checkpoint import default_embedding_layout, rank_state_dict
from llama.weights.writer import write_checkpoint
from llama.weights.schema import model_weights
from llama.text.tokenizer import Tokenizer

FAMILIES = {
    # params.json extras per family; Llama 2 files say vocab_size -1 and omit rope_theta.
    "llama2": {},
    "llama3": {"rope_theta": 500000.0},
    "llama3.1": {"rope_theta": 500000.0, "use_scaled_rope": True},
}


def random_params(family: str, dim: int, n_layers: int, n_heads: int, n_kv_heads: Optional[int],
                  vocab_size: int, multiple_of: int = 32, ffn_dim_multiplier: Optional[float] = None) -> dict:
    """A params.json dict shaped like `family`'s files."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {sorted(FAMILIES)}")
    params = {"dim": dim, "n_layers": n_layers, "n_heads": n_heads, "multiple_of": multiple_of, "norm_eps": 1e-5}
    if n_kv_heads is not None:
        params["n_kv_heads"] = n_kv_heads
    if ffn_dim_multiplier is not None:
        params["ffn_dim_multiplier"] = ffn_dim_multiplier
    params["vocab_size"] = -1 if family == "llama2" else vocab_size
    params.update(FAMILIES[family])
    return params


def random_state_dict(args: ModelArgs, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    """Full (unsharded) random weights for `args`, under Meta's parameter names (llama/weights/schema.py)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, w in model_weights(args).items():
        if w.kind == "norm":
            t = 1 + 0.1 * torch.randn(w.shape, generator=g)
        elif w.kind == "embedding":
            t = torch.randn(w.shape, generator=g)
        else:  # linear layers: keep activations O(1)
            t = torch.randn(w.shape, generator=g) / w.shape[1] ** 0.5
            if name == "output.weight":
                t = t * 4  # spread logits apart
        state[name] = t.to(dtype)
    return state


def make_random_checkpoint(out_dir, params: dict, tokenizer_path=None, n_shards: int = 1, seed: int = 0,
                           dtype: torch.dtype = torch.bfloat16, force: bool = False) -> Path:
    """Writes params.json, n_shards consolidated.NN.pth (sharded as Meta shards
    that family) and, if given, a copy of the tokenizer into `out_dir`."""
    vocab = params["vocab_size"]
    if vocab == -1:
        if tokenizer_path is None:
            raise ValueError("a Llama 2 shaped checkpoint takes its vocab size from the tokenizer: pass one")
        vocab = Tokenizer.from_file(tokenizer_path).n_words
    args = ModelArgs.from_params({**params, "vocab_size": vocab})
    full = random_state_dict(args, seed, dtype)
    layout = default_embedding_layout(params["vocab_size"])
    shards = (rank_state_dict([full], args, rank, n_shards, layout) for rank in range(n_shards))
    return write_checkpoint(out_dir, params, shards, tokenizer_path=tokenizer_path, force=force)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="output checkpoint directory")
    parser.add_argument("--family", default="llama3", choices=sorted(FAMILIES))
    parser.add_argument("--tokenizer", type=Path, help="tokenizer.model to copy in (sets vocab_size for llama2)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--n_layers", type=int, default=4)
    parser.add_argument("--n_heads", type=int, default=8)
    parser.add_argument("--n_kv_heads", type=int, default=None)
    parser.add_argument("--vocab_size", type=int, default=None, help="default: the tokenizer's size")
    parser.add_argument("--multiple_of", type=int, default=32)
    parser.add_argument("--ffn_dim_multiplier", type=float, default=None)
    parser.add_argument("--shards", type=int, default=1, help="number of consolidated.NN.pth files")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="overwrite a non-empty output directory")
    a = parser.parse_args(argv)
    vocab = a.vocab_size
    if vocab is None:
        if a.tokenizer is None:
            parser.error("pass --tokenizer or --vocab_size")
        vocab = Tokenizer.from_file(a.tokenizer).n_words
    params = random_params(a.family, a.dim, a.n_layers, a.n_heads, a.n_kv_heads, vocab, a.multiple_of, a.ffn_dim_multiplier)
    out = make_random_checkpoint(a.out, params, a.tokenizer, a.shards, a.seed, getattr(torch, a.dtype), a.force)
    print(f"wrote a random {a.family} checkpoint to {out}")


if __name__ == "__main__":
    main()
