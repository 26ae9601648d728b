"""Writes a Meta-format checkpoint with random weights.

For tests, benchmarks and trying the pipeline without Meta's download:

    python utils/make_random_checkpoint.py --out /tmp/tiny --family llama3 \\
        --tokenizer path/to/tokenizer.model --dim 256 --n_layers 4 --n_heads 8 --n_kv_heads 2

Weights are scaled so activations stay O(1) and logits are well spread (so
greedy decoding has no near-ties); the text they produce is gibberish.

`--quantize int4|int8` writes the linear weights as random q4_1 / q8_0
blocks directly (llama/weights/random_weights.py), as `llama quantize`
would store them, with embeddings and norms in --dtype: an 8B-shaped 4-bit
model in a minute or two, where quantizing a float one takes most of an hour:

    python utils/make_random_checkpoint.py --out /tmp/8b-int4 --family llama3.1 --vocab_size 128256 \
        --dim 4096 --n_layers 32 --n_heads 32 --n_kv_heads 8 --ffn_dim_multiplier 1.3 --multiple_of 1024 \
        --quantize int4
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this clone's llama package, installed or not

import torch  # noqa: E402

from llama.text.tokenizer import Tokenizer  # noqa: E402
from llama.weights import random_weights  # noqa: E402
from llama.weights.random_weights import FAMILIES, random_params, random_state_dict  # noqa: E402,F401


def make_random_checkpoint(out_dir, params: dict, tokenizer_path=None, n_shards: int = 1, seed: int = 0,
                           dtype: torch.dtype = torch.bfloat16, force: bool = False, quantize=None,
                           show_progress: bool = False) -> Path:
    """llama.weights.random_weights.make_random_checkpoint, with a Llama 2
    checkpoint's vocabulary size read from `tokenizer_path`."""
    n_words = None
    if params["vocab_size"] == -1 and tokenizer_path is not None:
        n_words = Tokenizer.from_file(tokenizer_path).n_words
    return random_weights.make_random_checkpoint(out_dir, params, tokenizer_path, n_shards, seed, dtype, force,
                                                 n_words=n_words, quantize=quantize,
                                                 show_progress=show_progress)


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
    parser.add_argument("--quantize", choices=["int4", "int8"], default=None,
                        help="store the linear weights as random q4_1 (int4; the output layer q8_0) or q8_0 "
                             "blocks, drawn directly (one shard; embeddings and norms in --dtype)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="overwrite a non-empty output directory")
    a = parser.parse_args(argv)
    vocab = a.vocab_size
    if vocab is None:
        if a.tokenizer is None:
            parser.error("pass --tokenizer or --vocab_size")
        vocab = Tokenizer.from_file(a.tokenizer).n_words
    params = random_params(a.family, a.dim, a.n_layers, a.n_heads, a.n_kv_heads, vocab, a.multiple_of, a.ffn_dim_multiplier)
    out = make_random_checkpoint(a.out, params, a.tokenizer, a.shards, a.seed, getattr(torch, a.dtype), a.force,
                                 quantize=a.quantize, show_progress=a.quantize is not None)
    print(f"wrote a random {a.family} checkpoint to {out}")


if __name__ == "__main__":
    main()
