"""Converts a Llama-architecture GGUF file (llama.cpp's format) into a Meta checkpoint directory.

    pip install gguf        # or: pip install -e ".[gguf]"
    python utils/convert_gguf_checkpoint.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf \\
        --out checkpoints/SmolLM2-135M-Instruct

Writes consolidated.00.pth (the dequantized weights, float32 unless --dtype
says otherwise), params.json, tokenizer.model (the byte-level BPE in tiktoken's
format), tokenizer.model.json (what that format cannot hold: split pattern,
special tokens, stop tokens, chat format) and checklist.chk. The directory then
works like any Meta checkpoint: pass it as --ckpt_dir and its tokenizer.model
as --tokenizer_path.

Supported: general.architecture "llama" (dense; no RoPE scaling but Llama
3.1's, which llama.cpp stores as a rope_freqs tensor) with a GPT-2
style byte-level BPE tokenizer ("gpt2") whose pre-tokenizer is listed in
PRE_TOKENIZER_PATTERNS, and either Llama 3's vocabulary and chat format (then
tokenizer.model is a Meta Llama 3 tokenizer.model and there is no sidecar) or
a ChatML chat template; weights in any type the gguf package can dequantize.
Anything else is refused with a message that says what. The output directory
is checked first; progress (tensors, MB, MB/s) goes to stderr. The whole
dequantized model is held in memory while it is written.
"""

import argparse
import base64
import json
import math
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from llama.weights.args import ModelArgs
from llama.weights.checkpoint import CheckpointError, check_shapes, expected_shapes
from llama.weights.writer import check_output_dir, write_checkpoint
from llama.weights.progress import Progress
from llama.common.files import sidecar_path
from llama.text.tokenizer import LLAMA3_PATTERN

# GGUF pre-tokenizer name (tokenizer.ggml.pre) -> the equivalent split regex
# for tiktoken, grouped as llama.cpp's llama-vocab.cpp groups the names, with
# the regex of the models' own tokenizer.json.
# "smollm" is llama.cpp's SMOLLM: single digits, then the GPT-2 pattern; a
# whitespace run right before a digit stays whole because the digit split cut
# the text there first.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
TEKKEN_PATTERN = (  # Mistral NeMo's "tekken"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_PRE_TOKENIZERS = ("llama-bpe", "llama3", "llama-v3", "falcon3")  # Llama 3 / 3.1 / 3.2 and Falcon3
PRE_TOKENIZER_PATTERNS = {
    "smollm": r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+",
    **{name: LLAMA3_PATTERN for name in LLAMA3_PRE_TOKENIZERS},
    "gpt-2": GPT2_PATTERN,
    "tekken": TEKKEN_PATTERN,
}
# llama.cpp adds bos for these unless the file says otherwise (tokenizer.ggml.add_bos_token).
ADDS_BOS_BY_DEFAULT = (*LLAMA3_PRE_TOKENIZERS, "tekken")

# Llama 3's special tokens that fix its chat format, at their ids: a GGUF with
# these (and 128000 ordinary tokens before them) holds Meta's tokenizer.
LLAMA3_N_BASE = 128000
LLAMA3_MARKERS = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128006: "<|start_header_id|>",
                  128007: "<|end_header_id|>", 128009: "<|eot_id|>"}

# GGUF tensor names -> Meta parameter names. llama.cpp stores attn_q/attn_k in
# Meta's interleaved RoPE layout (its converter undoes Hugging Face's
# permutation), so no tensor is reordered here.
GLOBAL_TENSORS = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}
LAYER_TENSORS = {
    "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv", "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
    "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
}

TOKEN_NORMAL, TOKEN_CONTROL = 1, 3  # tokenizer.ggml.token_type values
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class ConversionError(ValueError):
    """The GGUF file holds something this converter cannot turn into a Meta checkpoint."""


def import_gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError("reading GGUF files needs the gguf package: pip install gguf") from e
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
                     "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"], _INT),
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


class _Fields:
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


def model_params(fields: _Fields, n_vocab: int) -> dict:
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
    from llama.model import rope_frequencies

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


def convert_tensors(reader, path: Path, args: ModelArgs, dtype: torch.dtype,
                    show_progress: bool = False) -> Dict[str, torch.Tensor]:
    """Dequantized weights under Meta's names, checked against the shapes `args` implies."""
    gguf = import_gguf()
    state: Dict[str, torch.Tensor] = {}
    bar = Progress("dequantizing", len(reader.tensors), "tensors", sys.stderr if show_progress else None)
    for t in reader.tensors:
        if t.name == ROPE_FREQS:  # turned into use_scaled_rope by llama31_rope_scaling
            bar.update(items=1)
            continue
        name = meta_name(t.name, path)
        try:
            w = gguf.dequantize(t.data, t.tensor_type)  # float32, shape (out, in): GGUF lists dims reversed
        except NotImplementedError as e:
            raise ConversionError(
                f"{path}: tensor {t.name} is stored as {t.tensor_type.name}, which the gguf package cannot "
                "dequantize; this converter needs float or llama.cpp-quantized weights"
            ) from e
        if w.dtype != np.float32:
            raise ConversionError(f"{path}: tensor {t.name} is stored as {t.tensor_type.name}, not as floating-point weights")
        state[name] = torch.from_numpy(np.array(w, copy=True)).to(dtype)
        bar.update(items=1, nbytes=int(t.n_bytes))
    bar.close()
    if "output.weight" not in state and "tok_embeddings.weight" in state:
        # Tied embeddings. One tensor under both names: torch.save stores it once.
        state["output.weight"] = state["tok_embeddings.weight"]
    try:
        check_shapes(state, expected_shapes(args, 1, "vocab"), str(path), "The GGUF's tensors do not match its metadata.")
    except CheckpointError as e:
        raise ConversionError(str(e)) from e
    return state


def _byte_decoder() -> Dict[str, int]:
    """GPT-2's byte-level alphabet reversed: the printable character that
    stands for each byte in a vocabulary -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in chars]
    chars.update({b: chr(256 + i) for i, b in enumerate(others)})
    return {c: b for b, c in chars.items()}


_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}<>]*?)<\|im_end\|>")


def is_llama3_vocabulary(tokens: Sequence[str], types: Sequence[int], template: str) -> bool:
    """Meta's Llama 3 tokenizer: 128000 ordinary tokens, then 256 control
    tokens with Llama 3's markers at their ids, and Llama 3's chat template (or none)."""
    return (len(tokens) == LLAMA3_N_BASE + 256
            and all(ty == TOKEN_NORMAL for ty in types[:LLAMA3_N_BASE])
            and all(ty == TOKEN_CONTROL for ty in types[LLAMA3_N_BASE:])
            and all(tokens[i] == name for i, name in LLAMA3_MARKERS.items())
            and (not template or "<|start_header_id|>" in template))


def tokenizer_files(fields: _Fields) -> Tuple[str, Optional[dict]]:
    """The tokenizer as (tiktoken ranks file, sidecar dict). No sidecar means
    the ranks file is a Meta Llama 3 tokenizer.model, complete as it is."""
    path = fields.path
    model = fields.require("tokenizer.ggml.model")
    if model != "gpt2":
        raise ConversionError(
            f"{path} has a {model!r} tokenizer; only byte-level BPE tokenizers (tokenizer.ggml.model 'gpt2') are supported"
        )
    pre = fields.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZER_PATTERNS:
        raise ConversionError(
            f"{path} uses the pre-tokenizer {pre!r}; supported: {sorted(PRE_TOKENIZER_PATTERNS)} "
            "(add its split pattern to PRE_TOKENIZER_PATTERNS once checked against a reference)"
        )
    tokens, types = fields.require("tokenizer.ggml.tokens"), fields.require("tokenizer.ggml.token_type")
    merges = fields.require("tokenizer.ggml.merges")
    if len(types) != len(tokens):
        raise ConversionError(f"{path}: {len(tokens)} tokens but {len(types)} token types")
    odd = sorted({ty for ty in types if ty not in (TOKEN_NORMAL, TOKEN_CONTROL)})
    if odd:
        raise ConversionError(f"{path}: token types {odd} are not supported (only normal and control tokens)")
    special = {tok: i for i, (tok, ty) in enumerate(zip(tokens, types)) if ty == TOKEN_CONTROL}

    # tiktoken ranks are token ids, so ids must follow BPE's merge priority:
    # every normal token is a single byte or the result of a merge, and the
    # results of earlier merges have smaller ids.
    to_byte = _byte_decoder()
    token_bytes: Dict[int, bytes] = {}
    for i, (tok, ty) in enumerate(zip(tokens, types)):
        if ty == TOKEN_NORMAL:
            if any(c not in to_byte for c in tok):
                raise ConversionError(f"{path}: token {i} ({tok!r}) is not in GPT-2's byte-level alphabet")
            token_bytes[i] = bytes(to_byte[c] for c in tok)
    if len(set(token_bytes.values())) != len(token_bytes):
        raise ConversionError(f"{path}: two tokens stand for the same bytes")
    ids = {tok: i for i, tok in enumerate(tokens)}
    results = []
    for k, merge in enumerate(merges):
        parts = merge.split(" ")
        if len(parts) != 2 or any(p not in ids for p in parts) or "".join(parts) not in ids:
            raise ConversionError(f"{path}: merge {k} ({merge!r}) does not join two tokens into a token")
        results.append(ids["".join(parts)])
    # A vocabulary may list several merges giving one token (Llama 3's lists every split).
    if any(b < a for a, b in zip(results, results[1:])):
        raise ConversionError(f"{path}: token ids do not follow the merge order, which tiktoken ranks need")
    merged = set(results)
    stray = [i for i, b in token_bytes.items() if len(b) > 1 and i not in merged]
    if stray:
        raise ConversionError(f"{path}: token {stray[0]} ({tokens[stray[0]]!r}) is neither a byte nor a merge result")

    ranks = "".join(f"{base64.b64encode(b).decode()} {i}\n" for i, b in sorted(token_bytes.items()))
    template = fields.get("tokenizer.chat_template", "")
    if pre in LLAMA3_PRE_TOKENIZERS and is_llama3_vocabulary(tokens, types, template):
        return ranks, None
    missing = [t for t in ("<|im_start|>", "<|im_end|>") if t not in special]
    if missing:
        raise ConversionError(f"{path}: no {' or '.join(missing)} control token: only ChatML chat models "
                              "and Llama 3's own vocabulary and chat format are supported")
    default_system = _DEFAULT_SYSTEM.search(template)
    eos = fields.require("tokenizer.ggml.eos_token_id")
    stop = {eos, special["<|im_end|>"]}
    stop |= {fields.get(k) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")} - {None}
    if "<|endoftext|>" in special:
        stop.add(special["<|endoftext|>"])
    sidecar = {
        "version": 1,
        "pattern": PRE_TOKENIZER_PATTERNS[pre],
        "special_tokens": special,
        "bos_id": fields.require("tokenizer.ggml.bos_token_id"),
        "eos_id": eos,
        "pad_id": fields.get("tokenizer.ggml.padding_token_id", -1),
        "add_bos": bool(fields.get("tokenizer.ggml.add_bos_token", pre in ADDS_BOS_BY_DEFAULT)),
        "stop_tokens": sorted(stop),
        "chat_format": "chatml",
        "default_system_prompt": default_system[1] if default_system else None,
    }
    return ranks, sidecar


def _check_tokenizer(tokenizer: Path, path: Path) -> None:
    """Loads the tokenizer files about to be written with the loader's own
    checks, so the converter never writes what the loader would then reject."""
    from llama.text.tokenizer import Tokenizer, TokenizerError

    try:
        Tokenizer.from_file(tokenizer)
    except TokenizerError as e:
        raise ConversionError(f"{path}: its tokenizer would not load: {str(e).replace(str(tokenizer.parent) + '/', '')}") from e


def convert(gguf_path, out_dir, dtype: str = "float32", force: bool = False,
            progress: Callable[[str], None] = lambda msg: None, show_progress: bool = False) -> Path:
    """Converts `gguf_path` into a Meta checkpoint directory `out_dir`; returns `out_dir`.

    The output directory is checked before the (slow) reading; `show_progress`
    draws tensors done, MB and MB/s on stderr."""
    gguf = import_gguf()
    path = Path(gguf_path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} not found")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    check_output_dir(out_dir, force)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # truncated or damaged: numpy raises ValueError, IndexError, ...
        raise ConversionError(f"{path} is not a readable GGUF file ({type(e).__name__}: {str(e)[:160]}); "
                              "it is truncated or damaged: download it again") from e
    fields = _Fields(reader, path)
    params = model_params(fields, n_vocab=len(fields.require("tokenizer.ggml.tokens")))
    params = llama31_rope_scaling(reader, path, params)
    ranks, sidecar = tokenizer_files(fields)
    progress(f"{path.name}: {fields.get('general.name', '?')} (license: {fields.get('general.license', 'not stated')}), "
             f"params {json.dumps(params)}, trained context {fields.get('llama.context_length', '?')} tokens")
    state = convert_tensors(reader, path, ModelArgs.from_params(params), DTYPES[dtype], show_progress)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = Path(tmp) / "tokenizer.model"
        tokenizer.write_text(ranks)
        if sidecar is not None:
            sidecar_path(tokenizer).write_text(json.dumps(sidecar, indent=1, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
        _check_tokenizer(tokenizer, path)
        return write_checkpoint(out_dir, params, [state], tokenizer_path=tokenizer, force=force, progress=progress,
                                show_progress=show_progress)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", required=True, type=Path, help="the .gguf file to convert")
    parser.add_argument("--out", required=True, type=Path, help="output checkpoint directory")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="weights' dtype in the checkpoint (default float32: the exact dequantized values)")
    parser.add_argument("--force", action="store_true", help="overwrite a non-empty output directory")
    a = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        out = convert(a.gguf, a.out, a.dtype, a.force, progress=print, show_progress=True)
    except (ImportError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"converted {a.gguf} to {out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
