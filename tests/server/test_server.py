"""The OpenAI-compatible server in process (FastAPI's TestClient): every
endpoint, the SSE format, sampling fields, tool calls and every error status.
Greedy answers through the server equal the Python API's for the same input."""

import json

import pytest
import torch
from fastapi.testclient import TestClient  # the server and test extras

from conftest import build_tiny
from llama.engine.engine import Engine
from llama.server.app import create_app
from server_helpers import sse_events

MODEL = "tiny"
TAG, EOM, EOT = 128010, 128008, 128009
USER = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def llama3(make_ckpt):
    return build_tiny(make_ckpt("llama3"), max_seq_len=512, max_batch_size=2)


@pytest.fixture(scope="module")
def reference(llama3):
    """Greedy answers of the Python API, computed before any server owns the engine."""
    chat = llama3.chat_completion([USER], max_gen_len=8, temperature=0)[0]["generation"]["content"]
    text = llama3.text_completion(["The sky is", "One two"], max_gen_len=6, temperature=0)
    return {"chat": chat, "complete": [t["generation"] for t in text]}


@pytest.fixture(scope="module")
def client(llama3, reference):
    with TestClient(create_app(llama3, MODEL, max_queue=0)) as c:
        yield c


def chat(client, **body):
    return client.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, **body})


def error_of(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_models_health_metrics(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == MODEL
    assert client.get(f"/v1/models/{MODEL}").json()["object"] == "model"
    assert client.get("/health").json()["status"] == "ok"
    chat(client, max_tokens=2, temperature=0)
    text = client.get("/metrics").text
    for name in ("llama_requests_total", "llama_prompt_tokens_total", "llama_generated_tokens_total",
                 "llama_queue_length", "llama_time_to_first_token_seconds_bucket",
                 "llama_time_per_output_token_seconds_bucket"):
        assert name in text
    assert 'llama_requests_total{endpoint="/v1/chat/completions",status="200"}' in text


def test_chat_greedy_equals_python_api(client, reference):
    r = chat(client, max_tokens=8, temperature=0)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    [choice] = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == reference["chat"]
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens"] <= 8


def test_chat_stream_sse_format(client, reference):
    with client.stream("POST", "/v1/chat/completions",
                       json={"model": MODEL, "messages": USER, "max_tokens": 8, "temperature": 0, "stream": True,
                             "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] >= 1
    assert all(c["object"] == "chat.completion.chunk" and c["usage"] is None for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == reference["chat"]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_completions_string_and_list(client, reference):
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": ["The sky is", "One two"], "max_tokens": 6,
                                             "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion"
    assert [c["text"] for c in body["choices"]] == reference["complete"]
    one = client.post("/v1/completions", json={"model": MODEL, "prompt": "The sky is", "max_tokens": 6,
                                               "temperature": 0, "echo": True}).json()
    assert one["choices"][0]["text"] == "The sky is" + reference["complete"][0]
    with client.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": "One two", "max_tokens": 6,
                                                        "temperature": 0, "stream": True}) as r:
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == reference["complete"][1]
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_seed_n_and_reproducibility(client):
    body = dict(max_tokens=6, temperature=1.0, seed=123, n=2)
    a, b = chat(client, **body).json(), chat(client, **body).json()
    assert [c["index"] for c in a["choices"]] == [0, 1]
    assert [c["message"]["content"] for c in a["choices"]] == [c["message"]["content"] for c in b["choices"]]
    # n requests use seeds seed, seed+1: the second choice is the first one of seed+1
    c = chat(client, max_tokens=6, temperature=1.0, seed=124).json()
    assert c["choices"][0]["message"]["content"] == a["choices"][1]["message"]["content"]


def test_stop_and_max_completion_tokens(client, reference):
    full = chat(client, max_tokens=8, temperature=0).json()["choices"][0]["message"]["content"]
    assert len(full) > 2
    stop = full[2:4]
    cut = chat(client, max_tokens=8, temperature=0, stop=[stop]).json()["choices"][0]
    assert cut["message"]["content"] == full[: full.index(stop)] and cut["finish_reason"] == "stop"
    short = chat(client, max_completion_tokens=2, max_tokens=50, temperature=0).json()
    assert short["usage"]["completion_tokens"] <= 2


def test_logprobs(client):
    body = chat(client, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"]
    for item in content:
        assert item["logprob"] <= 0 and len(item["top_logprobs"]) == 2
        assert item["top_logprobs"][0]["logprob"] >= item["logprob"] - 1e-5  # greedy: the best one
    text = client.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 3, "temperature": 0,
                                                "logprobs": 1}).json()
    lp = text["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 3


def test_penalties_are_accepted_and_checked(client):
    assert chat(client, max_tokens=3, frequency_penalty=1.0, presence_penalty=0.5).status_code == 200
    err = error_of(chat(client, presence_penalty=3.0), 400)
    assert "presence_penalty" in err["message"] and err["param"] == "presence_penalty"


def test_errors(client, llama3):
    err = error_of(client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert "JSON" in err["message"]
    err = error_of(chat(client, temperature="hot"), 400)
    assert err["param"] == "temperature"
    err = error_of(chat(client, max_tokenz=3), 400)
    assert "max_tokenz" in err["message"]
    err = error_of(client.post("/v1/chat/completions", json={"model": MODEL}), 400)
    assert err["param"] == "messages"
    err = error_of(client.post("/v1/chat/completions", json={"model": "gpt-4", "messages": USER}), 404)
    assert err["code"] == "model_not_found" and "gpt-4" in err["message"]
    long = [{"role": "user", "content": "word " * 600}]
    err = error_of(client.post("/v1/chat/completions", json={"model": MODEL, "messages": long}), 400)
    assert "tokens" in err["message"] and "max_seq_len=512" in err["message"]
    assert err["code"] == "context_length_exceeded"
    err = error_of(client.post("/v1/completions", json={"model": MODEL, "prompt": "x " * 600}), 400)
    assert "tokens" in err["message"]
    err = error_of(chat(client, messages=[{"role": "assistant", "content": "hi"}]), 400)
    assert "cannot follow" in err["message"] and err["param"] == "messages"
    error_of(client.get("/v1/nothing"), 404)


def test_429_when_slots_and_queue_are_full(client, monkeypatch):
    # max_batch_size 2 and max_queue 0: three choices at once can never fit (400, see
    # test_server_requests.py); two requests already in flight fill it (429).
    import threading
    import time

    from llama.engine.engine import Request
    from llama.engine.sampling import SamplingParams

    worker = client.app.state.server.worker
    release, step = threading.Event(), Engine.step
    monkeypatch.setattr(Engine, "step", lambda self: (release.wait(10), step(self))[1])
    handles = worker.submit([Request((1, 2, 3), SamplingParams(max_tokens=4))] * 2, [lambda e, err: None] * 2)
    r = chat(client, n=1, max_tokens=2)
    err = error_of(r, 429)
    assert r.headers["retry-after"] == "1" and "busy" in err["message"]
    worker.cancel(handles)
    release.set()
    deadline = time.monotonic() + 10
    while worker.inflight and time.monotonic() < deadline:
        time.sleep(0.01)
    monkeypatch.undo()
    assert error_of(chat(client, n=3, max_tokens=2), 400)["param"] == "n"
    assert chat(client, n=2, max_tokens=2).status_code == 200  # and nothing was left behind


def test_api_key_and_body_limit(llama3):
    app = create_app(llama3, MODEL, api_key="s3cret", max_body=2000)
    with TestClient(app) as c:
        assert c.get("/health").status_code == 200  # for load balancers: no key
        err = error_of(c.get("/v1/models"), 401)
        assert "Authorization: Bearer" in err["message"]
        error_of(c.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401)
        ok = {"Authorization": "Bearer s3cret"}
        assert c.get("/v1/models", headers=ok).status_code == 200
        big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 5000}]}
        err = error_of(c.post("/v1/chat/completions", json=big, headers=ok), 413)
        assert "2000 bytes" in err["message"]


@pytest.fixture
def script(monkeypatch):
    """script(rows): the i-th request submitted writes rows[i], one token per step."""
    def use(rows):
        order = {}

        def sample(self, seqs, logits):
            return torch.tensor([rows[order.setdefault(s.id, len(order))][len(s.tokens)] for s in seqs])
        monkeypatch.setattr(Engine, "_sample", sample)
    return use


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "the city"}},
                   "required": ["city"]}}}]


def test_tool_call_round_trip(client, llama3, script):
    tok = llama3.tokenizer
    call = [TAG] + tok.encode('{"name": "get_weather", "parameters": {"city": "Paris"}}', bos=False, eos=False)
    answer = tok.encode("It is sunny.", bos=False, eos=False)
    script([call + [EOM], answer + [EOT], call + [EOM]])
    ask = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": ask, "tools": TOOLS, "max_tokens": 40})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    [tc] = choice["message"]["tool_calls"]
    assert tc["type"] == "function" and tc["function"]["name"] == "get_weather"
    assert json.loads(tc["function"]["arguments"]) == {"city": "Paris"}
    # The result goes back as role "tool"; the model answers in text.
    back = ask + [{"role": "assistant", "content": None, "tool_calls": [tc]},
                  {"role": "tool", "tool_call_id": tc["id"], "content": "sunny, 24 C"}]
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": back, "tools": TOOLS, "max_tokens": 40})
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == "It is sunny." and choice["finish_reason"] == "stop"
    assert "tool_calls" not in choice["message"]
    # Streaming: the call comes as a tool_calls delta, then finish_reason tool_calls.
    with client.stream("POST", "/v1/chat/completions",
                       json={"model": MODEL, "messages": ask, "tools": TOOLS, "max_tokens": 40, "stream": True}) as s:
        events = sse_events(s.iter_lines())
    deltas = [e["choices"][0] for e in events[:-1]]
    calls = [d["delta"]["tool_calls"] for d in deltas if "tool_calls" in d["delta"]]
    assert calls[0][0]["function"]["name"] == "get_weather" and calls[0][0]["index"] == 0
    assert deltas[-1]["finish_reason"] == "tool_calls"


def test_tools_stream_plain_answers_as_they_come(client, llama3, script):
    tok = llama3.tokenizer
    answer = tok.encode("It is sunny in Paris today.", bos=False, eos=False)
    script([answer + [EOT]])
    body = {"model": MODEL, "messages": USER, "tools": TOOLS, "max_tokens": 40, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as s:
        events = sse_events(s.iter_lines())
    deltas = [e["choices"][0]["delta"] for e in events[1:-1]]
    texts = [d["content"] for d in deltas if d.get("content")]
    assert "".join(texts) == "It is sunny in Paris today." and len(texts) > 3  # streamed, not held back
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_call_gate_holds_back_what_may_be_a_call():
    from llama.server.serving_chat import CallGate as _CallGate

    g = _CallGate(tag=7)
    assert [g.feed(1, t) for t in (" ", "{", '"name"')] == ["", "", ""]
    assert g.rest("") == ""  # a JSON call: nothing of it was sent as text
    g = _CallGate(tag=7)
    assert [g.feed(1, t) for t in ("<fun", "ny", " day")] == ["", "<funny", " day"]
    g = _CallGate(tag=7)
    assert [g.feed(1, "Let me check. "), g.feed(7, ""), g.feed(1, "brave_search")] == ["Let me check. ", "", ""]
    assert g.rest("Let me check. ") == ""


def test_tool_definitions_go_into_the_system_prompt(client, llama3):
    from llama.server.protocol import ChatCompletionRequest
    from llama.server.translate import dialog_of

    req = ChatCompletionRequest(model=MODEL, messages=[{"role": "system", "content": "Be brief."}, *USER], tools=TOOLS)
    system = dialog_of(req, llama3.formatter)[0]
    assert system["role"] == "system" and system["content"].startswith("Environment: ipython")
    assert '"name": "get_weather"' in system["content"] and system["content"].endswith("Be brief.")
    none = ChatCompletionRequest(model=MODEL, messages=USER, tools=TOOLS, tool_choice="none")
    assert dialog_of(none, llama3.formatter)[0] == {"role": "user", "content": "Hello there"}
    err = error_of(chat(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), 400)
    assert err["param"] == "tool_choice"


def test_engine_failure_answers_503(llama3, monkeypatch):
    """A failing engine (under torchrun: a lost rank) fails the waiting requests
    with 503, turns /health to 503 and tells the server to exit."""
    fatal = []
    app = create_app(llama3, MODEL, on_fatal=fatal.append)

    def broken(self):
        raise RuntimeError("Connection reset by peer")
    monkeypatch.setattr(Engine, "step", broken)
    with TestClient(app) as c:
        err = error_of(chat(c, max_tokens=2), 503)
        assert "Connection reset by peer" in err["message"]
        assert c.get("/health").status_code == 503
        error_of(chat(c, max_tokens=2), 503)  # refused at once now
    assert len(fatal) == 1
    monkeypatch.undo()
    for seq in list(llama3.engine.waiting):  # leave the shared engine clean
        llama3.engine.cancel(seq.id)
    llama3.engine.step()
    assert not llama3.engine.has_work()


def test_speculative_decoding_counts_in_metrics(make_ckpt):
    from llama.engine.speculative import Speculator

    gen = build_tiny(make_ckpt("llama3"), max_seq_len=256, max_batch_size=2)
    # The same checkpoint as its own draft (built again: a draft has its own KV cache) proposes every step.
    draft = build_tiny(make_ckpt("llama3"), max_seq_len=256, max_batch_size=2).model
    gen.engine.set_speculation(Speculator.draft(draft, gen.model, 4))
    with TestClient(create_app(gen, MODEL, max_queue=0)) as c:
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "one two three", "max_tokens": 12,
                                            "temperature": 0})
        assert r.status_code == 200, r.text
        text = c.get("/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith("llama_speculative")}
    assert values["llama_speculative_proposed_tokens"] > 0
    assert values["llama_speculative_accepted_tokens"] == values["llama_speculative_proposed_tokens"]
    assert values["llama_speculative_acceptance_rate_count"] == 1
