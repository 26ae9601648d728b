"""`llama serve` as users start it: a subprocess on a free port, one process
or two torchrun ranks; SIGTERM lets the running request finish and exits 0;
a lost rank makes the server answer 503 / exit with the distributed error."""

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from conftest import REPO
from llama import Llama
from server_helpers import free_port, sse_events, stream_in_background, wait_healthy

pytestmark = pytest.mark.slow


# Under torchrun an idle server still steps every min(5 s, LLAMA_DIST_TIMEOUT / 4) so that the other ranks,
# waiting in follow(), stay within the timeout (llama/cli/serve.py). The torchrun tests set the timeout to
# 8 s: idle steps every 2 s, so waiting out an idle step, or noticing a lost rank at the next one, is quick.
TORCHRUN_ENV = {"LLAMA_DIST_TIMEOUT": "8"}
IDLE_STEP_S = 2.0


def serve_cmd(ckpt, port, nproc=None, *extra):
    args = ["-m", "llama", "serve", "--ckpt_dir", str(ckpt), "--port", str(port), "--dtype", "float32",
            "--max_seq_len", "128", "--max_batch_size", "2", "--model_name", "tiny", "--threads", "1", *extra]
    if nproc is None:
        return [sys.executable] + args
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port())] + args


def start(cmd, env=None):
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})


def greedy(ckpt, asks):
    """Each (content, max_tokens) answered alone by one process."""
    g = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=128, max_batch_size=1,
                    device="cpu", dtype="float32")
    return [g.chat_completion([[{"role": "user", "content": c}]], max_gen_len=n, temperature=0)[0]
            ["generation"]["content"] for c, n in asks]


def chat(url, content, n, **kw):
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": n, "temperature": 0}
    return httpx.post(f"{url}/v1/chat/completions", json={**body, **kw}, timeout=60)


def test_sigterm_finishes_the_running_request_and_exits_0(make_ckpt):
    ckpt = make_ckpt("llama3")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(serve_cmd(ckpt, port), env={"LLAMA_API_KEY": "k"})
    try:
        wait_healthy(proc, url)
        assert httpx.get(f"{url}/v1/models", timeout=5).status_code == 401  # LLAMA_API_KEY protects it
        headers = {"Authorization": "Bearer k"}
        assert chat(url, "Hello", 8).status_code == 401
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 60,
                "temperature": 0, "stream": True}
        t, got = stream_in_background(url, body, headers)
        proc.send_signal(signal.SIGTERM)
        t.join(60)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert got["events"][-1] == "[DONE]"  # the running request was answered in full
    finally:
        proc.kill()


def test_sigterm_past_the_shutdown_timeout_ends_the_stream_with_an_error_and_done(make_ckpt):
    ckpt = make_ckpt("llama3")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(serve_cmd(ckpt, port, None, "--max_seq_len", "1024", "--shutdown_timeout", "0.2"))
    try:
        wait_healthy(proc, url)
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 1000,
                "temperature": 1.0, "seed": 1, "stream": True}
        t, got = stream_in_background(url, body)
        proc.send_signal(signal.SIGTERM)
        t.join(60)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        events = got["events"]
        assert events[-1] == "[DONE]", events[-3:]
        err = events[-2]["error"]  # the stream was cut by the drain's end, and says so
        assert "shutting down" in err["message"] and set(err) == {"message", "type", "param", "code"}
        assert len(events) < 900
    finally:
        proc.kill()


def test_torchrun_two_ranks_serve_and_shut_down(make_ckpt):
    ckpt = make_ckpt("llama3", shards=2)
    # 13 clients with different prompt lengths and max_tokens, and 3 that disconnect mid-stream: 16 at once.
    asks = [("Hello", 8), ("Why is the sky blue?", 12), ("One two three", 5), ("a b c d e f g", 9), ("?", 4),
            ("Tell me a story about a llama", 16), ("Paris", 7), ("x " * 30, 6), ("Count to ten", 11),
            ("The quick brown fox", 10), ("Say yes", 3), ("Numbers 1 2 3 4", 14), ("Why?", 8)]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(serve_cmd(ckpt, port, 2), env=TORCHRUN_ENV)
    try:
        expected = greedy(ckpt, asks)  # while the server loads
        wait_healthy(proc, url)
        r = chat(url, "Hello", 8)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == expected[0]  # MP=2 equals one process
        time.sleep(1.5 * IDLE_STEP_S)  # longer than an idle step: rank 1 keeps following
        got = [None] * len(asks)

        def ask(i):
            body = {"model": "tiny", "messages": [{"role": "user", "content": asks[i][0]}], "max_tokens": asks[i][1],
                    "temperature": 0, "stream": True}
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
                events = sse_events(r.iter_lines())
            got[i] = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])

        def quit_early():
            body = {"model": "tiny", "messages": [{"role": "user", "content": "Go"}], "max_tokens": 100, "stream": True}
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
                lines = r.iter_lines()
                next(lines), next(lines)
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
        threads[2:2] = [threading.Thread(target=quit_early) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert got == expected  # 16 clients on 2 slots across the two ranks: none lost or disturbed
        rank0 = _worker(proc.pid, "0")
        os.kill(rank0, signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out  # rank 1 left follow() and both exited cleanly
    finally:
        proc.kill()


def test_torchrun_lost_rank_gives_503_and_exits(make_ckpt):
    ckpt = make_ckpt("llama3", shards=2)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(serve_cmd(ckpt, port, 2), env=TORCHRUN_ENV)
    try:
        wait_healthy(proc, url)
        os.kill(_worker(proc.pid, "1"), signal.SIGKILL)
        out, _ = proc.communicate(timeout=60)  # noticed at the next idle step (within IDLE_STEP_S), never a hang
        assert proc.returncode != 0
        assert "lost contact with another rank" in out, out
    finally:
        proc.kill()


def _worker(launcher_pid: int, rank: str) -> int:
    """The pid of torchrun's worker with RANK=rank."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        children = subprocess.run(["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True).stdout.split()
        for pid in map(int, children):
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            if f"RANK={rank}".encode() in env:
                return pid
        time.sleep(0.1)
    raise AssertionError(f"no worker with RANK={rank}")


def test_bad_flags_fail_before_loading_and_llama_does_not_import_fastapi(make_ckpt, tmp_path):
    r = subprocess.run([sys.executable, "-m", "llama", "serve", "--ckpt_dir", str(tmp_path), "--port", "70000"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--port must be in 1..65535, got 70000" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-c", "import sys, llama, llama.cli.main; from llama import Llama, Engine; "
                        "llama.cli.main.build_parser(); print('fastapi' in sys.modules, 'uvicorn' in sys.modules)"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["False", "False"], r.stderr


def test_port_in_use_is_an_error(make_ckpt):
    import socket

    ckpt = make_ckpt("llama3")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = subprocess.run(serve_cmd(ckpt, s.getsockname()[1]), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "address already in use" in (r.stdout + r.stderr).lower()
