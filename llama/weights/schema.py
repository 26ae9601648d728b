"""The weights of a Llama model: their names, their shapes, and how model
parallelism splits them. No torch.

One table, read by everything that reads or writes weights: the checkpoint
loader and resharder, the checkpoint writer, the random-checkpoint maker, the
GGUF converter, the transformers reference and the model's own loading.
"""

import re
from dataclasses import dataclass
from typing import Dict, Literal, Optional, Tuple

from .args import ModelArgs

# Llama 2 checkpoints split the embedding table along the model dimension
# (fairscale ParallelEmbedding), Llama 3 along the vocabulary
# (VocabParallelEmbedding). Only the shapes inside a checkpoint tell.
EmbeddingLayout = Literal["dim", "vocab"]

# Llama 2 shards carry the RoPE frequencies; the model computes its own.
UNUSED_KEYS = frozenset({"rope.freqs"})

# Per-layer weights in Meta's order: (name, kind). Column-parallel layers split
# their output rows (dim 0) across ranks, row-parallel ones their input columns
# (dim 1); norms are held whole by every rank.
LAYER_WEIGHTS = (
    ("attention.wq", "column"), ("attention.wk", "column"), ("attention.wv", "column"), ("attention.wo", "row"),
    ("feed_forward.w1", "column"), ("feed_forward.w2", "row"), ("feed_forward.w3", "column"),
    ("attention_norm", "norm"), ("ffn_norm", "norm"),
)
KV_WEIGHTS = ("attention.wk", "attention.wv")  # their heads are replicated when ranks outnumber KV heads
_SPLIT = {"column": 0, "row": 1, "norm": None}


@dataclass(frozen=True)
class Weight:
    name: str  # e.g. "layers.0.attention.wq.weight"
    shape: Tuple[int, ...]  # of the whole model
    kind: str  # "embedding", "column", "row" or "norm"

    def split_axis(self, layout: EmbeddingLayout) -> Optional[int]:
        """The axis model parallelism splits this weight along (None: not split)."""
        if self.kind == "embedding":
            return 1 if layout == "dim" else 0
        return _SPLIT[self.kind]

    @property
    def is_kv(self) -> bool:
        return self.name.endswith(tuple(f".{k}.weight" for k in KV_WEIGHTS))


def kv_replication(n_kv_heads: int, mp_size: int) -> int:
    """How many ranks share each KV head (1 unless there are more ranks than KV heads)."""
    if mp_size <= n_kv_heads:
        if n_kv_heads % mp_size:
            raise ValueError(f"{mp_size} model-parallel ranks cannot split {n_kv_heads} KV heads evenly")
        return 1
    if mp_size % n_kv_heads:
        raise ValueError(f"{mp_size} model-parallel ranks cannot share {n_kv_heads} KV heads evenly")
    return mp_size // n_kv_heads


def model_weights(args: ModelArgs) -> Dict[str, Weight]:
    """Every weight of the whole model, in Meta's order."""
    hd, ffn, dim = args.head_dim, args.ffn_hidden_dim, args.dim
    layer_shapes = {
        "attention.wq": (args.n_heads * hd, dim), "attention.wk": (args.n_kv_heads * hd, dim),
        "attention.wv": (args.n_kv_heads * hd, dim), "attention.wo": (dim, args.n_heads * hd),
        "feed_forward.w1": (ffn, dim), "feed_forward.w2": (dim, ffn), "feed_forward.w3": (ffn, dim),
        "attention_norm": (dim,), "ffn_norm": (dim,),
    }
    out = [Weight("tok_embeddings.weight", (args.vocab_size, dim), "embedding")]
    for i in range(args.n_layers):
        out += [Weight(f"layers.{i}.{name}.weight", layer_shapes[name], kind) for name, kind in LAYER_WEIGHTS]
    out += [Weight("norm.weight", (dim,), "norm"), Weight("output.weight", (args.vocab_size, dim), "column")]
    return {w.name: w for w in out}


def shard_shapes(args: ModelArgs, size: int, layout: EmbeddingLayout) -> Dict[str, tuple]:
    """The shape of every tensor in one shard of a `size`-way checkpoint (or one rank of `size`)."""
    replicas = kv_replication(args.n_kv_heads, size)
    shapes = {}
    for name, w in model_weights(args).items():
        shape = list(w.shape)
        if w.is_kv:
            shape[0] *= replicas  # each rank holds whole KV heads, some of them copies
        axis = w.split_axis(layout)
        if axis is not None:
            shape[axis] //= size
        shapes[name] = tuple(shape)
    return shapes


_LAYER = re.compile(r"layers\.(\d+)\.")


def stage_holds(name: str, layers: range, n_layers: int) -> bool:
    """Whether a pipeline stage holding `layers` (global indices) holds weight
    `name`: its layers, the embedding if it is the first stage, the output if
    the last, and the final norm (every stage: a few values). Unknown names
    are kept (the shape checks report them)."""
    m = _LAYER.match(name)
    if m:
        return int(m.group(1)) in layers
    if name.startswith("tok_embeddings."):
        return layers.start == 0
    if name.startswith("output."):
        return layers.stop == n_layers
    return True
