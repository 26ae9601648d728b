"""Pipeline stages that work at once (llama/engine/engine.py, Lanes): the
KV-cache sets of the model (Transformer.setup_caches(sets=), select_cache),
the lanes' split refused or skipped, and under torchrun 2 stages with lanes
giving exactly the tokens of one process for many concurrent requests
(joining and ending at different steps, prompts prefilled in chunks of 4
tokens, greedy, seeded sampling, logprobs, a stop string, a cancellation)
and for one request alone.

Run as a script under torchrun, this file is the worker of the distributed
test (rank 0 runs the requests, the other rank follows its steps; then every
rank steps one request together).
"""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if __name__ == "__main__":  # the torchrun worker: this checkout's llama and tests/ helpers
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from llama.engine.engine import Engine, Request  # noqa: E402
from llama.engine.sampling import SamplingParams  # noqa: E402
from llama.text.messages import StopReason  # noqa: E402
from engine_helpers import drive as shared_drive  # noqa: E402

ROWS = 4  # max_batch_size: 2 lanes of 2 rows with 2 stages
TEXTS = ["The llama is a domesticated", "Alpacas", "Model parallelism splits every layer across workers: each",
         "Hi", "Guanacos and vicunas live in the Andes", "One", "Two three four", "A", "Pipeline stages",
         "The quick brown fox"]


def requests(tokenizer, stop: str = ""):
    """{step: [Request]}: 11 requests joining at four steps (more than a lane's rows), ending at different steps."""
    enc = [tokenizer.encode(t, bos=True, eos=False) for t in TEXTS]
    greedy = [SamplingParams(temperature=0, max_tokens=n) for n in (6, 9, 4, 12, 7)]
    sampled = [SamplingParams(temperature=0.9, top_p=0.9, seed=s, max_tokens=8) for s in (1, 2)]
    logprobs = SamplingParams(temperature=0, logprobs=True, top_logprobs=2, max_tokens=5)
    stopping = SamplingParams(temperature=0, max_tokens=12, stop=(stop,) if stop else ())
    return {0: [Request(enc[0], greedy[0]), Request(enc[1], sampled[0]), Request(enc[2], greedy[1]),
                Request(enc[3], stopping), Request(enc[4], greedy[2])],  # request 4 is the one cancelled
            2: [Request(enc[5], logprobs), Request(enc[6], greedy[3]), Request(enc[7], sampled[1])],
            5: [Request(enc[8], greedy[4]), Request(enc[9], greedy[0])],
            9: [Request(enc[0], sampled[1])]}


CANCEL = (3, 4)  # before step 3, cancel the request submitted 5th


def drive(engine, plan, cancel=None):
    """engine_helpers.drive to the end: ({index: [tokens]}, {index: (reason, text,
    logprobs, tokens)} (saved by the torchrun worker), the most lanes running at once)."""
    busiest = []
    tokens, last, _ = shared_drive(engine, plan, cancel, after_step=lambda e: busiest.append(
        sum(bool(lane.running) for lane in e._lanes)))
    last = {i: (e.stop_reason.value, e.completion.text, e.completion.logprobs, e.completion.tokens)
            for i, e in last.items()}
    return tokens, last, max(busiest, default=0)


# -- the model's cache sets and the lanes' split ------------------------------------------


@pytest.fixture(scope="module")
def gen(make_ckpt):
    from conftest import build_tiny

    return build_tiny(make_ckpt("llama3"), max_seq_len=96, max_batch_size=ROWS)


def test_cache_sets_are_separate_and_swapped_in_place(gen):
    model = gen.model
    k = model.layers[0].attention.cache_k
    try:
        model.setup_caches(k.device, k.dtype, sets=2)
        assert model.cache_sets == 2 and model.cache_set == 0
        sets = [layer.attention.cache_sets for layer in model.layers]
        assert all(s[0][0].shape[0] == ROWS // 2 for s in sets)
        tokens = torch.tensor([[1, 5, 9], [3, 4, 7]])
        first = model.forward(tokens, 0)
        model.select_cache(1)
        assert all(layer.attention.cache_k is s[1][0] and layer.attention.cache_v is s[1][1]
                   for layer, s in zip(model.layers, sets))
        assert not sets[0][1][0].any()  # set 1 untouched by set 0's pass
        torch.testing.assert_close(model.forward(tokens, 0), first)  # the same pass in the other set
        model.select_cache(0)
        again = model.forward(tokens[:, -1:], 3)  # set 0 still holds its own positions
        model.select_cache(1)
        torch.testing.assert_close(model.forward(tokens[:, -1:], 3), again)
        with pytest.raises(IndexError, match="KV-cache set 2 does not exist: the model has 2"):
            model.select_cache(2)
        with pytest.raises(ValueError, match="cannot split max_batch_size=4 KV-cache rows into 3 equal cache sets"):
            model.setup_caches(k.device, k.dtype, sets=3)
    finally:
        model.setup_caches(k.device, k.dtype)
    assert model.cache_sets == 1 and model.layers[0].attention.cache_k.shape[0] == ROWS


def test_lanes_split_refused_or_skipped(gen):
    """One lane per stage; max_batch_size not a multiple of the stages: refused
    with overlap=True, stage at a time by default. (Two stages faked on one
    process: only the split is tested here, the passes under torchrun.)"""
    engine = Engine(gen.model, gen.tokenizer)
    assert engine.lanes == 1 and gen.model.cache_sets == 1  # one stage: nothing to overlap
    engine.passes.stages = 2
    try:
        engine._set_lanes(None)
        assert engine.lanes == 2 and gen.model.cache_sets == 2 and engine._lane_rows == ROWS // 2
        engine.passes.stages = 3
        with pytest.raises(ValueError, match="max_batch_size=4 is not a multiple of the 3 stages: give a "
                                             r"max_batch_size that is \(e.g. 6\), or turn overlap off"):
            engine._set_lanes(True)
        engine._set_lanes(None)
        assert engine.lanes == 1 and gen.model.cache_sets == 1
        with pytest.raises(ValueError, match="overlap must be true, false or unset"):
            engine._set_lanes("yes")
        engine.submit(Request(gen.tokenizer.encode("Hi", bos=True, eos=False), SamplingParams(max_tokens=1)))
        with pytest.raises(ValueError, match="call it while no request is queued or running"):
            engine.set_overlap(True)
    finally:
        engine.passes.stages = 1
        engine._set_lanes(False)
    assert gen.model.cache_sets == 1


# -- torchrun: 2 stages with lanes give one process's tokens -----------------------------------


def _reference(gen):
    """One process: the stop string (3 characters from the middle of request 3's
    answer), every request's answer (request 4 not cancelled), and one alone."""
    probe = requests(gen.tokenizer)[0][3]
    _, last, _ = drive(Engine(gen.model, gen.tokenizer), {0: [probe]})
    text = last[0][1]
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert len(stop) == 3, text
    tokens, last, _ = drive(Engine(gen.model, gen.tokenizer), requests(gen.tokenizer, stop))
    alone, alone_last, _ = drive(Engine(gen.model, gen.tokenizer), {0: [requests(gen.tokenizer)[0][0]]})
    return stop, tokens, last, alone[0]


def test_two_stages_with_lanes_give_the_tokens_of_one_process(gen, make_ckpt, tmp_path):
    import subprocess

    from dist_helpers import free_port

    stop, tokens, last, alone = _reference(gen)
    assert last[3][0] == StopReason.STOP_STRING.value  # the stop string ends request 3
    out = tmp_path / "out.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           __file__, str(make_ckpt("llama3")), str(out), json.dumps(stop)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    result = torch.load(out, weights_only=False)
    assert result["lanes"] == 2 and result["busiest"] == 2  # both lanes ran rows at once
    cancelled = CANCEL[1]
    assert result["last"][cancelled][0] == StopReason.CANCELLED.value
    got = result["tokens"].get(cancelled, [])
    assert got == tokens[cancelled][:len(got)]
    for i in tokens:
        if i == cancelled:
            continue
        assert result["tokens"][i] == tokens[i], i
        reason, text, lps, _ = result["last"][i]
        assert (reason, text) == last[i][:2], i
        if last[i][2] is not None:
            torch.testing.assert_close(torch.tensor(lps), torch.tensor(last[i][2]), atol=1e-4, rtol=1e-4)
    assert result["alone"] == alone
    assert result["alone_off"] == alone and result["lanes_off"] == 1


def _worker(ckpt: str, out: str, stop: str) -> None:
    import torch.distributed as dist

    from llama import Llama

    gen = Llama.build(ckpt, str(Path(ckpt) / "tokenizer.model"), max_seq_len=96, max_batch_size=ROWS, device="cpu",
                      dtype="float32", pipeline_stages=2)
    engine = gen.engine
    result = {"lanes": engine.lanes}
    if dist.get_rank() == 0:  # as under a server: rank 0 takes the requests, the other rank follows
        # Chunks of 4 prompt tokens (rank 0's chunk goes to every rank): the
        # lanes' prompts are prefilled over several turns, in flight like their decoding.
        engine.set_prefill_chunk(4)
        result["tokens"], result["last"], result["busiest"] = drive(engine, requests(gen.tokenizer, json.loads(stop)),
                                                                    cancel=CANCEL)
        engine.shutdown()
        engine.step()
    else:
        engine.follow()  # then steps on its own, as after Llama.generate's follow (stopped stays set)
    # One request alone, every rank stepping (as Llama.generate does).
    alone, _, _ = drive(engine, {0: [requests(gen.tokenizer)[0][0]]})
    result["alone"] = alone[0]
    engine.set_overlap(False)  # --pipeline_overlap off: the stages take turns, the same tokens
    again, _, _ = drive(engine, {0: [requests(gen.tokenizer)[0][0]]})
    result["alone_off"], result["lanes_off"] = again[0], engine.lanes
    if dist.get_rank() == 0:
        torch.save(result, out)


if __name__ == "__main__":
    _worker(*sys.argv[1:4])
