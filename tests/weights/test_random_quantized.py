"""Random checkpoints drawn directly as quantized blocks
(llama/weights/random_weights.py, `make_random_checkpoint(quantize=...)`,
`utils/make_random_checkpoint.py --quantize`): the layout `llama quantize`
writes, loaded by the normal loader, with weights spread like the float
random ones and finite, well-spread logits."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, TINY
from llama import Llama
from llama.weights import quantized
from llama.weights.random_weights import make_random_checkpoint, random_params

SHAPE = {**TINY, "dim": 128}  # wo and w2 need a multiple of 32 input columns
TOKENS = torch.tensor([[128000, 791, 94776, 374, 264, 13018, 17779, 9]])


@pytest.fixture(scope="module")
def random_quantized(tmp_path_factory, llama3_tokenizer_path):
    """{method: random quantized llama3.1 checkpoint} at a tiny shape with the real tokenizer."""
    out = tmp_path_factory.mktemp("random_quantized")
    params = random_params("llama3.1", vocab_size=128256, **SHAPE)
    return {m: make_random_checkpoint(out / m, params, llama3_tokenizer_path, seed=3, quantize=m)
            for m in quantized.METHODS}


@pytest.mark.parametrize("method", quantized.METHODS)
def test_layout_and_record_are_what_llama_quantize_writes(random_quantized, method):
    state = torch.load(random_quantized[method] / "consolidated.00.pth", mmap=True, weights_only=True)
    params = json.loads((random_quantized[method] / "params.json").read_text())
    record = params[quantized.PARAMS_KEY]
    assert record["method"] == method and record["group_size"] == quantized.GROUP
    assert record["types"] == ({"q4_1": 14, "q8_0": 1} if method == "int4" else {"q8_0": 15})
    assert state["tok_embeddings.weight"].dtype == torch.bfloat16 and state["norm.weight"].dtype == torch.bfloat16
    for key in ("layers.0.attention.wq.weight", "layers.1.feed_forward.w2.weight", "output.weight"):
        kind = quantized.type_for(method, key)
        w, s = state[key], state[quantized.scales_key(key)]
        n, k = quantized.logical_shape(kind, w)
        assert quantized.stored_type(key, w, s, k) == kind
        back = quantized.dequantize(kind, w, s)
        want = (4 if key == "output.weight" else 1) / k ** 0.5  # the float random weights' spread
        assert abs(back.mean()) < 0.1 * want and 0.85 * want < back.std() < 1.2 * want, (key, back.std(), want)
        if kind == "q4_1":  # both nibbles of the bytes are used
            assert set((w & 15).unique().tolist()) == set(range(16)) == set((w >> 4).unique().tolist())


@pytest.mark.parametrize("method", quantized.METHODS)
def test_loads_with_the_normal_loader_and_gives_finite_spread_logits(random_quantized, method):
    ckpt = random_quantized[method]
    gen = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=32, max_batch_size=1, device="cpu",
                      dtype="float32")
    logits = gen.model.forward(TOKENS, 0)
    assert logits.isfinite().all()
    last = logits[0, -1]
    assert 0.3 < last.std() < 30  # activations O(1): neither vanished nor blown up
    top2 = last.topk(2).values
    assert top2[0] - top2[1] > 1e-4  # no near-tie for greedy decoding
    out, _ = gen.generate([TOKENS[0].tolist()], 4, temperature=0.0)
    assert 1 <= len(out[0]) <= 4


def test_same_seed_same_file_and_info_names_the_types(random_quantized, tmp_path, llama3_tokenizer_path):
    from llama.cli.info import checkpoint_info

    params = random_params("llama3.1", vocab_size=128256, **SHAPE)
    again = make_random_checkpoint(tmp_path / "again", params, llama3_tokenizer_path, seed=3, quantize="int4")
    a, b = (torch.load(d / "consolidated.00.pth", mmap=True, weights_only=True) for d in (again, random_quantized["int4"]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    facts = checkpoint_info(random_quantized["int4"])
    assert facts.quantized == {"q4_1": 14, "q8_0": 1}
    assert "14 weights q4_1, 1 weight q8_0" in facts.report()


def test_bad_requests_are_refused_with_the_fix(tmp_path):
    params = random_params("llama3", 64, 2, 4, 2, 512)
    with pytest.raises(ValueError, match=r"unknown quantization 'int3'; choose from \['int8', 'int4'\]"):
        make_random_checkpoint(tmp_path / "a", params, quantize="int3")
    with pytest.raises(ValueError, match=r"written as one shard, not 2: split it afterwards with `llama shard -n 2`"):
        make_random_checkpoint(tmp_path / "b", params, n_shards=2, quantize="int4")
    odd = random_params("llama3", 80, 2, 4, 2, 512)  # wo: 80 input columns
    with pytest.raises(ValueError, match="has 80 input columns: quantized weights need a multiple of 32"):
        make_random_checkpoint(tmp_path / "c", odd, quantize="int8")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_the_command_line_writes_one(tmp_path):
    out = tmp_path / "cli"
    subprocess.run([sys.executable, "utils/make_random_checkpoint.py", "--out", str(out), "--vocab_size", "512",
                    "--dim", "64", "--n_layers", "1", "--n_heads", "4", "--quantize", "int8"],
                   cwd=REPO, check=True, capture_output=True)
    assert json.loads((out / "params.json").read_text())["quantization"]["types"] == {"q8_0": 8}
