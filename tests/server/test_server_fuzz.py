"""Property-based fuzzing (Hypothesis) of the server's request bodies: whatever
JSON a client sends to /v1/chat/completions or /v1/completions, the answer is
a success or an OpenAI-shaped client error, never a 500 or a traceback, and
the server keeps answering. The same style as tests/repo/test_fuzz_inputs.py:
few examples by default, LLAMA_FUZZ_SCALE for a longer run."""

import json
import os

import pytest
from fastapi.testclient import TestClient  # the server and test extras
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import build_tiny
from llama.server.app import create_app

MODEL = "tiny"
SCALE = int(os.environ.get("LLAMA_FUZZ_SCALE", "1"))
FUZZ = settings(max_examples=40 * SCALE, deadline=None, derandomize=SCALE == 1,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
CLIENT_ERRORS = {400, 404, 413, 415, 422, 429}

scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 5), st.integers(), st.floats(allow_nan=False),
                    st.floats(), st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)
roles = st.sampled_from(["system", "user", "assistant", "ipython", "tool", "bogus", ""])
message = st.fixed_dictionaries({"role": roles}, optional={
    "content": st.one_of(st.text(max_size=30), json_values),
    "tool_calls": st.one_of(json_values, st.lists(st.fixed_dictionaries({
        "id": st.text(max_size=5), "type": st.just("function"),
        "function": st.fixed_dictionaries({"name": st.text(max_size=8),
                                           "arguments": st.one_of(st.text(max_size=30), json_values)})}),
        max_size=2)),
    "tool_call_id": json_values, "name": json_values})
tool = st.one_of(json_values, st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": st.text(max_size=8)}, optional={"description": json_values, "parameters": json_values})}))
SAMPLING = {"max_tokens": st.one_of(st.integers(-2, 4), json_values), "temperature": json_values,
            "top_p": json_values, "n": st.one_of(st.integers(-1, 3), json_values), "stop": json_values,
            "stream": st.one_of(st.booleans(), json_values), "seed": json_values, "logprobs": json_values,
            "top_logprobs": json_values, "presence_penalty": json_values, "frequency_penalty": json_values,
            "logit_bias": json_values, "user": json_values}
chat_body = st.fixed_dictionaries({"model": st.one_of(st.just(MODEL), json_values),
                                   "messages": st.one_of(st.lists(message, max_size=3), json_values)},
                                  optional={**SAMPLING, "tools": st.one_of(st.lists(tool, max_size=2), json_values),
                                            "tool_choice": json_values, "response_format": json_values})
completion_body = st.fixed_dictionaries({"model": st.one_of(st.just(MODEL), json_values),
                                         "prompt": st.one_of(st.text(max_size=30), st.lists(st.integers(-1, 300),
                                                                                            max_size=5), json_values)},
                                        optional={**SAMPLING, "echo": json_values, "suffix": json_values,
                                                  "best_of": json_values})


@pytest.fixture(scope="module")
def client(make_ckpt):
    gen = build_tiny(make_ckpt("llama3"), max_seq_len=64, max_batch_size=4)
    with TestClient(create_app(gen, MODEL, max_queue=8)) as c:  # a server error raises here: the test fails
        yield c


def post(client, path, body):
    """`body` as Python's json writes it: NaN and Infinity included, which standard JSON has not."""
    return client.post(path, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})


def check(r):
    assert r.status_code == 200 or r.status_code in CLIENT_ERRORS, (r.status_code, r.text[:500])
    if r.status_code != 200:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"]


@FUZZ
@given(body=chat_body)
def test_chat_bodies_get_an_answer_or_a_client_error(client, body):
    check(post(client, "/v1/chat/completions", body))


@FUZZ
@given(body=completion_body)
def test_completion_bodies_get_an_answer_or_a_client_error(client, body):
    check(post(client, "/v1/completions", body))


@FUZZ
@given(body=json_values)
def test_any_json_gets_a_client_error(client, body):
    for path in ("/v1/chat/completions", "/v1/completions"):
        check(post(client, path, body))


def test_the_server_still_answers_after_the_fuzzing(client):
    r = client.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 2, "temperature": 0,
                                                  "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
