"""The tokenizer of a GGUF file (llama.cpp's format) as this package's
tokenizer files: a tiktoken ranks file (tokenizer.model) and, unless the
vocabulary is Meta's Llama 3 one, a sidecar (tokenizer.model.json) with what
that format cannot hold: split pattern, special tokens, stop tokens, chat
format.

Design: plain Python over the GGUF's metadata (tokenizer.ggml.*), no torch
and no gguf package: the caller passes the metadata as an object with
`path`, `get(key, default)` and `require(key)` (llama/weights/gguf.py's
Metadata, which checks each key's type). The split regex comes from the
GGUF's pre-tokenizer name through PRE_TOKENIZER_PATTERNS.

Invariants: tiktoken ranks are token ids, so the ids must follow BPE's
merge priority: every normal token is a single byte or the result of a
merge, and the results of earlier merges have smaller ids; this is checked,
not assumed. `check_tokenizer` loads the files with the loader's own checks,
so nothing is written that the loader would then reject.

Failure modes: a tokenizer that is not byte-level BPE, an unknown
pre-tokenizer, token types other than normal and control, tokens outside
GPT-2's byte alphabet, merges that do not join two tokens, or a chat model
that is neither ChatML nor Llama 3 raise VocabularyError naming the file and
the problem.
"""

import base64
import re
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

from .tokenizer import LLAMA3_PATTERN

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

TOKEN_NORMAL, TOKEN_CONTROL = 1, 3  # tokenizer.ggml.token_type values


class VocabularyError(ValueError):
    """The GGUF's tokenizer cannot be expressed as this package's tokenizer files."""


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


def tokenizer_files(fields) -> Tuple[str, Optional[dict]]:
    """The tokenizer as (tiktoken ranks file, sidecar dict). No sidecar means
    the ranks file is a Meta Llama 3 tokenizer.model, complete as it is."""
    path = fields.path
    model = fields.require("tokenizer.ggml.model")
    if model != "gpt2":
        raise VocabularyError(
            f"{path} has a {model!r} tokenizer; only byte-level BPE tokenizers (tokenizer.ggml.model 'gpt2') are supported"
        )
    pre = fields.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZER_PATTERNS:
        raise VocabularyError(
            f"{path} uses the pre-tokenizer {pre!r}; supported: {sorted(PRE_TOKENIZER_PATTERNS)} "
            "(add its split pattern to PRE_TOKENIZER_PATTERNS once checked against a reference)"
        )
    tokens, types = fields.require("tokenizer.ggml.tokens"), fields.require("tokenizer.ggml.token_type")
    merges = fields.require("tokenizer.ggml.merges")
    if len(types) != len(tokens):
        raise VocabularyError(f"{path}: {len(tokens)} tokens but {len(types)} token types")
    odd = sorted({ty for ty in types if ty not in (TOKEN_NORMAL, TOKEN_CONTROL)})
    if odd:
        raise VocabularyError(f"{path}: token types {odd} are not supported (only normal and control tokens)")
    special = {tok: i for i, (tok, ty) in enumerate(zip(tokens, types)) if ty == TOKEN_CONTROL}

    # tiktoken ranks are token ids, so ids must follow BPE's merge priority:
    # every normal token is a single byte or the result of a merge, and the
    # results of earlier merges have smaller ids.
    to_byte = _byte_decoder()
    token_bytes: Dict[int, bytes] = {}
    for i, (tok, ty) in enumerate(zip(tokens, types)):
        if ty == TOKEN_NORMAL:
            if any(c not in to_byte for c in tok):
                raise VocabularyError(f"{path}: token {i} ({tok!r}) is not in GPT-2's byte-level alphabet")
            token_bytes[i] = bytes(to_byte[c] for c in tok)
    if len(set(token_bytes.values())) != len(token_bytes):
        raise VocabularyError(f"{path}: two tokens stand for the same bytes")
    ids = {tok: i for i, tok in enumerate(tokens)}
    results = []
    for k, merge in enumerate(merges):
        parts = merge.split(" ")
        if len(parts) != 2 or any(p not in ids for p in parts) or "".join(parts) not in ids:
            raise VocabularyError(f"{path}: merge {k} ({merge!r}) does not join two tokens into a token")
        results.append(ids["".join(parts)])
    # A vocabulary may list several merges giving one token (Llama 3's lists every split).
    if any(b < a for a, b in zip(results, results[1:])):
        raise VocabularyError(f"{path}: token ids do not follow the merge order, which tiktoken ranks need")
    merged = set(results)
    stray = [i for i, b in token_bytes.items() if len(b) > 1 and i not in merged]
    if stray:
        raise VocabularyError(f"{path}: token {stray[0]} ({tokens[stray[0]]!r}) is neither a byte nor a merge result")

    ranks = "".join(f"{base64.b64encode(b).decode()} {i}\n" for i, b in sorted(token_bytes.items()))
    template = fields.get("tokenizer.chat_template", "")
    if pre in LLAMA3_PRE_TOKENIZERS and is_llama3_vocabulary(tokens, types, template):
        return ranks, None
    missing = [t for t in ("<|im_start|>", "<|im_end|>") if t not in special]
    if missing:
        raise VocabularyError(f"{path}: no {' or '.join(missing)} control token: only ChatML chat models "
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


def check_tokenizer(tokenizer: Path, path: Path) -> None:
    """Loads the tokenizer files about to be written with the loader's own
    checks, so the converter never writes what the loader would then reject."""
    from .tokenizer import Tokenizer, TokenizerError

    try:
        Tokenizer.from_file(tokenizer)
    except TokenizerError as e:
        raise VocabularyError(f"{path}: its tokenizer would not load: {str(e).replace(str(tokenizer.parent) + '/', '')}") from e
