"""Checkpoint folders built to hurt: each is refused by a cheap check, with
the numbers, before the loader does work that grows with what the file says
(issue 13). Each build here ends in well under a second."""

import json
import os
import shutil

import pytest
import torch

from llama import CheckpointError, Llama
from llama.builder import check_cache_memory
from llama.model import cache_bytes
from llama.weights.checkpoint import find_shards, load_shard
from llama.weights.args import ModelArgs


def build(ckpt, **kw):
    kw = {"max_seq_len": 32, "max_batch_size": 2, "device": "cpu", "dtype": "float32", **kw}
    return Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), **kw)


@pytest.fixture
def ckpt(make_ckpt, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(make_ckpt("llama3"), dst)
    return dst


def replace_tensor(path, key, tensor):
    state = torch.load(path, weights_only=True)
    state[key] = tensor
    torch.save(state, path)


def test_huge_shard_index_costs_nothing(ckpt):
    (ckpt / "consolidated.99999999999999999999.pth").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"has 2 shard files, but \['consolidated.99999999999999999999.pth'\] "
                                              r"cannot belong to them .*remove it"):
        find_shards(ckpt)


def test_two_files_for_one_shard(ckpt):
    shutil.copy(ckpt / "consolidated.00.pth", ckpt / "consolidated.0.pth")
    with pytest.raises(CheckpointError, match=r"two files for the same shard: \['consolidated.0.pth', 'consolidated.00.pth'\]"):
        find_shards(ckpt)


def test_directory_named_like_a_shard(ckpt):
    (ckpt / "consolidated.00.pth").unlink()
    (ckpt / "consolidated.00.pth").mkdir()
    with pytest.raises(CheckpointError, match=r"consolidated.00.pth is not a regular file"):
        build(ckpt)


def test_symlink_loop_named_like_a_shard(ckpt):
    (ckpt / "consolidated.00.pth").unlink()
    os.symlink("consolidated.00.pth", ckpt / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match=r"consolidated.00.pth is not a regular file"):
        build(ckpt)
    with pytest.raises(CheckpointError, match=r"consolidated.00.pth cannot be read"):
        load_shard(ckpt / "consolidated.00.pth")


def test_stride_zero_tensor_claiming_gigabytes(ckpt):
    """A few bytes of storage viewed as 2**31 elements: refused before anything copies it."""
    replace_tensor(ckpt / "consolidated.00.pth", "norm.weight", torch.zeros(1).expand(2**31))
    with pytest.raises(CheckpointError, match=r"tensor 'norm.weight' of shape \(2147483648,\) claims 8,589,934,592 "
                                              r"bytes over a storage of 4 bytes"):
        build(ckpt)


def test_sparse_tensor_is_refused(ckpt):
    bad = torch.sparse_coo_tensor(torch.tensor([[10**9]]), torch.tensor([1.0]), (64,), check_invariants=False)
    replace_tensor(ckpt / "consolidated.00.pth", "norm.weight", bad)
    with pytest.raises(CheckpointError, match=r"tensor 'norm.weight' is a torch.sparse_coo Tensor .*not a dense tensor"):
        build(ckpt)


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64, torch.bool])
def test_non_weight_dtype_is_refused(ckpt, dtype):
    replace_tensor(ckpt / "consolidated.00.pth", "norm.weight", torch.zeros(64, dtype=dtype))
    with pytest.raises(CheckpointError, match=rf"tensor 'norm.weight' has dtype {dtype}; weights must be one of"):
        build(ckpt)


def test_n_layers_far_beyond_the_weights(ckpt):
    params = json.loads((ckpt / "params.json").read_text())
    (ckpt / "params.json").write_text(json.dumps({**params, "n_layers": 4000}))
    with pytest.raises(CheckpointError, match=r"params.json says n_layers=4000 but .* holds 2 layers"):
        build(ckpt)


def test_huge_max_seq_len_is_refused_with_the_numbers(make_ckpt):
    with pytest.raises(CheckpointError, match=r"max_seq_len=1000000000 and max_batch_size=2 need a KV cache of "
                                              r"[\d,.]+ GiB per process .* GiB is free on cpu; lower --max_seq_len"):
        build(make_ckpt("llama3"), max_seq_len=10**9)
    with pytest.raises(CheckpointError, match=r"max_batch_size=1000000000 need a KV cache"):
        build(make_ckpt("llama3"), max_batch_size=10**9)


def test_cache_bytes_matches_what_the_model_allocates(make_ckpt):
    gen = build(make_ckpt("llama3"), max_seq_len=48, max_batch_size=3)
    allocated = sum(layer.attention.cache_k.nbytes + layer.attention.cache_v.nbytes for layer in gen.model.layers)
    kv_only = cache_bytes(gen.model.params, 1, torch.float32) - 3 * 48 * (gen.model.params.head_dim // 2) * 4
    assert kv_only == allocated


def test_cache_check_passes_for_a_normal_size():
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, max_seq_len=128, max_batch_size=2)
    check_cache_memory(args, 1, torch.device("cpu"), torch.float32)  # no error


def test_compressed_archive_is_refused(ckpt):
    """mmap would read deflated bytes as weights; a deflated pickle could be a zip bomb."""
    import zipfile

    path = ckpt / "consolidated.00.pth"
    with zipfile.ZipFile(path) as zin:
        entries = [(i.filename, zin.read(i.filename)) for i in zin.infolist()]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zout:
        for name, data in entries:
            zout.writestr(name, data)
    with pytest.raises(CheckpointError, match=r"consolidated.00.pth: its entry .* is compressed; a memory-mapped load"):
        build(ckpt)
