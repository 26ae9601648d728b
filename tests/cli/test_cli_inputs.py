"""Careless command lines get one clear message before the model loads
(empty --prompt, a negative --seed or --max_gen_len, a mistyped --ckpt_dir,
a GGUF file as --ckpt_dir); piped input asks what --prompt asks; Ctrl-C,
even while torch imports, ends with one line and exit 130.

Run in-process through `llama.cli.main.main` (what the console script
calls), except where the process's own start is what is tested."""

import io
import os
import subprocess
import sys

import pytest

from conftest import REPO
from llama.cli import generate, main as cli_main

MODEL = ["--temperature", "0", "--threads", "1", "--dtype", "float32", "--device", "cpu"]


@pytest.fixture(autouse=True)
def keep_the_process_group(monkeypatch):
    """run_clean ends a successful run by destroying the process group, as a
    process about to exit should; in this process the other tests' models
    still use it."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "destroy_process_group", lambda *args, **kwargs: None)


@pytest.fixture(autouse=True)
def keep_the_logging_setup():
    """main() sets up logging as a program does (setup_logging quiets
    llama.metrics, basicConfig adds a root handler); the tests after these
    capture those loggers as they were."""
    import logging

    metrics, root = logging.getLogger("llama.metrics"), logging.getLogger()
    level, root_level, handlers = metrics.level, root.level, list(root.handlers)
    yield
    metrics.setLevel(level)
    root.setLevel(root_level)
    root.handlers[:] = handlers


@pytest.fixture
def no_loading(monkeypatch):
    """Fails the test if the model would be loaded: the error must come first."""
    from llama.generation import Llama

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad flag was refused")

    monkeypatch.setattr(Llama, "build", refuse)


def run_main(argv, capsys, stdin=None, monkeypatch=None):
    """(exit code, stdout, stderr) of `llama ARGV` in this process."""
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = 0
    try:
        cli_main.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", ["chat", "complete"])
def test_empty_prompt_is_refused(command, make_ckpt, capsys, no_loading):
    for prompt in ("", "  \n"):
        code, _, err = run_main([command, "--ckpt_dir", make_ckpt("llama3"), "--prompt", prompt, *MODEL], capsys)
        assert code == 2 and err.startswith("error: --prompt is empty: give ")
        assert "Traceback" not in err


def test_empty_file_is_refused(make_ckpt, capsys, no_loading, tmp_path):
    (tmp_path / "empty.txt").write_text("\n")
    code, _, err = run_main(["complete", "--ckpt_dir", make_ckpt("llama3"), "--file", tmp_path / "empty.txt",
                             *MODEL], capsys)
    assert code == 2 and err == f"error: --file {tmp_path / 'empty.txt'} is empty: give a file with the text to continue\n"


@pytest.mark.parametrize("seed", [-5, 2**63])
def test_seed_out_of_the_engines_range_is_refused(seed, make_ckpt, capsys, no_loading):
    code, _, err = run_main(["complete", "--ckpt_dir", make_ckpt("llama3"), "--prompt", "x", "--seed", seed, *MODEL],
                            capsys)
    assert code == 2
    assert err == f"error: --seed must be an integer from 0 to {2**63 - 1} (2**63 - 1), got {seed}\n"


@pytest.mark.parametrize("command", ["chat", "complete"])
def test_negative_max_gen_len_is_refused_before_loading(command, make_ckpt, capsys, no_loading):
    code, _, err = run_main([command, "--ckpt_dir", make_ckpt("llama3"), "--prompt", "x", "--max_gen_len", -3, *MODEL],
                            capsys)
    assert code == 2 and err.startswith("error: --max_gen_len must be a positive number of tokens, got -3 ")


def test_mistyped_ckpt_dir_says_directory_not_found(tmp_path, capsys, no_loading):
    (tmp_path / "tokenizer.model").write_bytes(b"")  # even with a tokenizer.model beside it
    missing = tmp_path / "Meta-Llama-3.1-8B-Instrcut"
    code, _, err = run_main(["chat", "--ckpt_dir", missing, "--prompt", "Hi", *MODEL], capsys)
    assert code == 2
    assert err.startswith(f"error: --ckpt_dir {missing}: directory not found")
    assert "tokenizer" not in err


def test_gguf_file_as_ckpt_dir_suggests_llama_convert(tmp_path, capsys, no_loading):
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    code, _, err = run_main(["complete", "--ckpt_dir", gguf, "--prompt", "Hi", *MODEL], capsys)
    assert code == 2
    out_dir = tmp_path / "SmolLM2-135M-Instruct.Q4_1"
    assert err == (f"error: --ckpt_dir {gguf} is a GGUF file, not a checkpoint directory: convert it once with "
                   f"`llama convert --gguf {gguf} --out {out_dir}`, then pass --ckpt_dir {out_dir}\n")
    # Another file: said to be a file, not a directory.
    other = tmp_path / "params.json"
    other.write_text("{}")
    code, _, err = run_main(["complete", "--ckpt_dir", other, "--prompt", "Hi", *MODEL], capsys)
    assert code == 2 and err.startswith(f"error: --ckpt_dir {other} is a file, not a checkpoint directory")


def test_piped_input_loses_its_trailing_newline(monkeypatch):
    from llama.cli.options import read_stdin

    for piped in ("What is the capital of France?\n", "What is the capital of France?\r\n\n"):
        monkeypatch.setattr(sys, "stdin", io.StringIO(piped))
        assert read_stdin("x") == "What is the capital of France?"
    monkeypatch.setattr(sys, "stdin", io.StringIO("line one\nline two\n"))
    assert read_stdin("x") == "line one\nline two"  # inner newlines stay


def test_piped_and_prompt_give_the_same_prompt_tokens(make_ckpt, capsys, monkeypatch):
    """`echo "..." | llama complete` and `llama complete --prompt "..."` hand the
    engine the same tokens; `llama chat` the same message."""
    from llama.text.tokenizer import Tokenizer

    ckpt = make_ckpt("llama3")
    tokenizer = Tokenizer.from_file(str(ckpt / "tokenizer.model"))
    seen = []

    class Stub:
        def __init__(self):
            self.tokenizer = tokenizer
            self.model = type("M", (), {"params": type("P", (), {"max_seq_len": 64})})()

        def generate_stream(self, prompts, max_gen_len, **kw):
            seen.append(prompts[0])
            yield from ()

    monkeypatch.setattr(generate, "build_generator", lambda a: Stub())
    question = "What is the capital of France?"
    run_main(["complete", "--ckpt_dir", ckpt, "--prompt", question, *MODEL], capsys)
    run_main(["complete", "--ckpt_dir", ckpt, *MODEL], capsys, stdin=f"{question}\n", monkeypatch=monkeypatch)
    assert seen[0] == seen[1] == tokenizer.encode(question, bos=True, eos=False)

    asked = []

    class Session:
        def __init__(self, *args, **kwargs):
            pass

        def ask(self, prompt):
            asked.append(prompt)
            return ""

    monkeypatch.setattr(generate, "ChatSession", Session)
    run_main(["chat", "--ckpt_dir", ckpt, "--prompt", question, *MODEL], capsys)
    run_main(["chat", "--ckpt_dir", ckpt, *MODEL], capsys, stdin=f"{question}\n", monkeypatch=monkeypatch)
    assert asked == [question, question]


def test_piped_chat_answers_as_prompt_does(make_ckpt, capsys, monkeypatch):
    """The whole path, greedy on a tiny model: the same answer, byte for byte."""
    ckpt = make_ckpt("llama2")
    args = ["chat", "--ckpt_dir", ckpt, "--max_gen_len", 5, *MODEL]
    code, prompted, _ = run_main([*args, "--prompt", "Hello there"], capsys)
    assert code == 0
    code, piped, _ = run_main(args, capsys, stdin="Hello there\n", monkeypatch=monkeypatch)
    assert code == 0 and piped == prompted and prompted.strip()


@pytest.fixture
def interrupting_torch(tmp_path):
    """An environment whose `import torch` is interrupted, as by a Ctrl-C while torch imports."""
    fake = tmp_path / "fake"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text("raise KeyboardInterrupt\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), str(REPO)])}


@pytest.mark.parametrize("how", [
    ["-m", "llama"],  # python -m llama
    ["-c", "import sys; from llama.cli.main import main; sys.argv[0] = 'llama'; sys.exit(main())"],  # console script
])
def test_ctrl_c_while_torch_imports_is_one_line_and_exit_130(how, interrupting_torch, tmp_path):
    r = subprocess.run([sys.executable, *how, "chat", "--ckpt_dir", "x", "--prompt", "Hi"], env=interrupting_torch,
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 130
    assert r.stderr == "interrupted\n" and r.stdout == ""


def test_the_command_module_imports_no_torch():
    code = "import sys, llama.cli.main; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
