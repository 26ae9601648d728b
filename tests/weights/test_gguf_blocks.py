"""`llama convert` keeps a GGUF's quantized linear weights as blocks
(llama/weights/gguf.py kept_types / read_tensors, llama/cli/checkpoints.py
convert_gguf): each kept weight stands for exactly the values the gguf package
dequantizes from the same GGUF tensor, tied embeddings keep their blocks for
the output layer, other block types are refused before anything is read or
written, --dequantize and float GGUF files give the all-float checkpoint, and
the checkpoint is about the GGUF's size. The written files are read with plain
torch.load (the checkpoint loader of this branch takes float weights only)."""

import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch

import gguf_reference
from conftest import REPO
from gguf_reference import write_tiny_gguf
from llama.cli.checkpoints import convert_gguf as convert
from llama.weights import quantized
from llama.weights.gguf import KEPT_TYPES, RAW_BLOCK_BYTES, ConversionError, is_linear

WIDE = {"dim": 256, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn": 768}  # K-quants need rows of 256 weights
GGUF_TO_META = {"token_embd": "tok_embeddings", "output": "output", "blk.0.attn_q": "layers.0.attention.wq",
                "blk.0.attn_k": "layers.0.attention.wk", "blk.0.attn_v": "layers.0.attention.wv",
                "blk.0.attn_output": "layers.0.attention.wo", "blk.0.ffn_gate": "layers.0.feed_forward.w1",
                "blk.0.ffn_down": "layers.0.feed_forward.w2", "blk.0.ffn_up": "layers.0.feed_forward.w3",
                "blk.1.attn_q": "layers.1.attention.wq", "blk.1.attn_k": "layers.1.attention.wk",
                "blk.1.attn_v": "layers.1.attention.wv", "blk.1.attn_output": "layers.1.attention.wo",
                "blk.1.ffn_gate": "layers.1.feed_forward.w1", "blk.1.ffn_down": "layers.1.feed_forward.w2",
                "blk.1.ffn_up": "layers.1.feed_forward.w3", "output_norm": "norm",
                "blk.0.attn_norm": "layers.0.attention_norm", "blk.1.ffn_norm": "layers.1.ffn_norm"}


def load(ckpt):
    return torch.load(ckpt / "consolidated.00.pth", mmap=True, weights_only=True)


def gguf_tensors(path):
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def reference(t) -> torch.Tensor:
    """What the gguf package dequantizes the GGUF tensor to (float32, shape (out, in))."""
    return torch.from_numpy(np.array(gguf.dequantize(t.data, t.tensor_type)))


def kept_values(state, key: str, kind, k: int) -> torch.Tensor:
    """The float weight a stored one of `kind` (None: float) and `k` input
    columns stands for: quantized.dequantize for q8_0 and q4_1, gguf.quants
    for the raw K-quant super-blocks."""
    w = state[key]
    if kind is None:
        return w.float()
    if kind in RAW_BLOCK_BYTES:
        qtype = getattr(gguf.GGMLQuantizationType, kind.upper())
        return torch.from_numpy(np.array(gguf.quants.dequantize(w.numpy(), qtype)))
    scales = state[quantized.scales_key(key)]
    assert quantized.stored_type(key, w, scales, k) == kind, key
    return quantized.dequantize(kind, w, scales)


def random_k_blocks(x: np.ndarray, qtype) -> np.ndarray:
    """Random super-blocks of `qtype` for an (N, K) float array, with sane fp16
    scales (gguf.quants cannot quantize to the K types): what the converter
    keeps is bytes, whatever they encode."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n, k = x.shape
    rng = np.random.default_rng(n * k + size)
    blocks = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
    scales = (rng.uniform(1e-3, 1e-2, (n, k // block, 2))).astype(np.float16).view(np.uint8)
    # Where each type keeps its fp16 d (and dmin): Q4_K, Q5_K first; Q2_K, Q3_K, Q6_K last.
    fields = {"Q4_K": slice(0, 4), "Q5_K": slice(0, 4), "Q2_K": slice(size - 4, size), "Q3_K": slice(size - 2, size),
              "Q6_K": slice(size - 2, size)}[qtype.name]
    blocks[..., fields] = scales[..., :fields.stop - fields.start]
    return blocks.reshape(n, -1)


@pytest.fixture
def wide(monkeypatch):
    """write_tiny_gguf with rows of 256 weights, writing random blocks for the types gguf.quants cannot make."""
    monkeypatch.setattr(gguf_reference, "TINY_SHAPE", WIDE)
    real = gguf.quantize

    def quantize(x, qtype):
        if qtype.name in ("Q4_K", "Q5_K", "Q6_K", "Q2_K", "Q3_K"):
            return random_k_blocks(x, qtype)
        return real(x, qtype)

    monkeypatch.setattr(gguf, "quantize", quantize)
    return write_tiny_gguf


def check_kept(path, ckpt, expected_types):
    """Every tensor of the converted checkpoint is what the GGUF's tensor dequantizes to, exactly;
    the linear weights named in `expected_types` (GGUF name -> stored type) are stored as that type."""
    state, tensors = load(ckpt), gguf_tensors(path)
    for gguf_name, meta in GGUF_TO_META.items():
        t = tensors.get(gguf_name + ".weight", tensors["token_embd.weight"])  # tied: output is token_embd
        key = meta + ".weight"
        kind = expected_types.get(gguf_name) if is_linear(key) else None
        if kind is None:
            assert state[key].dtype == torch.float32, key
        elif kind in RAW_BLOCK_BYTES:  # the GGUF's bytes, row by row
            assert state[key].dtype == torch.uint8 and quantized.scales_key(key) not in state, key
            assert np.array_equal(state[key].numpy(), np.asarray(t.data).reshape(state[key].shape)), key
            assert state[key].shape == (int(t.shape[1]), int(t.shape[0]) // 256 * RAW_BLOCK_BYTES[kind]), key
        assert torch.equal(kept_values(state, key, kind, int(t.shape[0])), reference(t)), key
    return state


@pytest.mark.parametrize("qtype, kind", [("Q8_0", "q8_0"), ("Q5_0", "q8_0"), ("Q4_0", "q4_1"), ("Q4_1", "q4_1")])
def test_q8_0_q4_0_q4_1_keep_their_blocks_exactly(tmp_path, qtype, kind):
    linear = ["blk.0.attn_q", "blk.0.attn_k", "blk.1.attn_output", "blk.0.ffn_down", "blk.1.ffn_up", "output"]
    write_tiny_gguf(tmp_path / "q.gguf", tensor_types={f"{n}.weight": qtype for n in linear}, tied=False)
    ckpt = convert(tmp_path / "q.gguf", tmp_path / "ckpt")
    check_kept(tmp_path / "q.gguf", ckpt, dict.fromkeys(linear, kind))
    assert json.loads((ckpt / "params.json").read_text())["quantization"] == {
        "method": None, "group_size": 32, "source": f"gguf:{qtype}", "types": {kind: len(linear)}}


def test_q4_0_scales_become_d_and_minus_8_d(tmp_path):
    write_tiny_gguf(tmp_path / "q.gguf", tensor_types={"blk.0.attn_q.weight": "Q4_0"})
    state = load(convert(tmp_path / "q.gguf", tmp_path / "ckpt"))
    blocks = np.asarray(gguf_tensors(tmp_path / "q.gguf")["blk.0.attn_q.weight"].data).reshape(64, 2, 18)
    d = torch.from_numpy(blocks[..., :2].copy().view(np.float16)[..., 0])
    scales = state["layers.0.attention.wq.scales"]
    assert torch.equal(scales[..., 0], d) and torch.equal(scales[..., 1], d * -8)
    assert torch.equal(state["layers.0.attention.wq.weight"], torch.from_numpy(blocks[..., 2:].reshape(64, 32).copy()))


def test_k_quants_keep_their_super_blocks(tmp_path, wide):
    types = {"blk.0.attn_q": "Q4_K", "blk.0.attn_v": "Q5_K", "blk.0.ffn_down": "Q6_K", "blk.1.ffn_gate": "Q5_K",
             "blk.1.attn_output": "Q8_0", "output": "Q6_K", "blk.1.ffn_norm": "F16"}
    wide(tmp_path / "k.gguf", tensor_types={f"{n}.weight": t for n, t in types.items()}, tied=False)
    ckpt = convert(tmp_path / "k.gguf", tmp_path / "ckpt")
    check_kept(tmp_path / "k.gguf", ckpt, {n: KEPT_TYPES[t] for n, t in types.items() if t in KEPT_TYPES})
    record = json.loads((ckpt / "params.json").read_text())["quantization"]
    assert record["types"] == {"q4_k": 1, "q5_k": 2, "q6_k": 2, "q8_0": 1}
    assert record["source"] == "gguf:Q4_K+Q5_K+Q6_K+Q8_0"


def test_tied_embeddings_keep_blocks_for_the_output_layer(tmp_path, wide):
    wide(tmp_path / "t.gguf", tensor_types={"token_embd.weight": "Q6_K", "blk.0.attn_k.weight": "Q4_K"}, tied=True)
    ckpt = convert(tmp_path / "t.gguf", tmp_path / "ckpt")
    state = check_kept(tmp_path / "t.gguf", ckpt, {"output": "q6_k", "blk.0.attn_k": "q4_k"})
    embd = gguf_tensors(tmp_path / "t.gguf")["token_embd.weight"]
    assert state["tok_embeddings.weight"].dtype == torch.float32  # a lookup: float
    assert torch.equal(state["tok_embeddings.weight"], reference(embd))
    assert state["output.weight"].shape == (275, 210)
    assert json.loads((ckpt / "params.json").read_text())["quantization"]["types"] == {"q4_k": 1, "q6_k": 1}


def test_tied_q8_0_embeddings(tmp_path):
    write_tiny_gguf(tmp_path / "t.gguf", tensor_types={"token_embd.weight": "Q8_0"}, tied=True)
    state = load(convert(tmp_path / "t.gguf", tmp_path / "ckpt", dtype="bfloat16"))
    embd = gguf_tensors(tmp_path / "t.gguf")["token_embd.weight"]
    assert state["output.weight"].dtype == torch.int8 and state["output.scales"].dtype == torch.float32
    assert torch.equal(quantized.dequantize("q8_0", state["output.weight"], state["output.scales"]), reference(embd))
    assert state["tok_embeddings.weight"].dtype == torch.bfloat16  # --dtype applies to the float tensors
    assert torch.equal(state["tok_embeddings.weight"], reference(embd).bfloat16())


@pytest.mark.parametrize("types, named", [
    ({"blk.1.ffn_down.weight": "Q5_1"}, r"tensor blk\.1\.ffn_down\.weight is stored as Q5_1"),
    ({"blk.0.attn_v.weight": "Q5_1", "blk.0.attn_q.weight": "Q8_0"}, r"tensor blk\.0\.attn_v\.weight is stored as Q5_1"),
    ({"token_embd.weight": "Q5_1"}, r"tensor token_embd\.weight \(the output layer: the embeddings are tied\) is stored as Q5_1"),
    ({"blk.0.attn_q.weight": "TQ1_0"}, r"tensor blk\.0\.attn_q\.weight is stored as TQ1_0"),
    ({"blk.1.attn_output.weight": "Q3_K", "blk.1.ffn_up.weight": "Q4_K"}, r"tensor blk\.1\.attn_output\.weight is stored as Q3_K"),
])
def test_other_block_types_are_refused_before_reading(tmp_path, monkeypatch, wide, types, named):
    wide(tmp_path / "bad.gguf", tensor_types=types, tied=True)
    calls = []
    monkeypatch.setattr(gguf, "dequantize", lambda *a: calls.append(a))
    with pytest.raises(ConversionError, match=named) as e:
        convert(tmp_path / "bad.gguf", tmp_path / "out")
    assert "which this converter cannot keep quantized" in str(e.value)
    assert "re-quantize the model with llama.cpp's llama-quantize to Q8_0, Q4_0, Q4_1, Q4_K_M, Q5_K_M or Q6_K" in str(e.value)
    assert "or pass --dequantize" in str(e.value)
    assert not (tmp_path / "out").exists() and calls == []  # nothing written, nothing dequantized
    monkeypatch.undo()
    state = load(convert(tmp_path / "bad.gguf", tmp_path / "out", dequantize=True))  # the fix the message names
    assert {t.dtype for t in state.values()} == {torch.float32}


def test_a_k_quant_we_do_not_keep_is_refused(tmp_path, wide):
    wide(tmp_path / "bad.gguf", tensor_types={"blk.0.ffn_up.weight": "Q2_K", "blk.0.ffn_gate.weight": "Q4_K"})
    with pytest.raises(ConversionError, match=r"tensor blk\.0\.ffn_up\.weight is stored as Q2_K, which this converter"):
        convert(tmp_path / "bad.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_norms_in_a_block_type_are_dequantized(tmp_path, wide):
    # Only linear weights keep blocks: a norm or an embedding in any type the gguf package reads is expanded.
    wide(tmp_path / "n.gguf", tensor_types={"blk.0.attn_norm.weight": "Q8_0", "token_embd.weight": "Q5_0"}, tied=False)
    state = load(convert(tmp_path / "n.gguf", tmp_path / "ckpt"))
    tensors = gguf_tensors(tmp_path / "n.gguf")
    assert torch.equal(state["layers.0.attention_norm.weight"], reference(tensors["blk.0.attn_norm.weight"]))
    assert torch.equal(state["tok_embeddings.weight"], reference(tensors["token_embd.weight"]))
    assert "quantization" not in json.loads((tmp_path / "ckpt" / "params.json").read_text())


def test_dequantize_writes_the_all_float_checkpoint(tmp_path):
    types = {"blk.0.attn_q.weight": "Q8_0", "blk.1.ffn_up.weight": "Q4_0", "token_embd.weight": "Q4_1",
             "blk.0.ffn_down.weight": "Q5_0", "blk.1.attn_v.weight": "F16"}
    write_tiny_gguf(tmp_path / "m.gguf", tensor_types=types, tied=True)
    ckpt = convert(tmp_path / "m.gguf", tmp_path / "ckpt", dequantize=True)
    state, tensors = load(ckpt), gguf_tensors(tmp_path / "m.gguf")
    assert {t.dtype for t in state.values()} == {torch.float32}
    assert not any(k.endswith(".scales") for k in state)
    for gguf_name, meta in GGUF_TO_META.items():
        t = tensors.get(gguf_name + ".weight", tensors["token_embd.weight"])
        assert torch.equal(state[meta + ".weight"], reference(t)), meta
    assert state["output.weight"].data_ptr() == state["tok_embeddings.weight"].data_ptr()  # stored once
    assert "quantization" not in json.loads((ckpt / "params.json").read_text())


def test_float_gguf_converts_as_before(tiny_gguf, tmp_path):
    path, before = tiny_gguf  # converted by conftest with the defaults
    ckpt = convert(path, tmp_path / "now")
    dequantized = convert(path, tmp_path / "dequantized", dequantize=True)
    for name in ("consolidated.00.pth", "params.json", "tokenizer.model", "checklist.chk"):
        assert (ckpt / name).read_bytes() == (before / name).read_bytes() == (dequantized / name).read_bytes(), name
    assert "quantization" not in json.loads((ckpt / "params.json").read_text())


def test_checkpoint_is_about_the_gguf_size(tmp_path, wide):
    linear = [f"blk.{i}.{n}.weight" for i in range(2)
              for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_down", "ffn_up")]
    types = {**dict.fromkeys(linear, "Q4_K"), "blk.1.ffn_down.weight": "Q6_K", "token_embd.weight": "Q6_K"}
    wide(tmp_path / "q.gguf", tensor_types=types, tied=True)
    gguf_size = (tmp_path / "q.gguf").stat().st_size
    kept = (convert(tmp_path / "q.gguf", tmp_path / "kept", dtype="bfloat16") / "consolidated.00.pth").stat().st_size
    full = (convert(tmp_path / "q.gguf", tmp_path / "full", dequantize=True) / "consolidated.00.pth").stat().st_size
    # The GGUF's blocks plus the float embedding table (a lookup); the float32 expansion is ~6.5 times that.
    assert kept < 1.4 * gguf_size, (kept, gguf_size)
    assert full > 5 * gguf_size, (full, gguf_size)


def test_is_linear():
    assert all(is_linear(k) for k in ["output.weight", "layers.3.attention.wq.weight", "layers.0.attention.wo.weight",
                                      "layers.12.feed_forward.w2.weight", "layers.1.feed_forward.w3.weight"])
    assert not any(is_linear(k) for k in ["tok_embeddings.weight", "norm.weight", "layers.0.attention_norm.weight",
                                          "layers.0.ffn_norm.weight"])


def test_source_names_llama_cpps_file_type(tmp_path):
    write_tiny_gguf(tmp_path / "q.gguf", tensor_types={"blk.0.attn_q.weight": "Q8_0"},
                    extra_kv={"general.file_type": ("uint32", int(gguf.LlamaFileType.MOSTLY_Q4_K_M))})
    ckpt = convert(tmp_path / "q.gguf", tmp_path / "ckpt")
    assert json.loads((ckpt / "params.json").read_text())["quantization"]["source"] == "gguf:Q4_K_M"


QUANTIZE = """import ctypes, sys
import llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + sys.argv[3])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
"""


def llama_cpp_quantize(src, dst, ftype: str):
    """llama.cpp's own quantizer (llama-cpp-python), in a subprocess: a crash there skips, not kills, the tests."""
    pytest.importorskip("llama_cpp")
    run = subprocess.run([sys.executable, "-c", QUANTIZE, str(src), str(dst), ftype], capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    if run.returncode != 0:
        pytest.skip(f"llama_cpp.llama_model_quantize to {ftype} failed ({run.returncode}): {run.stderr[-300:]}")


@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q5_K_M", "Q6_K", "Q4_0"])
def test_llama_cpps_quantizations_keep_their_blocks(tmp_path, monkeypatch, ftype):
    monkeypatch.setattr(gguf_reference, "TINY_SHAPE", WIDE)
    write_tiny_gguf(tmp_path / "f32.gguf", tied=True)
    llama_cpp_quantize(tmp_path / "f32.gguf", tmp_path / "q.gguf", ftype)
    tensors = gguf_tensors(tmp_path / "q.gguf")
    expected = {n: KEPT_TYPES[tensors.get(n + ".weight", tensors["token_embd.weight"]).tensor_type.name]
                for n in GGUF_TO_META if is_linear(GGUF_TO_META[n] + ".weight")}
    ckpt = convert(tmp_path / "q.gguf", tmp_path / "ckpt")
    check_kept(tmp_path / "q.gguf", ckpt, expected)
    record = json.loads((ckpt / "params.json").read_text())["quantization"]
    assert record["source"] == f"gguf:{ftype}" and sum(record["types"].values()) == 15


def test_llama_cpps_q2_k_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_reference, "TINY_SHAPE", WIDE)
    write_tiny_gguf(tmp_path / "f32.gguf", tied=True)
    llama_cpp_quantize(tmp_path / "f32.gguf", tmp_path / "q2.gguf", "Q2_K")
    with pytest.raises(ConversionError, match=r"tensor \S+ (\(the output layer: the embeddings are tied\) )?is stored "
                                              r"as (Q2_K|Q3_K), which this converter cannot keep quantized"):
        convert(tmp_path / "q2.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_dequantize_flag(tmp_path):
    # In subprocesses: the command tears down torch.distributed when it ends, which other tests' models use.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    write_tiny_gguf(tmp_path / "q.gguf", tensor_types={"blk.0.attn_q.weight": "Q8_0"})
    llama_convert = [sys.executable, "-c", "import sys; from llama.cli.main import main; main(sys.argv[1:])", "convert"]
    script = [sys.executable, "utils/convert_gguf_checkpoint.py"]
    for cmd, out, flags in [(llama_convert, "kept", []), (llama_convert, "full", ["--dequantize"]),
                            (script, "script", ["--dequantize"])]:
        r = subprocess.run([*cmd, "--gguf", str(tmp_path / "q.gguf"), "--out", str(tmp_path / out), *flags],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    assert load(tmp_path / "kept")["layers.0.attention.wq.weight"].dtype == torch.int8
    assert load(tmp_path / "full")["layers.0.attention.wq.weight"].dtype == torch.float32
    assert load(tmp_path / "script")["layers.0.attention.wq.weight"].dtype == torch.float32
