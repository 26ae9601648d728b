"""The KV cache is planned by the function that sizes it (model.cache_shape),
so the memory check before building and the allocation cannot disagree."""

import pytest
import torch

from conftest import build_tiny
from llama.model import cache_bytes, cache_shape, local_kv_heads
from llama.parallel.memory import available_memory
from llama.weights.args import ModelArgs


def test_the_allocated_cache_has_the_planned_shape_and_bytes(make_ckpt):
    gen = build_tiny(make_ckpt("llama3"))
    params = gen.model.params
    shape = cache_shape(params, 1)
    assert all(tuple(layer.attention.cache_k.shape) == shape == tuple(layer.attention.cache_v.shape)
               for layer in gen.model.layers)
    allocated = sum(layer.attention.cache_k.nbytes + layer.attention.cache_v.nbytes for layer in gen.model.layers)
    dtype = gen.model.layers[0].attention.cache_k.dtype
    assert cache_bytes(params, 1, dtype) - 3 * params.max_seq_len * (params.head_dim // 2) * 4 == allocated
    with pytest.raises(ValueError, match="does not fit"):
        gen.model.layers[0].attention.allocate_cache((1, shape[1] + 1, 4, shape[3]), "cpu", dtype)


def test_kv_heads_are_replicated_or_split_per_rank():
    args = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=100, max_seq_len=16, max_batch_size=3)
    assert [local_kv_heads(2, m) for m in (1, 2, 4, 8)] == [2, 1, 1, 1]
    assert cache_shape(args, 4) == (3, 1, 16, 8)
    with pytest.raises(ValueError):
        local_kv_heads(2, 3)
    assert cache_bytes(args, 3, torch.float32) > 0  # an impossible split is planned for, and refused later


def test_available_memory_says_or_says_none():
    free = available_memory(torch.device("cpu"))
    assert free is None or free > 0
    assert available_memory(torch.device("meta")) is None
