"""The optional compiled decoding step (llama/compiled.py) computes what eager decoding does."""

import pytest
import torch

from conftest import build_tiny
from llama import Llama
from llama.compiled import OpaqueLinear
from llama.engine import Request
from llama.sampling import SamplingParams
from test_engine import PROMPTS, encode, run_to_end


@pytest.fixture(scope="module")
def pair(make_ckpt):
    ckpt = make_ckpt("llama3")
    eager = build_tiny(ckpt)
    compiled = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=64, max_batch_size=4,
                           device="cpu", dtype="float32", compile=True)
    return eager, compiled


def test_every_parallel_linear_layer_is_called_opaquely(pair):
    _, compiled = pair
    layers = [m for m in compiled.model.modules() if isinstance(m, OpaqueLinear)]
    assert len(layers) == 4 * compiled.model.params.n_layers  # wqkv, wo, w13, w2 per layer
    assert compiled.model.compiled_block is not None


def test_compiled_decode_steps_equal_eager_ones(pair):
    """One row, several rows at one position, rows at their own positions."""
    eager, compiled = pair
    lens = [5, 11, 2]
    seqs = [torch.randint(3, 500, (n + 1,), generator=torch.Generator().manual_seed(n)) for n in lens]
    for gen in (eager, compiled):
        gen.model.prefill([s[:n].tolist() for s, n in zip(seqs, lens)], rows=[0, 1, 2])
    nxt = torch.stack([s[n] for s, n in zip(seqs, lens)])[:, None]
    for start in (torch.tensor(lens), 2):
        steps = [gen.model.forward(nxt, start) for gen in (eager, compiled)]
        torch.testing.assert_close(steps[1], steps[0], atol=1e-4, rtol=1e-4)
    one = [gen.model.forward(nxt[:1], 3) for gen in (eager, compiled)]
    torch.testing.assert_close(one[1], one[0], atol=1e-4, rtol=1e-4)


def test_compiled_generation_gives_the_eager_tokens(pair):
    """Greedy rows that join a running batch mid-way: the engine's real schedule."""
    eager, compiled = pair
    outs = []
    for gen in (eager, compiled):
        a, b, c = (Request(p, SamplingParams(temperature=0, max_tokens=12)) for p in encode(gen, PROMPTS[:3]))
        outs.append(run_to_end(gen.engine, {0: [a], 4: [b], 7: [c]})[0])
    assert outs[1] == outs[0]


def test_compile_must_be_a_bool(make_ckpt):
    ckpt = make_ckpt("llama3")
    with pytest.raises(ValueError, match="compile must be true or false, got 'yes'"):
        Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=64, max_batch_size=4,
                    device="cpu", dtype="float32", compile="yes")
