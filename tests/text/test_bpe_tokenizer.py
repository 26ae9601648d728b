"""The byte-level BPE tokenizer of converted GGUF models (tokenizer.model plus
its tokenizer.model.json sidecar), on a tiny vocabulary, against Hugging Face
`tokenizers` built from the same GGUF; and every kind of bad sidecar.
The real SmolLM2 tokenizer is compared in test_smollm2.py."""

import json
import random
import shutil

import pytest

from gguf_reference import hf_tokenizer_from_gguf, write_tiny_gguf
from llama.text.tokenizer import BPETokenizer, TiktokenTokenizer, Tokenizer, TokenizerError, detect_kind

STRINGS = [
    "the llama in the barn", "  the\tllama  \n\n  in  ", "12 123 3.14159 a  1", "Ünïcödé 日本語 🦙",
    "<|im_start|>user<|im_end|>", "", " ", "\n\n\n",
]


@pytest.fixture(scope="module")
def tok(tiny_gguf):
    return Tokenizer.from_file(tiny_gguf[1] / "tokenizer.model")


@pytest.fixture(scope="module")
def hf_tok(tiny_gguf):
    return hf_tokenizer_from_gguf(tiny_gguf[0])


@pytest.fixture
def tok_copy(tiny_gguf, tmp_path):
    """A writable copy of the tiny tokenizer: (tokenizer.model path, sidecar dict)."""
    for name in ("tokenizer.model", "tokenizer.model.json"):
        shutil.copy(tiny_gguf[1] / name, tmp_path / name)
    return tmp_path / "tokenizer.model", json.loads((tmp_path / "tokenizer.model.json").read_text())


def test_detected_from_the_sidecar(tok, tiny_gguf, llama3_tokenizer_path):
    assert isinstance(tok, BPETokenizer) and tok.kind == "bpe"
    assert detect_kind(tiny_gguf[1] / "tokenizer.model") == "bpe"
    assert detect_kind(llama3_tokenizer_path) == "tiktoken"  # no sidecar: Llama 3, as before
    assert isinstance(Tokenizer.from_file(llama3_tokenizer_path), TiktokenTokenizer)


def test_interface(tok):
    assert tok.n_words == 3 + 256 + 16
    assert tok.special_tokens == {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    assert tok.stop_tokens == {0, 2}  # <|endoftext|>, <|im_end|>
    assert tok.chat_format == "chatml" and tok.default_system_prompt == "You are a tiny test model"


@pytest.mark.parametrize("text", STRINGS)
def test_same_ids_as_hugging_face(tok, hf_tok, text):
    assert tok.encode(text, bos=False, eos=False) == hf_tok.encode(text).ids
    assert tok.decode(tok.encode(text, bos=False, eos=False)) == text


def test_same_ids_as_hugging_face_fuzzed(tok, hf_tok):
    rng = random.Random(0)
    alphabet = list("the llama in am on er 12 \n\n\t .,'s'll") + ["  ", "    ", "é", "中", "😀", "\u00a0", "<|im_end|>"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(2000)]
    assert [t for t in texts if tok.encode(t, bos=False, eos=False) != hf_tok.encode(t).ids] == []


def test_special_token_text_is_plain_text(tok):
    ids = tok.encode("<|im_start|>user<|im_end|>", bos=False, eos=False)
    assert not set(ids) & set(tok.special_tokens.values())
    assert tok.decode(ids) == "<|im_start|>user<|im_end|>"


def test_bos_only_if_the_model_expects_it(tok, tok_copy):
    # SmolLM2-style (add_bos false): bos=True adds nothing; eos is appended.
    assert tok.encode("the", bos=True, eos=True) == tok.encode("the", bos=False, eos=False) + [2]
    path, meta = tok_copy
    path.with_name("tokenizer.model.json").write_text(json.dumps({**meta, "add_bos": True}))
    assert Tokenizer.from_file(path).encode("the", bos=True, eos=False)[0] == 1


def test_bytes_without_a_token_are_dropped(tmp_path):
    """A vocabulary without a token for byte 0x04: tiktoken would panic; like
    Hugging Face's tokenizer, we drop the byte."""
    from utils.convert_gguf_checkpoint import convert

    write_tiny_gguf(tmp_path / "t.gguf", missing_bytes=[0x04, 0xF5])
    tok = Tokenizer.from_file(convert(tmp_path / "t.gguf", tmp_path / "ckpt") / "tokenizer.model")
    hf = hf_tokenizer_from_gguf(tmp_path / "t.gguf")
    assert tok.n_words == 3 + 254 + 16
    for text in ("the\x04llama", "\x04", "a \x04 b"):
        ids = tok.encode(text, bos=False, eos=False)
        assert ids == hf.encode(text).ids and max(ids, default=0) < tok.n_words
        assert tok.decode(ids) == text.replace("\x04", "")


def test_long_input(tok):
    text = "llama " * 100_000 + " " * 30_000 + "x" * 30_000
    assert tok.decode(tok.encode(text, bos=False, eos=False)) == text


def test_missing_sidecar(tok_copy):
    path, _ = tok_copy
    path.with_name("tokenizer.model.json").unlink()
    assert detect_kind(path) == "tiktoken"
    with pytest.raises(TokenizerError, match=r"or it is a tokenizer converted from GGUF whose sidecar tokenizer.model.json"):
        Tokenizer.from_file(path)
    with pytest.raises(FileNotFoundError, match=r"tokenizer.model.json not found: a BPE tokenizer.model needs the sidecar"):
        BPETokenizer(path)


@pytest.mark.parametrize("content, message", [
    ("{not json", r"tokenizer.model.json is not valid JSON"),
    ("[1, 2]", r"tokenizer.model.json must hold a JSON object, got list"),
])
def test_corrupt_sidecar(tok_copy, content, message):
    path, _ = tok_copy
    path.with_name("tokenizer.model.json").write_text(content)
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.from_file(path)


@pytest.mark.parametrize("change, message", [
    ({"pattern": None}, r"tokenizer.model.json: missing 'pattern'; convert the model again"),
    ({"colour": "red"}, r"tokenizer.model.json: unknown key 'colour'"),
    ({"add_bos": 1}, r"tokenizer.model.json: 'add_bos' must be true or false, got 1"),
    ({"bos_id": True}, r"tokenizer.model.json: 'bos_id' must be a token id, got True"),
    ({"version": 2}, r"tokenizer.model.json: version 2 is not the supported version 1"),
    ({"chat_format": "llama3"}, r"tokenizer.model.json: 'chat_format' 'llama3' is not one of \['chatml'\]"),
    ({"special_tokens": {"<|im_end|>": "2"}}, r"tokenizer.model.json: 'special_tokens' must map token text to integer ids"),
    ({"stop_tokens": [2, 9999]}, r"tokenizer.model.json: stop_tokens 9999 outside 0..274"),
    ({"pattern": "(unclosed"}, r"tokenizer.model.json: 'pattern' is not a usable regular expression"),
    ({"special_tokens": {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 3}},
     r"tokenizer.model: token ranks and special token ids are not 0..274 without gaps"),
])
def test_bad_sidecar(tok_copy, change, message):
    path, meta = tok_copy
    meta = {k: v for k, v in {**meta, **change}.items() if v is not None}
    path.with_name("tokenizer.model.json").write_text(json.dumps(meta))
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.from_file(path)


@pytest.mark.parametrize("pattern, message", [
    ("", "cannot split text .*must not match the empty string"),
    ("a*", "cannot split text"),
    ("(?:)", "cannot split text"),
    (r"\w+", "skips characters of the text it splits"),
])
def test_split_pattern_that_cannot_split_is_refused(tok_copy, pattern, message):
    path, meta = tok_copy
    path.with_name("tokenizer.model.json").write_text(json.dumps({**meta, "pattern": pattern}))
    with pytest.raises(TokenizerError, match=r"tokenizer.model.json: 'pattern' .*" + message):
        Tokenizer.from_file(path)
