"""`llama quantize`: a full-precision checkpoint into a quantized one, once.

Quantizing at every start holds the full-precision model and spends minutes
of compute; a checkpoint stored quantized (llama/weights/quantized.py) loads
by mapping the file. `quantize_checkpoint` reads the input shard files
memory-mapped and writes the same number of shards, each a StreamedShard
(llama/weights/writer.py): the output file is laid out first, then every
tensor is written into it as it is made, and the pages of the input and the
output it touched are given back (llama/weights/mapped.py). Peak memory is
about one tensor and its float temporaries, whatever the model's size.

What is quantized: every linear weight (attention wq/wk/wv/wo, feed-forward
w1/w2/w3, output) with a multiple of 32 input columns in its shard;
embeddings and norms are copied in their dtype. "int8" stores q8_0, "int4"
q4_1 with the output layer in q8_0 (quantized.type_for). The result is what
`--quantize` at load makes from the same file, bit for bit.

Failure modes: the writer's (nothing published unless complete, DiskFullError,
outputs that are inputs refused); an input already quantized, or split into
pipeline stages, is refused before anything is written.
"""

import dataclasses
import json
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

from . import mapped, quantized, stages
from .args import ModelArgs
from .checkpoint import CheckpointError, LazyShards, inspect_checkpoint, weights_vocab_size, find_shards
from .schema import model_weights
from .writer import StreamedShard, check_output_dir, write_checkpoint


def planned_types(state: Dict[str, torch.Tensor], args: ModelArgs, method: str) -> Dict[str, str]:
    """The type each weight of one shard is stored as (key -> type); weights not listed stay float."""
    schema = model_weights(args)
    return {k: quantized.type_for(method, k) for k, t in state.items()
            if k in schema and schema[k].kind in ("column", "row") and t.shape[1] % quantized.GROUP == 0}


def shard_spec(state: Dict[str, torch.Tensor], types: Dict[str, str]) -> Dict[str, torch.Tensor]:
    """The output shard's tensors as torch.empty placeholders (never touched)."""
    spec = {}
    for key, t in state.items():
        if key in types:
            spec[key], spec[quantized.scales_key(key)] = quantized.empty_stored(types[key], *t.shape)
        else:
            spec[key] = torch.empty(t.shape, dtype=t.dtype)
    return spec


def quantized_shard(path: Path, args: ModelArgs, method: str) -> StreamedShard:
    """The StreamedShard of input shard file `path` quantized by `method`."""
    state = LazyShards([path])[0]
    types = planned_types(state, args, method)

    def fill(out: Dict[str, torch.Tensor]):
        for key, t in state.items():
            if key in types:
                done = quantized.quantize(t, types[key], out=(out[key], out[quantized.scales_key(key)]))
            else:
                out[key].copy_(t)
                done = (out[key],)
            mapped.release([t, *done])
            yield sum(x.nbytes for x in done)

    return StreamedShard(shard_spec(state, types), fill)


def quantize_checkpoint(in_dir, out_dir, method: str, tokenizer_path: Optional[Path] = None, force: bool = False,
                        progress: Callable[[str], None] = print, show_progress: bool = False) -> Path:
    """Writes `in_dir` (a float checkpoint) quantized by `method` ("int8" or
    "int4") into `out_dir`, with as many shards; params.json gains a
    "quantization" record. Returns `out_dir`."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if method not in quantized.METHODS:
        raise ValueError(f"--quantize must be one of {list(quantized.METHODS)}, got {method!r}")
    if not in_dir.is_dir():
        raise FileNotFoundError(f"input checkpoint directory {in_dir} not found")
    if (in_dir / stages.NAME).is_file() or stages.stage_folders(in_dir):
        raise ValueError(f"{in_dir} is split into pipeline stages; quantize the whole checkpoint, then split it "
                         "(llama shard --pipeline_stages)")
    check_output_dir(out_dir, force, protect=[in_dir])
    file_args = ModelArgs.from_json(in_dir / "params.json")
    args = dataclasses.replace(file_args, vocab_size=weights_vocab_size(find_shards(in_dir)))
    paths, _ = inspect_checkpoint(in_dir, args, file_args.vocab_size)
    params = json.loads((in_dir / "params.json").read_text())
    first = LazyShards(paths[:1])[0]
    already = sorted(k for k, t in first.items() if quantized.is_quantized(t))
    if already or quantized.PARAMS_KEY in params:
        raise CheckpointError(f"{in_dir} is quantized already ({already[0] if already else 'params.json says so'}); "
                              "quantize the full-precision checkpoint it was made from")
    if tokenizer_path is None and (in_dir / "tokenizer.model").is_file():
        tokenizer_path = in_dir / "tokenizer.model"
    types = planned_types(first, args, method)
    params[quantized.PARAMS_KEY] = quantized.describe(types, method, source=f"llama quantize from {in_dir.name}")
    progress(f"{in_dir}: {len(paths)} shard(s) -> {out_dir}: {method} ({params[quantized.PARAMS_KEY]['types']} "
             "linear weights per shard)")
    shards = (quantized_shard(p, args, method) for p in paths)
    return write_checkpoint(out_dir, params, shards, tokenizer_path=tokenizer_path, force=force, protect=[in_dir],
                            progress=progress, n_shards=len(paths), show_progress=show_progress)
