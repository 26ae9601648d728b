"""The server's handler layer without HTTP: `chat_completion` and `completion`
called with a validated request and a `ServerState`, and the one function
that turns OpenAI's sampling fields and defaults into our SamplingParams."""

import asyncio
import time

import pytest
import torch
from pydantic import ValidationError

from conftest import build_tiny
from llama.engine.engine import Engine
from llama.server import serving
from llama.server.protocol import APIError, ChatCompletionRequest, CompletionRequest
from llama.server.serving import ServerState
from llama.server.serving_chat import chat_completion
from llama.server.serving_completions import completion, prompt_tokens
from llama.server.translate import OPENAI_DEFAULTS, sampling_params
from server_helpers import sse_events

MODEL = "tiny"
USER = [{"role": "user", "content": "Hello there"}]


def chat_req(**body) -> ChatCompletionRequest:
    return ChatCompletionRequest(**{"model": MODEL, "messages": USER, **body})


def text_req(**body) -> CompletionRequest:
    return CompletionRequest(**{"model": MODEL, "prompt": "The sky is", **body})


# -- the OpenAI defaults, decided once ----------------------------------------


def test_sampling_params_apply_openai_defaults():
    [p] = sampling_params(chat_req())
    assert (p.temperature, p.top_p) == (1.0, 1.0) == (OPENAI_DEFAULTS["temperature"], OPENAI_DEFAULTS["top_p"])
    assert (p.presence_penalty, p.frequency_penalty, p.stop, p.seed) == (0.0, 0.0, (), None)
    assert p.max_tokens is None and not p.logprobs and p.top_logprobs == 0  # a chat answer: until the context is full
    [p] = sampling_params(text_req())
    assert p.max_tokens == 16 and (p.temperature, p.top_p) == (1.0, 1.0)
    [p] = sampling_params(text_req(max_tokens=None))  # an explicit null: until the context is full
    assert p.max_tokens is None
    [p] = sampling_params(text_req(n=None))
    assert p.max_tokens == 16


def test_sampling_params_take_the_clients_values():
    ps = sampling_params(chat_req(temperature=0.0, top_p=0.5, n=3, seed=7, stop="END", presence_penalty=0.5,
                                  frequency_penalty=-1.0, max_tokens=50, max_completion_tokens=5,
                                  logprobs=True, top_logprobs=2))
    assert [p.seed for p in ps] == [7, 8, 9]  # choice i: seed + i
    p = ps[0]
    assert (p.temperature, p.top_p, p.stop, p.presence_penalty, p.frequency_penalty) == (0.0, 0.5, ("END",), 0.5, -1.0)
    assert p.max_tokens == 5  # max_completion_tokens wins over max_tokens
    assert p.logprobs and p.top_logprobs == 2
    assert [p.seed for p in sampling_params(chat_req(n=2))] == [None, None]
    [p] = sampling_params(text_req(logprobs=0, max_tokens=3))
    assert p.logprobs and p.top_logprobs == 0 and p.max_tokens == 3
    [p] = sampling_params(text_req(logprobs=3))
    assert p.logprobs and p.top_logprobs == 3


@pytest.mark.parametrize("body, param", [
    (dict(temperature=-1.0), "temperature"), (dict(top_p=-0.5), "top_p"), (dict(presence_penalty=3.0), "presence_penalty"),
    (dict(logit_bias={"1": 2.0}), "logit_bias"), (dict(top_logprobs=2), "top_logprobs"),
])
def test_sampling_params_refuse_bad_values_naming_the_field(body, param):
    with pytest.raises(APIError) as e:
        sampling_params(chat_req(**body))
    assert e.value.status == 400 and e.value.param == param and param in e.value.message


def test_n_is_checked_by_the_protocol():
    for n in (0, 17):
        with pytest.raises(ValidationError):
            chat_req(n=n)
    with pytest.raises(ValidationError):
        chat_req(n="2")  # strict types: no silent conversion


# -- the handlers, with a tiny model ------------------------------------------


@pytest.fixture(scope="module")
def llama3(make_ckpt):
    return build_tiny(make_ckpt("llama3"), max_seq_len=256, max_batch_size=2)


@pytest.fixture(scope="module")
def reference(llama3):
    """Greedy answers of the Python API, computed before the worker owns the engine."""
    chat = llama3.chat_completion([USER], max_gen_len=8, temperature=0)[0]["generation"]["content"]
    text = llama3.text_completion(["The sky is"], max_gen_len=6, temperature=0)[0]["generation"]
    return {"chat": chat, "complete": text}


@pytest.fixture(scope="module")
def state(llama3, reference):
    s = ServerState.build(llama3, MODEL, max_queue=0)
    s.worker.start()
    yield s
    s.worker.stop()


def run(coro):
    return asyncio.run(coro)


async def lines_of(stream):
    return [line async for chunk in stream for line in chunk.split("\n")]


def settled(state):
    deadline = time.monotonic() + 5
    while state.worker.inflight and time.monotonic() < deadline:
        time.sleep(0.01)
    return state.worker.inflight == 0


def test_chat_handler_answers_without_http(state, reference):
    body = run(chat_completion(state, chat_req(max_tokens=8, temperature=0)))
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    [choice] = body["choices"]
    assert choice["message"]["content"] == reference["chat"] and choice["finish_reason"] in ("stop", "length")
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    assert 'llama_requests_total{endpoint="/v1/chat/completions",status="200"}' in state.metrics.text().decode()


def test_chat_handler_streams_sse_lines(state, reference):
    async def go():
        stream = await chat_completion(state, chat_req(max_tokens=8, temperature=0, stream=True,
                                                       stream_options={"include_usage": True}))
        return await lines_of(stream)
    events = sse_events(run(go()))
    assert events[-1] == "[DONE]" and events[-2]["choices"] == []
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2]) == reference["chat"]
    assert settled(state)


def test_completion_handler_echo_and_n(state, reference):
    body = run(completion(state, text_req(max_tokens=6, temperature=0, echo=True, n=2)))
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert [c["text"] for c in body["choices"]] == ["The sky is" + reference["complete"]] * 2
    assert body["usage"]["prompt_tokens"] == len(prompt_tokens("The sky is", state.tokenizer)[0])  # once, not per choice


def test_handlers_raise_api_errors_before_submitting(state):
    with pytest.raises(APIError) as e:
        run(chat_completion(state, chat_req(model="gpt-4")))
    assert e.value.status == 404 and e.value.code == "model_not_found"
    with pytest.raises(APIError) as e:
        run(chat_completion(state, chat_req(n=3, max_tokens=2)))  # 2 slots, no queue: it can never fit
    assert e.value.status == 400 and e.value.param == "n" and "can hold at once" in e.value.message
    with pytest.raises(APIError) as e:
        run(completion(state, text_req(suffix="!")))
    assert e.value.param == "suffix"
    with pytest.raises(APIError) as e:
        run(completion(state, text_req(prompt=[])))
    assert e.value.param == "prompt"
    assert settled(state)


def test_dropped_stream_and_gone_client_free_their_slots(state, monkeypatch):
    step = Engine.step

    def slow_step(self):
        time.sleep(0.02)
        return step(self)
    monkeypatch.setattr(Engine, "step", slow_step)
    monkeypatch.setattr(Engine, "_sample", lambda self, rows, logits: torch.full((len(rows),), 9906))  # never stops
    monkeypatch.setattr(serving, "DISCONNECT_POLL_S", 0.005)
    long = dict(max_tokens=200, temperature=0, stop=["never-appears-xyz"])

    async def drop_after_two():
        stream = await chat_completion(state, chat_req(stream=True, **long))
        got = [await stream.__anext__(), await stream.__anext__()]
        await stream.aclose()  # what Starlette does when the client goes away
        return got
    assert len(run(drop_after_two())) == 2
    assert settled(state)

    async def gone():
        return True
    with pytest.raises(serving.ClientGone):  # the app answers it quietly: nobody is there to read it
        run(chat_completion(state, chat_req(**long), is_disconnected=gone))
    assert settled(state) and not state.engine.running
