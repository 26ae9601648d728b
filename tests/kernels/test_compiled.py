"""The optional compiled decoding step (llama/kernels/compiled.py) computes what eager decoding does."""

import pytest
import torch

from conftest import build_tiny
from llama import Llama
from llama.kernels.compiled import CompiledDecoding, OpaqueLinear
from llama.kernels import native
from llama.kernels.linear import KernelLinear, NativeMatmul, PlainMatmul
from llama.engine.engine import Request
from llama.engine.sampling import SamplingParams
from engine_helpers import PROMPTS, encode, run_to_end


@pytest.fixture(scope="module")
def pair(make_ckpt):
    ckpt = make_ckpt("llama3")
    eager = build_tiny(ckpt)
    compiled = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=64, max_batch_size=4,
                           device="cpu", dtype="float32", compile=True)
    return eager, compiled


def test_linear_layers_are_plain_in_one_process_and_opaque_otherwise(pair):
    """One process, fp32: F.linear, which inductor calls itself, where our
    kernels (llama/kernels.c) did not build; ours and any other kernel go
    through the opaque operator (see the int8 test below)."""
    _, compiled = pair
    blocks = compiled.model.layers
    assert isinstance(compiled.model.decode_hook, CompiledDecoding)
    layers = 4 * compiled.model.params.n_layers
    if native.library() is None:
        assert not any(isinstance(m, (OpaqueLinear, KernelLinear)) for m in blocks.modules())
        assert sum(isinstance(m, PlainMatmul) for m in blocks.modules()) == layers
    else:
        opaque = [m for m in blocks.modules() if isinstance(m, OpaqueLinear)]
        assert len(opaque) == layers and all(isinstance(m.layer.matmul, NativeMatmul) for m in opaque)


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


def test_compiled_bf16_int8_decoding_is_as_close_to_fp32_as_eager(make_ckpt):
    """Other dtypes and kernels through the opaque layers: bf16 activations, int8
    weights. Fused kernels round bf16 intermediates at other points than eager
    ones, so the two differ slightly; compiled must be no further from the fp32
    computation (same int8 weights) than eager is."""
    ckpt = make_ckpt("llama3")
    runs = [("float32", False), ("bfloat16", False), ("bfloat16", True)]
    prompt = torch.randint(3, 500, (9,), generator=torch.Generator().manual_seed(3))
    logits = []
    for dtype, compile in runs:
        gen = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=64, max_batch_size=2,
                          device="cpu", dtype=dtype, quantize="int8", compile=compile)
        gen.model.prefill([prompt[:8].tolist()], rows=[0])
        logits.append(gen.model.forward(prompt[8:][None], 8))
    assert sum(isinstance(m, OpaqueLinear) for m in gen.model.layers.modules()) == 4 * gen.model.params.n_layers
    reference, eager, compiled = logits
    eager_error, compiled_error = (eager - reference).abs().max(), (compiled - reference).abs().max()
    assert compiled_error <= 1.5 * eager_error + 1e-3, (compiled_error, eager_error)
    assert compiled.argmax(-1).item() == reference.argmax(-1).item()


def test_compiled_pipeline_stages_chained_equal_the_whole_model(make_ckpt):
    """A stage after the first compiles from a hidden state, not token ids."""
    from llama.kernels.compiled import compile_decode
    from llama.kernels.linear import use_kernels
    from engine_helpers import FOUR_LAYERS, _stage_model

    ckpt = make_ckpt("llama3", **FOUR_LAYERS)
    whole = use_kernels(_stage_model(ckpt, None)[0])
    stages = [use_kernels(_stage_model(ckpt, layers)[0]) for layers in (range(0, 2), range(2, 4))]
    for stage in stages:
        compile_decode(stage)
    prompts = [[1, 5, 9], [3, 4, 7]]
    whole.prefill(prompts, rows=[0, 1])
    h = None
    for stage in stages:
        h = stage.prefill(prompts, rows=[0, 1], hidden=h)
    step = torch.tensor([[11], [12]])
    want = whole.forward(step, torch.tensor([3, 3]))
    for stage in stages:
        step = stage.forward(step, 3)
    torch.testing.assert_close(step, want, atol=1e-4, rtol=1e-4)
