"""Random weights in Meta's checkpoint format, for tests, benchmarks and
trying the pipeline without Meta's download.

Design: the weights' names and shapes come from the one weight table
(llama/weights/schema.py); the full model is drawn with a seeded generator
and sharded the way Meta shards that family (rank_state_dict), then written
by the atomic writer. params.json is shaped like the family's own files
(Llama 2's says vocab_size -1 and omits rope_theta).

With `quantize` ("int4" or "int8"), the linear weights are drawn directly
as stored blocks (llama/weights/quantized.py), the way `llama quantize`
would store them (int4: q4_1, the output layer q8_0; int8: q8_0), with
embeddings and norms in `dtype` and params.json's "quantization" record:
random codes (nibbles or int8) and per-group scales chosen so that each
weight has the float random weights' spread (a per-group factor in
[0.75, 1.25] varies them as real scales vary). Nothing float of the linear
layers is ever made, so an 8B-shaped 4-bit model takes a minute or two,
not the ~45 min of quantizing a float one; the file is streamed to disk
tensor by tensor (writer.StreamedShard), holding about one tensor.

Invariants: the same seed gives the same weights whatever the number of
shards; weights are scaled so activations stay O(1) and logits are well
spread (greedy decoding has no near-ties); the text they produce is
gibberish.

Failure modes: an unknown family or quantization method is a ValueError
naming the choices, as is a quantized checkpoint asked in several shards
(split it afterwards: `llama shard -n N`); an unknown family is a ValueError naming the choices; a
Llama 2 shaped checkpoint needs the tokenizer's vocabulary size
(`n_words`), which the caller reads from the tokenizer (this wing does not
import the text wing).
"""

from pathlib import Path
from typing import Optional

import torch

from . import mapped, quantized
from .args import ModelArgs
from .checkpoint import default_embedding_layout, rank_state_dict
from .schema import model_weights
from .writer import StreamedShard, write_checkpoint

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


# The spread of a uniform code: q4_1's nibbles 0..15 (mean 7.5) and q8_0's int8 in [-127, 127].
_NIBBLE_STD = (255 / 12) ** 0.5
_INT8_STD = ((255 ** 2 - 1) / 12) ** 0.5


def quantized_types(args: ModelArgs, method: str) -> dict:
    """weight name -> the stored type `method` gives it (quantized.type_for); embeddings and norms are not listed."""
    return {name: quantized.type_for(method, name) for name, w in model_weights(args).items()
            if w.kind in ("column", "row")}


def _fill_quantized(name: str, kind: str, weight: torch.Tensor, scales: torch.Tensor, g: torch.Generator) -> None:
    """Random codes and scales, written in place, so that W has std about
    1 / sqrt(K) (times 4 for the output layer), mean about 0."""
    n, k = quantized.logical_shape(kind, weight)
    std = (4 if name == "output.weight" else 1) / k ** 0.5
    factor = 0.75 + 0.5 * torch.rand(scales.shape[:2], generator=g)  # (n, k / 32): one per group
    if kind == "q4_1":
        weight.random_(0, 256, generator=g)  # two uniform nibbles a byte
        d = (std / _NIBBLE_STD * factor).half()
        scales[..., 0].copy_(d)
        scales[..., 1].copy_(-7.5 * d.float())  # W = d (q - 7.5): centred
    else:
        weight.random_(-127, 128, generator=g)
        scales.copy_(std / _INT8_STD * factor)


def random_quantized_shard(args: ModelArgs, method: str, seed: int = 0,
                           dtype: torch.dtype = torch.bfloat16) -> StreamedShard:
    """The single shard of a random checkpoint stored quantized by `method`,
    as a StreamedShard: each tensor is drawn into the file being written,
    then its pages are given back (llama/weights/mapped.py)."""
    types = quantized_types(args, method)
    spec = {}
    for name, w in model_weights(args).items():
        if name in types:
            spec[name], spec[quantized.scales_key(name)] = quantized.empty_stored(types[name], *w.shape)
        else:
            spec[name] = torch.empty(w.shape, dtype=dtype)

    def fill(out):
        g = torch.Generator().manual_seed(seed)
        for name, w in model_weights(args).items():
            if name in types:
                done = (out[name], out[quantized.scales_key(name)])
                _fill_quantized(name, types[name], *done, g)
            elif w.kind == "norm":
                done = (out[name].copy_(1 + 0.1 * torch.randn(w.shape, generator=g)),)
            else:  # the embedding: a row at a time would do too, but randn in chunks keeps float temporaries small
                t = out[name]
                for start in range(0, t.shape[0], 4096):
                    t[start:start + 4096].copy_(torch.randn(t[start:start + 4096].shape, generator=g))
                done = (t,)
            mapped.release(done)
            yield sum(x.nbytes for x in done)

    return StreamedShard(spec, fill)


def make_random_checkpoint(out_dir, params: dict, tokenizer_path=None, n_shards: int = 1, seed: int = 0,
                           dtype: torch.dtype = torch.bfloat16, force: bool = False,
                           n_words: Optional[int] = None, quantize: Optional[str] = None,
                           show_progress: bool = False) -> Path:
    """Writes params.json, n_shards consolidated.NN.pth (sharded as Meta shards
    that family) and, if given, a copy of the tokenizer into `out_dir`.

    `n_words` is the tokenizer's vocabulary size, needed when params say vocab_size -1 (Llama 2).
    `quantize` ("int4", "int8"): linear weights stored quantized, drawn as
    blocks (one shard only; embeddings and norms in `dtype`)."""
    vocab = params["vocab_size"]
    if vocab == -1:
        if n_words is None:
            raise ValueError("a Llama 2 shaped checkpoint takes its vocab size from the tokenizer: pass one")
        vocab = n_words
    args = ModelArgs.from_params({**params, "vocab_size": vocab})
    if quantize is not None:
        if quantize not in quantized.METHODS:
            raise ValueError(f"unknown quantization {quantize!r}; choose from {list(quantized.METHODS)}")
        if n_shards != 1:
            raise ValueError(f"a random quantized checkpoint is written as one shard, not {n_shards}: split it "
                             f"afterwards with `llama shard -n {n_shards}`")
        bad = [name for name, w in model_weights(args).items()
               if w.kind in ("column", "row") and w.shape[1] % quantized.GROUP]
        if bad:
            raise ValueError(f"{bad[0]} has {model_weights(args)[bad[0]].shape[1]} input columns: quantized "
                             f"weights need a multiple of {quantized.GROUP} (choose dim and the FFN size so)")
        types = quantized_types(args, quantize)
        params = {**params, quantized.PARAMS_KEY: quantized.describe(types, quantize, source="random weights")}
        shard = random_quantized_shard(args, quantize, seed, dtype)
        return write_checkpoint(out_dir, params, [shard], tokenizer_path=tokenizer_path, force=force,
                                show_progress=show_progress)
    full = random_state_dict(args, seed, dtype)
    layout = default_embedding_layout(params["vocab_size"])
    shards = (rank_state_dict([full], args, rank, n_shards, layout) for rank in range(n_shards))
    return write_checkpoint(out_dir, params, shards, tokenizer_path=tokenizer_path, force=force)
