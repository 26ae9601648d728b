"""Every bad input to Llama.build / generate gets a message naming the problem
and the fix, and loading stays safe (weights_only)."""

import json
import os
import shutil

import pytest
import torch

from llama import CheckpointError, Llama


def build(ckpt, tokenizer=None, **kw):
    kw = {"max_seq_len": 32, "max_batch_size": 2, "device": "cpu", "dtype": "float32", **kw}
    return Llama.build(str(ckpt), str(tokenizer or ckpt / "tokenizer.model"), **kw)


@pytest.fixture
def ckpt_copy(make_ckpt, tmp_path):
    """A private copy of a tiny Llama 3 checkpoint that a test may damage."""
    src = make_ckpt("llama3")
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def test_missing_checkpoint_dir(tmp_path, llama3_tokenizer_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory .*nowhere not found"):
        build(tmp_path / "nowhere", llama3_tokenizer_path)


def test_missing_params(ckpt_copy):
    (ckpt_copy / "params.json").unlink()
    with pytest.raises(FileNotFoundError, match="params.json not found"):
        build(ckpt_copy)


def test_no_shards(ckpt_copy):
    (ckpt_copy / "consolidated.00.pth").rename(ckpt_copy / "model.pth")
    with pytest.raises(CheckpointError, match=r"no consolidated.\*.pth files in .*found \['model.pth'\]"):
        build(ckpt_copy)


def test_params_do_not_match_weights(ckpt_copy):
    params = json.loads((ckpt_copy / "params.json").read_text())
    (ckpt_copy / "params.json").write_text(json.dumps({**params, "dim": 128}))
    with pytest.raises(CheckpointError, match=r"consolidated.00.pth: .*has shape \(.*\), expected .*params.json belongs"):
        build(ckpt_copy)
    (ckpt_copy / "params.json").write_text(json.dumps({**params, "n_layers": 3}))
    with pytest.raises(CheckpointError, match=r"params.json says n_layers=3 but .*consolidated.00.pth holds 2 layers \(\[0, 1\]\)"):
        build(ckpt_copy)


def test_tokenizer_of_another_family(make_ckpt, sp_tokenizer_path, llama3_tokenizer_path):
    with pytest.raises(ValueError, match=r"has 512 tokens but .*vocab_size=128256: this tokenizer belongs to another model"):
        build(make_ckpt("llama3"), sp_tokenizer_path)
    # Llama 2 params say vocab_size -1: the weights themselves disagree with the tokenizer.
    with pytest.raises(CheckpointError, match=r"vocabulary of 512 tokens but the tokenizer .* has 128256"):
        build(make_ckpt("llama2"), llama3_tokenizer_path)


def test_html_instead_of_weights(ckpt_copy):
    (ckpt_copy / "consolidated.00.pth").write_text("<html><head><title>403 Forbidden</title></head></html>")
    with pytest.raises(CheckpointError, match=r"consolidated.00.pth is a web page, not weights.*Download it again"):
        build(ckpt_copy)


def test_truncated_weights(ckpt_copy):
    path = ckpt_copy / "consolidated.00.pth"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"consolidated.00.pth is not a readable PyTorch checkpoint.*truncated or corrupt"):
        build(ckpt_copy)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_that_runs_code_is_refused(ckpt_copy):
    torch.save({"tok_embeddings.weight": torch.zeros(2), "x": _Exploit()}, ckpt_copy / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match="holds Python objects other than tensors, which could run code"):
        build(ckpt_copy)


def test_missing_middle_shard(make_ckpt, tmp_path):
    src = make_ckpt("llama3", shards=4)
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    (dst / "consolidated.01.pth").unlink()
    with pytest.raises(CheckpointError, match=r"has shards \[0, 2, 3\] but not \[1\]: a shard is missing"):
        build(dst)
    (dst / "consolidated.02.pth").unlink()
    (dst / "consolidated.03.pth").unlink()  # only 00 left: it holds 1/4 of every split tensor
    with pytest.raises(CheckpointError, match=r"lacks 3 of the 4 shards its writer wrote \(consolidated.01.pth, "
                                              r"consolidated.02.pth, consolidated.03.pth\); copy them"):
        build(dst)
    (dst / "manifest.json").unlink()  # as in Meta's folders: the weights themselves tell
    with pytest.raises(CheckpointError, match=r"vocabulary of 32064 tokens"):
        build(dst)


def test_bad_runtime_arguments(make_ckpt):
    ckpt = make_ckpt("llama3")
    with pytest.raises(ValueError, match="float16 on CPU is very slow"):
        build(ckpt, dtype="float16")
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        build(ckpt, dtype="fp8")
    with pytest.raises(ValueError, match="max_seq_len must be a positive integer"):
        build(ckpt, max_seq_len=0)
    with pytest.raises(ValueError, match="model_parallel_size=2 but 1 processes were launched"):
        build(ckpt, model_parallel_size=2)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="this PyTorch sees no CUDA GPU; use --device cpu"):
            build(ckpt, device="cuda")


def test_bad_prompts(make_ckpt):
    gen = build(make_ckpt("llama3"))
    assert len(gen.text_completion(["a", "b", "c"], max_gen_len=2)) == 3  # more than max_batch_size: queued
    with pytest.raises(ValueError, match=r"prompt 0 has 33 tokens, which leaves no room to generate within max_seq_len=32"):
        gen.generate([[1] * 33], max_gen_len=2)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        gen.generate([[1], []], max_gen_len=2)
    with pytest.raises(ValueError, match=r"prompt 0 has token ids outside 0..128255"):
        gen.generate([[128256]], max_gen_len=2)
    with pytest.raises(ValueError, match="max_gen_len must be a non-negative integer"):
        gen.generate([[1]], max_gen_len=-1)


def test_two_models_in_one_process(make_ckpt):
    a = build(make_ckpt("llama3"))
    b = build(make_ckpt("llama2"))
    out_a = a.text_completion(["Hello"], max_gen_len=4, temperature=0)[0]["generation"]
    b.text_completion(["Hello"], max_gen_len=4, temperature=0)
    assert a.text_completion(["Hello"], max_gen_len=4, temperature=0)[0]["generation"] == out_a


@pytest.mark.parametrize("value", ["abc", "nan", "-5", "0", "inf", ""])
def test_bad_dist_timeout_is_a_clear_error(make_ckpt, monkeypatch, value):
    monkeypatch.setenv("LLAMA_DIST_TIMEOUT", value)
    with pytest.raises(ValueError, match=r"LLAMA_DIST_TIMEOUT=.* is not a number of seconds; set it to a positive"):
        build(make_ckpt("llama3"))


def test_bad_dist_timeout_from_the_cli(make_ckpt):
    import subprocess
    import sys

    from conftest import REPO

    ckpt = make_ckpt("llama3")
    cmd = [sys.executable, "example_text_completion.py", "--ckpt_dir", str(ckpt), "--tokenizer_path",
           str(ckpt / "tokenizer.model"), "--device", "cpu"]
    r = subprocess.run(cmd, cwd=REPO, env={**os.environ, "LLAMA_DIST_TIMEOUT": "abc"}, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "error: LLAMA_DIST_TIMEOUT='abc' is not a number of seconds" in r.stderr
