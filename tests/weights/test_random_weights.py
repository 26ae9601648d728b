"""llama/weights/random_weights.py: random checkpoints shaped like each
family's files, the same weights whatever the sharding, and clear refusals."""

import json

import pytest
import torch

from llama.weights.checkpoint import find_shards, load_shard
from llama.weights.random_weights import make_random_checkpoint, random_params


def test_params_per_family():
    assert random_params("llama2", 64, 2, 4, None, 300) == {
        "dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 32, "norm_eps": 1e-5, "vocab_size": -1}
    p = random_params("llama3.1", 64, 2, 4, 2, 300, ffn_dim_multiplier=1.3)
    assert p["vocab_size"] == 300 and p["use_scaled_rope"] and p["rope_theta"] == 500000.0 and p["n_kv_heads"] == 2
    with pytest.raises(ValueError, match=r"unknown family 'llama4'; choose from \['llama2', 'llama3', 'llama3.1'\]"):
        random_params("llama4", 64, 2, 4, None, 300)


def test_llama2_needs_the_tokenizers_size(tmp_path):
    params = random_params("llama2", 64, 2, 4, None, 300)
    with pytest.raises(ValueError, match="a Llama 2 shaped checkpoint takes its vocab size from the tokenizer"):
        make_random_checkpoint(tmp_path / "a", params)
    out = make_random_checkpoint(tmp_path / "b", params, n_words=300, dtype=torch.float32)
    assert json.loads((out / "params.json").read_text())["vocab_size"] == -1
    assert load_shard(find_shards(out)[0])["tok_embeddings.weight"].shape == (300, 64)


def test_same_seed_same_weights_whatever_the_sharding(tmp_path):
    params = random_params("llama3", 64, 2, 4, 2, 300)
    one = make_random_checkpoint(tmp_path / "one", params, seed=5, dtype=torch.float32)
    two = make_random_checkpoint(tmp_path / "two", params, seed=5, dtype=torch.float32, n_shards=2)
    full = load_shard(find_shards(one)[0])
    halves = [load_shard(p) for p in find_shards(two)]
    assert len(halves) == 2
    assert torch.equal(torch.cat([h["layers.0.attention.wq.weight"] for h in halves]), full["layers.0.attention.wq.weight"])
    assert torch.equal(torch.cat([h["layers.1.attention.wo.weight"] for h in halves], 1),
                       full["layers.1.attention.wo.weight"])
