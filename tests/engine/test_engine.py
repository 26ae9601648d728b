"""The decoding engine: per-row positions, packed prefill, rows that join and
leave a running batch, cancellation, per-request sampling."""

import pytest
import torch

from conftest import build_tiny
from engine_helpers import PROMPTS, encode, run_to_end
from llama import StopReason
from llama.engine.engine import Engine, Request
from llama.engine.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0)


def build(make_ckpt, family, max_batch_size=4, max_seq_len=64):
    return build_tiny(make_ckpt(family), max_seq_len, max_batch_size)


@pytest.fixture(scope="module")
def llama3(make_ckpt):
    return build(make_ckpt, "llama3")


@pytest.fixture(scope="module")
def llama2(make_ckpt):
    return build(make_ckpt, "llama2")




@pytest.mark.parametrize("family", ["llama2", "llama3"])
def test_packed_prefill_logits_equal_each_prompt_alone(family, llama2, llama3):
    gen = llama2 if family == "llama2" else llama3
    model, prompts = gen.model, encode(gen, PROMPTS)
    alone = [model.forward(torch.tensor([p]), 0)[0] for p in prompts]  # (len, vocab) each
    packed = model.prefill(prompts, rows=[3, 1, 0, 2], all_logits=[True] * len(prompts))
    for a, b in zip(alone, packed):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    last_only = model.prefill(prompts, rows=[0, 1, 2, 3])
    for a, b in zip(alone, last_only):
        assert b.shape == (1, a.shape[-1])
        torch.testing.assert_close(b[0], a[-1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama2", "llama3"])
def test_rows_at_their_own_positions_equal_each_row_alone(family, llama2, llama3):
    """Decode steps with every row at a different position, then a 3-token chunk
    per row, against each row's full forward."""
    gen = llama2 if family == "llama2" else llama3
    model = gen.model
    lens = [5, 11, 2]
    seqs = [torch.randint(3, 500, (n + 4,), generator=torch.Generator().manual_seed(n)) for n in lens]
    full = [model.forward(s[None], 0)[0] for s in seqs]
    model.prefill([s[:n].tolist() for s, n in zip(seqs, lens)], rows=[0, 1, 2])
    step = model.forward(torch.stack([s[n] for s, n in zip(seqs, lens)])[:, None], torch.tensor(lens))
    for i, n in enumerate(lens):
        torch.testing.assert_close(step[i, 0], full[i][n], atol=1e-4, rtol=1e-4)
    chunk = model.forward(torch.stack([s[n + 1 : n + 4] for s, n in zip(seqs, lens)]), torch.tensor(lens) + 1)
    for i, n in enumerate(lens):
        torch.testing.assert_close(chunk[i], full[i][n + 1 : n + 4], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama2", "llama3"])
def test_ragged_batch_tokens_and_logprobs_equal_alone(family, llama2, llama3):
    gen = llama2 if family == "llama2" else llama3
    prompts = encode(gen, PROMPTS)
    params = SamplingParams(temperature=0, logprobs=True)
    batch, batch_lp = gen.generate(prompts, 10, sampling=params)
    for p, toks, lps in zip(prompts, batch, batch_lp):
        (alone,), (alone_lp,) = gen.generate([p], 10, sampling=params)
        assert toks == alone
        torch.testing.assert_close(torch.tensor(lps), torch.tensor(alone_lp), atol=1e-4, rtol=1e-4)


def test_one_prefill_then_one_step_per_token(llama3):
    gen = llama3
    old, gen.tokenizer.stop_tokens = gen.tokenizer.stop_tokens, frozenset()
    try:
        result = gen.generate(encode(gen, PROMPTS), 16, temperature=0)
    finally:
        gen.tokenizer.stop_tokens = old
    assert result.metrics.decode_steps == 16  # step 1 prefills all four prompts and samples their first tokens


def test_a_request_that_joins_mid_way_gets_its_tokens_alone(llama3):
    gen, engine = llama3, llama3.engine
    a, b, c = (Request(p, SamplingParams(temperature=0, max_tokens=12)) for p in encode(gen, PROMPTS[:3]))
    alone = [run_to_end(engine, {0: [r]})[0][0] for r in (a, b, c)]
    # b joins while a runs (a has 4 tokens by then); c joins later, after b's prompt was prefilled.
    joined, last = run_to_end(engine, {0: [a], 4: [b], 7: [c]})
    assert joined == alone
    assert all(e.stop_reason == StopReason.OUT_OF_TOKENS for e in last)
    assert engine.free_slots == engine.max_batch_size and not engine.has_work()


def test_more_prompts_than_slots_wait_in_the_queue(make_ckpt, llama3):
    small = build(make_ckpt, "llama3", max_batch_size=2)
    prompts = encode(small, PROMPTS)
    queued, _ = small.generate(prompts, 6, temperature=0)
    assert queued == [llama3.generate([p], 6, temperature=0)[0][0] for p in prompts]


def test_cancel_frees_the_slot_at_once(make_ckpt):
    gen = build(make_ckpt, "llama3", max_batch_size=2)
    engine = gen.engine
    reqs = [Request(p, SamplingParams(temperature=0, max_tokens=20)) for p in encode(gen, PROMPTS[:3])]
    ids = [engine.submit(r) for r in reqs]
    engine.step()
    assert engine.free_slots == 0 and len(engine.waiting) == 1
    engine.cancel(ids[0])
    assert engine.free_slots == 1
    events = engine.step()
    cancelled = [e for e in events if e.row == ids[0]]
    assert [(e.token, e.stop_reason) for e in cancelled] == [(None, StopReason.CANCELLED)]
    assert cancelled[0].completion.stop_reason == StopReason.CANCELLED
    assert {e.row for e in events if e.token is not None} == {ids[1], ids[2]}  # the waiting one joined
    for rid in ids[1:]:
        engine.cancel(rid)
    engine.step()
    assert not engine.has_work() and engine.free_slots == 2


def test_closing_a_stream_cancels_its_rows(llama3):
    stream = llama3.generate_stream(encode(llama3, PROMPTS[:2]), 30, temperature=0)
    next(stream)
    stream.close()
    assert llama3.engine.free_slots == llama3.engine.max_batch_size
    assert llama3.last_metrics.generated_tokens == 0  # none finished
    llama3.engine.step()  # delivers the cancellation events
    assert not llama3.engine.has_work()


def test_seeded_requests_reproduce_whatever_shares_the_batch(llama3):
    prompts = encode(llama3, PROMPTS)
    seeded = SamplingParams(temperature=1.0, top_p=1.0, seed=1234)
    (alone,), _ = llama3.generate(prompts[:1], 12, sampling=seeded)
    others = [SamplingParams(temperature=1.0, top_p=1.0, seed=s) for s in (1, 2, 3)]
    batch, _ = llama3.generate(prompts, 12, sampling=[seeded] + others)
    assert batch[0] == alone
    (again,), _ = llama3.generate(prompts[:1], 12, sampling=SamplingParams(temperature=1.0, top_p=1.0, seed=1235))
    assert again != alone


@pytest.mark.parametrize("temperature", [1e-45, 1e-300, 1e-6])
def test_a_temperature_below_the_floor_gives_the_greedy_tokens(llama3, temperature):
    """Dividing by 1e-45 overflows float32 (softmax NaN, torch.multinomial
    refuses): below sampling.GREEDY_BELOW a row is greedy instead, with or
    without penalties and logprobs, alone or beside sampled rows."""
    prompts = encode(llama3, PROMPTS)
    greedy, _ = llama3.generate(prompts, 8, temperature=0)
    tiny, _ = llama3.generate(prompts, 8, temperature=temperature)
    assert tiny == greedy
    tiny = SamplingParams(temperature=temperature, top_p=0.5, logprobs=True)
    sampled = SamplingParams(temperature=1.0, seed=3)
    mixed, _ = llama3.generate(prompts, 8, sampling=[tiny, sampled, tiny, sampled])
    assert mixed[0] == greedy[0] and mixed[2] == greedy[2]
    penalized = [llama3.generate(prompts[:1], 8, sampling=SamplingParams(temperature=t, repetition_penalty=1.5))[0]
                 for t in (0, temperature)]
    assert penalized[0] == penalized[1]


def test_stop_strings_cut_exactly_across_tokens_streaming_or_not(llama3):
    gen = llama3
    prompt = encode(gen, ["A llama"])
    (free,), _ = gen.generate(prompt, 16, temperature=0)
    pieces = [gen.tokenizer.decode([t]) for t in free]
    full = gen.tokenizer.decode(free)
    assert "".join(pieces) == full
    # A stop string from the end of one token into the next: no single token contains it.
    i = next(i for i in range(1, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2)
    boundary = len("".join(pieces[: i + 1]))
    stop = full[boundary - 2 : boundary + 2]
    assert all(stop not in p for p in pieces)
    cut = full[: full.index(stop)]
    params = SamplingParams(temperature=0, stop=["never appears", stop])
    [result] = gen.text_completion(["A llama"], max_gen_len=16, sampling=params)
    assert result["generation"] == cut and result["stop_reason"] == StopReason.STOP_STRING
    events = list(gen.generate_stream(prompt, 16, sampling=params))
    assert "".join(e.text for e in events) == cut
    assert events[-1].stop_reason == StopReason.STOP_STRING and events[-1].completion.text == cut


def test_top_logprobs(llama3):
    params = SamplingParams(temperature=0, top_logprobs=3, max_tokens=4)
    events = list(llama3.generate_stream(encode(llama3, ["A llama"]), 4, sampling=params))
    for e in events:
        ids, lps = zip(*e.top_logprobs)
        assert len(ids) == 3 and list(lps) == sorted(lps, reverse=True)
        assert ids[0] == e.token and lps[0] == pytest.approx(e.logprob)  # greedy takes the most likely


def test_repetition_penalty_changes_greedy_choice(llama3):
    prompt = encode(llama3, ["A llama"])
    (plain,), _ = llama3.generate(prompt, 24, temperature=0)
    (penalized,), _ = llama3.generate(prompt, 24, sampling=SamplingParams(temperature=0, frequency_penalty=2.0))
    assert len(set(penalized)) >= len(set(plain))
    # Meta's arguments and SamplingParams give the same greedy result.
    assert llama3.generate(prompt, 24, sampling=GREEDY)[0][0] == plain


def test_max_gen_len_zero_streams_nothing(llama3):
    assert list(llama3.generate_stream(encode(llama3, ["Hi"]), 0, temperature=0)) == []
    assert not llama3.engine.has_work()


def test_request_metrics_are_returned(llama3):
    [result] = llama3.text_completion(["Hello"], max_gen_len=5, temperature=0)
    m = result["request_metrics"]
    assert m["generated_tokens"] == 5 and m["prompt_tokens"] == 2
    assert 0 <= m["queue_seconds"] <= m["time_to_first_token_s"] <= m["seconds"]


@pytest.mark.parametrize("bad, field", [
    ([[1, 2.5]], "prompt 0 has a token id that is not an integer: 2.5"),
    ([[]], "empty"),
    ([[1, 10**9]], "outside"),
    ([list(range(1, 65))], "no room"),
])
def test_bad_prompts_are_rejected_before_anything_runs(llama3, bad, field):
    with pytest.raises(ValueError, match=field):
        llama3.generate(bad, 4)
    assert not llama3.engine.has_work()


def test_bad_max_gen_len(llama3):
    for value in (True, -1, 2.0):
        with pytest.raises(ValueError, match="max_gen_len"):
            llama3.generate([[1, 2]], value)


def test_submit_takes_requests_only(llama3):
    with pytest.raises(TypeError, match="Request"):
        llama3.engine.submit([1, 2, 3])


def test_engine_follows_the_model_limits(llama3):
    engine = Engine(llama3.model, llama3.tokenizer)
    assert engine.max_batch_size == 4 and engine.free_slots == 4
