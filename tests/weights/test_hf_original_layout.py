"""Meta's Hugging Face repositories (meta-llama/Meta-Llama-3.1-8B-Instruct, ...)
keep the Meta-format files in `original/`: the README tells users to download
only that folder and pass it as --ckpt_dir. A fake repository laid out the
same way (Hugging Face files at the top, a tiny random checkpoint in
original/) loads from original/, and the top level gets a pointer there."""

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY
from llama import Llama
from llama.weights.checkpoint import CheckpointError, find_shards
from llama.text.tokenizer import Tokenizer
from utils.make_random_checkpoint import make_random_checkpoint, random_params

# What `huggingface-cli download meta-llama/Meta-Llama-3.1-8B-Instruct` fetches
# besides original/ (the Hugging Face format, which this package does not read).
HF_TOP_LEVEL = ["LICENSE", "README.md", "USE_POLICY.md", "config.json", "generation_config.json",
                "model-00001-of-00004.safetensors", "model.safetensors.index.json", "special_tokens_map.json",
                "tokenizer.json", "tokenizer_config.json"]


def fake_hf_repo(root: Path, tokenizer: Path, n_shards: int) -> Path:
    for name in HF_TOP_LEVEL:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("{}" if name.endswith(".json") else "not used here")
    params = random_params("llama3.1", vocab_size=128256, **TINY)
    make_random_checkpoint(root / "original", params, tokenizer, n_shards=n_shards, dtype=torch.bfloat16)
    (root / "original" / "checklist.chk").unlink()  # the Hub's original/ has none
    (root / "original" / "manifest.json").unlink()  # nor a manifest (our writers add it)
    return root


@pytest.fixture(scope="module", params=[1, 2], ids=["8B-like", "70B-like"])
def hf_repo(request, tmp_path_factory, llama3_tokenizer_path):
    return fake_hf_repo(tmp_path_factory.mktemp("Meta-Llama-3.1-8B-Instruct"), llama3_tokenizer_path, request.param)


def test_original_folder_holds_a_meta_checkpoint(hf_repo):
    original = hf_repo / "original"
    assert sorted(p.name for p in original.iterdir()) == sorted(
        ["params.json", "tokenizer.model"] + [p.name for p in find_shards(original)])
    assert json.loads((original / "params.json").read_text())["use_scaled_rope"] is True
    assert Tokenizer.from_file(original / "tokenizer.model").kind == "tiktoken"
    generator = Llama.build(str(original), str(original / "tokenizer.model"), max_seq_len=32, max_batch_size=1,
                            device="cpu", dtype="float32")
    (result,) = generator.chat_completion([[{"role": "user", "content": "Hello"}]], temperature=0, max_gen_len=3)
    assert result["generation"]["role"] == "assistant"


def test_top_level_points_to_original(hf_repo):
    original = hf_repo / "original"
    hint = f"Meta's files are in {original}; pass --ckpt_dir {original} --tokenizer_path {original / 'tokenizer.model'}"
    with pytest.raises(FileNotFoundError, match="tokenizer file .* not found: .*" + re.escape(hint)):
        Llama.build(str(hf_repo), str(hf_repo / "tokenizer.model"), max_seq_len=32, max_batch_size=1, device="cpu")
    with pytest.raises(FileNotFoundError) as e:
        Llama.build(str(hf_repo), str(original / "tokenizer.model"), max_seq_len=32, max_batch_size=1, device="cpu")
    assert "params.json not found" in str(e.value) and hint in str(e.value)
    with pytest.raises(CheckpointError) as e:
        find_shards(hf_repo)
    assert "no consolidated.*.pth files" in str(e.value) and hint in str(e.value)


def test_no_hint_elsewhere(tmp_path):
    with pytest.raises(CheckpointError) as e:
        find_shards(tmp_path)
    assert "Hugging Face" not in str(e.value)


def test_readme_shows_the_download_command():
    readme = (REPO / "README.md").read_text()
    assert 'huggingface-cli download meta-llama/Meta-Llama-3.1-8B-Instruct --include "original/*"' in readme
    assert "--ckpt_dir Meta-Llama-3.1-8B-Instruct/original" in readme
