"""The server on a real socket (uvicorn in a thread): the official openai
client unchanged, concurrent streams sharing the batch, and a client that
disconnects mid-stream freeing its slot."""

import threading
import time

import httpx
import openai
import pytest
import torch

from llama import Llama
from llama.engine.engine import Engine
from llama.server.app import create_app
from server_helpers import live_server, sse_events

MODEL = "tiny-live"


@pytest.fixture(scope="module")
def llama3(make_ckpt):
    ckpt = make_ckpt("llama3")
    return Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=256, max_batch_size=4,
                       device="cpu", dtype="float32")


PROMPTS = [("Hello", 12), ("Tell me a story about a cat", 20), ("One", 5), ("Why is the sky blue?", 16),
           ("a b c d e f g h", 9), ("Numbers: 1 2 3", 14), ("x " * 40, 7), ("Paris", 18), ("Count to ten", 11),
           ("The quick brown fox jumps over the lazy dog", 13), ("?", 6), ("Say yes", 15), ("Llamas " * 12, 10)]


@pytest.fixture(scope="module")
def alone(llama3):
    """Each prompt's greedy answer through the Python API, one at a time."""
    return [llama3.chat_completion([[{"role": "user", "content": p}]], max_gen_len=n, temperature=0)[0]
            ["generation"]["content"] for p, n in PROMPTS]


@pytest.fixture(scope="module")
def server(llama3, alone):
    app = create_app(llama3, MODEL, api_key="k", max_queue=16)
    with live_server(app) as url:
        yield url, app


def test_openai_client_unchanged(server, alone):
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL]
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPTS[0][0]}],
                                       max_tokens=PROMPTS[0][1], temperature=0)
    assert r.choices[0].message.content == alone[0]
    assert r.usage.completion_tokens >= 1 and r.choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPTS[0][0]}],
                                            max_tokens=PROMPTS[0][1], temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == alone[0]
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    text = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=4, temperature=0)
    assert text.choices[0].text and text.object == "text_completion"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=-1)
    assert "temperature" in str(e.value)


def _stream(url, prompt, max_tokens, out, i):
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer k"},
                      timeout=60) as r:
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    out[i] = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])


def _quitter(url):
    """A client that reads two events of a long stream and disconnects."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Go"}], "max_tokens": 100, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer k"},
                      timeout=60) as r:
        lines = r.iter_lines()
        next(lines), next(lines)


def test_concurrent_streams_equal_alone(server, alone):
    url, app = server
    out = [None] * len(PROMPTS)
    threads = [threading.Thread(target=_stream, args=(url, p, n, out, i)) for i, (p, n) in enumerate(PROMPTS)]
    threads[3:3] = [threading.Thread(target=_quitter, args=(url,)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    # 16 clients on 4 slots: most waited in the queue; none was lost or disturbed by the 3 that left
    assert out == alone
    deadline = time.monotonic() + 5
    while app.state.server.worker.inflight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert app.state.server.worker.inflight == 0


def test_disconnect_frees_the_slot(server, monkeypatch):
    url, app = server
    worker = app.state.server.worker
    steps_before = worker.steps
    step = Engine.step

    def slow_step(self):
        time.sleep(0.02)
        return step(self)
    monkeypatch.setattr(Engine, "step", slow_step)  # 200 tokens now take > 4 s
    monkeypatch.setattr(Engine, "_sample", lambda self, rows, logits: torch.full((len(rows),), 9906))  # never stops
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Go on"}], "max_tokens": 200,
            "temperature": 0, "stream": True, "stop": ["never-appears-xyz"]}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer k"},
                      timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert worker.inflight == 1 and worker.running == 1
        left = time.monotonic()
    while worker.inflight and time.monotonic() - left < 3:
        time.sleep(0.01)
    assert worker.inflight == 0 and not worker.engine.running
    assert time.monotonic() - left < 2  # well before the answer could have finished
    assert worker.steps - steps_before < 150
