"""Checkpoints stored quantized (llama/weights/quantized.py): `llama quantize`
writes them tensor by tensor, plain torch.load reads them, Llama.build runs
them as they are (the same logits, bit for bit, as quantizing at load), and
they split and merge like float checkpoints, at whole groups only."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, build_tiny
from dist_helpers import run_worker
from llama import Llama
from llama.weights import quantized
from llama.weights.checkpoint import CheckpointError
from llama.weights.quantizer import quantize_checkpoint
from llama.weights.writer import reshard_checkpoint

LINEAR = ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
          "feed_forward.w3")


@pytest.fixture(scope="module")
def quantized_ckpts(make_ckpt, tmp_path_factory):
    """{method: quantized copy} of the tiny llama3 checkpoint (fp32)."""
    src = make_ckpt("llama3")
    out = tmp_path_factory.mktemp("quantized")
    return {m: quantize_checkpoint(src, out / m, m, progress=lambda msg: None) for m in quantized.METHODS}


def built(ckpt, **kw):
    return Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=64, max_batch_size=2, device="cpu",
                       dtype="float32", **kw)


TOKENS = torch.tensor([[128000, 791, 94776, 374, 264, 13018, 17779, 9]])


@pytest.mark.parametrize("method", quantized.METHODS)
def test_the_file_is_plain_torch_load_and_holds_the_documented_layout(make_ckpt, quantized_ckpts, method):
    src = torch.load(make_ckpt("llama3") / "consolidated.00.pth", mmap=True, weights_only=True)
    state = torch.load(quantized_ckpts[method] / "consolidated.00.pth", mmap=True, weights_only=True)
    for i in range(2):
        for name in LINEAR:
            key = f"layers.{i}.{name}.weight"
            kind = quantized.type_for(method, key)
            w, s = state[key], state[quantized.scales_key(key)]
            assert (tuple(w.shape), tuple(s.shape)) == quantized.stored_shapes(kind, *src[key].shape)
            assert (w.dtype, s.dtype) == (quantized.TYPES[kind][0], quantized.TYPES[kind][2])
            back = quantized.dequantize(kind, w, s)
            step = (src[key].reshape(src[key].shape[0], -1, 32).abs().amax(-1) / (127 if kind == "q8_0" else 7)).repeat_interleave(32, 1)
            assert ((back - src[key]).abs() <= step + 1e-6).all()  # within a step of each group
    assert state["output.weight"].dtype == torch.int8  # int4 keeps the output layer in q8_0
    assert torch.equal(state["tok_embeddings.weight"], src["tok_embeddings.weight"])  # float, as it was
    params = json.loads((quantized_ckpts[method] / "params.json").read_text())
    assert params["quantization"]["method"] == method and params["quantization"]["group_size"] == 32
    assert json.loads((quantized_ckpts[method] / "manifest.json").read_text())["complete"] is True


@pytest.mark.parametrize("method", quantized.METHODS)
def test_a_stored_checkpoint_gives_the_logits_of_quantizing_at_load_bit_for_bit(make_ckpt, quantized_ckpts, method):
    at_load = built(make_ckpt("llama3"), quantize=method).model.forward(TOKENS, 0)
    stored = built(quantized_ckpts[method]).model.forward(TOKENS, 0)
    assert torch.equal(stored, at_load)
    same_flag = built(quantized_ckpts[method], quantize=method).model.forward(TOKENS, 0)  # asking again: no-op
    assert torch.equal(same_flag, at_load)
    full = build_tiny(make_ckpt("llama3")).model.forward(TOKENS, 0)
    relative = ((stored - full).norm() / full.norm()).item()
    assert 0 < relative < {"int8": 0.02, "int4": 0.15}[method], relative  # quantized, and close


def test_stored_weights_run_on_pytorch_where_our_kernels_do_not(quantized_ckpts, monkeypatch):
    from llama.kernels import linear

    gen = built(quantized_ckpts["int4"])
    ours = gen.model.forward(TOKENS, 0)
    for m in gen.model.modules():  # PyTorch's dequantization is kernels.c's, exactly
        if isinstance(m, linear.KernelLinear):
            assert torch.equal(quantized.dequantize(m.matmul.kind, m.matmul.weight, m.matmul.scales), m.matmul.dequantized())
    monkeypatch.setattr(linear.native, "library", lambda: None)
    gen = built(quantized_ckpts["int4"])
    matmuls = {type(m.matmul).__name__ for m in gen.model.modules() if isinstance(m, linear.KernelLinear)}
    assert matmuls == {"StoredMatmul"}
    theirs = gen.model.forward(TOKENS, 0)
    assert ((theirs - ours).norm() / ours.norm()).item() < 0.03  # the same weights; only ours quantize activations


def test_asking_for_another_quantization_than_stored_is_refused(quantized_ckpts):
    with pytest.raises(CheckpointError, match=r"stores its weights quantized .* --quantize int4 would quantize them "
                                              r"again: leave --quantize out"):
        built(quantized_ckpts["int8"], quantize="int4")


def test_quantizing_a_quantized_checkpoint_is_refused(quantized_ckpts, tmp_path):
    with pytest.raises(CheckpointError, match="is quantized already"):
        quantize_checkpoint(quantized_ckpts["int8"], tmp_path / "again", "int4", progress=lambda msg: None)
    assert not (tmp_path / "again").exists() or not any((tmp_path / "again").iterdir())


def test_the_command_line_quantizes(make_ckpt, tmp_path):
    r = subprocess.run([sys.executable, "-m", "llama", "quantize", "--ckpt_dir", str(make_ckpt("llama3")),
                        "--out", str(tmp_path / "q"), "--quantize", "int4"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "quantized" in r.stdout and (tmp_path / "q" / "consolidated.00.pth").is_file()


def test_damaged_quantized_files_are_named(quantized_ckpts, tmp_path):
    for damage, message in (("drop scales", "scales.* is missing"), ("int8 embedding", "only linear layers may be quantized"),
                            ("stray scales", "scales no quantized weight")):
        ckpt = tmp_path / damage.replace(" ", "_")
        shutil.copytree(quantized_ckpts["int8"], ckpt)
        (ckpt / "manifest.json").unlink()  # the test edits the file on purpose
        state = dict(torch.load(ckpt / "consolidated.00.pth", weights_only=True))
        if damage == "drop scales":
            del state["layers.1.feed_forward.w2.scales"]
        elif damage == "int8 embedding":
            state["tok_embeddings.weight"] = state["tok_embeddings.weight"].to(torch.int8)
        else:
            state["norm.scales"] = torch.ones(2)
        torch.save(state, ckpt / "consolidated.00.pth")
        with pytest.raises(CheckpointError, match=message):
            built(ckpt)


def test_quantized_checkpoints_split_and_merge_and_run_on_any_rank_count_that_keeps_groups(quantized_ckpts, tmp_path):
    """1 file on 2 ranks, 2 files on 2 ranks: the same tokens; 2 files merged: the same bytes; 4 ranks
    would cut wo's 64 input columns into 16: refused with the sizes that work."""
    one = run_worker(quantized_ckpts["int4"], tmp_path, tokens_only=True)  # greedy tokens and logits only
    two_files = reshard_checkpoint(quantized_ckpts["int4"], tmp_path / "two", 2, progress=lambda msg: None)
    merged = reshard_checkpoint(two_files, tmp_path / "merged", 1, progress=lambda msg: None)
    a = torch.load(quantized_ckpts["int4"] / "consolidated.00.pth", weights_only=True)
    b = torch.load(merged / "consolidated.00.pth", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the bytes survive a split and a merge
    for ckpt, nproc in ((quantized_ckpts["int4"], 2), (two_files, 2)):  # 2 files on 1 rank: the merge above
        result = run_worker(ckpt, tmp_path, nproc=nproc, tokens_only=True)
        assert result["tokens"] == one["tokens"]
        torch.testing.assert_close(result["logits"], one["logits"], atol=1e-3, rtol=1e-3)
    with pytest.raises(CheckpointError, match=r"attention.wo.weight \(64 input columns, q4_1\) cannot be split into 4 "
                                              r"parts without cutting its groups of 32 columns; sizes that work for it: \[1, 2\]"):
        reshard_checkpoint(quantized_ckpts["int4"], tmp_path / "four", 4, progress=lambda msg: None)


MEMORY_CHILD = """
import sys, torch
from llama import Llama
def status(key):
    return int(open('/proc/self/status').read().split(key + ':')[1].split()[0]) * 1024
before = status('VmRSS')
g = Llama.build(sys.argv[1], sys.argv[1] + '/tokenizer.model', max_seq_len=16, max_batch_size=1,
                quantize=None if sys.argv[2] == 'none' else sys.argv[2], dtype='bfloat16')
print(status('VmHWM') - before)
"""


def test_quantized_loads_never_hold_the_full_precision_model(make_ckpt, tmp_path):
    """Peak memory added by Llama.build (the child's own VmHWM over its RSS
    before): quantizing at load holds the quantized model and one tensor, a
    stored checkpoint the quantized model, against about the bf16 model and
    more for a plain bf16 load before our kernels took float weights the
    same way. 8 layers of dim 1024 and FFN 2816: 26 MB a layer in bf16.
    The stored checkpoint is drawn as int4 blocks directly, of the same
    shapes: quantizing 200 MB of weights takes seconds, which the at-load
    child spends already; what the stored case measures is the loading."""
    from utils.make_random_checkpoint import make_random_checkpoint

    shape = {"dim": 1024, "n_layers": 8, "n_heads": 8, "n_kv_heads": 8, "multiple_of": 256}
    src = make_ckpt("llama2", dtype=torch.bfloat16, **shape)
    stored = make_random_checkpoint(tmp_path / "int4", json.loads((src / "params.json").read_text()),
                                    src / "tokenizer.model", dtype=torch.bfloat16, quantize="int4")
    assert json.loads((stored / "params.json").read_text())[quantized.PARAMS_KEY]["method"] == "int4"
    linear_bf16 = sum(t.nbytes for k, t in torch.load(src / "consolidated.00.pth", mmap=True, weights_only=True).items()
                      if k.startswith("layers."))

    def peak(ckpt, quantize):
        r = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(ckpt), quantize], cwd=REPO, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return int(r.stdout.split()[-1])

    plain, at_load, from_file = peak(src, "none"), peak(src, "int4"), peak(stored, "none")
    embedding_and_output = 2 * 512 * 1024 * 2  # bf16 embedding (a 512-token vocabulary), the output layer in less
    assert at_load < 0.5 * linear_bf16 + embedding_and_output + (40 << 20), (plain, at_load, from_file, linear_bf16)
    assert from_file < 0.5 * linear_bf16 + embedding_and_output + (40 << 20), (plain, at_load, from_file, linear_bf16)
    assert plain > linear_bf16  # the measurement sees a full-precision model where there is one


def test_info_names_the_types_and_the_rank_counts_that_keep_groups(quantized_ckpts):
    from llama.cli.info import checkpoint_info

    facts = checkpoint_info(quantized_ckpts["int4"])
    assert facts.quantized == {"q4_1": 14, "q8_0": 1}  # 7 linear weights in each of 2 layers; the output in q8_0
    assert facts.world_sizes == [1, 2]  # 4 ranks would cut wo's 64 input columns into 16
    assert "quantized:    14 weights q4_1, 1 weight q8_0" in facts.report()


def test_quantized_pipeline_stages_run_as_one_process(quantized_ckpts, tmp_path):
    """A quantized checkpoint split into 2 stage folders (each node holds its
    stage's quantized layers only) gives the tokens of the whole one."""
    one = run_worker(quantized_ckpts["int8"], tmp_path, tokens_only=True)
    staged = reshard_checkpoint(quantized_ckpts["int8"], tmp_path / "stages", 1, pipeline_stages=2,
                                progress=lambda msg: None)
    stage1 = torch.load(staged / "stage1" / "consolidated.00.pth", mmap=True, weights_only=True)
    assert "layers.0.attention.wq.weight" not in stage1 and stage1["layers.1.attention.wq.weight"].dtype == torch.int8
    shutil.copy(quantized_ckpts["int8"] / "tokenizer.model", staged / "tokenizer.model")  # run_worker passes ckpt/tokenizer.model
    result = run_worker(staged, tmp_path, nproc=2, pipeline_stages=2, tokens_only=True)
    assert result["tokens"] == one["tokens"]
