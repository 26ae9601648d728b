"""Writes a Meta checkpoint as a float32 GGUF file that llama.cpp runs: the
same weights for both engines in a side-by-side benchmark. The inverse of
llama/weights/gguf.py: exporting a converted checkpoint and converting the
result back gives the same tensors bit for bit.

Design: the model's shape comes from params.json, the weights from the
checkpoint (one shard). The tokenizer is not rebuilt from tokenizer.model:
every `tokenizer.*` key (vocabulary, merges, pre-tokenizer, special ids,
chat template) and the descriptive `general.*` keys are copied from a GGUF
file of the same vocabulary, so llama.cpp tokenizes as that file does.

Invariants: no rows are reordered (Meta's wq/wk rotate interleaved pairs,
and so does llama.cpp's LLaMA RoPE); tied embeddings (output equal to
tok_embeddings) are written once, as llama.cpp's files hold them; Llama
3.1's RoPE scaling becomes a rope_freqs tensor of divisors. The file
appears under its name only when complete (written to a temporary file,
then renamed), with the permissions the umask asks for (0644 under 022).
The output is never one of the inputs (the template or the checkpoint's
files), compared by file identity so that a link or bind mount is caught.

Failure modes: a checkpoint of several shards, one that disagrees with its
params.json, or a template GGUF that is unreadable, holds no tokenizer or a
vocabulary of another size raise ExportError naming the file and the fix.
The gguf package (an optional extra) is imported on first use.
"""

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Optional

import torch

from .args import ModelArgs, rope_frequencies
from .checkpoint import CheckpointError, check_shapes, expected_shapes, find_shards, load_shard
from .gguf import GLOBAL_TENSORS, LAYER_TENSORS, ROPE_FREQS, import_gguf
from .writer import check_output_file, new_file_mode

META_TO_GGUF = {meta: gguf for gguf, meta in {**GLOBAL_TENSORS, **LAYER_TENSORS}.items()}
# What the template file says about itself, not about its weights or shape.
SKIPPED_GENERAL = {"general.architecture", "general.file_type", "general.quantization_version",
                   "general.alignment"}
FTYPE_ALL_F32 = 0  # llama.cpp's LLAMA_FTYPE_ALL_F32


class ExportError(ValueError):
    """The checkpoint or the tokenizer file cannot make a GGUF llama.cpp would run."""


def gguf_name(meta_name: str) -> str:
    """Meta parameter name -> GGUF tensor name ("layers.3.attention.wq.weight" -> "blk.3.attn_q.weight")."""
    stem = meta_name.removesuffix(".weight")
    if stem.startswith("layers."):
        _, i, rest = stem.split(".", 2)
        return f"blk.{i}.{META_TO_GGUF[rest]}.weight"
    return f"{META_TO_GGUF[stem]}.weight"


def read_checkpoint(ckpt_dir: Path):
    """(ModelArgs with the vocabulary size filled in, state) of an MP=1 checkpoint."""
    args = ModelArgs.from_json(ckpt_dir / "params.json")
    shards = find_shards(ckpt_dir)
    if len(shards) != 1:
        raise ExportError(f"{ckpt_dir} has {len(shards)} shards; merge them first: "
                          f"python utils/shard_model_checkpoint.py -n 1 -i {ckpt_dir} -o MERGED_DIR")
    state = load_shard(shards[0])
    if args.vocab_size == -1 and "tok_embeddings.weight" in state:  # Llama 2 leaves it to the tokenizer
        args = dataclasses.replace(args, vocab_size=state["tok_embeddings.weight"].shape[0])
    try:
        check_shapes(state, expected_shapes(args, 1, "vocab"), str(shards[0]), "The checkpoint does not match params.json.")
    except CheckpointError as e:
        raise ExportError(str(e)) from e
    return args, state


def model_metadata(writer, args: ModelArgs, context_length: int) -> None:
    """The llama.* keys llama.cpp reads to build the model."""
    writer.add_uint32("llama.context_length", context_length)
    writer.add_uint32("llama.embedding_length", args.dim)
    writer.add_uint32("llama.block_count", args.n_layers)
    writer.add_uint32("llama.feed_forward_length", args.ffn_hidden_dim)
    writer.add_uint32("llama.attention.head_count", args.n_heads)
    writer.add_uint32("llama.attention.head_count_kv", args.n_kv_heads)
    writer.add_float32("llama.rope.freq_base", float(args.rope_theta))
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", float(args.norm_eps))
    writer.add_uint32("llama.vocab_size", args.vocab_size)
    writer.add_uint32("llama.rope.dimension_count", args.head_dim)
    writer.add_uint32("general.file_type", FTYPE_ALL_F32)


def copy_tokenizer_metadata(writer, template: Path, vocab_size: int) -> int:
    """Copies tokenizer.* and descriptive general.* keys; returns the template's context length (or 0)."""
    gguf = import_gguf()
    try:
        reader = gguf.GGUFReader(template)
    except Exception as e:  # numpy raises whatever a damaged file makes it raise
        raise ExportError(f"{template} is not a readable GGUF file ({type(e).__name__}: {str(e)[:120]})") from e
    fields = reader.fields
    if "tokenizer.ggml.tokens" not in fields:
        raise ExportError(f"{template} holds no tokenizer (no tokenizer.ggml.tokens): pass the GGUF the model came from")
    n_tokens = len(fields["tokenizer.ggml.tokens"].contents())
    if n_tokens != vocab_size:
        raise ExportError(f"{template} has {n_tokens} tokens but the checkpoint's embeddings have {vocab_size} rows: "
                          "pass a GGUF with this model's vocabulary")
    for name, field in fields.items():
        if name.startswith("tokenizer.") or (name.startswith("general.") and name not in SKIPPED_GENERAL):
            kind = field.types[0]
            sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(name, field.contents(), kind, sub_type=sub)
    arch = fields["general.architecture"].contents() if "general.architecture" in fields else "llama"
    context = fields.get(f"{arch}.context_length")
    return int(context.contents()) if context is not None else 0


def gguf_tensors(args: ModelArgs, state) -> dict:
    """GGUF name -> float32 array (out, in), in Meta's order; tied output left out."""
    tensors = {}
    tied = torch.equal(state["output.weight"], state["tok_embeddings.weight"])
    for name in state:
        if name == "output.weight" and tied:
            continue  # llama.cpp uses token_embd when there is no output tensor
        tensors[gguf_name(name)] = state[name].float().contiguous().numpy()
    if args.use_scaled_rope:
        plain = rope_frequencies(args.head_dim, args.rope_theta, use_scaled=False)
        scaled = rope_frequencies(args.head_dim, args.rope_theta, use_scaled=True)
        tensors[ROPE_FREQS] = (plain / scaled).numpy()  # llama.cpp divides each frequency by these
    return tensors


def export_gguf(ckpt_dir, out_path, tokenizer_from, context_length: Optional[int] = None) -> Path:
    """Writes `ckpt_dir` (an MP=1 Meta checkpoint) as an F32 GGUF at `out_path`; returns it.

    `tokenizer_from` is a GGUF file of the same vocabulary whose tokenizer and
    description keys are copied. `context_length` defaults to the template's.
    The file appears under its name only when complete."""
    gguf = import_gguf()
    ckpt_dir, out_path, template = Path(ckpt_dir), Path(out_path), Path(tokenizer_from)
    if not template.is_file():
        raise FileNotFoundError(f"GGUF file {template} not found (--tokenizer_from)")
    args, state = read_checkpoint(ckpt_dir)  # memory-mapped: its weights are not read yet
    try:
        check_output_file(out_path, [template, ckpt_dir / "params.json", *find_shards(ckpt_dir)])
    except ValueError as e:
        raise ExportError(str(e)) from e
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, "llama")
        template_context = copy_tokenizer_metadata(writer, template, args.vocab_size)
        model_metadata(writer, args, context_length or template_context or 4096)
        for name, array in gguf_tensors(args, state).items():
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, new_file_mode())  # mkstemp made it 0600
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out_path
