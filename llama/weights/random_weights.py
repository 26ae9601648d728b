"""Random weights in Meta's checkpoint format, for tests, benchmarks and
trying the pipeline without Meta's download.

Design: the weights' names and shapes come from the one weight table
(llama/weights/schema.py); the full model is drawn with a seeded generator
and sharded the way Meta shards that family (rank_state_dict), then written
by the atomic writer. params.json is shaped like the family's own files
(Llama 2's says vocab_size -1 and omits rope_theta).

Invariants: the same seed gives the same weights whatever the number of
shards; weights are scaled so activations stay O(1) and logits are well
spread (greedy decoding has no near-ties); the text they produce is
gibberish.

Failure modes: an unknown family is a ValueError naming the choices; a
Llama 2 shaped checkpoint needs the tokenizer's vocabulary size
(`n_words`), which the caller reads from the tokenizer (this wing does not
import the text wing).
"""

from pathlib import Path
from typing import Optional

import torch

from .args import ModelArgs
from .checkpoint import default_embedding_layout, rank_state_dict
from .schema import model_weights
from .writer import write_checkpoint

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
                           dtype: torch.dtype = torch.bfloat16, force: bool = False,
                           n_words: Optional[int] = None) -> Path:
    """Writes params.json, n_shards consolidated.NN.pth (sharded as Meta shards
    that family) and, if given, a copy of the tokenizer into `out_dir`.

    `n_words` is the tokenizer's vocabulary size, needed when params say vocab_size -1 (Llama 2)."""
    vocab = params["vocab_size"]
    if vocab == -1:
        if n_words is None:
            raise ValueError("a Llama 2 shaped checkpoint takes its vocab size from the tokenizer: pass one")
        vocab = n_words
    args = ModelArgs.from_params({**params, "vocab_size": vocab})
    full = random_state_dict(args, seed, dtype)
    layout = default_embedding_layout(params["vocab_size"])
    shards = (rank_state_dict([full], args, rank, n_shards, layout) for rank in range(n_shards))
    return write_checkpoint(out_dir, params, shards, tokenizer_path=tokenizer_path, force=force)
