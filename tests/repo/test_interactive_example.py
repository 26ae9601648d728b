"""example_chat_completion.py --interactive, run as a user runs it: through a
pipe and on a terminal (pty), with a tiny random-weight checkpoint."""

import os
import pty
import select
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO


def command(ckpt, *extra):
    return [sys.executable, "example_chat_completion.py", "--ckpt_dir", str(ckpt), "--tokenizer_path",
            str(ckpt / "tokenizer.model"), "--interactive", "--temperature", "0", "--max_gen_len", "6",
            "--max_batch_size", "1", "--device", "cpu", *extra]


# Several turns, a message too long for the context, a new conversation, an empty line to quit.
LINES = ["Hello there", "How are you?", "word " * 600, "/new", "Hi again", "", "never read"]


def chat_through_pipe(cmd):
    r = subprocess.run(cmd, cwd=REPO, input="\n".join(LINES) + "\n", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def one_process_transcript(make_ckpt):
    """The piped chat of one process on the MP=2 checkpoint (it reads both shards): the transcript the
    pipe test checks and the one the torchrun run must equal, made once."""
    return chat_through_pipe(command(make_ckpt("llama3", shards=2), "--max_seq_len", "512"))


@pytest.mark.slow
def test_interactive_through_a_pipe(one_process_transcript):
    out = one_process_transcript
    assert out.startswith("Chatting. /help lists the commands; an empty line or Ctrl-D ends, /new starts a new "
                          "conversation, Ctrl-C stops an answer.\nTools: calculator, current_time")
    assert out.count("> Assistant: ") == 3 and out.count("> User: ") == 6
    assert "[the conversation no longer fits max_seq_len=512; start a new one with /new" in out
    assert "(new conversation)" in out


@pytest.mark.slow
def test_interactive_on_two_ranks_equals_one_process(make_ckpt, one_process_transcript):
    """Under torchrun rank 0 reads the input and broadcasts it; both ranks
    generate together and the transcript is that of a single process."""
    single = one_process_transcript
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port())]
    two = chat_through_pipe(torchrun + command(make_ckpt("llama3", shards=2), "--max_seq_len", "512")[1:])
    assert two == single


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_interactive_on_a_terminal_ends_on_ctrl_d(make_ckpt):
    main, worker = pty.openpty()
    proc = subprocess.Popen(command(make_ckpt("llama3")), cwd=REPO, stdin=worker, stdout=worker,
                            stderr=subprocess.PIPE, close_fds=True)
    os.close(worker)
    output = b""
    try:
        output += _read_until(main, proc, b"> User: ")
        os.write(main, b"Hello\n")
        output += _read_until(main, proc, b"> User: ")
        os.write(main, b"Tell me more\n")
        output += _read_until(main, proc, b"> User: ")
        os.write(main, b"\x04")  # Ctrl-D: end of input
        output += _read_until(main, proc, None)
        assert proc.wait(timeout=60) == 0, proc.stderr.read().decode()
    finally:
        proc.kill()
        os.close(main)
    text = output.decode(errors="replace")
    assert text.count("> Assistant: ") == 2 and "Traceback" not in text


def _read_until(fd, proc, marker, timeout=300):
    """Reads the terminal until `marker` has arrived (or, for None, until the program ends)."""
    data, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if marker is not None and marker in data:
            return data
        ready, _, _ = select.select([fd], [], [], 1.0)
        if not ready:
            if proc.poll() is not None:
                return data
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the program closed the terminal: it has ended
            return data
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"timed out waiting for {marker!r}; got {data[-500:]!r}")
