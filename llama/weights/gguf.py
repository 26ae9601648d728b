"""Reads a Llama-architecture GGUF file (llama.cpp's format): its metadata as
params.json, its tensors under Meta's names, quantized linear weights kept as
their blocks or dequantized.

Design: a GGUF file is a key-value header plus tensors. `Metadata` gives
typed access to the header (a GGUF can put any type under any key, so every
key this module reads has the type it must have, see _KEY_TYPES);
`model_params` turns it into a params.json dict. `check_gguf_shapes` checks
the tensors' shapes against those params (llama/weights/schema.py) and
`kept_types` picks the stored type (llama/weights/quantized.py) of every
linear weight in a block type we keep (KEPT_TYPES), both from the headers
alone; `read_tensors` then reads one tensor at a time from the memory-mapped
file: kept weights as their blocks (`stored_blocks`, numpy views copied
once), everything else dequantized by the gguf package. The tokenizer half
of a GGUF is turned into tokenizer files by llama/text/gguf_vocab.py, and the
two are joined into a checkpoint by llama/cli/checkpoints.py's `convert_gguf`.

Invariants: no tensor is reordered (llama.cpp stores attn_q/attn_k in
Meta's interleaved RoPE layout; its converter undoes Hugging Face's
permutation); a kept weight stands for exactly the values the gguf package
dequantizes from its tensor (Q8_0's fp16 scale widens exactly, Q4_0's d
becomes (d, -8 d), the K-quants' super-blocks are copied byte for byte);
embeddings and norms are always float (the embedding is a lookup); tied
embeddings become one float tensor under both names, or, when their blocks
are kept, a float tok_embeddings and an output layer in token_embd's blocks;
Llama 3.1's RoPE scaling, stored by llama.cpp as a rope_freqs tensor,
becomes use_scaled_rope, and any other scaling is refused. Memory: the
output's size plus one tensor's temporaries, never a float copy of a kept
weight.

Failure modes: everything this module cannot convert (another
architecture, mixture of experts, other RoPE scaling, a damaged or
truncated file, a tensor type the gguf package cannot dequantize, a linear
weight in a block type we do not keep unless it is dequantized, shapes that
disagree with the metadata) raises ConversionError naming the file, the
tensor and what to do, before any tensor data is read where the headers
tell. The `gguf` package is an optional extra: it is imported on first use,
and its absence is an ImportError that says how to install it.
"""

import math
import re
import sys
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from .args import ModelArgs, rope_frequencies
from .checkpoint import CheckpointError, check_shapes, expected_shapes
from .progress import Progress
from . import quantized
from .quantized import scales_key
from .schema import LAYER_WEIGHTS

# GGUF tensor names -> Meta parameter names. llama.cpp stores attn_q/attn_k in
# Meta's interleaved RoPE layout (its converter undoes Hugging Face's
# permutation), so no tensor is reordered here.
GLOBAL_TENSORS = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}
LAYER_TENSORS = {
    "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv", "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
    "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class ConversionError(ValueError):
    """The GGUF file holds something this converter cannot turn into a Meta checkpoint."""


GGUF_INSTALL = 'pip install gguf (or this package with its extra: pip install "llama[gguf]")'


def import_gguf():
    """The gguf package (an optional extra), or an ImportError that says how to install it."""
    try:
        import gguf
    except ImportError as e:
        raise ImportError(f"reading GGUF files needs the gguf package: {GGUF_INSTALL}") from e
    return gguf


# The type each metadata key this converter reads must have: a GGUF file can
# put any type under any key ("llama.embedding_length" = "abc").
_INT, _FLOAT, _STR, _BOOL = "an integer", "a finite number", "a string", "true or false"
_KEY_TYPES = {
    **dict.fromkeys(["llama.embedding_length", "llama.block_count", "llama.attention.head_count",
                     "llama.attention.head_count_kv", "llama.feed_forward_length", "llama.vocab_size",
                     "llama.rope.dimension_count", "llama.attention.key_length", "llama.attention.value_length",
                     "llama.expert_count", "llama.context_length", "tokenizer.ggml.bos_token_id",
                     "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id",
                     "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id", "general.file_type"], _INT),
    **dict.fromkeys(["llama.attention.layer_norm_rms_epsilon", "llama.rope.freq_base"], _FLOAT),
    **dict.fromkeys(["general.architecture", "llama.rope.scaling.type", "tokenizer.ggml.model", "tokenizer.ggml.pre",
                     "tokenizer.chat_template", "general.name", "general.license"], _STR),
    "tokenizer.ggml.add_bos_token": _BOOL,
    "tokenizer.ggml.tokens": "a list of strings",
    "tokenizer.ggml.merges": "a list of strings",
    "tokenizer.ggml.token_type": "a list of integers",
}


def _has_type(value, kind: str) -> bool:
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if kind == _INT:
        return is_int
    if kind == _FLOAT:
        return (is_int or isinstance(value, float)) and math.isfinite(value)
    if kind == _STR:
        return isinstance(value, str)
    if kind == _BOOL:
        return isinstance(value, bool)
    item = str if kind == "a list of strings" else int
    return isinstance(value, list) and all(isinstance(v, item) and not isinstance(v, bool) for v in value)


class Metadata:
    """Typed access to a GGUF file's key-value metadata; errors name the file and key."""

    def __init__(self, reader, path: Path):
        self.reader, self.path = reader, path

    def get(self, key: str, default=None):
        field = self.reader.fields.get(key)
        if field is None:
            return default
        try:
            value = field.contents()
        except Exception as e:  # a damaged field: the gguf package raises whatever numpy does
            raise ConversionError(f"{self.path}: metadata key {key!r} cannot be read ({e}); the file is damaged") from e
        kind = _KEY_TYPES.get(key)
        if kind is not None and not _has_type(value, kind):
            raise ConversionError(f"{self.path}: metadata key {key!r} must be {kind}, got {str(value)[:60]!r} "
                                  f"({type(value).__name__}); the file is damaged or not a llama.cpp GGUF")
        return value

    def require(self, key: str):
        value = self.get(key)
        if value is None:
            raise ConversionError(f"{self.path} lacks the metadata key {key!r}, which a Llama model needs")
        return value


def ffn_params(dim: int, hidden: int) -> dict:
    """multiple_of and ffn_dim_multiplier for which Meta's FFN size rule gives `hidden`.

    Prefers no multiplier and the largest power-of-two multiple_of, as Meta's
    own params.json files read.
    """
    base = int(2 * 4 * dim / 3)
    multipliers = [None, *dict.fromkeys([*(round(hidden / base, d) for d in range(1, 5)), hidden / base])]
    for multiplier in multipliers:
        for multiple_of in (1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1):
            if hidden % multiple_of:
                continue
            params = {"multiple_of": multiple_of} if multiplier is None else {
                "multiple_of": multiple_of, "ffn_dim_multiplier": multiplier}
            if ModelArgs(dim=dim, n_heads=1, **params).ffn_hidden_dim == hidden:
                return params
    raise ConversionError(f"no multiple_of / ffn_dim_multiplier gives a feed-forward size of {hidden} for dim {dim}")


def model_params(fields: Metadata, n_vocab: int) -> dict:
    """params.json for the model the GGUF metadata describes."""
    arch = fields.require("general.architecture")
    if arch != "llama":
        raise ConversionError(
            f"{fields.path} holds a {arch!r} model; this converter reads only the 'llama' architecture"
        )
    if fields.get("llama.expert_count", 0):
        raise ConversionError(f"{fields.path} is a mixture-of-experts model (llama.expert_count > 0), which is not supported")
    scaling = fields.get("llama.rope.scaling.type", "none")
    if scaling != "none":
        raise ConversionError(f"{fields.path} uses RoPE scaling {scaling!r}, which is not supported")
    dim, n_heads = fields.require("llama.embedding_length"), fields.require("llama.attention.head_count")
    if not (isinstance(n_heads, int) and n_heads > 0 and dim % n_heads == 0):
        raise ConversionError(f"{fields.path}: llama.attention.head_count={n_heads!r} does not divide embedding_length={dim}")
    for key in ("llama.rope.dimension_count", "llama.attention.key_length", "llama.attention.value_length"):
        if fields.get(key, dim // n_heads) != dim // n_heads:
            raise ConversionError(
                f"{fields.path}: {key}={fields.get(key)} differs from embedding_length / head_count = "
                f"{dim // n_heads}; such models are not supported"
            )
    # GGUF stores eps as float32: write the shortest decimal that rounds to it (1e-05, not 9.99999974e-06).
    eps = float(str(np.float32(fields.require("llama.attention.layer_norm_rms_epsilon"))))
    vocab_size = fields.get("llama.vocab_size", n_vocab)
    if vocab_size != n_vocab:
        raise ConversionError(f"{fields.path}: llama.vocab_size={vocab_size} but the tokenizer has {n_vocab} tokens")
    params = {
        "dim": dim,
        "n_layers": fields.require("llama.block_count"),
        "n_heads": n_heads,
        "n_kv_heads": fields.get("llama.attention.head_count_kv", n_heads),
        "vocab_size": vocab_size,
        **ffn_params(dim, fields.require("llama.feed_forward_length")),
        "norm_eps": eps,
        "rope_theta": float(fields.get("llama.rope.freq_base", 10000.0)),
    }
    try:
        ModelArgs.from_params(params)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{fields.path}: the metadata describes no valid Llama model: {e}") from e
    return params


ROPE_FREQS = "rope_freqs.weight"


def llama31_rope_scaling(reader, path: Path, params: dict) -> dict:
    """params with use_scaled_rope if the GGUF holds Llama 3.1's RoPE scaling.

    llama.cpp stores it as a tensor of per-frequency divisors (rope_freqs)
    rather than as metadata; only Llama 3.1's own divisors (factor 8, as
    use_scaled_rope computes them) are accepted.
    """
    found = [t for t in reader.tensors if t.name == ROPE_FREQS]
    if not found:
        return params
    head_dim = params["dim"] // params["n_heads"]
    plain = rope_frequencies(head_dim, params["rope_theta"], use_scaled=False)
    expected = (plain / rope_frequencies(head_dim, params["rope_theta"], use_scaled=True)).numpy()
    got = import_gguf().dequantize(found[0].data, found[0].tensor_type).reshape(-1)
    if got.shape != expected.shape or not np.allclose(got, expected, rtol=1e-4):
        raise ConversionError(
            f"{path}: {ROPE_FREQS} holds RoPE scaling factors other than Llama 3.1's (Llama 3.2 and other "
            "models scale by other factors); only Llama 3.1's scaling is supported"
        )
    return {**params, "use_scaled_rope": True}


def meta_name(gguf_name: str, path: Path) -> str:
    m = re.fullmatch(r"(?:blk\.(\d+)\.)?(\w+)\.weight", gguf_name)
    table = LAYER_TENSORS if m and m[1] is not None else GLOBAL_TENSORS
    if not m or m[2] not in table:
        raise ConversionError(f"{path} holds a tensor {gguf_name!r} that has no place in a Llama model; not supported")
    return f"layers.{m[1]}.{table[m[2]]}.weight" if m[1] is not None else f"{table[m[2]]}.weight"


# GGUF block types a linear weight keeps as they are (see quantized.py for
# q8_0 and q4_1): Q8_0's fp16 scale widens to fp32 exactly, Q4_0's scale d
# gives Q4_1's (d, m = -8 d) exactly (a multiplication by a power of two);
# Q5_0's 5-bit q - 16 fits int8 with its d as the q8_0 scale, exactly (llama.cpp
# stores weights whose rows are no multiple of 256 in Q5_0 in a Q4_K_M file);
# the K-quants keep each row's ggml super-blocks byte for byte.
KEPT_TYPES = {"Q8_0": "q8_0", "Q5_0": "q8_0", "Q4_0": "q4_1", "Q4_1": "q4_1", "Q4_K": "q4_k", "Q5_K": "q5_k",
              "Q6_K": "q6_k"}
# Stored types that are a row's ggml super-blocks back to back (quantized.BLOCK_TYPES):
# bytes per super-block of quantized.QK weights.
RAW_BLOCK_BYTES = {kind: nbytes for kind, (_, nbytes) in quantized.BLOCK_TYPES.items()}
RECOMMENDED = "Q8_0, Q4_0, Q4_1, Q4_K_M, Q5_K_M or Q6_K"
_LINEAR = tuple(f".{name}.weight" for name, kind in LAYER_WEIGHTS if kind in ("column", "row"))


def is_linear(name: str) -> bool:
    """Whether the Meta weight `name` is a matmul's (attention, feed-forward, output), not a lookup or a norm."""
    return name == "output.weight" or (name.startswith("layers.") and name.endswith(_LINEAR))


def _logical_shape(t) -> tuple:
    return tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims reversed: ne0 is the input size K


def _named_tensors(reader, path: Path) -> Dict[str, object]:
    """Meta name -> GGUF tensor, without rope_freqs (turned into use_scaled_rope by llama31_rope_scaling)."""
    return {meta_name(t.name, path): t for t in reader.tensors if t.name != ROPE_FREQS}


def check_gguf_shapes(reader, path: Path, args: ModelArgs) -> None:
    """ConversionError unless the GGUF's tensors are the ones, with the
    shapes, `args` implies; reads headers only, before any tensor data."""
    shapes = {name: torch.empty(_logical_shape(t), device="meta") for name, t in _named_tensors(reader, path).items()}
    if "output.weight" not in shapes and "tok_embeddings.weight" in shapes:
        shapes["output.weight"] = shapes["tok_embeddings.weight"]  # tied embeddings
    try:
        check_shapes(shapes, expected_shapes(args, 1, "vocab"), str(path), "The GGUF's tensors do not match its metadata.")
    except CheckpointError as e:
        raise ConversionError(str(e)) from e


def kept_types(reader, path: Path) -> Dict[str, str]:
    """The stored type (KEPT_TYPES) of every linear weight the GGUF holds in
    blocks we keep, by Meta name; the output layer of tied embeddings takes
    token_embd's. Float weights are left out. Reads headers only: a linear
    weight in any other block type (Q2_K, Q3_K, Q5_0, IQ*, ...) raises
    ConversionError before any tensor is read."""
    gguf = import_gguf()
    tensors = _named_tensors(reader, path)
    if "output.weight" not in tensors and "tok_embeddings.weight" in tensors:
        tensors["output.weight"] = tensors["tok_embeddings.weight"]
    types: Dict[str, str] = {}
    for name, t in tensors.items():
        if not is_linear(name):
            continue
        qtype = t.tensor_type
        if qtype.name in KEPT_TYPES:
            types[name] = KEPT_TYPES[qtype.name]
        elif gguf.GGML_QUANT_SIZES[qtype][0] > 1:  # a block type we do not keep (floats and integers have blocks of 1)
            what = t.name if t.name != "token_embd.weight" else f"{t.name} (the output layer: the embeddings are tied)"
            raise ConversionError(
                f"{path}: tensor {what} is stored as {qtype.name}, which this converter cannot keep quantized "
                f"(it keeps {', '.join(KEPT_TYPES)}); re-quantize the model with llama.cpp's llama-quantize to "
                f"{RECOMMENDED}, or pass --dequantize to expand every weight to float")
    return types


def _blocks(t, path: Path, kind: str, name: str) -> np.ndarray:
    """The tensor's blocks as uint8 (N, bytes per row), checked against its type's block size."""
    gguf = import_gguf()
    n, k = _logical_shape(t)
    block, size = gguf.GGML_QUANT_SIZES[t.tensor_type]
    data = np.asarray(t.data)
    if k % block or data.dtype != np.uint8 or data.size != n * (k // block) * size:
        raise ConversionError(f"{path}: tensor {t.name} ({name}, {t.tensor_type.name}, {n} x {k}) holds {data.size} "
                              f"bytes of {data.dtype}, not {n} rows of {k // block} blocks of {size} bytes; "
                              "the file is damaged: download it again")
    return data.reshape(n, k // block, size)


def _copy(x: np.ndarray) -> np.ndarray:
    """A contiguous, writable copy: never a view of the read-only memory-mapped file."""
    return np.array(x, copy=True, order="C")


def stored_blocks(t, path: Path, kind: str, name: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(weight, scales or None) of `kind` for GGUF tensor `t`, copied from its
    memory-mapped blocks without dequantizing; exact for every kept type."""
    b = _blocks(t, path, kind, name)
    n = b.shape[0]
    if kind in RAW_BLOCK_BYTES:
        return torch.from_numpy(_copy(b.reshape(n, -1))), None
    if t.tensor_type.name == "Q8_0":  # fp16 d, then 32 int8
        d = _copy(b[..., :2]).view(np.float16)[..., 0].astype(np.float32)
        q = _copy(b[..., 2:]).view(np.int8).reshape(n, -1)
        return torch.from_numpy(q), torch.from_numpy(d)
    if t.tensor_type.name == "Q5_0":  # fp16 d, 32 high bits (uint32), 16 bytes of low nibbles: W = (q - 16) d
        d = _copy(b[..., :2]).view(np.float16)[..., 0].astype(np.float32)
        high = (_copy(b[..., 2:6]).view("<u4") >> np.arange(32, dtype=np.uint32)) & 1  # (n, groups, 32)
        low = np.concatenate([b[..., 6:] & 15, b[..., 6:] >> 4], axis=-1)  # weight j: byte j % 16, low nibble first
        q = (low.astype(np.int16) | (high.astype(np.int16) << 4)) - 16
        return torch.from_numpy(_copy(q.astype(np.int8).reshape(n, -1))), torch.from_numpy(d)
    if t.tensor_type.name == "Q4_1":  # fp16 d, fp16 m, then 16 bytes of nibbles: our (d, m) and packed layout
        dm = _copy(b[..., :4]).view(np.float16)
        return torch.from_numpy(_copy(b[..., 4:]).reshape(n, -1)), torch.from_numpy(dm)
    # Q4_0: fp16 d, then 16 bytes of nibbles q, W = (q - 8) d = q d + m with m = -8 d.
    d = _copy(b[..., :2]).view(np.float16)
    m = (d.astype(np.float32) * -8).astype(np.float16)
    if not np.array_equal(m.astype(np.float32), d.astype(np.float32) * -8):
        raise ConversionError(f"{path}: tensor {t.name} ({name}) has Q4_0 scales beyond fp16's range / 8, which "
                              "q4_1's fp16 minimum cannot hold; pass --dequantize to expand the weights to float")
    dm = np.concatenate([d, m], axis=-1)
    return torch.from_numpy(_copy(b[..., 2:]).reshape(n, -1)), torch.from_numpy(dm)


DEQUANTIZE_ROWS = 4096  # rows dequantized at a time: float temporaries of a few MB, not of the whole tensor


def _dequantized(gguf, t, path: Path, dtype: torch.dtype) -> torch.Tensor:
    """The tensor dequantized to `dtype`, DEQUANTIZE_ROWS rows at a time into the output."""
    data = t.data
    out = None
    for start in range(0, max(len(data), 1) if data.ndim > 1 else 1, DEQUANTIZE_ROWS):
        rows = data[start:start + DEQUANTIZE_ROWS] if data.ndim > 1 else data
        try:
            w = gguf.dequantize(rows, t.tensor_type)  # float32, shape (out, in): GGUF lists dims reversed
        except NotImplementedError as e:
            raise ConversionError(
                f"{path}: tensor {t.name} is stored as {t.tensor_type.name}, which the gguf package cannot "
                "dequantize; this converter needs float or llama.cpp-quantized weights"
            ) from e
        if w.dtype != np.float32:
            raise ConversionError(f"{path}: tensor {t.name} is stored as {t.tensor_type.name}, not as floating-point weights")
        if data.ndim <= 1:
            return torch.from_numpy(np.array(w, copy=True)).to(dtype)
        if out is None:
            out = torch.empty((len(data), *w.shape[1:]), dtype=dtype)
        out[start:start + len(w)] = torch.from_numpy(_copy(w))  # a float32 file's rows are read-only views of it
    return out


def read_tensors(reader, path: Path, args: ModelArgs, dtype: torch.dtype, show_progress: bool = False,
                 kept: Optional[Dict[str, str]] = None) -> Dict[str, torch.Tensor]:
    """The weights under Meta's names, checked against the shapes `args`
    implies before any is read: those named in `kept` (kept_types) as their
    stored type (weight, plus `.scales` for q8_0 and q4_1), every other one
    dequantized to `dtype`. One tensor is read at a time, from the
    memory-mapped file: the memory held is the output's."""
    gguf = import_gguf()
    kept = kept or {}
    check_gguf_shapes(reader, path, args)
    tensors = _named_tensors(reader, path)
    state: Dict[str, torch.Tensor] = {}
    bar = Progress("reading" if kept else "dequantizing", len(reader.tensors), "tensors",
                   sys.stderr if show_progress else None)
    if len(tensors) < len(reader.tensors):
        bar.update(items=1)  # rope_freqs
    for name, t in tensors.items():
        if name in kept:
            state[name], scales = stored_blocks(t, path, kept[name], name)
            if scales is not None:
                state[scales_key(name)] = scales
        else:
            state[name] = _dequantized(gguf, t, path, dtype)
        bar.update(items=1, nbytes=int(t.n_bytes))
    if "output.weight" not in state and "tok_embeddings.weight" in state:
        if "output.weight" in kept:  # tied: the output layer keeps token_embd's blocks, the lookup is float
            state["output.weight"], scales = stored_blocks(tensors["tok_embeddings.weight"], path,
                                                           kept["output.weight"], "output.weight")
            if scales is not None:
                state[scales_key("output.weight")] = scales
        else:  # Tied embeddings. One tensor under both names: torch.save stores it once.
            state["output.weight"] = state["tok_embeddings.weight"]
    bar.close()
    return state


def source_name(fields: "Metadata", kept: Dict[str, str]) -> str:
    """params.json's quantization source: "gguf:" and llama.cpp's file type
    (general.file_type: Q4_K_M, ...), or the GGUF types of the kept weights."""
    gguf = import_gguf()
    file_type = fields.get("general.file_type")
    try:
        return "gguf:" + gguf.LlamaFileType(file_type).name.replace("MOSTLY_", "")
    except ValueError:  # absent (None) or a number this gguf package does not know
        reader_types = {t.name: t.tensor_type.name for t in fields.reader.tensors}
        names = {meta_name(n, fields.path): ty for n, ty in reader_types.items() if n != ROPE_FREQS}
        names.setdefault("output.weight", names.get("tok_embeddings.weight"))
        return "gguf:" + "+".join(sorted({names[k] for k in kept}))


def open_gguf(path) -> Metadata:
    """The metadata of the GGUF file at `path`, its reader (with the tensors) as `.reader`."""
    gguf = import_gguf()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} not found")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # truncated or damaged: numpy raises ValueError, IndexError, ...
        raise ConversionError(f"{path} is not a readable GGUF file ({type(e).__name__}: {str(e)[:160]}); "
                              "it is truncated or damaged: download it again") from e
    return Metadata(reader, path)


def read_params(fields: Metadata) -> dict:
    """params.json of the GGUF's model, Llama 3.1's RoPE scaling included."""
    params = model_params(fields, n_vocab=len(fields.require("tokenizer.ggml.tokens")))
    return llama31_rope_scaling(fields.reader, fields.path, params)
