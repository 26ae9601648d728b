"""`llama chat` on a terminal (a pty that is the program's controlling
terminal, so Ctrl-C is the key, not a signal sent by hand), and the `llama`
command under torchrun: the same answers as one process, and one message for
a wrong world size."""

import fcntl
import json
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import termios
import time

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

CHAT = [sys.executable, "-m", "llama", "chat", "--temperature", "0", "--threads", "1", "--dtype", "float32",
        "--device", "cpu"]
UP = b"\x1b[A"


def _controlling_terminal():
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)  # stdin (the pty) becomes this new session's terminal
    # Ctrl-C as a shell's foreground job gets it, even where the tests run in
    # the background (there SIGINT is ignored, and ignoring is inherited).
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Chat:
    """A program on a pty: type keys, read what it shows."""

    def __init__(self, cmd, env):
        self.fd, worker = pty.openpty()
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdin=worker, stdout=worker, stderr=worker, env=env,
                                     start_new_session=True, preexec_fn=_controlling_terminal)
        os.close(worker)
        self.seen, self.mark = b"", 0

    def type(self, keys: bytes) -> None:
        os.write(self.fd, keys)

    def read_until(self, marker: bytes, timeout=120) -> bytes:
        """What the program showed since the last read, up to `marker` (b"": up to the first new bytes)."""
        start, deadline = self.mark, time.monotonic() + timeout
        while time.monotonic() < deadline:
            pos = self.seen.find(marker, start)
            if pos >= 0 and (marker or len(self.seen) > start):
                self.mark = pos + len(marker) if marker else len(self.seen)
                return self.seen[start:self.mark]
            ready, _, _ = select.select([self.fd], [], [], 0.2)
            if ready:
                try:
                    data = os.read(self.fd, 65536)
                except OSError:  # the program closed the terminal
                    data = b""
                if not data:
                    break
                self.seen += data
            elif self.proc.poll() is not None:
                break
        raise AssertionError(f"did not see {marker!r}; the screen ends with {self.seen[-800:]!r}")

    def close(self):
        self.proc.kill()
        self.proc.wait()
        os.close(self.fd)


@pytest.fixture
def chat_env(tmp_path):
    return {**os.environ, "LLAMA_HISTORY_FILE": str(tmp_path / "history")}


def test_ctrl_c_stops_the_answer_and_history_recalls_the_question(make_ckpt, tmp_path, chat_env):
    """Ctrl-C mid-answer returns to the prompt; the up arrow recalls the
    question, whose answer then runs to its end; /save shows the stopped turn
    was dropped; Ctrl-C at the empty prompt ends the chat; history is kept."""
    ckpt = make_ckpt("llama3")
    chat = Chat(CHAT + ["--ckpt_dir", str(ckpt), "--max_gen_len", "1500"], chat_env)
    try:
        banner = chat.read_until(b"> User: ")
        assert b"Tools: calculator, current_time" in banner and b"Ctrl-C stops an answer" in banner
        chat.type(b"Hello\r")
        chat.read_until(b"> Assistant: ")
        chat.read_until(b"")  # the first bytes of the answer
        chat.type(b"\x03")  # Ctrl-C, 1500 tokens before the answer could end
        stopped = chat.read_until(b"> User: ")
        assert b"[stopped; this question is not kept in the conversation]" in stopped
        chat.type(UP + b"\r")
        answered = chat.read_until(b"> User: ")
        assert answered.startswith(b"Hello\r\n> Assistant: ") and b"[stopped" not in answered
        chat.type(f"/save {tmp_path / 'dialog.json'}\r".encode())
        assert b"(saved 3 messages to" in chat.read_until(b"> User: ")
        chat.type(b"\x03")  # Ctrl-C at the prompt ends the chat
        assert chat.proc.wait(timeout=60) == 0
    finally:
        chat.close()
    assert b"Traceback" not in chat.seen
    dialog = json.loads((tmp_path / "dialog.json").read_text())
    assert [m["role"] for m in dialog] == ["system", "user", "assistant"] and dialog[1]["content"] == "Hello"
    assert (tmp_path / "history").read_text().splitlines()[:1] == ["Hello"]


def test_system_save_and_load_on_a_terminal(make_ckpt, tmp_path, chat_env):
    """Llama 2 (no tools, and the banner says so): /system, /load, a question, /save."""
    ckpt = make_ckpt("llama2")
    saved = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello!", "stop_reason": "end_of_turn"}]
    (tmp_path / "before.json").write_text(json.dumps(saved))
    chat = Chat(CHAT + ["--ckpt_dir", str(ckpt), "--max_gen_len", "4"], chat_env)
    try:
        banner = chat.read_until(b"> User: ")
        assert b"No tools: this model's chat format (Llama 2) has no tool calling" in banner
        chat.type(b"/system Answer in French.\r")
        assert b"(system prompt set)" in chat.read_until(b"> User: ")
        chat.type(f"/save {tmp_path / 'system.json'}\r".encode())
        chat.read_until(b"> User: ")
        chat.type(f"/load {tmp_path / 'before.json'}\r".encode())
        assert b"(loaded 3 messages from" in chat.read_until(b"> User: ")
        chat.type(b"And you?\r")
        chat.read_until(b"> User: ")
        chat.type(f"/save {tmp_path / 'after.json'}\r".encode())
        chat.read_until(b"> User: ")
        chat.type(b"\x04")  # Ctrl-D
        assert chat.proc.wait(timeout=60) == 0
    finally:
        chat.close()
    assert json.loads((tmp_path / "system.json").read_text()) == [{"role": "system", "content": "Answer in French."}]
    after = json.loads((tmp_path / "after.json").read_text())
    assert after[:3] == saved and after[3] == {"role": "user", "content": "And you?"} and after[4]["role"] == "assistant"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), "-m", "llama"]


def test_chat_under_torchrun_answers_as_one_process(make_ckpt):
    ckpt = make_ckpt("llama3", shards=2)
    args = ["chat", "--ckpt_dir", str(ckpt), "--max_gen_len", "8", "--temperature", "0", "--dtype", "float32",
            "--device", "cpu"]
    one = subprocess.run([sys.executable, "-m", "llama", *args], cwd=REPO, input="Hello", capture_output=True,
                         text=True, timeout=300)
    two = subprocess.run(torchrun(2) + args, cwd=REPO, input="Hello", capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    assert two.stdout == one.stdout and one.stdout.strip()
    # One process reshards the 2-shard checkpoint and says so; two processes need not.
    assert "Resharding" in one.stderr and "Resharding" not in two.stderr


def test_wrong_world_size_under_torchrun_is_one_message(make_ckpt):
    """3 workers for a model that splits into 1, 2 or 4: every rank fails the
    same way, rank 0 alone says so, once, with no "Resharding" line before it."""
    ckpt = make_ckpt("llama3", shards=2)
    r = subprocess.run(torchrun(3) + ["complete", "--ckpt_dir", str(ckpt), "--prompt", "Hi", "--device", "cpu"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    output = r.stdout + r.stderr
    ours = [line for line in output.splitlines() if "cannot be split into 3 parts" in line]
    assert ours == ["[rank 0] error: running on 3 processes: this model (4 heads, 2 KV heads, dim 64, FFN 192, "
                    "vocab 128256) cannot be split into 3 parts; sizes that work: [1, 2, 4]"], output
    assert "Resharding" not in output
    # torchrun's summary names rank 0, the rank that reported, as the root cause.
    assert output.count("exitcode  : 2") == 1 and "rank      : 0 (local_rank: 0)\n  exitcode  : 2" in output, output
