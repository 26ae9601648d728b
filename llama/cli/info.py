"""What a checkpoint directory holds, read without loading the weights
(`llama info`), and where its tokenizer is.

Everything comes from params.json, the tokenizer file and shard 0's tensor
headers (memory-mapped: its weights are not read) and the files' sizes.
Tied embeddings (an output.weight that is tok_embeddings.weight, as in
SmolLM2) are one set of parameters and counted once; telling them apart
reads row 0 of each, and the whole tables only when that row is equal.
"""

import dataclasses
import json
import math
from pathlib import Path
from typing import Dict, List, Optional

from ..weights import quantized
from ..weights.args import ModelArgs
from ..text.chat_format import ChatFormat, chat_format_name
from ..weights.checkpoint import (LazyShards, embeddings_tied, expected_shapes, find_shards, inspect_checkpoint,
                                  stored_types, supported_world_sizes, weights_vocab_size)
from ..weights.schema import model_weights
from ..text.tokenizer import Tokenizer
from ..weights.stages import find_tokenizer


def model_family(args: ModelArgs, raw_vocab_size: int, tokenizer_kind: Optional[str]) -> str:
    """"Llama 2", "Llama 3", "Llama 3.1" or "converted from GGUF" (a BPE tokenizer with a sidecar)."""
    if tokenizer_kind == "bpe":
        return "converted from GGUF"
    if raw_vocab_size == -1 or tokenizer_kind == "sentencepiece":
        return "Llama 2"
    return "Llama 3.1" if args.use_scaled_rope else "Llama 3"


@dataclasses.dataclass
class CheckpointInfo:
    path: str
    family: str
    parameters: int  # whole model, tied embeddings once
    file_bytes: int  # all consolidated.*.pth files on disk
    shards: int
    dtypes: List[str]  # of the stored tensors
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    tokenizer: Optional[str]  # path, or None if not found
    tokenizer_kind: Optional[str]  # sentencepiece / tiktoken / bpe
    chat_format: Optional[str]
    world_sizes: List[int]  # numbers of processes it can run on
    tied_embeddings: bool = False  # output.weight is tok_embeddings.weight
    quantized: Dict[str, int] = dataclasses.field(default_factory=dict)  # stored type -> linear weights (shard 0)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    def report(self) -> str:
        sizes = ", ".join(map(str, self.world_sizes))
        tok = f"{self.tokenizer} ({self.tokenizer_kind}, chat format {self.chat_format})" if self.tokenizer else \
            "not found (pass --tokenizer_path)"
        lines = [
            ("checkpoint", self.path),
            ("family", self.family),
            ("parameters", f"{_human(self.parameters, 1000, ['', 'K', 'M', 'B', 'T'])} ({self.parameters:,}"
                           f"{'; output tied to the embeddings' if self.tied_embeddings else ''})"),
            ("size on disk", f"{_human(self.file_bytes, 1024, [' B', ' KiB', ' MiB', ' GiB', ' TiB'])} "
                             f"in {self.shards} shard{'s' if self.shards > 1 else ''} (consolidated.*.pth)"),
            ("stored dtype", ", ".join(self.dtypes)),
            *([("quantized", ", ".join(f"{n} weight{'s' if n > 1 else ''} {kind}" for kind, n in self.quantized.items())
                + " (llama/weights/quantized.py)")] if self.quantized else []),
            ("shape", f"dim {self.dim}, {self.n_layers} layers, {self.n_heads} heads, "
                      f"{self.n_kv_heads} KV heads, vocabulary {self.vocab_size}"),
            ("tokenizer", tok),
            ("runs on", f"{sizes} processes (torchrun --nproc_per_node x --nnodes); "
                        f"other counts than {self.shards} reshard while loading"),
        ]
        return "\n".join(f"{k + ':':<14}{v}" for k, v in lines)


def _human(n: float, base: int, units: List[str]) -> str:
    i = min(int(math.log(max(n, 1), base)), len(units) - 1)
    value = n / base**i
    return f"{value:.0f}{units[i]}" if i == 0 else f"{value:.3g}{units[i]}"


def _splits(types: Dict[str, str], schema: dict, size: int) -> bool:
    """Whether `size` ranks split every quantized row-parallel weight at whole groups."""
    try:
        for key, kind in types.items():
            if schema[key].kind == "row":
                quantized.check_split(key, kind, schema[key].shape[1], size)
    except ValueError:
        return False
    return True


def checkpoint_info(ckpt_dir, tokenizer_path=None) -> CheckpointInfo:
    """Reads what `ckpt_dir` holds; raises FileNotFoundError / ValueError naming the problem."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {ckpt_dir} not found")
    file_args = ModelArgs.from_json(ckpt_dir / "params.json")
    paths = find_shards(ckpt_dir)
    args = dataclasses.replace(file_args, vocab_size=weights_vocab_size(paths))  # Llama 2 says -1
    paths, layout = inspect_checkpoint(ckpt_dir, args, file_args.vocab_size)  # shapes checked against params.json
    try:
        tok_path = find_tokenizer(ckpt_dir, tokenizer_path)
    except FileNotFoundError:
        tok_path = None
    tokenizer = Tokenizer.from_file(tok_path) if tok_path is not None else None
    chat_format = chat_format_name(ChatFormat.for_tokenizer(tokenizer)) if tokenizer else None
    shard0 = LazyShards(paths[:1])[0]
    full = expected_shapes(args, 1, layout)
    tied = embeddings_tied(shard0)  # each shard holds the same rows of both: shard 0 tells
    types = stored_types(shard0, expected_shapes(args, len(paths), layout), str(paths[0]))
    schema = model_weights(args)
    kinds: Dict[str, int] = {}
    for kind in types.values():
        kinds[kind] = kinds.get(kind, 0) + 1
    return CheckpointInfo(
        path=str(ckpt_dir),
        family=model_family(args, file_args.vocab_size, tokenizer.kind if tokenizer else None),
        parameters=sum(math.prod(shape) for name, shape in full.items() if not (tied and name == "output.weight")),
        file_bytes=sum(p.stat().st_size for p in paths),
        shards=len(paths),
        dtypes=sorted({str(t.dtype).replace("torch.", "") for t in shard0.values()}),
        dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
        vocab_size=args.vocab_size,
        tokenizer=str(tok_path) if tok_path else None,
        tokenizer_kind=tokenizer.kind if tokenizer else None,
        chat_format=chat_format,
        world_sizes=[m for m in supported_world_sizes(args) if _splits(types, schema, m)],
        tied_embeddings=tied,
        quantized=dict(sorted(kinds.items())),
    )
