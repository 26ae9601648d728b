"""Chunked prefill (llama/engine/engine.py): a long prompt joining running
rows is prefilled over several steps within `prefill_chunk` prompt tokens a
step, the running rows decoding at each; the tokens (greedy and seeded
sampling), logprobs and prompt logprobs of a run without chunking;
cancelling mid-prefill; the prefix cache keeping each chunk's blocks; the
layout kept when rows leave; torchrun (two pipeline stages) and bad budgets.

Logprobs are compared to 1e-5: a chunk runs after the positions already in
its row, in a pass of another shape than the whole prompt's.

Run as a script under torchrun, this file is the worker of the distributed
test (rank 0 drives the engine, the other rank follows its steps).
"""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if __name__ == "__main__":  # the torchrun worker: this checkout's llama and tests/ helpers
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from llama import StopReason  # noqa: E402
from llama.engine.engine import PREFILL_TOKEN_BUDGET, Engine, Request  # noqa: E402
from llama.engine.prefix_cache import BLOCK  # noqa: E402
from llama.engine.sampling import SamplingParams  # noqa: E402
from engine_helpers import drive as shared_drive  # noqa: E402

CHUNK = 16
WHOLE = 10_000  # a budget no prompt here reaches: every prompt in one pass
MiB = 1 << 20
GREEDY_LP = SamplingParams(temperature=0, logprobs=True, max_tokens=24)
SAMPLED_LP = SamplingParams(temperature=0.9, top_p=0.95, seed=5, logprobs=True, max_tokens=24)


def prompt(n, seed):
    return torch.randint(3, 5000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def schedule(params):
    """Two short rows (one ends while the long prompts prefill: a release with
    prefilling rows behind it), then two long prompts joining them."""
    short = [Request(prompt(5, 1), params.__class__(**{**params.__dict__, "max_tokens": 4})),
             Request(prompt(9, 2), params)]
    return {0: short, 2: [Request(prompt(70, 3), params), Request(prompt(41, 4), params)]}


def drive(engine, plan, cancel=None):
    """engine_helpers.drive, and the number of steps after which a prompt was left part-prefilled."""
    partial = []
    tokens, last, steps = shared_drive(engine, plan, cancel,
                                       after_step=lambda e: partial.append(e.n_decoding < len(e.running)))
    return tokens, last, steps, sum(partial)


@pytest.fixture(scope="module")
def gen(make_ckpt):
    from conftest import build_tiny

    return build_tiny(make_ckpt("llama3"), max_seq_len=160, max_batch_size=4)


def assert_same_answers(got, ref):
    (tokens, last, _, _), (ref_tokens, ref_last, _, _) = got, ref
    assert tokens == ref_tokens
    for i, e in ref_last.items():
        assert last[i].stop_reason == e.stop_reason
        if e.completion.logprobs is not None:
            torch.testing.assert_close(torch.tensor(last[i].completion.logprobs), torch.tensor(e.completion.logprobs),
                                       atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("params", [GREEDY_LP, SAMPLED_LP], ids=["greedy", "seeded_sampling"])
def test_long_prompts_joining_running_rows_get_the_answers_of_one_pass(gen, params):
    whole = Engine(gen.model, gen.tokenizer, prefill_chunk=WHOLE)
    chunked = Engine(gen.model, gen.tokenizer, prefill_chunk=CHUNK)
    ref, got = drive(whole, schedule(params)), drive(chunked, schedule(params))
    assert_same_answers(got, ref)
    assert chunked.prefilled_tokens == whole.prefilled_tokens == sum(
        len(r.prompt_tokens) for step in schedule(params).values() for r in step)
    assert got[3] == -(-(70 + 41) // CHUNK) - 1 and ref[3] == 0  # steps that left a long prompt part-done


def test_running_rows_get_a_token_at_every_step_while_long_prompts_prefill(gen):
    engine = Engine(gen.model, gen.tokenizer, prefill_chunk=CHUNK)
    plan = schedule(SamplingParams(temperature=0, max_tokens=40))
    _, last, steps, _ = drive(engine, plan)
    long_total = 70 + 41
    prefill_steps = -(-long_total // CHUNK)  # the chunks of both, one after the other
    # Step 2 admits the first, 16 tokens a step; it completes at step 2 + 4
    # (70 = 4 x 16 + 6), whose other 10 tokens start the second.
    first_done, second_done = 2 + 70 // CHUNK, 2 + prefill_steps - 1
    for step in range(2, second_done + 1):
        counts = steps[step]
        assert counts.get(1) == 1  # the running row decodes every step
        assert counts.get(0) == (1 if step < 4 else None)  # the short row: its 4 tokens, then gone (step 3 is its last)
        assert counts.get(2) == (1 if step >= first_done else None)  # its first token when its last chunk runs
        assert counts.get(3) == (1 if step == second_done else None)
    assert steps[second_done + 1] == {1: 1, 2: 1, 3: 1}
    assert engine.prefilled_tokens == sum(len(r.prompt_tokens) for step in plan.values() for r in step)
    assert all(e.stop_reason == StopReason.OUT_OF_TOKENS for e in last.values())


def test_layout_decoding_rows_first(gen):
    """While a prompt is being prefilled the decoding rows are running[:n_decoding];
    a row leaving the decoding region is replaced without breaking that, and the
    next prompt waits while the one being prefilled takes the whole budget."""
    engine = Engine(gen.model, gen.tokenizer, prefill_chunk=CHUNK)
    plan = schedule(SamplingParams(temperature=0, max_tokens=40))
    ids = [engine.submit(r) for r in plan[0]]
    engine.step(), engine.step()
    ids += [engine.submit(r) for r in plan[2]]
    engine.step()
    assert engine.n_decoding == 2 and [s.id for s in engine.running] == ids[:3]
    assert [s.id for s in engine.waiting] == ids[3:] and engine.running[2].cached == CHUNK
    engine.step()  # the short row's last token: the last decoding row takes its place, the prefilling row that one's
    assert engine.n_decoding == 1 and [s.id for s in engine.running] == [ids[1], ids[2]]
    assert engine.running[0].prefilled and not engine.running[1].prefilled and engine.running[1].cached == 2 * CHUNK
    assert engine.free_slots == 2


def test_prompt_logprobs_are_gathered_chunk_by_chunk(gen):
    for max_tokens in (0, 3):
        echo = Request(prompt(53, 7), SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=True),
                       prompt_logprobs=True)
        plan = {0: [Request(prompt(6, 8), GREEDY_LP)], 1: [echo]}
        ref = drive(Engine(gen.model, gen.tokenizer, prefill_chunk=WHOLE), plan)
        got = drive(Engine(gen.model, gen.tokenizer, prefill_chunk=CHUNK), plan)
        assert_same_answers(got, ref)
        lps, ref_lps = got[1][1].completion.prompt_logprobs, ref[1][1].completion.prompt_logprobs
        assert len(lps) == 53 and lps[0] == 0.0
        torch.testing.assert_close(torch.tensor(lps), torch.tensor(ref_lps), atol=1e-5, rtol=1e-5)
        assert got[3] == 53 // CHUNK and ref[3] == 0


def test_cancel_mid_prefill_frees_the_row_and_keeps_its_written_blocks(gen):
    short, long = Request(prompt(7, 9), GREEDY_LP), Request(prompt(120, 10), GREEDY_LP)
    plain = Engine(gen.model, gen.tokenizer, prefill_chunk=WHOLE)
    ref, _, _, _ = drive(plain, {0: [short]})
    engine = Engine(gen.model, gen.tokenizer, prefill_chunk=BLOCK, prefix_cache_bytes=MiB)
    # The long prompt joins at step 1, runs two chunks of one block (steps 1, 2) and is cancelled before step 3.
    tokens, last, steps, partial = drive(engine, {0: [short], 1: [long]}, cancel=(3, 1))
    assert tokens == {0: ref[0]}  # the running row is untouched
    assert last[1].stop_reason == StopReason.CANCELLED and last[1].token is None and 1 not in tokens
    assert last[1].completion.tokens == [] and engine.free_slots == engine.max_batch_size
    assert all(step.get(0) == 1 for step in steps[:len(ref[0])])
    assert partial == 2 and len(engine.prefix_cache) == 2  # the long prompt's two written blocks (the short row has none)
    # The same prompt again, joining a running row, reuses them and prefills only the rest, in chunks.
    beside = Request(prompt(5, 16), SamplingParams(temperature=0, max_tokens=20))
    before = engine.prefilled_tokens
    again, again_last, _, again_partial = drive(engine, {0: [beside], 1: [long]})
    ref_long, ref_long_last, _, _ = drive(plain, {0: [beside], 1: [long]})
    assert again == ref_long
    assert engine.prefilled_tokens - before == len(beside.prompt_tokens) + len(long.prompt_tokens) - 2 * BLOCK
    assert again_partial == 1  # the 56 tokens after the cached blocks: 32, then 24
    torch.testing.assert_close(torch.tensor(again_last[1].completion.logprobs),
                               torch.tensor(ref_long_last[1].completion.logprobs), atol=1e-5, rtol=1e-5)


def test_a_chunked_prompt_shares_its_blocks_with_a_later_request(gen):
    """Blocks are kept as each chunk is written: a request sharing the document,
    admitted after it, prefills only what follows."""
    doc = prompt(100, 11)
    a = Request(doc + prompt(5, 12), GREEDY_LP)
    b = Request(doc + prompt(6, 13), GREEDY_LP)
    engine = Engine(gen.model, gen.tokenizer, prefill_chunk=BLOCK, prefix_cache_bytes=MiB)
    engine.submit(Request(prompt(4, 14), SamplingParams(temperature=0, max_tokens=30)))
    engine.step()
    engine.submit(a)
    engine.step()
    assert len(engine.prefix_cache) == 1  # a's first chunk: one block, kept while it is written
    engine.step()
    assert len(engine.prefix_cache) == 2
    before = engine.prefilled_tokens
    got, last, _, _ = drive(engine, {0: [b]})
    ref, ref_last, _, _ = drive(Engine(gen.model, gen.tokenizer, prefill_chunk=WHOLE), {0: [b]})
    assert got == ref
    assert engine.prefix_cache.reused_tokens == (len(doc) // BLOCK) * BLOCK
    torch.testing.assert_close(torch.tensor(last[0].completion.logprobs), torch.tensor(ref_last[0].completion.logprobs),
                               atol=1e-5, rtol=1e-5)
    assert engine.prefilled_tokens - before == len(a.prompt_tokens) - 2 * BLOCK + len(b.prompt_tokens) - 3 * BLOCK


def test_with_no_row_decoding_a_batch_is_prefilled_in_one_step(gen):
    engine = Engine(gen.model, gen.tokenizer, prefill_chunk=4)
    plan = {0: [Request(prompt(30, s), SamplingParams(temperature=0, max_tokens=3)) for s in (20, 21, 22)]}
    _, _, steps, partial = drive(engine, plan)
    assert steps[0] == {0: 1, 1: 1, 2: 1} and len(steps) == 3 and partial == 0 and PREFILL_TOKEN_BUDGET >= 90


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "16", None])
def test_bad_budgets_are_refused(gen, bad):
    with pytest.raises(ValueError, match=f"prefill_chunk must be a positive whole number of prompt tokens per step, "
                                         f"got {bad!r}"):
        Engine(gen.model, gen.tokenizer, prefill_chunk=bad)
    engine = Engine(gen.model, gen.tokenizer)
    with pytest.raises(ValueError, match="prefill_chunk must be a positive whole number"):
        engine.set_prefill_chunk(bad)
    engine.set_prefill_chunk(7)
    assert engine.prefill_chunk == 7


def test_serve_flag_refuses_a_bad_chunk(tmp_path):
    import subprocess

    r = subprocess.run([sys.executable, "-m", "llama", "serve", "--ckpt_dir", str(tmp_path), "--prefill_chunk", "0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--prefill_chunk must be a positive number of prompt tokens per step, got 0" in r.stderr, \
        r.stderr


# -- torchrun: two pipeline stages run rank 0's chunks ---------------------------------------


def test_two_pipeline_stages_under_torchrun_give_the_tokens_of_one_process(gen, make_ckpt, tmp_path):
    import subprocess

    from dist_helpers import free_port

    ckpt = make_ckpt("llama3")
    out = tmp_path / "out.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           __file__, str(ckpt), str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    result = torch.load(out, weights_only=False)
    reference = worker_run(gen, follow=False)
    assert result["tokens"] == reference["tokens"] and result["reasons"] == reference["reasons"]
    assert result["prefilled"] == reference["prefilled"]
    torch.testing.assert_close(torch.tensor(result["prompt_logprobs"]), torch.tensor(reference["prompt_logprobs"]),
                               atol=1e-5, rtol=1e-5)
    assert all(keys == reference["keys"] for keys in result["keys"])  # the same blocks on every rank


def worker_run(gen, follow: bool) -> dict:
    """Rank 0 runs long prompts joining running rows (one cancelled mid-prefill,
    one with prompt logprobs) with a prefix cache; with `follow`, the other
    ranks follow its steps, as under a server."""
    # Stage at a time (no lanes): the cancellation lands at the same step as in one process.
    engine = Engine(gen.model, gen.tokenizer, prefill_chunk=CHUNK, prefix_cache_bytes=MiB, overlap=False)
    if follow and torch.distributed.get_rank() != 0:
        engine.follow()
        result = {}
    else:
        plan = schedule(GREEDY_LP)
        plan[3] = [Request(prompt(60, 15), GREEDY_LP, prompt_logprobs=True)]
        tokens, last, _, _ = drive(engine, plan, cancel=(4, 2))
        if follow:
            engine.shutdown()
            engine.step()
        result = {"tokens": tokens, "reasons": {i: e.stop_reason.value for i, e in last.items()},
                  "prefilled": engine.prefilled_tokens, "prompt_logprobs": last[4].completion.prompt_logprobs}
    keys = engine.prefix_cache.keys()
    if not follow:
        return {**result, "keys": keys}
    every = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, keys)
    return {**result, "keys": every}


def _worker(ckpt: str, out: str) -> None:
    from llama import Llama

    gen = Llama.build(ckpt, str(Path(ckpt) / "tokenizer.model"), max_seq_len=160, max_batch_size=4, device="cpu",
                      dtype="float32", pipeline_stages=2)
    result = worker_run(gen, follow=True)
    if torch.distributed.get_rank() == 0:
        torch.save(result, out)


if __name__ == "__main__":
    _worker(*sys.argv[1:3])
