"""The `llama` command as pip installs it, run as a user runs it: a fresh
virtual environment (the test environment's packages visible through a .pth
file, this repository installed into it without dependencies), outside the
clone, on tiny random checkpoints."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

# As a user runs it: no PYTHONPATH pointing at the clone (the test setup sets one).
USER_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
MODEL = ["--temperature", "0", "--threads", "1", "--dtype", "float32", "--device", "cpu"]


@pytest.fixture(scope="module")
def llama_bin(tmp_path_factory) -> Path:
    """The `llama` console script of a fresh venv with this repository pip-installed (not editable)."""
    tmp = tmp_path_factory.mktemp("venv")
    venv, src = tmp / "venv", tmp / "src"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # The new venv sees torch & co. from the test environment, after its own packages.
    (Path(purelib) / "test-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # Install from a copy, so that building leaves nothing in the clone.
    src.mkdir()
    for name in ("setup.py", "requirements.txt", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "llama", src / "llama", ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                        "--quiet", str(src)], capture_output=True, text=True, env=USER_ENV)
    assert r.returncode == 0, r.stdout + r.stderr
    return venv / "bin" / "llama"


def llama(llama_bin, *args, cwd, input=None, timeout=300):
    """Runs the installed command from `cwd` (not the clone)."""
    return subprocess.run([str(llama_bin), *map(str, args)], cwd=cwd, input=input, capture_output=True, text=True,
                          timeout=timeout, env=USER_ENV)


def test_console_script_is_installed_with_readable_help(llama_bin, tmp_path):
    assert llama_bin.is_file()
    r = llama(llama_bin, "--help", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for command in ("chat", "complete", "serve", "info", "shard", "convert"):
        assert f"\n    {command} " in r.stdout
    r = llama(llama_bin, "chat", "--help", cwd=tmp_path)
    assert r.returncode == 0 and "--ckpt_dir" in r.stdout and "--system" in r.stdout
    assert "sampling:" in r.stdout and "--temperature" in r.stdout and "--threads" in r.stdout and "--compile" in r.stdout
    r = llama(llama_bin, "serve", "--help", cwd=tmp_path)
    assert r.returncode == 0 and "--api_key" in r.stdout and "--max_queue" in r.stdout and "--ckpt_dir" in r.stdout
    # It runs the installed package, not the clone's.
    python = llama_bin.parent / "python"
    where = subprocess.run([str(python), "-c", "import llama; print(llama.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, env=USER_ENV).stdout
    assert where.startswith(str(llama_bin.parent.parent)), where


def greedy_chat_answer(ckpt, message, max_gen_len):
    from llama import Llama

    gen = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=2048, max_batch_size=1,
                      device="cpu", dtype="float32")
    dialog = [{"role": "user", "content": message}]
    tokens = [e.text for e in gen.chat_completion_stream(dialog, temperature=0, max_gen_len=max_gen_len)]
    return "".join(tokens)


def test_one_shot_answer_from_prompt_and_from_stdin(llama_bin, make_ckpt, tmp_path):
    """Llama 2 has no tools, so the dialog is the message alone: the answer is
    exactly the API's greedy answer, on stdout alone (remarks go to stderr)."""
    ckpt = make_ckpt("llama2")
    expected = greedy_chat_answer(ckpt, "Hello there", 5)
    r = llama(llama_bin, "chat", "--ckpt_dir", ckpt, "--prompt", "Hello there", "--max_gen_len", 5, *MODEL,
              cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n" and expected.strip()
    assert "[cut off: the answer reached max_gen_len or max_seq_len]" in r.stderr
    piped = llama(llama_bin, "chat", "--ckpt_dir", ckpt, "--max_gen_len", 5, *MODEL, cwd=tmp_path,
                  input="Hello there")
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == r.stdout


def test_complete_from_prompt_file_and_stdin(llama_bin, make_ckpt, tmp_path):
    ckpt = make_ckpt("llama3")
    (tmp_path / "prompt.txt").write_text("The llama is a", encoding="utf-8")
    runs = [
        llama(llama_bin, "complete", "--ckpt_dir", ckpt, "--prompt", "The llama is a", "--max_gen_len", 6, *MODEL,
              cwd=tmp_path),
        llama(llama_bin, "complete", "--ckpt_dir", ckpt, "--file", "prompt.txt", "--max_gen_len", 6, *MODEL,
              cwd=tmp_path),
        llama(llama_bin, "complete", "--ckpt_dir", ckpt, "--max_gen_len", 6, *MODEL, cwd=tmp_path,
              input="The llama is a"),
    ]
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
    assert runs[0].stdout.strip() and runs[0].stdout == runs[1].stdout == runs[2].stdout
    from llama import Llama

    gen = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=2048, max_batch_size=1,
                      device="cpu", dtype="float32")
    assert runs[0].stdout == gen.text_completion(["The llama is a"], temperature=0, max_gen_len=6)[0]["generation"] + "\n"


def test_sampling_flags_reach_the_engine(llama_bin, make_ckpt, tmp_path):
    """--stop cuts the completion exactly; a bad sampling value is one message naming it, before loading."""
    ckpt = make_ckpt("llama3")
    full = llama(llama_bin, "complete", "--ckpt_dir", ckpt, "--prompt", "The llama is a", "--max_gen_len", 8, *MODEL,
                 cwd=tmp_path)
    assert full.returncode == 0, full.stderr
    text = full.stdout.rstrip("\n")
    stop = text[3:6]
    cut = llama(llama_bin, "complete", "--ckpt_dir", ckpt, "--prompt", "The llama is a", "--max_gen_len", 8,
                "--stop", stop, "--top_k", 5, "--repetition_penalty", 1.0, *MODEL, cwd=tmp_path)
    assert cut.returncode == 0, cut.stderr
    assert cut.stdout.rstrip("\n") == text[: text.index(stop)]
    bad = llama(llama_bin, "complete", "--ckpt_dir", ckpt, "--prompt", "x", "--top_p", "-1", *MODEL, cwd=tmp_path)
    assert bad.returncode == 2 and "sampling top_p must be in [0, 1], got -1" in bad.stderr
    assert "Traceback" not in bad.stderr and "Loaded" not in bad.stderr


def _info(llama_bin, ckpt, cwd):
    r = llama(llama_bin, "info", ckpt, "--json", cwd=cwd)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_info_on_each_family(llama_bin, make_ckpt, tiny_gguf, tmp_path):
    import torch

    l3 = _info(llama_bin, make_ckpt("llama3", shards=2), tmp_path)
    assert l3["family"] == "Llama 3" and l3["shards"] == 2 and l3["dtypes"] == ["float32"]
    assert l3["world_sizes"] == [1, 2, 4] and l3["tokenizer_kind"] == "tiktoken" and l3["chat_format"] == "Llama 3"
    # 2 layers of dim 64 (4 heads, 2 KV heads, FFN 192) and two 128256 x 64 tables.
    per_layer = 64 * 64 * 2 + 2 * 32 * 64 + 3 * 64 * 192 + 2 * 64
    assert l3["parameters"] == 2 * per_layer + 2 * 128256 * 64 + 64
    ckpt = make_ckpt("llama3", shards=2)
    assert l3["file_bytes"] == sum(p.stat().st_size for p in ckpt.glob("consolidated.*.pth"))
    assert _info(llama_bin, make_ckpt("llama3.1"), tmp_path)["family"] == "Llama 3.1"
    gguf = _info(llama_bin, tiny_gguf[1], tmp_path)
    assert gguf["family"] == "converted from GGUF" and gguf["chat_format"] == "ChatML"

    # Llama 2's download keeps one tokenizer.model above the model folders: found there.
    l2_src = make_ckpt("llama2", dtype=torch.bfloat16)
    model = tmp_path / "download" / "llama-2-tiny"
    model.mkdir(parents=True)
    for name in ("params.json", "consolidated.00.pth"):
        (model / name).symlink_to(l2_src / name)
    (model.parent / "tokenizer.model").symlink_to(l2_src / "tokenizer.model")
    l2 = _info(llama_bin, model, tmp_path)
    assert l2["family"] == "Llama 2" and l2["tokenizer"] == str(model.parent / "tokenizer.model")
    assert l2["dtypes"] == ["bfloat16"] and l2["chat_format"] == "Llama 2"
    text = llama(llama_bin, "info", model, cwd=tmp_path).stdout
    assert "family:       Llama 2" in text and "runs on:      1, 2, 4 processes" in text


def test_missing_tokenizer_says_where_it_looked(llama_bin, make_ckpt, tmp_path):
    src = make_ckpt("llama3")
    model = tmp_path / "m"
    model.mkdir()
    for name in ("params.json", "consolidated.00.pth"):
        (model / name).symlink_to(src / name)
    r = llama(llama_bin, "chat", "--ckpt_dir", model, "--prompt", "Hi", *MODEL, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (f"error: no tokenizer.model found; looked in {model / 'tokenizer.model'} and "
                                f"{tmp_path / 'tokenizer.model'}. Pass --tokenizer_path with the tokenizer.model "
                                "that came with these weights")


def test_usage_errors_are_one_line(llama_bin, tmp_path):
    r = llama(llama_bin, "chat", "--prompt", "Hi", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr == "error: llama chat: the following arguments are required: --ckpt_dir (see llama chat --help)\n"
    r = llama(llama_bin, "complete", "--ckpt_dir", tmp_path, cwd=tmp_path, input="")
    assert r.returncode == 2 and r.stderr.startswith("error: stdin is empty: give --prompt TEXT, --file FILE")


def test_shard_then_info(llama_bin, make_ckpt, tmp_path):
    r = llama(llama_bin, "shard", "-n", 2, "-i", make_ckpt("llama3"), "-o", tmp_path / "two", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "two").glob("*.pth")) == ["consolidated.00.pth", "consolidated.01.pth"]
    assert _info(llama_bin, tmp_path / "two", tmp_path)["shards"] == 2
    again = llama(llama_bin, "shard", "-n", 2, "-i", make_ckpt("llama3"), "-o", tmp_path / "two", cwd=tmp_path)
    assert again.returncode == 2 and "is not empty" in again.stderr and "Traceback" not in again.stderr


def test_convert_outside_a_clone(llama_bin, tiny_gguf, tmp_path):
    """The installed package converts on its own: no utils/ script, no clone, the cwd elsewhere."""
    r = llama(llama_bin, "convert", "--gguf", tiny_gguf[0], "--out", "out", cwd=tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "converted" in r.stdout and "dequantizing: 20/20 tensors" in r.stderr
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in tiny_gguf[1].iterdir())
    assert (out / "params.json").read_text() == (tiny_gguf[1] / "params.json").read_text()
    assert (out / "tokenizer.model.json").read_bytes() == (tiny_gguf[1] / "tokenizer.model.json").read_bytes()
    assert _info(llama_bin, out, tmp_path)["family"] == "converted from GGUF"
    # Bad input is one line naming it.
    r = llama(llama_bin, "convert", "--gguf", "x.gguf", "--out", "out2", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == "error: GGUF file x.gguf not found"
    # The installed copy holds no utils/: the command cannot be leaning on a script.
    python = llama_bin.parent / "python"
    where = subprocess.run([str(python), "-c", "import llama.cli.checkpoints as c, llama.weights.gguf as g; "
                            "print(c.__file__); print(g.__file__)"], cwd=tmp_path, capture_output=True, text=True,
                           env=USER_ENV)
    files = where.stdout.split()
    assert len(files) == 2 and all(f.startswith(str(llama_bin.parent.parent)) for f in files), where


def test_convert_from_the_clone(tiny_gguf, tmp_path):
    r = subprocess.run([sys.executable, "-m", "llama", "convert", "--gguf", str(tiny_gguf[0]), "--out",
                        str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "consolidated.00.pth").is_file() and (tmp_path / "out" / "tokenizer.model.json").is_file()


def test_threads_and_batches_are_checked():
    import torch

    from llama.parallel.threads import set_threads

    with pytest.raises(ValueError, match=r"--threads must be a positive integer, got 0"):
        set_threads(0)
    before = torch.get_num_threads()
    set_threads(1)
    assert torch.get_num_threads() == 1
    torch.set_num_threads(before)
