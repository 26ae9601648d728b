"""SamplingParams validation, the sampling functions, and stop strings."""

import math
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from llama.engine.sampling import (GREEDY_BELOW, SamplingParams, apply_penalties, row_generator, sample_one,
                                   scaled_logits)
from llama.text.stream import StopStrings


@pytest.mark.parametrize("field, value", [
    ("temperature", math.nan), ("temperature", -0.1), ("temperature", math.inf), ("temperature", "hot"),
    ("temperature", True), ("top_p", -1e-9), ("top_p", -1), ("top_p", 1.5), ("top_p", math.nan),
    ("top_k", -1), ("top_k", 2.5), ("min_p", 1.0), ("min_p", -0.1), ("repetition_penalty", 0.0),
    ("repetition_penalty", math.nan), ("presence_penalty", 3.0), ("frequency_penalty", -2.5),
    ("seed", -1), ("seed", 1.5), ("seed", 2**63), ("max_tokens", -1), ("max_tokens", True), ("max_tokens", 1.0),
    ("logprobs", 1), ("top_logprobs", 21), ("top_logprobs", -1), ("stop", [""]), ("stop", [3]),
    ("stop", ["x"] * 17),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"sampling {field}\b"):
        SamplingParams(**{field: value})


def test_defaults_and_normalization():
    p = SamplingParams(stop="END")
    assert p.stop == ("END",) and not p.greedy and not p.has_penalties
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(top_logprobs=2).wants_logprobs


def test_greedy_is_decided_by_the_temperature_floor():
    for t in (0, 1e-300, 1e-45, GREEDY_BELOW / 2):
        p = SamplingParams(temperature=t)
        assert p.greedy and p.argmax_only and row_generator(p, 1, "cpu") is None
    assert not SamplingParams(temperature=GREEDY_BELOW).greedy
    assert isinstance(row_generator(SamplingParams(temperature=GREEDY_BELOW), 1, "cpu"), torch.Generator)
    penalized = SamplingParams(temperature=0, repetition_penalty=1.2)
    assert penalized.greedy and not penalized.argmax_only


def test_tiny_temperatures_draw_the_arg_max_and_stay_finite():
    logits = torch.tensor([1.0, 3.0, 2.9, -1.0])
    for t in (1e-45, 1e-300, 0):
        assert sample_one(logits, SamplingParams(temperature=t), None) == 1
    scaled = scaled_logits(logits, SamplingParams(temperature=GREEDY_BELOW))
    assert torch.isfinite(scaled).all() and torch.isfinite(torch.softmax(scaled, dim=-1)).all()
    g = torch.Generator().manual_seed(0)
    assert sample_one(logits, SamplingParams(temperature=GREEDY_BELOW, top_p=1.0), g) == 1
    assert torch.equal(scaled_logits(logits, SamplingParams(temperature=0)), logits)
    assert torch.equal(scaled_logits(logits, SamplingParams(temperature=0.5)), logits / 0.5)


def test_top_k_and_min_p_cut_the_tail():
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    g = torch.Generator().manual_seed(0)
    top2 = {sample_one(logits, SamplingParams(temperature=1, top_p=1, top_k=2), g) for _ in range(300)}
    assert top2 == {0, 1}
    # min_p 0.6: keep tokens with p >= 0.6 * 0.4 = 0.24
    minp = {sample_one(logits, SamplingParams(temperature=1, top_p=1, min_p=0.6), g) for _ in range(300)}
    assert minp == {0, 1}


def test_penalties():
    logits = torch.tensor([2.0, -1.0, 0.5, 0.0])
    rep = apply_penalties(logits, SamplingParams(repetition_penalty=2.0), torch.tensor([0, 1]), torch.tensor([]))
    assert rep.tolist() == [1.0, -2.0, 0.5, 0.0]
    freq = apply_penalties(logits, SamplingParams(frequency_penalty=0.5, presence_penalty=0.25),
                           torch.tensor([]), torch.tensor([2, 2, 3], dtype=torch.long))
    assert freq.tolist() == [2.0, -1.0, 0.5 - 1.0 - 0.25, 0.0 - 0.5 - 0.25]
    assert logits.tolist() == [2.0, -1.0, 0.5, 0.0]  # a copy is penalized


def test_seeded_draws_repeat():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0, top_p=1.0)
    draws = [[sample_one(logits, params, torch.Generator().manual_seed(s)) for _ in range(1)] for s in (7, 7)]
    assert draws[0] == draws[1]


@pytest.mark.parametrize("pieces, stops, emitted, found", [
    (["Hello wor", "ld. END", " more"], ["END"], "Hello world. ", True),
    (["ab", "c", "d"], ["cd"], "ab", True),  # held "c" until "d" completes the stop
    (["ab", "c", "x"], ["cd"], "abcx", False),  # "c" released once it cannot start "cd"
    (["x<", "|e", "o"], ["<|end|>"], "x<|eo", False),
    (["one two"], ["two", "one"], "", True),  # the earliest stop string wins
])
def test_stop_strings(pieces, stops, emitted, found):
    s = StopStrings(stops)
    out, hit = [], False
    for piece in pieces:
        text, hit = s.feed(piece)
        out.append(text)
        if hit:
            break
    if not hit:
        out.append(s.flush())
    assert "".join(out) == emitted and hit == found


def test_text_layer_imports_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now fails
        "import llama, llama.text.tokenizer, llama.text.chat_format, llama.text.tool_calls, llama.text.messages, llama.text.stream\n"
        "from llama import ChatFormat, Tokenizer, StopReason, Message, ModelArgs\n"
        "try:\n    llama.Llama\nexcept ImportError:\n    print('lazy ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "lazy ok"
