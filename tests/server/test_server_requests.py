"""Requests that must not hurt the server (issue 25, item 1), in process:
bodies too large to build are refused before anything is built, requests
that could never fit get 400 (429 only for a full queue), malformed tool
schemas and nesting are 400s, metrics labels stay bounded, the
Authorization scheme is case-insensitive, the body's Content-Type is
checked clearly, and `echo` with `logprobs` is OpenAI's legacy definition."""

import json
import time

import pytest
from fastapi.testclient import TestClient  # the server and test extras

from conftest import build_tiny
from llama.server.app import create_app
from llama.server.prometheus import endpoint_label
from llama.server.protocol import MAX_CHOICES, MAX_JSON_DEPTH, MAX_PROMPT_TOKENS, CompletionRequest
from server_helpers import sse_events

MODEL = "tiny"
USER = [{"role": "user", "content": "Hello there"}]
PROMPT = "The sky is"


@pytest.fixture(scope="module")
def llama3(make_ckpt):
    return build_tiny(make_ckpt("llama3"), max_seq_len=256, max_batch_size=2)


@pytest.fixture(scope="module")
def reference(llama3):
    """The Python API's greedy echo with logprobs, before a server owns the engine."""
    [out] = llama3.text_completion([PROMPT], max_gen_len=3, temperature=0, logprobs=True, echo=True)
    return out


@pytest.fixture(scope="module")
def client(llama3, reference):
    # capacity: 2 running rows + 1 queue place
    with TestClient(create_app(llama3, MODEL, max_queue=1)) as c:
        yield c


def error_of(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def complete(client, **body):
    return client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2, **body})


def chat(client, **body):
    return client.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "max_tokens": 2, **body})


# -- sizes: refused before anything is built ----------------------------------------


def test_a_million_prompts_are_refused_before_they_are_built(client):
    huge = {"model": MODEL, "prompt": [[1]] * 1_500_000}
    parsed = json.loads(json.dumps(huge))
    t = time.perf_counter()
    with pytest.raises(ValueError) as e:
        CompletionRequest.model_validate(parsed)
    validating = time.perf_counter() - t
    assert "1500000 prompts" in str(e.value) and validating < 1.0  # reads the length only (measured: ~10 us)
    body = json.dumps(huge).encode()
    assert len(body) < 8 << 20  # under the body limit: the size check is what refuses it
    t = time.perf_counter()
    err = error_of(client.post("/v1/completions", content=body, headers={"content-type": "application/json"}), 400)
    print(f"1.5 million prompts refused in {time.perf_counter() - t:.2f} s (json.loads of 7.5 MB included)")
    assert err["param"] == "prompt" and f"at most {MAX_CHOICES}" in err["message"] and "1500000" in err["message"]
    assert len(err["message"]) < 200  # the input is not echoed back
    err = error_of(complete(client, prompt=[1] * (MAX_PROMPT_TOKENS + 1)), 400)
    assert err["param"] == "prompt" and f"at most {MAX_PROMPT_TOKENS}" in err["message"]
    err = error_of(complete(client, prompt=[[1, 2], [1] * (MAX_PROMPT_TOKENS + 1)]), 400)
    assert "prompt 1 has" in err["message"]
    assert client.get("/health").status_code == 200


def test_prompts_times_n_has_a_fixed_maximum(client):
    err = error_of(complete(client, prompt=["a"] * 100, n=2), 400)
    assert err["param"] == "n" and "100 prompts x n=2" in err["message"] and f"at most {MAX_CHOICES}" in err["message"]


def test_requests_that_can_never_fit_get_400_naming_the_field(client):
    err = error_of(chat(client, n=4), 400)  # capacity 3: 2 rows + 1 queue place
    assert err["param"] == "n" and "n=4" in err["message"] and "(3:" in err["message"]
    err = error_of(complete(client, prompt=["a", "b", "c", "d"]), 400)
    assert err["param"] == "prompt" and "4 prompts" in err["message"]
    err = error_of(complete(client, prompt=["a", "b"], n=2), 400)
    assert err["param"] == "n"
    assert chat(client, n=3).status_code == 200  # what fits runs (one choice queues)
    assert complete(client, prompt=["a", "b", "c"]).status_code == 200


# -- tools: every malformed schema or nesting is a 400 --------------------------------


def tools(parameters):
    return [{"type": "function", "function": {"name": "f", "description": "d", "parameters": parameters}}]


@pytest.mark.parametrize("parameters, says", [
    ({"type": "object", "properties": {"a": {"type": "string"}}, "required": 5}, "required must be a list"),
    ({"type": "object", "properties": [1, 2]}, "properties must be an object"),
    ({"type": "object", "properties": {"a": 5}}, "properties.a must be an object"),
    ({"type": "object", "properties": {"a": {"type": 5}}}, "properties.a.type must be a string"),
    ({"type": "object", "properties": {"a": {"description": ["x"]}}}, "properties.a.description"),
    ({"type": "object", "properties": {}, "required": ["b"]}, "'b', which is not in properties"),
    ({"type": "array"}, 'type must be "object"'),
])
def test_malformed_tool_schemas_are_400(client, parameters, says):
    err = error_of(chat(client, tools=tools(parameters)), 400)
    assert err["param"] == "tools.0.function.parameters" and says in err["message"], err


def test_deep_nesting_is_400(client):
    deep = {"type": "object", "properties": {}}
    for _ in range(MAX_JSON_DEPTH + 5):
        deep = {"type": "object", "properties": {"a": deep}}
    err = error_of(chat(client, tools=tools(deep)), 400)
    assert err["param"] == "tools.0.function.parameters" and f"deeper than {MAX_JSON_DEPTH}" in err["message"]
    for depth in (5000, MAX_JSON_DEPTH + 5):
        arguments = '{"a": ' + "[" * depth + "]" * depth + "}"
        call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}
        messages = USER + [{"role": "assistant", "content": None, "tool_calls": [call]},
                           {"role": "tool", "tool_call_id": "c1", "content": "ok"}]
        err = error_of(chat(client, messages=messages, tools=tools({"type": "object", "properties": {}})), 400)
        assert err["param"] == "messages[1].tool_calls[0].function.arguments", err
        assert f"deeper than {MAX_JSON_DEPTH}" in err["message"]
    # A whole body nested 5000 deep: FastAPI's JSON parsing refuses it, with a 400 too.
    body = '{"model": "tiny", "messages": [], "metadata": ' + "[" * 5000 + "]" * 5000 + "}"
    error_of(client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"}), 400)
    assert client.get("/health").status_code == 200


# -- metrics, Authorization, Content-Type ------------------------------------------


def test_metrics_labels_are_route_templates(client):
    for name in ("a", "b", "c/d"):
        error_of(client.get(f"/v1/models/{name}"), 404)
    text = client.get("/metrics").text
    assert 'endpoint="/v1/models/{name}",status="404"' in text
    assert "/v1/models/a" not in text and "/v1/models/c/d" not in text
    assert [endpoint_label(p) for p in ("/v1/completions", "/v1/models/x", "/v1/models/", "/nope", "/v1/x")] == [
        "/v1/completions", "/v1/models/{name}", "other", "other", "other"]


def test_authorization_scheme_is_case_insensitive(llama3, reference):
    with TestClient(create_app(llama3, MODEL, api_key="s3cret")) as c:
        for given in ("Bearer s3cret", "bearer s3cret", "BEARER s3cret", "bEaReR  s3cret "):
            assert c.get("/v1/models", headers={"Authorization": given}).status_code == 200, given
        for given in ("Basic s3cret", "bearer nope", "s3cret", "Bearer"):
            err = error_of(c.get("/v1/models", headers={"Authorization": given}), 401)
            assert err["code"] == "invalid_api_key"


def test_json_without_content_type_is_accepted_and_other_types_refused(client):
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 2}).encode()
    r = client.post("/v1/completions", content=body)
    assert "content-type" not in r.request.headers and r.status_code == 200, r.text
    for declared in ("application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x"):
        err = error_of(client.post("/v1/completions", content=body, headers={"content-type": declared}), 415)
        assert "Content-Type" in err["message"] and "application/json" in err["message"]
    r = client.post("/v1/completions", content=body, headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200


# -- echo with logprobs: OpenAI's legacy definition ------------------------------------


def test_echo_with_logprobs_covers_the_prompt(client, llama3, reference):
    body = complete(client, max_tokens=3, temperature=0, echo=True, logprobs=1).json()
    [choice] = body["choices"]
    lp = choice["logprobs"]
    prompt = llama3.tokenizer.encode(PROMPT, bos=True, eos=False)[1:]  # the BOS the server adds is not echoed
    n = len(prompt) + 3
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    assert lp["tokens"][: len(prompt)] == [llama3.tokenizer.decode([t]) for t in prompt]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # as OpenAI: the first has none
    # The rest equal the Python API's echo (its list starts at the BOS).
    assert lp["token_logprobs"][1:] == pytest.approx(reference["logprobs"][2:], abs=1e-5)
    assert all(len(t) == 1 for t in lp["top_logprobs"][len(prompt):])
    assert choice["text"] == "".join(lp["tokens"]) and choice["text"].startswith(PROMPT)
    assert lp["text_offset"] == [len("".join(lp["tokens"][:k])) for k in range(n)]
    # max_tokens 0: the prompt's logprobs only (how evaluation harnesses score a text)
    lp0 = complete(client, max_tokens=0, echo=True, logprobs=0).json()["choices"][0]["logprobs"]
    assert lp0["token_logprobs"] == lp["token_logprobs"][: len(prompt)]
    assert lp0["top_logprobs"] == [None] * len(prompt)


def test_logprobs_text_offsets_index_the_text(client):
    lp = complete(client, max_tokens=4, temperature=0, logprobs=0).json()["choices"][0]["logprobs"]
    assert lp["text_offset"] == [len("".join(lp["tokens"][:k])) for k in range(len(lp["tokens"]))]
    assert lp["top_logprobs"] == [{}] * len(lp["tokens"])
    with client.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 4,
                                                        "temperature": 0, "logprobs": 0, "echo": True,
                                                        "stream": True}) as r:
        events = sse_events(r.iter_lines())
    assert events[0]["choices"][0]["text"] == PROMPT
    seen, offsets, text = [], [], PROMPT
    for e in events[1:-1]:
        c = e["choices"][0]
        if c["logprobs"]:
            offsets += c["logprobs"]["text_offset"]
            seen.append(len(text))
        text += c["text"]
    assert offsets == seen and offsets[0] == len(PROMPT)  # offsets run on across chunks, after the echo
