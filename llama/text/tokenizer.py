"""Tokenizers for Llama 2 (SentencePiece), Llama 3 / 3.1 (tiktoken BPE) and
the byte-level BPE of other Llama-architecture models (converted from GGUF).

All share one small interface (`encode`, `decode`, `n_words`, `bos_id`,
`eos_id`, `pad_id`, `stop_tokens`, `special_tokens`), and
`Tokenizer.from_file` picks the kind from the file's contents (and, for the
third kind, the sidecar next to it), so a user never has to say which one they
hold. No torch here.

Every tokenizer file is read once, through `read_user_bytes` (regular files
only, at most 32 MiB), and the parsers get those bytes: SentencePiece loads
them with `LoadFromSerializedProto`, the tiktoken format is parsed here. So
a FIFO or /dev/zero given as --tokenizer_path is refused by name at once
instead of hanging or filling memory.
"""

import base64
import binascii
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Collection, Dict, FrozenSet, Iterator, List, Optional, Sequence

from ..common.files import sidecar_path
from ..common.hf_layout import original_folder_hint
from ..common.jsonfile import read_json_object
from ..common.userfiles import read_user_bytes

# The Llama 3 pre-tokenizer split pattern.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_SPECIAL_TOKENS = 256

# Names of the first special tokens after the 128000 base tokens, as Llama 3.1
# names them (Llama 3.0 called 128002-128005, 128008 and 128010 reserved
# tokens; the ids are the same). The remaining ids are reserved tokens.
LLAMA31_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message: the model waits for a tool result
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
]

# tiktoken fails on very long inputs and on very long runs of whitespace or
# non-whitespace (openai/tiktoken#195); we encode such text in pieces.
_MAX_ENCODE_CHARS = 400_000
_MAX_RUN_CHARS = 25_000


class TokenizerError(ValueError):
    """A tokenizer file is missing, corrupt or of a kind we cannot read."""


class Tokenizer(ABC):
    """What every tokenizer offers. Build one with `Tokenizer.from_file(path)`."""

    kind: str
    n_words: int
    bos_id: int
    eos_id: int
    pad_id: int
    stop_tokens: FrozenSet[int]
    special_tokens: Dict[str, int]

    @staticmethod
    def from_file(path) -> "Tokenizer":
        """Loads a SentencePiece (Llama 2), tiktoken (Llama 3) or BPE (with a
        tokenizer.model.json sidecar) tokenizer.model, deciding which from the files."""
        kinds = {"sentencepiece": SentencePieceTokenizer, "tiktoken": TiktokenTokenizer, "bpe": BPETokenizer}
        data = _read_tokenizer(Path(path))
        return kinds[_kind_of(Path(path), data)](path, data=data)

    @abstractmethod
    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        """Encodes text to token ids, optionally framed by bos/eos.

        Text that looks like a special token (say a user typing "<|eot_id|>")
        is encoded as ordinary text, never as the control token.
        """

    @abstractmethod
    def decode(self, t: Sequence[int]) -> str:
        """Decodes token ids to text."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={str(self.path)!r}, n_words={self.n_words})"


def _read_tokenizer(path: Path) -> bytes:
    """The bytes of a tokenizer file: a regular file of at most 32 MiB."""
    if not path.exists() and not path.is_symlink():
        raise FileNotFoundError(f"tokenizer file {path} not found: pass --tokenizer_path pointing to a tokenizer.model"
                                + original_folder_hint(path.parent))
    fix = ("pass the tokenizer.model file inside it" if path.is_dir() else
           "pass --tokenizer_path the tokenizer.model file that came with the weights")
    return read_user_bytes(path, "tokenizer", fix=fix, missing=fix, error=TokenizerError)


def detect_kind(path, data: Optional[bytes] = None) -> str:
    """Returns "sentencepiece", "tiktoken" or "bpe" (a tiktoken-format file with
    a sidecar) for a tokenizer file (whose bytes are `data`, if read already),
    or raises a TokenizerError that names the file and what is wrong with it."""
    path = Path(path)
    return _kind_of(path, _read_tokenizer(path) if data is None else data)


def _kind_of(path: Path, data: bytes) -> str:
    head = data[:4096]
    if not head.strip():
        raise TokenizerError(f"{path} is empty: download it again")
    if head.lstrip()[:1] == b"<" or b"<html" in head.lower():
        raise TokenizerError(
            f"{path} is a web page, not a tokenizer: the download failed (an expired or "
            "mistyped link saves an HTML error page). Download the file again."
        )
    if sidecar_path(path).exists() or sidecar_path(path).is_symlink():
        return "bpe"
    first_line = head.split(b"\n", 1)[0].strip()
    if re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+", first_line):
        return "tiktoken"
    # A SentencePiece model is a serialized protobuf (binary); let the
    # SentencePiece loader judge whether it really is one.
    return "sentencepiece"


class SentencePieceTokenizer(Tokenizer):
    """Llama 2: SentencePiece, 32000 tokens, bos 1, eos 2, no pad token."""

    kind = "sentencepiece"

    def __init__(self, path, data: Optional[bytes] = None):
        from sentencepiece import SentencePieceProcessor

        self.path = Path(path)
        data = _read_tokenizer(self.path) if data is None else data
        if _kind_of(self.path, data) == "tiktoken":
            raise TokenizerError(
                f"{self.path} is a tiktoken BPE file (Llama 3), not a SentencePiece model (Llama 2); "
                "use Tokenizer.from_file, or the tokenizer.model that came with your Llama 2 download"
            )
        self.sp_model = SentencePieceProcessor()
        try:
            self.sp_model.LoadFromSerializedProto(data)
        except (RuntimeError, OSError) as e:
            raise TokenizerError(
                f"{self.path} is neither a SentencePiece model nor a tiktoken BPE file "
                f"(SentencePiece says: {e}); it may be truncated or corrupt: download it again"
            ) from e
        self.n_words = self.sp_model.vocab_size()
        self.bos_id = self.sp_model.bos_id()
        self.eos_id = self.sp_model.eos_id()
        self.pad_id = self.sp_model.pad_id()
        self.stop_tokens = frozenset({self.eos_id})
        self.special_tokens = {}

    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        if not isinstance(s, str):
            raise TypeError(f"encode expects str, got {type(s).__name__}")
        try:
            t = self.sp_model.encode(s)
        except RuntimeError:
            # SentencePiece cannot take a lone surrogate ("\ud800"): make it U+FFFD, as tiktoken does.
            t = self.sp_model.encode(s.encode("utf-16", "surrogatepass").decode("utf-16", "replace"))
        return ([self.bos_id] if bos else []) + t + ([self.eos_id] if eos else [])

    def decode(self, t: Sequence[int]) -> str:
        return self.sp_model.decode(list(t))


def load_tiktoken_bpe(path: Path, special_ids: Collection[int] = (), data: Optional[bytes] = None) -> Dict[bytes, int]:
    """Reads a tiktoken BPE file (whose bytes are `data`, if read already):
    one `base64(token) rank` per line.

    The ranks and `special_ids` (ids taken by special tokens, which the file
    does not list) must together be 0..n-1, each once.
    """
    data = _read_tokenizer(Path(path)) if data is None else data
    ranks: Dict[bytes, int] = {}
    for lineno, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error) as e:
            raise TokenizerError(
                f"{path}, line {lineno}: expected 'base64-token rank', got {line[:60]!r}; "
                "the file is corrupt: download it again"
            ) from e
    ids = sorted([*ranks.values(), *special_ids])
    if ids != list(range(len(ids))):
        if special_ids:
            raise TokenizerError(f"{path}: token ranks and special token ids are not 0..{len(ids) - 1} without gaps; "
                                 "the files are corrupt: convert the model again")
        raise TokenizerError(
            f"{path}: token ranks are not 0..{len(ids) - 1} without gaps: the file is corrupt, or it is a "
            f"tokenizer converted from GGUF whose sidecar {sidecar_path(path).name} was not kept next to it"
        )
    return ranks


class TiktokenTokenizer(Tokenizer):
    """Llama 3 / 3.1: tiktoken BPE with 128000 base tokens and 256 special tokens."""

    kind = "tiktoken"

    def __init__(self, path, data: Optional[bytes] = None):
        import tiktoken

        self.path = Path(path)
        data = _read_tokenizer(self.path) if data is None else data
        if _kind_of(self.path, data) != "tiktoken":
            raise TokenizerError(
                f"{self.path} is not a tiktoken BPE file (Llama 3); a Llama 2 tokenizer.model is "
                "SentencePiece: use Tokenizer.from_file, which detects the kind"
            )
        mergeable_ranks = load_tiktoken_bpe(self.path, data=data)
        n_base = len(mergeable_ranks)
        names = LLAMA31_SPECIAL_TOKENS + [
            f"<|reserved_special_token_{i}|>"
            for i in range(2, LLAMA3_NUM_SPECIAL_TOKENS - len(LLAMA31_SPECIAL_TOKENS) + 2)
        ]
        self.special_tokens = {name: n_base + i for i, name in enumerate(names)}
        self.model = tiktoken.Encoding(
            name=self.path.name,
            pat_str=LLAMA3_PATTERN,
            mergeable_ranks=mergeable_ranks,
            special_tokens=self.special_tokens,
        )
        self.n_words = self.model.n_vocab
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]
        # <|eom_id|> only occurs in Llama 3.1 output; as a stop token it is harmless for 3.0.
        self.stop_tokens = frozenset(
            self.special_tokens[name] for name in ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>")
        )

    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        t = _encode_ordinary(self.model, s)
        return ([self.bos_id] if bos else []) + t + ([self.eos_id] if eos else [])

    def decode(self, t: Sequence[int]) -> str:
        return self.model.decode(list(t))


# Chat formats a BPE tokenizer's sidecar may name (see llama/text/chat_format.py).
BPE_CHAT_FORMATS = ("chatml",)
_SIDECAR_VERSION = 1
_SIDECAR_FIELDS = {  # key: (accepted types, description for error messages)
    "version": (int, "an integer"),
    "pattern": (str, "a regular expression"),
    "special_tokens": (dict, "an object mapping token text to id"),
    "bos_id": (int, "a token id"),
    "eos_id": (int, "a token id"),
    "pad_id": (int, "a token id or -1"),
    "add_bos": (bool, "true or false"),
    "stop_tokens": (list, "a list of token ids"),
    "chat_format": (str, f"one of {list(BPE_CHAT_FORMATS)}"),
    "default_system_prompt": ((str, type(None)), "a string or null"),
}


def _is_id(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _read_sidecar(path: Path) -> dict:
    """Reads and validates a BPE tokenizer's sidecar JSON; errors name the file."""
    meta = read_json_object(
        path, missing="a BPE tokenizer.model needs the sidecar that llama convert "
        "writes next to it; keep the two files together", fix="convert the model again", error=TokenizerError,
    )
    problems = [f"unknown key {k!r}" for k in sorted(set(meta) - set(_SIDECAR_FIELDS))]
    for key, (types, what) in _SIDECAR_FIELDS.items():
        if key not in meta:
            problems.append(f"missing {key!r}")
        elif not isinstance(meta[key], types) or (types is int and isinstance(meta[key], bool)):
            problems.append(f"{key!r} must be {what}, got {meta[key]!r:.60}")
    if not problems:
        if meta["version"] != _SIDECAR_VERSION:
            problems.append(f"version {meta['version']} is not the supported version {_SIDECAR_VERSION}")
        if not all(isinstance(k, str) and _is_id(v) for k, v in meta["special_tokens"].items()):
            problems.append("'special_tokens' must map token text to integer ids")
        if not all(_is_id(i) for i in meta["stop_tokens"]):
            problems.append("'stop_tokens' must be integer token ids")
        if meta["chat_format"] not in BPE_CHAT_FORMATS:
            problems.append(f"'chat_format' {meta['chat_format']!r} is not one of {list(BPE_CHAT_FORMATS)}")
    if problems:
        raise TokenizerError(f"{path}: " + "; ".join(problems) + "; convert the model again")
    return meta


_PATTERN_PROBE = "Hello, world! It's 2024:\n\tx = [1, 22, 333]  # ok?"


def _check_pattern(model, sidecar: Path) -> None:
    """A split pattern must cut every text into non-empty pieces that cover it:
    one that can match the empty string makes tiktoken panic (a BaseException,
    not a ValueError), one that skips characters drops them silently."""
    try:
        ids = model.encode_ordinary(_PATTERN_PROBE)
    except BaseException as e:  # pyo3's PanicException derives from BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise TokenizerError(f"{sidecar}: 'pattern' {model._pat_str[:80]!r} cannot split text (tiktoken: "
                             f"{str(e)[:120]}); it must not match the empty string; convert the model again") from None
    if model.decode(ids) != _PATTERN_PROBE:
        raise TokenizerError(f"{sidecar}: 'pattern' {model._pat_str[:80]!r} skips characters of the text it "
                             "splits, which would be lost; convert the model again")


class BPETokenizer(Tokenizer):
    """The byte-level (GPT-2 style) BPE of another Llama-architecture model,
    such as SmolLM2, as llama convert writes it.

    `tokenizer.model` is in tiktoken's format (`base64(token) rank`, rank = token
    id); what that format cannot hold is in the sidecar `tokenizer.model.json`::

        {"version": 1,
         "pattern": "...",                       # pre-tokenizer split regex
         "special_tokens": {"<|im_start|>": 1},  # text -> id; ids not in tokenizer.model
         "bos_id": 1, "eos_id": 2, "pad_id": 2,  # pad_id -1: none
         "add_bos": false,                       # does the model expect bos first?
         "stop_tokens": [2, 0],
         "chat_format": "chatml",
         "default_system_prompt": "..."}         # or null

    Byte values without a token of their own (a vocabulary learnt from a
    restricted alphabet lacks a few control bytes) are dropped from the text,
    as Hugging Face's tokenizer does.
    """

    kind = "bpe"

    def __init__(self, path, data: Optional[bytes] = None):
        import tiktoken

        self.path = Path(path)
        self.sidecar = sidecar_path(self.path)
        data = _read_tokenizer(self.path) if data is None else data  # a missing file or a directory: said first
        meta = _read_sidecar(self.sidecar)
        self.special_tokens = dict(meta["special_tokens"])
        ranks = load_tiktoken_bpe(self.path, self.special_tokens.values(), data=data)
        self.n_words = len(ranks) + len(self.special_tokens)
        # tiktoken panics on a byte it has no rank for. Missing bytes get ranks
        # past the vocabulary, so they never merge, and are dropped after encoding.
        missing = [bytes([b]) for b in range(256) if bytes([b]) not in ranks]
        ranks.update({b: self.n_words + i for i, b in enumerate(missing)})
        self._drop_missing = bool(missing)
        try:
            self.model = tiktoken.Encoding(
                name=self.path.name, pat_str=meta["pattern"], mergeable_ranks=ranks, special_tokens=self.special_tokens
            )
        except ValueError as e:
            raise TokenizerError(f"{self.sidecar}: 'pattern' is not a usable regular expression ({e})") from e
        _check_pattern(self.model, self.sidecar)
        self.bos_id, self.eos_id, self.pad_id = meta["bos_id"], meta["eos_id"], meta["pad_id"]
        self.add_bos = meta["add_bos"]
        self.stop_tokens = frozenset(meta["stop_tokens"])
        self.chat_format = meta["chat_format"]
        self.default_system_prompt: Optional[str] = meta["default_system_prompt"]
        ids = {"bos_id": [self.bos_id], "eos_id": [self.eos_id], "stop_tokens": sorted(self.stop_tokens)}
        if self.pad_id != -1:
            ids["pad_id"] = [self.pad_id]
        bad = [f"{k} {i}" for k, v in ids.items() for i in v if not 0 <= i < self.n_words]
        if bad:
            raise TokenizerError(f"{self.sidecar}: {', '.join(bad)} outside 0..{self.n_words - 1}; convert the model again")

    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        """Encodes text to token ids.

        `bos` adds bos_id only if the model expects it (the sidecar's `add_bos`;
        SmolLM2 does not); `eos` appends eos_id. Text that looks like a special
        token is encoded as ordinary text.
        """
        t = _encode_ordinary(self.model, s)
        if self._drop_missing:
            t = [i for i in t if i < self.n_words]
        return ([self.bos_id] if bos and self.add_bos else []) + t + ([self.eos_id] if eos else [])

    def decode(self, t: Sequence[int]) -> str:
        return self.model.decode(list(t))

def _encode_ordinary(model, s: str) -> List[int]:
    """tiktoken ids of `s`, encoded in pieces tiktoken can handle; text that
    looks like a special token is encoded as ordinary text."""
    if not isinstance(s, str):
        raise TypeError(f"encode expects str, got {type(s).__name__}")
    t: List[int] = []
    for piece in _pieces(s):
        # disallowed_special=() turns the check off: special-token text is plain text.
        t.extend(model.encode(piece, allowed_special=set(), disallowed_special=()))
    return t


_LONG_RUN = re.compile(r"\s{%d,}|\S{%d,}" % (_MAX_RUN_CHARS + 1, _MAX_RUN_CHARS + 1))


def _pieces(s: str) -> Iterator[str]:
    """Cuts text into pieces of at most 400,000 characters whose runs of
    whitespace or non-whitespace are at most 25,000 characters (cut points are
    those of Meta's reference tokenizer)."""
    for i in range(0, max(len(s), 1), _MAX_ENCODE_CHARS):
        chunk = s[i : i + _MAX_ENCODE_CHARS]
        start = 0
        for run in _LONG_RUN.finditer(chunk):
            for cut in range(run.start() + _MAX_RUN_CHARS, run.end(), _MAX_RUN_CHARS):
                yield chunk[start:cut]
                start = cut
        yield chunk[start:]
