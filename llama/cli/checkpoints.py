"""`llama info`, `llama shard` and `llama convert`: work on checkpoint directories.

The scripts utils/shard_model_checkpoint.py and utils/convert_gguf_checkpoint.py
are thin wrappers over the same functions and flags (add_shard_args,
add_convert_args), so the command and the scripts cannot drift apart."""

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Callable

from ..common.files import sidecar_path
from ..text import gguf_vocab
from ..weights import gguf, quantized
from ..weights.args import ModelArgs
from ..weights.writer import check_output_dir, write_checkpoint
from .info import checkpoint_info


def add_info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt_dir", type=Path, help="checkpoint directory")
    p.add_argument("--tokenizer_path", help="tokenizer.model (default: found in the directory, or its parent)")
    p.add_argument("--json", action="store_true", help="print the facts as JSON")


def info(a: argparse.Namespace) -> None:
    facts = checkpoint_info(a.ckpt_dir, a.tokenizer_path)
    print(facts.to_json() if a.json else facts.report())


def add_shard_args(p: argparse.ArgumentParser) -> None:
    # The flags of utils/shard_model_checkpoint.py.
    p.add_argument("-n", "--num_shards", type=int, required=True, help="number of output shards (workers)")
    p.add_argument("-i", "--input", type=Path, required=True, help="input checkpoint directory")
    p.add_argument("-o", "--output", type=Path, required=True, help="output checkpoint directory")
    p.add_argument("--pipeline_stages", type=int, default=1,
                   help="write one folder per pipeline stage, each with -n shards of its layers (default 1)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer.model to copy (default: the input's, if any)")
    p.add_argument("--force", action="store_true", help="write into a non-empty output directory")


def shard(a: argparse.Namespace) -> None:
    from ..weights.writer import reshard_checkpoint

    reshard_checkpoint(a.input, a.output, a.num_shards, tokenizer_path=a.tokenizer, force=a.force,
                       pipeline_stages=a.pipeline_stages)
    print(f"done: {a.output}")


def convert_gguf(gguf_path, out_dir, dtype: str = "float32", force: bool = False,
                 progress: Callable[[str], None] = lambda msg: None, show_progress: bool = False,
                 dequantize: bool = False) -> Path:
    """Converts the GGUF file `gguf_path` into a Meta checkpoint directory `out_dir`; returns `out_dir`.

    Writes consolidated.00.pth, params.json, tokenizer.model, its sidecar
    tokenizer.model.json unless the vocabulary is Meta's Llama 3 one, and
    checklist.chk. Linear weights stored in a block type we keep
    (gguf.KEPT_TYPES: Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K) keep their blocks
    (llama/weights/quantized.py's layouts) and params.json gets a
    "quantization" record; every other tensor (embeddings, norms, float
    linear weights) is dequantized to `dtype`. `dequantize` expands every
    tensor to `dtype` instead. A linear weight in any other block type is
    refused before anything is read or written. The output directory is
    checked before the (slow) reading; `show_progress` draws tensors done, MB
    and MB/s on stderr. The whole converted model is held in memory while it
    is written. It joins the two halves of a GGUF, which live in wings that
    do not import each other: weights/gguf.py (params and tensors) and
    text/gguf_vocab.py (the tokenizer).
    """
    gguf.import_gguf()
    path = Path(gguf_path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} not found")
    if dtype not in gguf.DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(gguf.DTYPES)}, got {dtype!r}")
    check_output_dir(out_dir, force, protect=[path])
    fields = gguf.open_gguf(path)
    params = gguf.read_params(fields)
    try:
        ranks, sidecar = gguf_vocab.tokenizer_files(fields)
    except gguf_vocab.VocabularyError as e:
        raise gguf.ConversionError(str(e)) from e
    progress(f"{path.name}: {fields.get('general.name', '?')} (license: {fields.get('general.license', 'not stated')}), "
             f"params {json.dumps(params)}, trained context {fields.get('llama.context_length', '?')} tokens")
    args = ModelArgs.from_params(params)
    gguf.check_gguf_shapes(fields.reader, path, args)
    kept = {} if dequantize else gguf.kept_types(fields.reader, path)
    if kept:
        params = {**params, quantized.PARAMS_KEY: quantized.describe(kept, None, gguf.source_name(fields, kept))}
        progress(f"keeping {len(kept)} linear weights quantized: {params[quantized.PARAMS_KEY]['types']}")
    state = gguf.read_tensors(fields.reader, path, args, gguf.DTYPES[dtype], show_progress, kept=kept)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = Path(tmp) / "tokenizer.model"
        tokenizer.write_text(ranks)
        if sidecar is not None:
            sidecar_path(tokenizer).write_text(json.dumps(sidecar, indent=1, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
        try:
            gguf_vocab.check_tokenizer(tokenizer, path)
        except gguf_vocab.VocabularyError as e:
            raise gguf.ConversionError(str(e)) from e
        return write_checkpoint(out_dir, params, [state], tokenizer_path=tokenizer, force=force, protect=[path],
                                progress=progress, show_progress=show_progress)


def add_convert_args(p: argparse.ArgumentParser) -> None:
    # The flags of utils/convert_gguf_checkpoint.py.
    p.add_argument("--gguf", required=True, type=Path, help="the .gguf file to convert")
    p.add_argument("--out", required=True, type=Path, help="output checkpoint directory")
    p.add_argument("--dtype", default="float32", choices=sorted(gguf.DTYPES),
                   help="dtype of the float tensors in the checkpoint: embeddings, norms, float weights, and "
                        "every weight with --dequantize (default float32: the exact dequantized values)")
    p.add_argument("--dequantize", action="store_true",
                   help="expand every weight to --dtype instead of keeping Q8_0, Q4_0, Q4_1, Q4_K, Q5_K and Q6_K "
                        "linear weights quantized (a checkpoint up to 8 times larger, for loaders without them)")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty output directory")


def run_convert(a: argparse.Namespace) -> Path:
    """The conversion `a` (add_convert_args' flags) asks for, with progress; prints where and how long."""
    start = time.perf_counter()
    out = convert_gguf(a.gguf, a.out, a.dtype, a.force, progress=print, show_progress=True,
                       dequantize=a.dequantize)
    print(f"converted {a.gguf} to {out} in {time.perf_counter() - start:.1f} s")
    return out


def convert(a: argparse.Namespace) -> None:
    """`llama convert` (add_convert_args' flags)."""
    try:
        run_convert(a)
    except ImportError as e:  # the gguf extra is missing: a bad setup, reported like a bad input
        raise FileNotFoundError(str(e)) from e
