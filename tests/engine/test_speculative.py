"""Speculative decoding (llama/engine/speculative.py): the same greedy output
as plain decoding with n-gram and draft proposers, the stop rules inside an
accepted run, the acceptance rule's distribution, and the refusals."""

import argparse
import copy
import shutil
import types

import pytest
import torch

from llama.engine.engine import Engine, Request
from llama.engine.sampling import SamplingParams, row_probs
from llama.engine.speculative import NgramProposer, Speculator, accept_token, check_draft
from llama.text.messages import StopReason

from conftest import build_tiny
from engine_helpers import run_to_end

GREEDY = SamplingParams(temperature=0, max_tokens=24)


@pytest.fixture(scope="module")
def gen(make_ckpt):
    return build_tiny(make_ckpt("llama3"), max_seq_len=96, max_batch_size=4)


@pytest.fixture(scope="module")
def same_draft(make_ckpt):
    """The same checkpoint built again (a draft needs its own KV cache): every proposal is accepted."""
    return build_tiny(make_ckpt("llama3"), max_seq_len=96, max_batch_size=4).model


@pytest.fixture(scope="module")
def other_draft(make_ckpt):
    """Another random model of the same shape and vocabulary: it rarely agrees with `gen`."""
    return build_tiny(make_ckpt("llama3", seed=1), max_seq_len=96, max_batch_size=4).model


@pytest.fixture(scope="module")
def copier(make_ckpt, tmp_path_factory):
    """A model that mostly repeats its last token (tied output embedding, the
    layers' outputs scaled by 0.3), so that n-gram proposals get accepted; its
    layers still shape the logits, and so its KV cache matters."""
    src, out = make_ckpt("llama3", seed=2), tmp_path_factory.mktemp("copier")
    for name in ("params.json", "tokenizer.model"):
        shutil.copy(src / name, out / name)
    state = torch.load(src / "consolidated.00.pth")
    state["output.weight"] = state["tok_embeddings.weight"].clone()
    for key in state:
        if key.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            state[key] = state[key] * 0.3
    torch.save(state, out / "consolidated.00.pth")
    return build_tiny(out, max_seq_len=96, max_batch_size=4)


def _prompts(gen):
    pattern = gen.tokenizer.encode(" one two three four five six", bos=False, eos=False)
    return [[gen.tokenizer.bos_id] + pattern * 4, [gen.tokenizer.bos_id] + pattern[:3] * 5 + pattern,
            gen.tokenizer.encode("A llama", bos=True, eos=False)]


def _run(gen, speculator, requests, schedule=None):
    engine = Engine(gen.model, gen.tokenizer)
    engine.set_speculation(speculator)
    tokens, last = run_to_end(engine, schedule or {0: requests})
    return tokens, last, engine


@pytest.mark.parametrize("proposer", ["ngram", "same_draft", "other_draft"])
def test_greedy_output_is_plain_output(gen, copier, same_draft, other_draft, proposer):
    if proposer == "ngram":  # a random model never repeats itself: proposals would all be refused or absent
        gen = copier
    requests = [Request(p, SamplingParams(temperature=0, max_tokens=24, logprobs=True, top_logprobs=2))
                for p in _prompts(gen)]
    plain_tokens, plain_last, _ = _run(gen, None, requests)
    speculator = {"ngram": lambda: Speculator.ngram(4),
                  "same_draft": lambda: Speculator.draft(same_draft, gen.model, 4, min_acceptance=0.0),
                  "other_draft": lambda: Speculator.draft(other_draft, gen.model, 3)}[proposer]()
    tokens, last, engine = _run(gen, speculator, requests)
    assert tokens == plain_tokens
    for a, b in zip(last, plain_last):
        assert a.completion.text == b.completion.text and a.stop_reason == b.stop_reason
        assert a.completion.logprobs == pytest.approx(b.completion.logprobs, abs=1e-5)
        top_a = [[t for t, _ in row] for row in a.completion.top_logprobs]
        assert top_a == [[t for t, _ in row] for row in b.completion.top_logprobs]
    assert speculator.proposed > 0
    rates = [e.completion.metrics.acceptance_rate for e in last if e.completion.metrics.proposed_tokens]
    if proposer == "same_draft":  # the target verifies its own proposals: all accepted
        assert speculator.accepted == speculator.proposed and all(r == 1.0 for r in rates)
    if proposer == "ngram":  # the copier's repeats are accepted, the repeated pattern's first proposal refused
        assert 0 < speculator.accepted < speculator.proposed
    assert sum(e.completion.metrics.proposed_tokens for e in last) == speculator.proposed
    assert not engine.running and not engine.speculator.proposer.__dict__.get("_rows")


def test_continuous_batching_and_prefix_cache(gen, same_draft):
    """Requests join while others speculate; the prefix cache sees only valid positions."""
    prompts = _prompts(gen)
    schedule = {0: [Request(prompts[0], GREEDY)], 2: [Request(prompts[1], GREEDY)],
                5: [Request(prompts[2], GREEDY), Request(prompts[0], GREEDY)]}
    plain, _ = run_to_end(Engine(gen.model, gen.tokenizer), schedule)
    engine = Engine(gen.model, gen.tokenizer, prefix_cache_bytes=1 << 20)
    engine.set_speculation(Speculator.draft(same_draft, gen.model, 4))
    assert run_to_end(engine, schedule)[0] == plain
    # A request that continues a finished one reuses its cached blocks (prompt + answer) and agrees.
    answer = plain[0]
    follow = Request(prompts[0] + answer[:-1], SamplingParams(temperature=0, max_tokens=6))
    alone, _ = run_to_end(Engine(gen.model, gen.tokenizer), {0: [follow]})
    reused_before = engine.prefix_cache.reused_tokens
    assert run_to_end(engine, {0: [follow]})[0] == alone
    assert engine.prefix_cache.reused_tokens > reused_before


def test_speculation_beside_a_prompt_prefilled_in_chunks(gen, same_draft, other_draft):
    """Rows speculate while a long prompt joins in chunks (it sits after them and is not verified)."""
    prompts = _prompts(gen)
    long_prompt = prompts[0] * 2 + prompts[1]  # several chunks of 8
    schedule = {0: [Request(prompts[0], GREEDY), Request(prompts[2], GREEDY)], 2: [Request(long_prompt, GREEDY)]}
    plain, _ = run_to_end(Engine(gen.model, gen.tokenizer, prefill_chunk=8), schedule)
    for draft in (same_draft, other_draft):
        engine = Engine(gen.model, gen.tokenizer, prefill_chunk=8)
        engine.set_speculation(Speculator.draft(draft, gen.model, 3, min_acceptance=0.0))
        assert run_to_end(engine, schedule)[0] == plain
        assert engine.speculator.proposed > 0


def test_cached_matches_the_tokens_each_step(gen, same_draft):
    engine = Engine(gen.model, gen.tokenizer)
    engine.set_speculation(Speculator.draft(same_draft, gen.model, 4))
    engine.submit(Request(_prompts(gen)[0], SamplingParams(temperature=0, max_tokens=30)))
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
        for seq in engine.running:  # every position but the last sampled token's holds valid keys
            assert seq.cached == len(seq.request.prompt_tokens) + len(seq.tokens) - 1
    assert steps <= 30 // 5 + 2  # 5 tokens a step when every proposal is accepted


def test_max_tokens_stop_string_and_stop_token_inside_a_run(gen, same_draft):
    prompt = _prompts(gen)[0]
    full, _, _ = _run(gen, None, [Request(prompt, GREEDY)])
    text = gen.tokenizer.decode(full[0])
    # Every proposal is accepted (the draft is the model): each end falls inside a run of 5.
    spec = lambda: Speculator.draft(same_draft, gen.model, 4)  # noqa: E731
    for n in (1, 2, 3, 7):
        tokens, last, _ = _run(gen, spec(), [Request(prompt, SamplingParams(temperature=0, max_tokens=n))])
        assert tokens[0] == full[0][:n] and last[0].stop_reason == StopReason.OUT_OF_TOKENS
    stop = text[len(text) // 2:len(text) // 2 + 3]
    request = Request(prompt, SamplingParams(temperature=0, max_tokens=24, stop=(stop,)))
    (plain_tokens, plain_last), (tokens, last) = [_run(gen, s, [request])[:2] for s in (None, spec())]
    assert tokens == plain_tokens and last[0].stop_reason == StopReason.STOP_STRING
    assert last[0].completion.text == plain_last[0].completion.text == text[:text.index(stop)]
    # A stop token: the tokenizer's stop set with the 6th greedy token in it.
    stopper = full[0][5]
    tok = copy.copy(gen.tokenizer)
    tok.stop_tokens = frozenset(gen.tokenizer.stop_tokens | {stopper})
    outs = []
    for s in (None, spec()):
        engine = Engine(gen.model, tok)
        engine.set_speculation(s)
        outs.append(run_to_end(engine, {0: [Request(prompt, GREEDY)]}))
    (plain_tokens, plain_last), (tokens, last) = outs
    cut = full[0].index(stopper)
    assert tokens == plain_tokens and tokens[0] == full[0][:cut + 1]
    assert last[0].token == stopper and last[0].completion.tokens == full[0][:cut]


def test_sampled_requests_run_and_repeat(gen, other_draft):
    params = SamplingParams(temperature=0.8, top_k=50, repetition_penalty=1.1, seed=3, max_tokens=10)
    requests = [Request(_prompts(gen)[0], params)]
    for make in (lambda: Speculator.ngram(3), lambda: Speculator.draft(other_draft, gen.model, 3)):
        a, _, _ = _run(gen, make(), requests)
        b, _, _ = _run(gen, make(), requests)
        assert a == b and all(len(t) == 10 for t in a)


def _frequencies(tokens, vocab):
    return torch.bincount(torch.tensor(tokens), minlength=vocab).double() / len(tokens)


@pytest.mark.parametrize("with_draft", [True, False])
def test_acceptance_rule_keeps_the_model_distribution(with_draft):
    """Tokens emitted by the rule (x drawn from q; accepted, or replaced) are
    distributed as p: 20k draws, every frequency within 0.012 of p."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.35, 0.25, 0.2, 0.1, 0.06, 0.04])
    q = torch.tensor([0.05, 0.1, 0.5, 0.05, 0.25, 0.05])
    out = []
    for _ in range(20000):
        if with_draft:
            x = int(torch.multinomial(q, 1, generator=g))
            ok, repl = accept_token(p, x, q, g)
        else:  # n-gram: a fixed proposal, q one-hot at it
            x = 2
            ok, repl = accept_token(p, x, None, g)
        out.append(x if ok else repl)
    assert (_frequencies(out, 6) - p.double()).abs().max() < 0.012


def test_row_probs_is_what_sampling_draws():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.1, -1.0, -3.0])
    params = SamplingParams(temperature=0.7, top_p=0.8, top_k=4)
    p = row_probs(logits, params, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    from llama.engine.sampling import sample_one

    g = torch.Generator().manual_seed(1)
    draws = [sample_one(logits, params, g) for _ in range(20000)]
    assert (_frequencies(draws, 6) - p.double()).abs().max() < 0.012 and p[4:].sum() == 0
    greedy = row_probs(logits, SamplingParams(temperature=0), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    assert greedy.tolist() == [1.0, 0, 0, 0, 0, 0]


def test_ngram_proposer_takes_the_longest_most_recent_match():
    ngram = NgramProposer()
    row = types.SimpleNamespace(id=0)
    ctx = [1, 2, 3, 9, 9, 5, 2, 3, 7, 8, 4, 1, 2, 3]
    assert ngram.propose([row], [3], [ctx])[0].tokens == [9, 9, 5]  # "1 2 3" beats the later "2 3"
    ctx += [6]
    assert ngram.propose([row], [3], [ctx])[0] is None  # 6 never occurred before
    assert ngram.propose([row], [0], [ctx + [2, 3]])[0] is None  # no room: nothing proposed
    assert ngram.propose([row], [2], [ctx + [2, 3]])[0].tokens == [6, 2]  # the latest "2 3"
    # In a run of one token the longest continuation wins over the latest match.
    assert ngram.propose([types.SimpleNamespace(id=1)], [3], [[5, 5, 5, 5, 5]])[0].tokens == [5, 5]


def test_low_acceptance_pauses_a_request_with_growing_pauses():
    from llama.engine.speculative import MAX_PAUSE_STEPS, PAUSE_STEPS

    spec = Speculator.ngram(4, min_acceptance=0.5, probation=8)
    seq = types.SimpleNamespace(id=7, request=types.SimpleNamespace(prompt_tokens=(1, 2, 1, 2), params=GREEDY), tokens=[1])

    def steps_paused():
        n = 0
        while spec.propose([seq], [4])[0] is None:
            n += 1
        return n

    assert spec.propose([seq], [4])[0] is not None
    for _ in range(2):
        spec._record(7, 4, 0)
    assert spec.propose([seq], [4])[0] is None  # paused after a window with nothing accepted
    assert 1 + steps_paused() == PAUSE_STEPS  # then it proposes again
    spec._record(7, 8, 1)  # another poor window: a pause twice as long
    assert steps_paused() == 2 * PAUSE_STEPS
    spec._record(7, 8, 8)  # a good window: the next pause is short again
    assert spec.propose([seq], [4])[0] is not None
    spec._record(7, 8, 0)
    assert steps_paused() == PAUSE_STEPS
    for _ in range(10):  # pauses stop growing at MAX_PAUSE_STEPS
        spec._record(7, 8, 0)
        n = steps_paused()
    assert n == MAX_PAUSE_STEPS
    assert spec.finish(7) == (4 * 2 + 8 * 13, 9)


def test_bad_settings_are_refused(gen, tmp_path):
    with pytest.raises(ValueError, match="positive number"):
        Speculator.ngram(0)
    fake = lambda v, b=4, n=96: types.SimpleNamespace(params=types.SimpleNamespace(  # noqa: E731
        vocab_size=v, max_batch_size=b, max_seq_len=n))
    with pytest.raises(ValueError, match="vocab_size 32000 differs from the target model's 128256"):
        check_draft(fake(32000), gen.model)
    with pytest.raises(ValueError, match="its own KV cache"):
        check_draft(gen.model, gen.model)
    with pytest.raises(ValueError, match="max_batch_size=1"):
        check_draft(fake(128256, b=1), gen.model)
    from llama.cli.options import check_speculation_args

    a = argparse.Namespace(speculate="off", draft_ckpt_dir=str(tmp_path / "missing"), speculate_tokens=4)
    with pytest.raises(FileNotFoundError, match="--draft_ckpt_dir .*missing: directory not found"):
        check_speculation_args(a)
    with pytest.raises(ValueError, match="--speculate_tokens must be a positive"):
        check_speculation_args(argparse.Namespace(speculate="ngram", draft_ckpt_dir=None, speculate_tokens=-1))
    with pytest.raises(ValueError, match="give one of them"):
        check_speculation_args(argparse.Namespace(speculate="ngram", draft_ckpt_dir=str(tmp_path), speculate_tokens=4))


def test_cli_flags_parse():
    from llama.cli.main import build_parser

    for cmd in ("chat", "complete", "serve"):
        a = build_parser().parse_args([cmd, "--ckpt_dir", "x", "--speculate", "ngram", "--speculate_tokens", "6"])
        assert a.speculate == "ngram" and a.speculate_tokens == 6 and a.draft_ckpt_dir is None
    assert build_parser().parse_args(["chat", "--ckpt_dir", "x"]).speculate == "off"
