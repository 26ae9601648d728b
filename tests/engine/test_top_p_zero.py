"""top_p=0 is accepted, as in Meta's reference and OpenAI's API, and means
greedy: Meta's rule keeps a token while the mass before it is at most top_p,
so only the most likely token stays."""

import torch

from conftest import build_tiny
from llama.engine.sampling import SamplingParams, row_generator, sample_one


def test_top_p_zero_is_valid_and_draws_the_arg_max():
    p = SamplingParams(temperature=1.0, top_p=0)
    assert p.top_p == 0 and not p.greedy  # still a sampling row: temperature decides `greedy`
    logits = torch.tensor([1.0, 3.0, 2.99, -1.0, 3.0 - 1e-6])
    g = row_generator(p, 1, "cpu")
    assert {sample_one(logits, p, g) for _ in range(200)} == {1}
    assert {sample_one(logits, SamplingParams(temperature=50.0, top_p=0.0, top_k=3), g) for _ in range(100)} == {1}


def test_top_p_zero_generates_the_greedy_text(make_ckpt):
    gen = build_tiny(make_ckpt("llama3"))
    greedy = gen.text_completion(["The llama is a"], temperature=0, max_gen_len=8)
    top_p_zero = gen.text_completion(["The llama is a"], temperature=1.0, top_p=0.0, max_gen_len=8)
    assert top_p_zero[0]["generation"] == greedy[0]["generation"]
