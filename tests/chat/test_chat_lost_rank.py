"""The interactive chat on two nodes (two torchrun launches on 127.0.0.1):
while rank 0 waits at the prompt, the other ranks wait too, for as long as
the user takes; but when a rank dies or hangs, rank 0 exits with the usual
"lost contact" message instead of waiting forever (issue 13)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from dist_helpers import _worker_pid, free_port

pytestmark = pytest.mark.slow


def chat_cmd(ckpt, node, port):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--nnodes", "2",
            "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port),
            "example_chat_completion.py", "--ckpt_dir", str(ckpt), "--tokenizer_path", str(ckpt / "tokenizer.model"),
            "--interactive", "--temperature", "0", "--max_gen_len", "4", "--max_seq_len", "512",
            "--max_batch_size", "1", "--device", "cpu"]


# LLAMA_DIST_TIMEOUT: how long rank 0 waits for a hung rank. Short, so the hung case ends soon, yet
# twice the user's 3 s pause below, which spans two heartbeats (a quarter of it, llama/chat/rank0_input.py).
TIMEOUT_S = 6


@pytest.mark.parametrize("how, bound", [("killed", 30), ("hung", 40)])
def test_lost_rank_while_rank0_waits_at_the_prompt(how, bound, make_ckpt, tmp_path):
    env = {**os.environ, "LLAMA_DIST_TIMEOUT": str(TIMEOUT_S)}
    ckpt, port = make_ckpt("llama3", shards=2), free_port()
    out = tmp_path / "rank0.txt"
    with open(out, "w") as sink:
        procs = [subprocess.Popen(chat_cmd(ckpt, n, port), cwd=REPO, env=env, text=True, start_new_session=True,
                                  stdin=subprocess.PIPE if n == 0 else subprocess.DEVNULL,
                                  stdout=sink if n == 0 else subprocess.DEVNULL, stderr=subprocess.STDOUT)
                 for n in (0, 1)]
        workers = []
        try:
            deadline = time.time() + 120
            while out.read_text().count("> User: ") < 2:  # one answered line, then waiting for the next
                if time.time() > deadline or procs[0].poll() is not None:
                    pytest.fail("the chat did not start:\n" + out.read_text())
                if "Chatting" in out.read_text() and not workers:
                    procs[0].stdin.write("Hello\n")
                    procs[0].stdin.flush()
                    workers = [_worker_pid(p.pid) for p in procs]
                time.sleep(0.2)
            if how == "hung":  # the user thinks: nothing ends while every rank lives (one variant shows it)
                time.sleep(3)
            assert procs[0].poll() is None and procs[1].poll() is None, out.read_text()
            start = time.time()
            os.kill(workers[1], signal.SIGKILL if how == "killed" else signal.SIGSTOP)
            procs[0].wait(timeout=bound)
            elapsed = time.time() - start
        finally:
            for pid in workers + [p.pid for p in procs]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for p in procs:
                p.wait()
    output = out.read_text()
    assert procs[0].returncode != 0
    assert "[rank 0] error: lost contact with another rank" in output, output
    # The worker exits with the CLI's code for lost contact (torchrun then prints its own report).
    assert "exitcode  : 3" in output and "Fatal Python error" not in output, output
    assert elapsed < bound
    if how == "hung":
        assert elapsed > TIMEOUT_S - 1  # the configured timeout, not less
