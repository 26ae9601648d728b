"""Generation invariants that need no reference implementation."""

import pytest
import torch

from conftest import build_tiny
from llama import StopReason


@pytest.fixture(scope="module")
def llama3(make_ckpt):
    return build_tiny(make_ckpt("llama3"))


@pytest.fixture(scope="module")
def llama2(make_ckpt):
    return build_tiny(make_ckpt("llama2"))


def test_kv_cache_decoding_equals_full_forward(llama3):
    model = llama3.model
    tokens = torch.randint(0, 128000, (2, 30), generator=torch.Generator().manual_seed(0))
    full = model.forward(tokens, 0)
    # Prefill 10, then one token at a time, then a 12-token chunk on a non-empty cache.
    steps = [model.forward(tokens[:, :10], 0)]
    steps += [model.forward(tokens[:, p : p + 1], p) for p in range(10, 18)]
    steps.append(model.forward(tokens[:, 18:30], 18))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)


def test_last_logits_only(llama3):
    tokens = torch.randint(0, 128000, (2, 7), generator=torch.Generator().manual_seed(1))
    full = llama3.model.forward(tokens, 0)
    last = llama3.model.forward(tokens, 0, last_logits_only=True)
    assert last.shape == (2, 1, full.shape[-1])
    torch.testing.assert_close(last[:, 0], full[:, -1])


@pytest.mark.parametrize("family", ["llama2", "llama3"])
def test_ragged_batch_equals_each_prompt_alone(family, llama2, llama3):
    gen = llama2 if family == "llama2" else llama3
    prompts = ["A llama", "The transformer has an embedding table and", "Hi"]
    batch = gen.text_completion(prompts, max_gen_len=12, temperature=0)
    alone = [gen.text_completion([p], max_gen_len=12, temperature=0)[0] for p in prompts]
    assert [b["generation"] for b in batch] == [a["generation"] for a in alone]
    assert all(b["generation"] for b in batch)


def test_greedy_is_deterministic_and_sampling_depends_on_seed(llama3):
    prompt = [llama3.tokenizer.encode("Llamas are", bos=True, eos=False)]
    g1, _ = llama3.generate(prompt, 16, temperature=0)
    g2, _ = llama3.generate(prompt, 16, temperature=0)
    assert g1 == g2
    torch.manual_seed(0)
    s1, _ = llama3.generate(prompt, 16, temperature=1.0, top_p=1.0)
    torch.manual_seed(0)
    s2, _ = llama3.generate(prompt, 16, temperature=1.0, top_p=1.0)
    torch.manual_seed(1)
    s3, _ = llama3.generate(prompt, 16, temperature=1.0, top_p=1.0)
    assert s1 == s2 and s1 != s3


def test_top_p_keeps_only_the_nucleus():
    from llama.engine.sampling import SamplingParams, sample_one

    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    params = SamplingParams(temperature=1.0, top_p=0.7)
    g = torch.Generator().manual_seed(0)
    picks = torch.tensor([sample_one(logits, params, g) for _ in range(2000)])
    assert set(picks.tolist()) == {0, 1}  # 0.5 + 0.3 >= 0.7: tokens 2 and 3 are cut
    assert 0.55 < (picks == 0).float().mean() < 0.70  # renormalized: 0.5 / 0.8 = 0.625


def test_logprobs_and_echo_agree_with_forward(llama3):
    prompt = llama3.tokenizer.encode("Model parallelism splits every layer", bos=True, eos=False)
    (toks,), (lps,) = llama3.generate([prompt], 6, temperature=0, logprobs=True, echo=True)
    assert toks[: len(prompt)] == prompt and len(toks) == len(lps) == len(prompt) + 6
    logits = llama3.model.forward(torch.tensor([toks]), 0)[0]
    expected = torch.log_softmax(logits[:-1], dim=-1).gather(-1, torch.tensor(toks[1:])[:, None])[:, 0]
    assert lps[0] == 0.0
    torch.testing.assert_close(torch.tensor(lps[1:]), expected, atol=1e-4, rtol=1e-4)
    # Without echo: the generated tokens' logprobs only.
    (toks2,), (lps2,) = llama3.generate([prompt], 6, temperature=0, logprobs=True)
    assert toks2 == toks[len(prompt):]
    torch.testing.assert_close(torch.tensor(lps2), torch.tensor(lps[len(prompt):]), atol=1e-4, rtol=1e-4)


def test_completion_result_shapes(llama3):
    out = llama3.text_completion(["Hello"], max_gen_len=3, temperature=0, logprobs=True)
    assert set(out[0]) == {"generation", "tokens", "logprobs", "metrics", "request_metrics", "stop_reason"}
    assert len(out[0]["tokens"]) == 3 and out[0]["request_metrics"]["generated_tokens"] == 3
    assert out[0]["metrics"]["generated_tokens"] == 3 and out[0]["metrics"]["batch_size"] == 1
    chat = llama3.chat_completion([[{"role": "user", "content": "Hello"}]], max_gen_len=3, temperature=0)
    assert chat[0]["generation"]["role"] == "assistant" and isinstance(chat[0]["generation"]["content"], str)
    assert llama3.text_completion(["Hello"], max_gen_len=0)[0]["generation"] == ""


def _with_stop_tokens(gen, stop):
    old = gen.tokenizer.stop_tokens
    gen.tokenizer.stop_tokens = frozenset(stop)
    return old


@pytest.mark.parametrize("family", ["llama2", "llama3"])
def test_generation_stops_at_stop_token(family, llama2, llama3):
    """Make the 4th greedy token a stop token: output is cut before it, the
    stream ends on it with the right reason, other rows go on."""
    gen = llama2 if family == "llama2" else llama3
    prompts = [gen.tokenizer.encode("A llama", bos=True, eos=False), gen.tokenizer.encode("Paris", bos=True, eos=False)]
    (free, other), _ = gen.generate(prompts, 10, temperature=0)
    stop = free[3]
    assert stop not in free[:3]
    old = _with_stop_tokens(gen, {stop})
    try:
        (cut, other2), _ = gen.generate(prompts, 10, temperature=0)
        events = [e for e in gen.generate_stream(prompts[:1], 10, temperature=0)]
    finally:
        gen.tokenizer.stop_tokens = old
    assert cut == free[:3]
    expected_other = other[: other.index(stop)] if stop in other else other
    assert other2 == expected_other
    assert [e.token for e in events] == free[:4]
    assert events[-1].stop_reason == StopReason.END_OF_TURN
    assert "".join(e.text for e in events) == gen.tokenizer.decode(cut)  # the stop token adds no text
    assert all(e.stop_reason is None for e in events[:-1])


def test_stream_text_equals_generation(llama2, llama3):
    for gen in (llama2, llama3):
        dialog = [{"role": "user", "content": "Tell me about llamas"}]
        events = list(gen.chat_completion_stream(dialog, temperature=0, max_gen_len=20))
        full = gen.chat_completion([dialog], temperature=0, max_gen_len=20)[0]["generation"]["content"]
        assert "".join(e.text for e in events) == full
        assert events[-1].stop_reason is not None


def test_stream_holds_back_partial_utf8(llama3):
    from llama.text.stream import TextStream as _TextStream

    stream = _TextStream(llama3.tokenizer)
    ids = llama3.tokenizer.encode("llama 🦙 ok", bos=False, eos=False)
    # The emoji is split across byte-level tokens; no piece may contain U+FFFD.
    pieces = [stream.add(t) for t in ids] + [stream.flush()]
    assert "".join(pieces) == "llama 🦙 ok"
    assert not any("\ufffd" in p for p in pieces)


def test_out_of_tokens_by_max_gen_len_and_by_max_seq_len(llama3):
    prompt = llama3.tokenizer.encode("Hi", bos=True, eos=False)
    (toks,), _ = llama3.generate([prompt], 5, temperature=0)
    assert len(toks) == 5  # no stop token in these five (random weights)
    events = list(llama3.generate_stream([prompt], 5, temperature=0))
    assert [e.token for e in events] == toks and events[-1].stop_reason == StopReason.OUT_OF_TOKENS
    # A 60-token prompt in a 64-token context leaves room for 4 tokens, whatever max_gen_len says.
    long_prompt = [llama3.tokenizer.bos_id] + [1000 + i for i in range(59)]
    (toks,), _ = llama3.generate([long_prompt], 10, temperature=0)
    events = list(llama3.generate_stream([long_prompt], 10, temperature=0))
    assert len(toks) == len(events) == 4 and events[-1].stop_reason == StopReason.OUT_OF_TOKENS
