"""The example scripts, run as users run them: plain python and torchrun."""

import re
import subprocess
import sys

import pytest

from conftest import REPO

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def run(cmd, timeout=300):
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["python", "torchrun"])
def test_text_completion_example(make_ckpt, launcher):
    ckpt = make_ckpt("llama3")
    prefix = [sys.executable] if launcher == "python" else TORCHRUN + ["--nproc_per_node", "1"]
    r = run(prefix + ["example_text_completion.py", "--ckpt_dir", str(ckpt), "--tokenizer_path",
                      str(ckpt / "tokenizer.model"), "--max_gen_len", "6", "--temperature", "0", "--device", "cpu"])
    assert r.returncode == 0, r.stderr
    assert "I believe the meaning of life is" in r.stdout and r.stdout.count("\n> ") == 4 and r.stdout.count("=====\n") == 4
    # the dtype chosen by the hardware, why, whose matmuls, and the default thread count
    assert re.search(r"Loaded .* s: (bfloat16|float32) \((native bf16 on this CPU|no native bf16 on this CPU).*\), "
                     r"(our (AVX-512|AVX2)|PyTorch's) kernels, \d+ threads?, rank 0 of 1",
                     r.stderr), r.stderr


@pytest.mark.slow
def test_chat_example_streams(make_ckpt):
    ckpt = make_ckpt("llama2")
    r = run([sys.executable, "example_chat_completion.py", "--ckpt_dir", str(ckpt), "--tokenizer_path",
             str(ckpt / "tokenizer.model"), "--max_gen_len", "6", "--temperature", "0", "--max_batch_size", "2"])
    assert r.returncode == 0, r.stderr
    assert "User: what is the recipe of mayonnaise?" in r.stdout and r.stdout.count("> Assistant: ") == 4
    assert r.stdout.count("------ Inference metrics ------") == 4


@pytest.mark.slow
@pytest.mark.parametrize("script", ["example_chat_completion.py", "example_text_completion.py"])
def test_examples_answer_every_prompt_with_metrics_after_answers(make_ckpt, script):
    """--max_batch_size 1 answers all 4 example prompts (they queue for the one row), not just the first;
    the tokenizer is found in the checkpoint directory; the metrics block follows the answers."""
    ckpt = make_ckpt("llama3")
    extra = ["--nostream"] if script.startswith("example_chat") else []
    r = run([sys.executable, script, "--ckpt_dir", str(ckpt), "--max_gen_len", "4", "--temperature", "0",
             "--max_batch_size", "1", "--threads", "1", *extra])
    assert r.returncode == 0, r.stderr
    blocks = r.stdout.split("------ Inference metrics ------")
    assert len(blocks) == 2  # one call: four answers, then the metrics
    answer = "> Assistant: " if extra else "\n> "
    assert blocks[0].count(answer) == 4, r.stdout
    assert "How to go from Beijing to NY?" in r.stdout or "cheese =>" in r.stdout


def test_example_reports_bad_input_without_traceback(tmp_path, llama3_tokenizer_path):
    r = run([sys.executable, "example_chat_completion.py", "--ckpt_dir", str(tmp_path / "missing"),
             "--tokenizer_path", str(llama3_tokenizer_path)])
    assert r.returncode == 2
    assert "error: checkpoint directory" in r.stderr and "Traceback" not in r.stderr


def test_example_refuses_a_bad_thread_count(tmp_path, llama3_tokenizer_path):
    r = run([sys.executable, "example_text_completion.py", "--ckpt_dir", str(tmp_path), "--tokenizer_path",
             str(llama3_tokenizer_path), "--threads", "0"])
    assert r.returncode == 2, r.stderr
    assert "error: --threads must be a positive integer, got 0" in r.stderr and "Traceback" not in r.stderr
