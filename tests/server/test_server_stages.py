"""`llama serve --pipeline_stages 2` under torchrun: concurrent clients get
one process's tokens (greedy and seeded), clients that leave free their rows
on every stage, SIGTERM stops every rank with exit 0; and a lost stage-1 node
fails the request in flight, turns /health to 503 naming the lost rank, and
ends the server within LLAMA_DIST_TIMEOUT."""

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from conftest import REPO, build_tiny
from engine_helpers import FOUR_LAYERS
from server_helpers import free_port, sse_events, stream_in_background, wait_healthy

pytestmark = pytest.mark.slow

# Idle steps every 2 s (a quarter of it), and a lost rank's server lingers as long before it exits.
TIMEOUT_S = 8
ENV = {"LLAMA_DIST_TIMEOUT": str(TIMEOUT_S)}
FLAGS = ["--dtype", "float32", "--max_batch_size", "2", "--model_name", "tiny", "--threads", "1",
         "--pipeline_stages", "2"]


def launch(ckpt, port, max_seq_len, node=None, master_port=None):
    """torchrun with 2 processes on one node, or node `node` of two with one process each."""
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if node is None:
        cmd += ["--nproc_per_node", "2", "--master_port", str(free_port())]
    else:
        cmd += ["--nproc_per_node", "1", "--nnodes", "2", "--node_rank", str(node), "--master_addr", "127.0.0.1",
                "--master_port", str(master_port)]
    cmd += ["-m", "llama", "serve", "--ckpt_dir", str(ckpt), "--port", str(port), "--max_seq_len", str(max_seq_len),
            *FLAGS]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **ENV})


def worker_pid(launcher_pid: int) -> int:
    """The pid of a torchrun launcher's (only or first) worker."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        children = subprocess.run(["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True).stdout.split()
        if children:
            return int(children[0])
        time.sleep(0.05)
    raise AssertionError("no worker")


def rank_pid(launcher_pid: int, rank: int) -> int:
    for _ in range(100):
        for pid in subprocess.run(["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True).stdout.split():
            if f"RANK={rank}".encode() in open(f"/proc/{pid}/environ", "rb").read().split(b"\0"):
                return int(pid)
        time.sleep(0.05)
    raise AssertionError(f"no worker with RANK={rank}")


# (content, max_tokens, sampling): greedy, and seeded sampling (each row's generator: batch-independent).
ASKS = [("Hello", 8, {}), ("Why is the sky blue?", 12, {"temperature": 0.8, "seed": 1}), ("One two three", 5, {}),
        ("a b c d e f g", 9, {"temperature": 1.0, "top_p": 0.9, "seed": 7}), ("?", 4, {}),
        ("Tell me a story", 16, {"temperature": 0.7, "seed": 3}), ("x " * 20, 6, {})]


def body(content, n, sampling, stream):
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": n, "temperature": 0,
            "stream": stream, **sampling}


def one_process(ckpt):
    """Each ask answered alone by the same app in this process (one process's tokens)."""
    from llama.server.app import create_app

    with TestClient(create_app(build_tiny(ckpt, max_seq_len=128, max_batch_size=2), "tiny")) as c:
        return [c.post("/v1/chat/completions", json=body(*ask, False)).json()["choices"][0]["message"]["content"]
                for ask in ASKS]


def metric(url, name):
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def test_two_stages_serve_concurrent_clients_as_one_process(make_ckpt):
    ckpt = make_ckpt("llama3", **FOUR_LAYERS)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = launch(ckpt, port, 128)
    try:
        expected = one_process(ckpt)  # while the server loads
        wait_healthy(proc, url)
        got = [None] * len(ASKS)

        def ask(i):
            if i % 2:  # half of them streamed
                with httpx.stream("POST", f"{url}/v1/chat/completions", json=body(*ASKS[i], True), timeout=120) as r:
                    events = sse_events(r.iter_lines())
                got[i] = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
            else:
                r = httpx.post(f"{url}/v1/chat/completions", json=body(*ASKS[i], False), timeout=120)
                got[i] = r.json()["choices"][0]["message"]["content"]

        def quit_early():  # its rows must be freed on both stages, or the later clients find no slot there
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body("Go", 100, {}, True), timeout=120) as r:
                lines = r.iter_lines()
                next(lines), next(lines)
        quitters = [threading.Thread(target=quit_early) for _ in range(3)]
        for t in quitters:
            t.start()
        askers = [threading.Thread(target=ask, args=(i,)) for i in range(len(ASKS))]
        for t in askers:
            t.start()
        for t in quitters + askers:
            t.join(120)
        assert got == expected  # 10 clients on 2 slots across 2 stages: none lost or disturbed
        deadline = time.monotonic() + 10
        while metric(url, "llama_inflight_requests") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metric(url, "llama_inflight_requests") == 0 and metric(url, "llama_running_requests") == 0
        r = httpx.post(f"{url}/v1/chat/completions", json=body(*ASKS[1], False), timeout=60)
        assert r.json()["choices"][0]["message"]["content"] == expected[1]  # seeded: the same again
        os.kill(rank_pid(proc.pid, 0), signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out  # stage 1 left follow() and both ranks exited cleanly
    finally:
        proc.kill()


def test_a_lost_stage_node_is_named_and_the_server_exits(make_ckpt):
    """Two "nodes" (two torchrun launches), one stage each: a single-node
    launch would stop rank 0 itself as soon as rank 1 dies."""
    ckpt = make_ckpt("llama3", **FOUR_LAYERS)
    port, master = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    nodes = [launch(ckpt, port, 1024, node=n, master_port=master) for n in (0, 1)]
    try:
        wait_healthy(nodes[0], url)
        stage1 = worker_pid(nodes[1].pid)
        t, got = stream_in_background(url, body("Hello", 1000, {}, True))
        killed = time.monotonic()
        os.kill(stage1, signal.SIGKILL)
        health = None
        while nodes[0].poll() is None and time.monotonic() < killed + 2 * TIMEOUT_S:
            try:
                r = httpx.get(f"{url}/health", timeout=1)
                if r.status_code == 503:
                    health = r.json()
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        out, _ = nodes[0].communicate(timeout=2 * TIMEOUT_S)
        gone = time.monotonic() - killed
        t.join(10)
        assert nodes[0].returncode != 0, out
        assert gone < TIMEOUT_S + 2, (gone, out)  # no hang: well within the distributed timeout
        lost = "lost rank 1 (stage 1 of 2, host "
        events = got["events"]
        assert events[-1] == "[DONE]" and lost in events[-2]["error"]["message"], events[-2:]
        assert health is not None and health["status"] == "error", health
        assert lost in health["error"]["message"] and "whose heartbeat stopped" in health["error"]["message"]
        assert "[rank 0] error: lost contact with another rank: " + lost in out, out
    finally:
        for p in nodes:
            p.kill()
            p.communicate()
