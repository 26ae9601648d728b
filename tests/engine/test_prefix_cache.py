"""The prefix cache (llama/engine/prefix_cache.py): a request that starts
with cached blocks prefills only the rest and gets the tokens of a run
without the cache; conversations, shared system prompts, LRU eviction,
cancelled requests, torchrun (tensor-parallel ranks and pipeline stages) and
bad budgets.

Tokens are compared exactly; logprobs to float rounding (1e-4, as a request
packed with others is compared with itself alone in test_engine.py): the
rest of a prompt runs in a pass of another shape than the full prefill.

Run as a script under torchrun, this file is the worker of the distributed
test (rank 0 serves a conversation, the other ranks follow its steps).
"""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if __name__ == "__main__":  # the torchrun worker: this checkout's llama and tests/ helpers
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from engine_helpers import run_to_end  # noqa: E402
from llama.engine.engine import Engine, Request  # noqa: E402
from llama.engine.prefix_cache import BLOCK, PrefixCache, block_keys  # noqa: E402
from llama.engine.sampling import SamplingParams  # noqa: E402

SYSTEM = ("You are a helpful assistant who knows about llamas, alpacas, vicunas and guanacos, the camelids "
          "of the Andes, and answers every question briefly and kindly.")
TURNS = [" What do llamas eat?", " And alpacas?", " Which one is larger?"]
GREEDY_LP = SamplingParams(temperature=0, logprobs=True, max_tokens=8)
MiB = 1 << 20


@pytest.fixture(scope="module")
def gen(make_ckpt):
    from conftest import build_tiny

    return build_tiny(make_ckpt("llama3"), max_seq_len=160, max_batch_size=3)


def engines(gen, budget=MiB):
    return Engine(gen.model, gen.tokenizer), Engine(gen.model, gen.tokenizer, prefix_cache_bytes=budget)


def block_bytes(gen):
    p = gen.model.params
    return p.n_layers * 2 * p.n_kv_heads * BLOCK * p.head_dim * 4


def converse(engine, tokenizer, turns=TURNS, params=GREEDY_LP):
    """Each turn resends the whole conversation: (tokens, logprobs, prompt tokens prefilled) per turn."""
    history, out = tokenizer.encode(SYSTEM, bos=True, eos=False), []
    for turn in turns:
        history = history + tokenizer.encode(turn, bos=False, eos=False)
        before = engine.prefilled_tokens
        [tokens], [last] = run_to_end(engine, {0: [Request(history, params)]})
        out.append((tokens, last.completion.logprobs, engine.prefilled_tokens - before))
        history = history + tokens
    return out


def assert_same(with_cache, without):
    for (tokens, lps, _), (ref_tokens, ref_lps, _) in zip(with_cache, without):
        assert tokens == ref_tokens
        if ref_lps is not None:
            torch.testing.assert_close(torch.tensor(lps), torch.tensor(ref_lps), atol=1e-4, rtol=1e-4)


def test_prefill_after_cached_positions_equals_the_full_prefill(gen):
    """Transformer.prefill with starts: prompts whose rows hold their first
    positions (copied there with read_cache / write_cache), packed with a fresh
    one and with a one-token rest, give the logits of running each whole."""
    model = gen.model
    g = torch.Generator().manual_seed(0)
    p, q = (torch.randint(3, 1000, (n,), generator=g).tolist() for n in (40, 37))
    full_p, full_q = (model.prefill([x], [0], [True])[0] for x in (p, q))
    model.prefill([p], [0])
    kv = model.read_cache(0, 0, 39)
    assert kv.shape == (len(model.layers), 2, model.layers[0].attention.n_local_kv_heads, 39,
                        model.params.head_dim)
    model.write_cache(1, 0, kv[..., :7, :])
    model.write_cache(2, 0, kv)
    out = model.prefill([p[:20], q, p], rows=[1, 0, 2], all_logits=[True, True, False], starts=[7, 0, 39])
    assert [o.shape[0] for o in out] == [13, 37, 1]
    torch.testing.assert_close(out[0], full_p[7:20], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1], full_q, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[2][0], full_p[-1], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="leaves nothing to run"):
        model.prefill([p], rows=[0], starts=[40])


def test_a_conversation_prefills_only_each_new_turn(gen):
    plain, cached = engines(gen)
    without, with_cache = converse(plain, gen.tokenizer), converse(cached, gen.tokenizer)
    assert_same(with_cache, without)
    prompt_lens = [n for _, _, n in without]  # without the cache every turn prefills all of its prompt
    assert with_cache[0][2] == prompt_lens[0]
    for turn in (1, 2):
        prompt = prompt_lens[turn]
        reused = prompt - with_cache[turn][2]
        assert reused >= BLOCK and reused % BLOCK == 0
        assert prompt - reused <= len(gen.tokenizer.encode(TURNS[turn], bos=False, eos=False)) + 8 + BLOCK  # the new turn, the answer, a block
    assert cached.prefix_cache.reused_tokens == sum(prompt_lens) - sum(n for _, _, n in with_cache)
    assert plain.prefix_cache is None and plain.prefilled_tokens == sum(prompt_lens)


def test_sampled_requests_reuse_and_keep_their_tokens(gen):
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=11, max_tokens=8)
    plain, cached = engines(gen)
    assert_same(converse(cached, gen.tokenizer, params=params), converse(plain, gen.tokenizer, params=params))
    assert cached.prefix_cache.reused_tokens > 0


def test_a_shared_system_prompt_in_later_steps_and_in_the_same_step(gen):
    tok = gen.tokenizer
    system = tok.encode(SYSTEM, bos=True, eos=False)
    a, b, c = (Request(system + tok.encode(q, bos=False, eos=False), GREEDY_LP) for q in TURNS)
    plain, cached = engines(gen)
    # b joins while a runs (a's prompt blocks were kept after its prefill); a and c share one step.
    schedules = [{0: [a], 3: [b]}, {0: [a, c]}]
    for schedule in schedules:
        ref_tokens, ref_last = run_to_end(plain, schedule)
        before = cached.prefilled_tokens
        tokens, last = run_to_end(cached, schedule)
        assert tokens == ref_tokens
        for e, ref in zip(last, ref_last):
            torch.testing.assert_close(torch.tensor(e.completion.logprobs), torch.tensor(ref.completion.logprobs),
                                       atol=1e-4, rtol=1e-4)
        prefilled = cached.prefilled_tokens - before
        full = sum(len(r.prompt_tokens) for step in schedule.values() for r in step)
        if schedule is schedules[0]:  # b reused a's system prompt blocks
            assert prefilled == full - (len(system) // BLOCK) * BLOCK
        else:  # a and c were admitted together, both after the first run: both reuse
            assert prefilled == full - 2 * (len(system) // BLOCK) * BLOCK
    fresh = Engine(gen.model, gen.tokenizer, prefix_cache_bytes=MiB)
    run_to_end(fresh, {0: [a, c]})  # the same step, nothing cached yet: both prefill whole
    assert fresh.prefilled_tokens == len(a.prompt_tokens) + len(c.prompt_tokens)
    assert len(fresh.prefix_cache) >= len(system) // BLOCK


def test_lru_eviction_under_a_tiny_budget_stays_exact_and_within_it(gen):
    budget = block_bytes(gen) + block_bytes(gen) // 2
    plain, cached = engines(gen, budget)
    assert cached.prefix_cache.capacity == 1
    assert_same(converse(cached, gen.tokenizer), converse(plain, gen.tokenizer))
    cache = cached.prefix_cache
    assert len(cache) == 1 and cache.nbytes <= budget and cache.evicted_blocks > 0
    assert cache.reused_tokens == 2 * BLOCK  # the first block (the system prompt) outlives the chains' ends


def test_lru_trims_chains_from_their_ends():
    cache = PrefixCache(3)
    read = lambda start, n: torch.full((1, 2, 1, n, 1), float(start))  # noqa: E731
    a = list(range(1, 3 * BLOCK + 2))
    cache.insert(a, len(a), read)
    assert cache.match(a) == 3 * BLOCK and cache.match(a[:3 * BLOCK]) == 2 * BLOCK  # never the whole prompt
    b = a[:BLOCK] + [7] * BLOCK + [8]
    cache.insert(b, len(b), read)  # shares a's first block; one block of a's chain must go: its last
    assert len(cache) == 3 and cache.evicted_blocks == 1
    assert cache.match(a) == 2 * BLOCK and cache.match(b) == 2 * BLOCK
    blocks = cache.take(b, 2 * BLOCK)
    assert [float(x[0, 0, 0, 0, 0]) for x in blocks] == [0.0, float(BLOCK)]
    with pytest.raises(RuntimeError, match="diverged"):
        cache.take([9] * (2 * BLOCK), BLOCK)
    assert block_keys(a, 2)[0] == block_keys(b, 1)[0] and block_keys(a, 2)[1] != block_keys(b, 2)[1]
    cache.insert([5] * (4 * BLOCK), 4 * BLOCK, read)  # a chain longer than the whole cache keeps its first blocks
    assert len(cache) == 3 and cache.match([5] * (4 * BLOCK)) == 3 * BLOCK


def test_a_cancelled_request_leaves_its_blocks(gen):
    tok = gen.tokenizer
    prompt = tok.encode(SYSTEM, bos=True, eos=False)
    params = SamplingParams(temperature=0, max_tokens=40)
    cached = Engine(gen.model, gen.tokenizer, prefix_cache_bytes=MiB)
    rid, tokens = cached.submit(Request(prompt, params)), []
    while len(prompt) + len(tokens) < 2 * BLOCK + 2:
        tokens += [e.token for e in cached.step() if e.row == rid]
    cached.cancel(rid)
    cached.step()
    assert not cached.has_work()
    follow_up = Request(prompt + tokens + tok.encode(" Thanks!", bos=False, eos=False), GREEDY_LP)
    plain = Engine(gen.model, gen.tokenizer)
    [ref], [ref_last] = run_to_end(plain, {0: [follow_up]})
    before = cached.prefilled_tokens
    [got], [last] = run_to_end(cached, {0: [follow_up]})
    assert got == ref
    torch.testing.assert_close(torch.tensor(last.completion.logprobs), torch.tensor(ref_last.completion.logprobs),
                               atol=1e-4, rtol=1e-4)
    assert cached.prefilled_tokens - before == len(follow_up.prompt_tokens) - 2 * BLOCK  # blocks of the answer too


def test_prompt_logprobs_bypass_the_cache(gen):
    plain, cached = engines(gen)
    prompt = gen.tokenizer.encode(SYSTEM, bos=True, eos=False)
    echo = Request(prompt, SamplingParams(temperature=0, max_tokens=2), prompt_logprobs=True)
    run_to_end(cached, {0: [Request(prompt, GREEDY_LP)]})
    before = cached.prefilled_tokens
    [_], [last] = run_to_end(cached, {0: [echo]})
    [_], [ref] = run_to_end(plain, {0: [echo]})
    assert cached.prefilled_tokens - before == len(prompt)
    assert len(last.completion.prompt_logprobs) == len(prompt)
    torch.testing.assert_close(torch.tensor(last.completion.prompt_logprobs),
                               torch.tensor(ref.completion.prompt_logprobs), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bad, message", [
    (-1, "whole number of bytes >= 0"), (1.5, "whole number"), (True, "whole number"), ("1", "whole number"),
    (100, "holds no block"),
])
def test_bad_budgets_are_refused(gen, bad, message):
    with pytest.raises(ValueError, match=message):
        Engine(gen.model, gen.tokenizer, prefix_cache_bytes=bad)
    engine = Engine(gen.model, gen.tokenizer, prefix_cache_bytes=MiB)
    with pytest.raises(ValueError, match="prefix_cache_bytes"):
        engine.set_prefix_cache(bad)
    engine.set_prefix_cache(0)
    assert engine.prefix_cache is None


# -- llama serve's flag and /metrics -----------------------------------------------------------


def test_serve_flag_refuses_bad_budgets_with_the_flag_named(make_ckpt, tmp_path):
    import subprocess

    r = subprocess.run([sys.executable, "-m", "llama", "serve", "--ckpt_dir", str(tmp_path), "--prefix_cache_mb", "-1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--prefix_cache_mb must be 0 (no prefix cache) or more MiB, got -1" in r.stderr, r.stderr
    ckpt = make_ckpt("llama3")  # 0.001 MiB passes the flag check, then holds no block of this model
    r = subprocess.run([sys.executable, "-m", "llama", "serve", "--ckpt_dir", str(ckpt), "--dtype", "float32",
                        "--max_seq_len", "64", "--max_batch_size", "1", "--prefix_cache_mb", "0.001"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--prefix_cache_mb 0.001: prefix_cache_bytes=1048 holds no block" in r.stderr, r.stderr


def test_metrics_count_prefilled_and_reused_tokens(gen):
    from types import SimpleNamespace

    from llama.server.prometheus import ServerMetrics

    cached = Engine(gen.model, gen.tokenizer, prefix_cache_bytes=MiB)
    metrics = ServerMetrics(SimpleNamespace(waiting=0, running=0, inflight=0, engine=cached))
    converse(cached, gen.tokenizer, TURNS[:2])
    text = metrics.text().decode()
    assert f"llama_prefilled_tokens {float(cached.prefilled_tokens)}" in text
    assert f"llama_prefix_cache_reused_tokens {float(cached.prefix_cache.reused_tokens)}" in text
    assert cached.prefix_cache.reused_tokens > 0
    off = ServerMetrics(SimpleNamespace(waiting=0, running=0, inflight=0, engine=Engine(gen.model, gen.tokenizer)))
    assert "llama_prefix_cache_reused_tokens 0.0" in off.text().decode()


# -- torchrun: rank 0 decides, every rank holds the same blocks ------------------------------


@pytest.mark.parametrize("stages", [1, 2], ids=["tensor_parallel_2", "pipeline_2_stages"])
def test_under_torchrun_the_tokens_of_one_process(make_ckpt, tmp_path, stages):
    import subprocess

    from dist_helpers import free_port

    ckpt = make_ckpt("llama3")
    out = tmp_path / "out.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           __file__, str(ckpt), str(out), str(stages)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    result = torch.load(out, weights_only=False)
    reference = worker_conversation(_one_process(ckpt), follow=False)
    assert result["tokens"] == reference["tokens"]
    assert result["prefilled"] == reference["prefilled"] and result["reused"] == reference["reused"] > 0
    assert reference["evicted"] > 0 and result["evicted"] == reference["evicted"]
    assert all(keys == reference["keys"] for keys in result["keys"])  # the same blocks on every rank, in LRU order


_ONE = {}


def _one_process(ckpt):
    from conftest import build_tiny

    if str(ckpt) not in _ONE:
        _ONE[str(ckpt)] = build_tiny(ckpt, max_seq_len=160, max_batch_size=3)
    return _ONE[str(ckpt)]


def worker_conversation(gen, follow: bool) -> dict:
    """Rank 0 runs a conversation of three turns and a request beside it
    (sharing the system prompt) in a budget of one block; with `follow`, the other
    ranks follow its steps, as under a server."""
    engine = Engine(gen.model, gen.tokenizer, prefix_cache_bytes=block_bytes(gen))
    if follow and torch.distributed.get_rank() != 0:
        engine.follow()
    else:
        tok, history, tokens, prefilled = gen.tokenizer, gen.tokenizer.encode(SYSTEM, bos=True, eos=False), [], []
        beside = Request(history + tok.encode(" Hello", bos=False, eos=False), SamplingParams(temperature=0, max_tokens=6))
        for i, turn in enumerate(TURNS):
            history = history + tok.encode(turn, bos=False, eos=False)
            before = engine.prefilled_tokens
            got, _ = run_to_end(engine, {0: [Request(history, SamplingParams(temperature=0, max_tokens=8))],
                                         **({2: [beside]} if i == 1 else {})})
            tokens.append(got)
            prefilled.append(engine.prefilled_tokens - before)
            history = history + got[0]
        if follow:
            engine.shutdown()
            engine.step()
        result = {"tokens": tokens, "prefilled": prefilled, "reused": engine.prefix_cache.reused_tokens,
                  "evicted": engine.prefix_cache.evicted_blocks}
    keys = engine.prefix_cache.keys()
    if not follow:
        return {**result, "keys": keys}
    every = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, keys)
    return {**result, "keys": every} if torch.distributed.get_rank() == 0 else {}


def _worker(ckpt: str, out: str, stages: str) -> None:
    from llama import Llama

    gen = Llama.build(ckpt, str(Path(ckpt) / "tokenizer.model"), max_seq_len=160, max_batch_size=3, device="cpu",
                      dtype="float32", pipeline_stages=int(stages))
    result = worker_conversation(gen, follow=True)
    if torch.distributed.get_rank() == 0:
        torch.save(result, out)


if __name__ == "__main__":
    _worker(*sys.argv[1:4])
