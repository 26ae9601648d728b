"""The GGUF converter (llama/weights/gguf.py, llama/text/gguf_vocab.py, joined by
llama/cli/checkpoints.py's convert_gguf; utils/convert_gguf_checkpoint.py wraps it) on tiny synthetic GGUF files: weights land
under the right names with the right values, the result runs, and every GGUF
it cannot convert is refused with a message that says why."""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO
from gguf_reference import tiny_vocab, write_tiny_gguf
from llama import Llama
from llama.weights.writer import write_checkpoint
from llama.cli.checkpoints import convert_gguf as convert
from llama.weights.gguf import ConversionError, ffn_params

# Scripts in utils/ import the llama package of this checkout, not an installed one.
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
TYPES = {"blk.0.attn_q.weight": "Q8_0", "blk.0.ffn_down.weight": "BF16", "blk.1.ffn_up.weight": "F16",
         "token_embd.weight": "Q8_0"}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A tiny GGUF with float32, float16, bfloat16 and Q8_0 tensors, converted with
    dequantize=True (every weight float): (weights written, ckpt dir)."""
    tmp = tmp_path_factory.mktemp("mixed")
    weights = write_tiny_gguf(tmp / "m.gguf", tensor_types=TYPES, tied=False)
    return weights, convert(tmp / "m.gguf", tmp / "ckpt", dequantize=True)  # Llama.build reads float weights


def test_files_and_params(mixed):
    _, ckpt = mixed
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "checklist.chk", "consolidated.00.pth", "manifest.json", "params.json", "tokenizer.model",
        "tokenizer.model.json"]
    assert json.loads((ckpt / "params.json").read_text()) == {
        "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 275,
        "multiple_of": 64, "norm_eps": 1e-05, "rope_theta": 10000.0}  # FFN: 64 * ceil(170 / 64) = 192
    listed = [line.split()[1] for line in (ckpt / "checklist.chk").read_text().splitlines()]
    assert listed == ["consolidated.00.pth", "params.json", "tokenizer.model", "tokenizer.model.json"]


def test_weights_keep_their_values_and_names(mixed):
    weights, ckpt = mixed
    state = torch.load(ckpt / "consolidated.00.pth", weights_only=True)
    names = {"output": "output", "output_norm": "norm", "blk.1.attn_q": "layers.1.attention.wq",
             "blk.1.attn_k": "layers.1.attention.wk", "blk.0.attn_v": "layers.0.attention.wv",
             "blk.1.attn_output": "layers.1.attention.wo", "blk.0.ffn_gate": "layers.0.feed_forward.w1",
             "blk.1.ffn_down": "layers.1.feed_forward.w2", "blk.0.ffn_up": "layers.0.feed_forward.w3",
             "blk.1.attn_norm": "layers.1.attention_norm", "blk.0.ffn_norm": "layers.0.ffn_norm"}
    for gguf_name, meta_name in names.items():  # float32 in the GGUF: exact
        assert torch.equal(state[meta_name + ".weight"], torch.from_numpy(weights[gguf_name + ".weight"]))
    # Stored as F16, BF16, Q8_0: the dequantized values, close to what was quantized.
    for gguf_name, meta_name, tol in [("blk.1.ffn_up", "layers.1.feed_forward.w3", 1e-3),
                                      ("blk.0.ffn_down", "layers.0.feed_forward.w2", 1e-2),
                                      ("blk.0.attn_q", "layers.0.attention.wq", 2e-2),
                                      ("token_embd", "tok_embeddings", 3e-2)]:
        original = torch.from_numpy(weights[gguf_name + ".weight"])
        torch.testing.assert_close(state[meta_name + ".weight"], original, atol=tol, rtol=0)
    assert all(t.dtype == torch.float32 for t in state.values())


def test_tied_embeddings_are_stored_once(tiny_gguf):
    _, ckpt = tiny_gguf
    state = torch.load(ckpt / "consolidated.00.pth", weights_only=True, mmap=True)
    assert state["output.weight"].data_ptr() == state["tok_embeddings.weight"].data_ptr()


def test_bfloat16(tiny_gguf, tmp_path):
    ckpt = convert(tiny_gguf[0], tmp_path / "bf16", dtype="bfloat16")
    state = torch.load(ckpt / "consolidated.00.pth", weights_only=True)
    assert {t.dtype for t in state.values()} == {torch.bfloat16}


def test_converted_model_runs(mixed):
    _, ckpt = mixed
    generator = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=64, max_batch_size=2,
                            device="cpu", dtype="float32")
    dialog = [{"role": "user", "content": "the llama"}]
    (result,) = generator.chat_completion([dialog], temperature=0, max_gen_len=5)
    assert result["generation"]["role"] == "assistant"
    streamed = "".join(e.text for e in generator.chat_completion_stream(dialog, temperature=0, max_gen_len=5))
    assert streamed == result["generation"]["content"]


@pytest.mark.parametrize("dim, hidden, expected", [
    (4096, 11008, {"multiple_of": 256}),  # Llama 2 7B
    (4096, 14336, {"multiple_of": 1024, "ffn_dim_multiplier": 1.3}),  # Llama 3 8B
    (8192, 28672, {"multiple_of": 1024, "ffn_dim_multiplier": 1.3}),  # Llama 3 70B
    (576, 1536, {"multiple_of": 512}),  # SmolLM2-135M
    (64, 100, {"multiple_of": 4, "ffn_dim_multiplier": 0.59}),
    (2048, 8192, {"multiple_of": 1024, "ffn_dim_multiplier": 1.5}),  # TinyLlama-like
])
def test_ffn_params_reproduce_the_hidden_size(dim, hidden, expected):
    from llama.weights.args import ModelArgs

    assert ffn_params(dim, hidden) == expected
    assert ModelArgs(dim=dim, n_heads=1, **expected).ffn_hidden_dim == hidden


@pytest.mark.parametrize("kwargs, message", [
    ({"arch": "qwen2", "pre": "qwen2"}, r"holds a 'qwen2' model; this converter reads only the 'llama' architecture"),
    ({"tensor_types": {"blk.1.attn_v.weight": "I32"}},
     r"tensor blk.1.attn_v.weight is stored as I32, which the gguf package cannot dequantize"),
    ({"omit": ["llama.feed_forward_length"]}, r"lacks the metadata key 'llama.feed_forward_length'"),
    ({"omit": ["tokenizer.ggml.merges"]}, r"lacks the metadata key 'tokenizer.ggml.merges'"),
    ({"extra_kv": {"llama.expert_count": ("uint32", 8)}}, r"is a mixture-of-experts model"),
    ({"extra_kv": {"llama.rope.scaling.type": ("string", "linear")}}, r"uses RoPE scaling 'linear', which is not supported"),
    ({"extra_kv": {"llama.attention.key_length": ("uint32", 32)}}, r"llama.attention.key_length=32 differs from"),
    ({"extra_tensors": {"pos_embd.weight": np.ones((8, 64), np.float32)}},
     r"holds a tensor 'pos_embd.weight' that has no place in a Llama model"),
    ({"extra_tensors": {"rope_freqs.weight": np.ones(8, np.float32)}},
     r"rope_freqs.weight holds RoPE scaling factors other than Llama 3.1's"),
    ({"extra_tensors": {"blk.0.attn_q.weight": np.ones((32, 64), np.float32)}},
     r"layers.0.attention.wq.weight has shape \(32, 64\), expected \(64, 64\). The GGUF's tensors do not match"),
    ({"omit": ["blk.1.ffn_norm.weight"]}, r"missing layers.1.ffn_norm.weight"),
    ({"tokenizer_model": "llama"}, r"has a 'llama' tokenizer; only byte-level BPE tokenizers"),
    ({"pre": "deepseek-llm"}, r"uses the pre-tokenizer 'deepseek-llm'; supported: \['falcon3', 'gpt-2', 'llama-bpe'"),
])
def test_refuses_what_it_cannot_convert(tmp_path, kwargs, message):
    write_tiny_gguf(tmp_path / "bad.gguf", **kwargs)
    with pytest.raises(ConversionError, match=message):
        convert(tmp_path / "bad.gguf", tmp_path / "out")
    assert not (tmp_path / "out" / "checklist.chk").exists()


def llama_cpp_rope_factors(head_dim, theta, factor=8.0, low=1.0, high=4.0, old_context=8192):
    """The rope_freqs tensor llama.cpp's convert_hf_to_gguf.py writes for rope_type "llama3"."""
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, np.float32)


def test_llama31_rope_scaling(tmp_path):
    factors = llama_cpp_rope_factors(16, 500000.0)
    assert len(set(factors.tolist())) > 2  # kept, stretched and blended frequencies all occur
    kv = {"llama.rope.freq_base": ("float32", 500000.0)}
    write_tiny_gguf(tmp_path / "l31.gguf", extra_kv=kv, extra_tensors={"rope_freqs.weight": factors})
    ckpt = convert(tmp_path / "l31.gguf", tmp_path / "ckpt")
    params = json.loads((ckpt / "params.json").read_text())
    assert params["use_scaled_rope"] is True and params["rope_theta"] == 500000.0
    assert "rope_freqs.weight" not in torch.load(ckpt / "consolidated.00.pth", weights_only=True)
    with pytest.raises(ConversionError, match="other than Llama 3.1's"):  # Llama 3.2 scales by 32
        write_tiny_gguf(tmp_path / "l32.gguf", extra_kv=kv,
                        extra_tensors={"rope_freqs.weight": llama_cpp_rope_factors(16, 500000.0, factor=32.0)})
        convert(tmp_path / "l32.gguf", tmp_path / "ckpt32")


def _vocab_with(change):
    tokens, types, merges = tiny_vocab()
    change(tokens, types, merges)
    return tokens, types, merges


@pytest.mark.parametrize("change, message", [
    (lambda t, ty, m: t.__setitem__(1, "<|start|>"), r"no <\|im_start\|> control token: only ChatML chat models"),
    (lambda t, ty, m: ty.__setitem__(5, 4), r"token types \[4\] are not supported"),
    (lambda t, ty, m: m.insert(0, m.pop(5)), r"token ids do not follow the merge order"),
    (lambda t, ty, m: m.append("Ġ zz"), r"merge 16 \('Ġ zz'\) does not join two tokens into a token"),
    (lambda t, ty, m: (t.append("Ġq"), ty.append(1)), r"token 275 \('Ġq'\) is neither a byte nor a merge result"),
])
def test_refuses_tokenizers_tiktoken_cannot_express(tmp_path, change, message):
    tokens, types, merges = _vocab_with(change)
    extra = {"llama.vocab_size": ("uint32", len(tokens))}
    write_tiny_gguf(tmp_path / "bad.gguf", vocab=(tokens, types, merges), extra_kv=extra)
    with pytest.raises(ConversionError, match=message):
        convert(tmp_path / "bad.gguf", tmp_path / "out")


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "x.gguf").write_text("<html>not found</html>")
    with pytest.raises(ConversionError, match=r"x.gguf is not a readable GGUF file"):
        convert(tmp_path / "x.gguf", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=r"GGUF file .*nope.gguf not found"):
        convert(tmp_path / "nope.gguf", tmp_path / "out")


def test_cli_refuses_a_non_empty_output_without_force(tiny_gguf, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    cmd = [sys.executable, "utils/convert_gguf_checkpoint.py", "--gguf", str(tiny_gguf[0]), "--out", str(tmp_path / "out")]
    r = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True)
    assert r.returncode == 2 and "is not empty; choose an empty one or pass --force" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run(cmd + ["--force"], cwd=REPO, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "checklist.chk").exists() and "converted" in r.stdout


def test_output_is_checked_before_the_gguf_is_read(tmp_path):
    """A non-empty output is refused at once, before reading (which takes long for big files)."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    (tmp_path / "x.gguf").write_text("not even a GGUF file: reading it would fail")
    with pytest.raises(ValueError, match=r"output directory .*out is not empty; choose an empty one or pass --force"):
        convert(tmp_path / "x.gguf", tmp_path / "out")


def test_cli_shows_progress(tiny_gguf, tmp_path):
    cmd = [sys.executable, "utils/convert_gguf_checkpoint.py", "--gguf", str(tiny_gguf[0]), "--out", str(tmp_path / "o")]
    r = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert re.fullmatch(r"dequantizing: 20/20 tensors, [\d.,]+ MB, [\d.,]+ MB/s, [\d.]+ s", lines[0]), lines
    assert re.fullmatch(r"writing .*o: 1/1 shards, [\d.,]+ MB, [\d.,]+ MB/s, [\d.]+ s", lines[-1]), lines


def test_cli_without_the_gguf_package(tiny_gguf, tmp_path):
    code = ("import sys, runpy; sys.modules['gguf'] = None; sys.argv = ['convert', '--gguf', sys.argv[1], '--out', sys.argv[2]];"
            " runpy.run_path('utils/convert_gguf_checkpoint.py', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code, str(tiny_gguf[0]), str(tmp_path / "out")],
                       cwd=REPO, env=ENV, capture_output=True, text=True)
    assert r.returncode == 2 and "error: reading GGUF files needs the gguf package: pip install gguf" in r.stderr


def test_writer_keeps_a_tokenizer_with_its_sidecar(tiny_gguf, tmp_path, llama3_tokenizer_path):
    """Any tool that writes a checkpoint (converter, resharding) copies a BPE
    tokenizer's sidecar too, and drops a stale one when forced over."""
    _, ckpt = tiny_gguf
    state = {"x": torch.zeros(2)}
    out = write_checkpoint(tmp_path / "c", {"dim": 1}, [state], tokenizer_path=ckpt / "tokenizer.model")
    assert (out / "tokenizer.model.json").read_bytes() == (ckpt / "tokenizer.model.json").read_bytes()
    assert "tokenizer.model.json" in (out / "checklist.chk").read_text()
    write_checkpoint(out, {"dim": 1}, [state], tokenizer_path=llama3_tokenizer_path, force=True)
    assert not (out / "tokenizer.model.json").exists()
    assert "tokenizer.model.json" not in (out / "checklist.chk").read_text()


@pytest.mark.parametrize("keep", [0, 4, 8, 30, 500, 10_000, -10])
def test_truncated_gguf_is_refused(tiny_gguf, tmp_path, keep):
    data = tiny_gguf[0].read_bytes()
    (tmp_path / "t.gguf").write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(ConversionError, match=r"t.gguf is not a readable GGUF file .*truncated or damaged"):
        convert(tmp_path / "t.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("key, value, kind", [
    ("llama.embedding_length", ("string", "abc"), "an integer"),
    ("llama.block_count", ("string", "2"), "an integer"),
    ("llama.attention.head_count", ("float32", 4.0), "an integer"),
    ("llama.attention.layer_norm_rms_epsilon", ("string", "x"), "a finite number"),
    ("llama.rope.freq_base", ("string", "1e4"), "a finite number"),
    ("tokenizer.ggml.eos_token_id", ("string", "2"), "an integer"),
    ("tokenizer.ggml.add_bos_token", ("string", "no"), "true or false"),
    ("general.architecture", ("uint32", 7), "a string"),
])
def test_wrong_type_in_metadata_is_named(tmp_path, key, value, kind):
    write_tiny_gguf(tmp_path / "bad.gguf", extra_kv={key: value})
    with pytest.raises(ConversionError, match=rf"metadata key '{re.escape(key)}' must be {kind}, got"):
        convert(tmp_path / "bad.gguf", tmp_path / "out")


def test_block_count_of_a_billion_is_refused_at_once(tmp_path):
    write_tiny_gguf(tmp_path / "bad.gguf", extra_kv={"llama.block_count": ("uint32", 10**9)})
    with pytest.raises(ConversionError, match=r"n_layers=1000000000 is more than 4096"):
        convert(tmp_path / "bad.gguf", tmp_path / "out")


def test_never_writes_a_tokenizer_the_loader_rejects(tmp_path):
    write_tiny_gguf(tmp_path / "bad.gguf", extra_kv={"tokenizer.ggml.bos_token_id": ("uint32", 99999)})
    with pytest.raises(ConversionError, match=r"its tokenizer would not load: .*bos_id 99999 outside 0..274"):
        convert(tmp_path / "bad.gguf", tmp_path / "out")
    assert not (tmp_path / "out" / "tokenizer.model").exists()


def test_the_package_imports_without_the_gguf_extra(tiny_gguf, tmp_path):
    """gguf is an optional extra: the package imports without it, and converting says how to install it."""
    code = ("import sys; sys.modules['gguf'] = None\n"
            "import llama.weights, llama.weights.gguf, llama.weights.gguf_export, llama.cli.checkpoints\n"
            "from llama.cli.checkpoints import convert_gguf\n"
            "try:\n    convert_gguf(sys.argv[1], sys.argv[2])\n"
            "except ImportError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code, str(tiny_gguf[0]), str(tmp_path / "out")],
                       cwd=REPO, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ('reading GGUF files needs the gguf package: pip install gguf '
                                '(or this package with its extra: pip install "llama[gguf]")')
    assert not (tmp_path / "out").exists()


def test_llama_convert_without_the_gguf_package(tiny_gguf, tmp_path):
    code = ("import sys; sys.modules['gguf'] = None\n"
            "from llama.cli.main import main\n"
            "main(['convert', '--gguf', sys.argv[1], '--out', sys.argv[2]])")
    r = subprocess.run([sys.executable, "-c", code, str(tiny_gguf[0]), str(tmp_path / "out")],
                       cwd=REPO, env=ENV, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert 'needs the gguf package: pip install gguf (or this package with its extra: pip install "llama[gguf]")' \
        in r.stderr


def test_rope_frequencies_of_the_weights_wing_are_the_models():
    """The model, the GGUF reader and the exporter use one rope_frequencies (weights/args.py), so the
    rope_freqs tensor a GGUF file carries is checked against exactly what the model computes."""
    from llama.model import rope_frequencies as model_frequencies
    from llama.weights.args import rope_frequencies

    assert model_frequencies is rope_frequencies
    for head_dim, theta in [(64, 500000.0), (128, 10000.0), (16, 500000.0)]:
        for scaled in (False, True):
            assert torch.equal(rope_frequencies(head_dim, theta, scaled), model_frequencies(head_dim, theta, scaled))
