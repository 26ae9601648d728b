"""GGUF pre-tokenizers: for each name the converter knows, a GGUF built with a
real vocabulary (Llama 3's, or its first ranks) converts to a tokenizer that
encodes exactly as transformers' tokenizer built from the same GGUF file.

A Llama 3 GGUF (the real tokenizer's whole vocabulary and merges, pre-tokenizer
`llama-bpe`, Llama 3's chat template) converts to Meta's own tokenizer.model,
byte for byte, and its chat prompts are the template's."""

import pytest

from conftest import CACHE, REPO
from gguf_reference import LLAMA3_TEMPLATE, hf_gguf_tokenizer, llama3_vocab, write_tiny_gguf
from llama import Llama
from llama.text.chat_format import ChatFormat, Llama3ChatFormat
from llama.text.tokenizer import Tokenizer
from utils.convert_gguf_checkpoint import PRE_TOKENIZER_PATTERNS, convert

# Text where the split patterns differ: digit runs, contractions in any case,
# CamelCase, whitespace and newline runs, punctuation runs, paths, non-Latin scripts.
TEXTS = [
    *(REPO / "tests" / "data" / "corpus.txt").read_text(encoding="utf-8").splitlines()[:40],
    "In 2024, 12345 llamas ate 3.14159 kg; call 555-0123.", "I'M sure you'LL see: don't, won't, it's, WE'VE",
    "HelloWorld iPhone XMLHttpRequest camelCaseName", "a\n\n\nb\r\n\r\nc  \n  d\t\te    f   ",
    "...!!! ?? /usr/local/bin/python3 --flag=value", "naïve café Straße Ελληνικά русский 日本語 中文 한국어 🦙🦙",
    "   leading and trailing   ", "x=1+2*(3/4)-5%6", "def f(x):\n    return x ** 2  # square\n",
]
CHATML = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
N_BASE = 6000  # Llama 3's first ranks: a complete BPE with common words, digits and pieces of every script
# transformers' tokenizers built from these GGUF files, kept between runs under each file's sha256
# (building one from Llama 3's whole vocabulary takes 15 s of Python parsing; see hf_gguf_tokenizer).
HF_CACHE = CACHE / "hf_gguf_tokenizers"


def ours_and_theirs(gguf, out_dir):
    ours = Tokenizer.from_file(convert(gguf, out_dir) / "tokenizer.model")
    return ours, hf_gguf_tokenizer(gguf, HF_CACHE)


@pytest.fixture(scope="module")
def prefix_vocab(llama3_tokenizer_path):
    return llama3_vocab(llama3_tokenizer_path, n_base=N_BASE, specials=CHATML)


@pytest.fixture(scope="module")
def encodings(prefix_vocab, tmp_path_factory):
    """pre-tokenizer name -> (our ids, transformers' ids) for TEXTS."""
    results = {}
    for pre in sorted(PRE_TOKENIZER_PATTERNS):
        tmp = tmp_path_factory.mktemp(pre)
        kv = {"tokenizer.ggml.bos_token_id": ("uint32", N_BASE), "tokenizer.ggml.eos_token_id": ("uint32", N_BASE + 2),
              "tokenizer.ggml.padding_token_id": ("uint32", N_BASE)}
        write_tiny_gguf(tmp / "m.gguf", vocab=prefix_vocab, pre=pre, extra_kv=kv)
        ours, hf = ours_and_theirs(tmp / "m.gguf", tmp / "ckpt")
        if pre == "smollm":
            # transformers builds no SmolLM2 pre-tokenizer from a GGUF (it falls back to GPT-2's):
            # use the one of SmolLM2's tokenizer.json, single digits then GPT-2 byte level.
            from tokenizers import pre_tokenizers

            hf.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
        results[pre] = ([ours.encode(t, bos=False, eos=False) for t in TEXTS],
                        [hf.encode(t, add_special_tokens=False) for t in TEXTS])
    return results


@pytest.mark.slow
@pytest.mark.parametrize("pre", sorted(PRE_TOKENIZER_PATTERNS))
def test_pre_tokenizer_matches_transformers(encodings, pre):
    ours, theirs = encodings[pre]
    for text, a, b in zip(TEXTS, ours, theirs):
        assert a == b, f"{pre}: {text!r}"


@pytest.mark.slow
def test_the_patterns_differ_on_this_text(encodings):
    """So the comparison above checks each pattern, not just the vocabulary."""
    distinct = {str(ours) for ours, _ in encodings.values()}
    assert len(distinct) == len({PRE_TOKENIZER_PATTERNS[p] for p in encodings})


@pytest.fixture(scope="module")
def llama3_gguf(llama3_tokenizer_path, tmp_path_factory):
    """(gguf path, converted checkpoint) of a tiny random model with Llama 3's whole tokenizer."""
    tmp = tmp_path_factory.mktemp("llama3_gguf")
    kv = {"tokenizer.ggml.bos_token_id": ("uint32", 128000), "tokenizer.ggml.eos_token_id": ("uint32", 128009),
          "tokenizer.ggml.add_bos_token": ("bool", True), "tokenizer.chat_template": ("string", LLAMA3_TEMPLATE),
          "llama.rope.freq_base": ("float32", 500000.0)}
    write_tiny_gguf(tmp / "l3.gguf", vocab=llama3_vocab(llama3_tokenizer_path), pre="llama-bpe", extra_kv=kv,
                    omit=["tokenizer.ggml.padding_token_id"], tensor_types={"token_embd.weight": "F16"})
    return tmp / "l3.gguf", convert(tmp / "l3.gguf", tmp / "ckpt")


@pytest.fixture(scope="module")
def llama3_hf(llama3_gguf):
    return hf_gguf_tokenizer(llama3_gguf[0], HF_CACHE)


@pytest.mark.slow
def test_llama3_gguf_gives_metas_tokenizer(llama3_gguf, llama3_hf, llama3_tokenizer_path):
    ckpt, hf = llama3_gguf[1], llama3_hf
    assert sorted(p.name for p in ckpt.iterdir()) == ["checklist.chk", "consolidated.00.pth", "manifest.json",
                                                       "params.json", "tokenizer.model"]  # no sidecar: Meta's format
    assert (ckpt / "tokenizer.model").read_bytes() == llama3_tokenizer_path.read_bytes()
    ours = Tokenizer.from_file(ckpt / "tokenizer.model")
    assert ours.kind == "tiktoken" and ours.n_words == 128256
    for text in TEXTS + ["<|eot_id|> is text here", "This is a test sentence."]:
        assert ours.encode(text, bos=False, eos=False) == hf.encode(text, add_special_tokens=False,
                                                                   split_special_tokens=True), text
    assert ours.encode("This is a test sentence.", bos=True, eos=True) == [128000, 2028, 374, 264, 1296, 11914, 13, 128001]

    formatter = ChatFormat.for_tokenizer(ours)
    assert isinstance(formatter, Llama3ChatFormat)
    dialog = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hello world!"},
              {"role": "assistant", "content": " Hi! "}, {"role": "user", "content": "12 + 30 = ?"}]
    rendered = hf.apply_chat_template(dialog, add_generation_prompt=True, tokenize=False)
    assert rendered.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are helpful.")
    assert formatter.encode_dialog_prompt(dialog) == hf.encode(rendered, add_special_tokens=False)


@pytest.mark.slow
def test_llama3_gguf_runs(llama3_gguf):
    _, ckpt = llama3_gguf
    generator = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=64, max_batch_size=1,
                            device="cpu", dtype="float32")
    assert generator.model.params.rope_theta == 500000.0
    (result,) = generator.chat_completion([[{"role": "user", "content": "Hello"}]], temperature=0, max_gen_len=4)
    assert result["generation"]["role"] == "assistant"
