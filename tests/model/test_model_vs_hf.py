"""Our transformer against Hugging Face LlamaForCausalLM on the same random
weights: all logits (fp32) and greedy generations, for Llama 2, Llama 3 and
Llama 3.1 (scaled RoPE) shapes."""

import pytest
import torch

from benchmarks.hf_reference import hf_model_from_meta
from llama import Llama
from llama.model import rope_frequencies

FAMILIES = ["llama2", "llama3", "llama3.1"]


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, make_ckpt):
    family = request.param
    ckpt = make_ckpt(family)
    ours = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=96, max_batch_size=4,
                       device="cpu", dtype="float32")
    theirs = hf_model_from_meta(ckpt, ours.tokenizer.n_words)
    return family, ours, theirs


def test_all_logits_match(pair):
    _, ours, theirs = pair
    tokens = torch.randint(0, ours.tokenizer.n_words, (3, 40), generator=torch.Generator().manual_seed(1))
    mine = ours.model.forward(tokens, 0)
    with torch.no_grad():
        ref = theirs(tokens).logits
    assert mine.dtype == torch.float32 and mine.shape == ref.shape
    torch.testing.assert_close(mine, ref, atol=1e-4, rtol=1e-4)


def test_greedy_generation_matches(pair):
    _, ours, theirs = pair
    prompt = ours.tokenizer.encode("The llama is a domesticated animal", bos=True, eos=False)
    (mine,), _ = ours.generate([prompt], max_gen_len=24, temperature=0)
    with torch.no_grad():
        ref = theirs.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt):].tolist()
    # Our output stops before a stop token; HF (no eos configured) runs on.
    assert len(mine) > 0
    assert mine == ref[: len(mine)]
    if len(mine) < 24:
        assert ref[len(mine)] in ours.tokenizer.stop_tokens


def test_scaled_rope_frequencies_match_transformers():
    """Llama 3.1 frequency scaling, compared directly (small positions barely
    exercise the long wavelengths it changes)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for head_dim in (16, 64, 128):
        config = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, max_position_embeddings=131072,
                             rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 8192})
        ref, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
        mine = rope_frequencies(head_dim, 500000.0, use_scaled=True)
        torch.testing.assert_close(mine, ref.float(), rtol=1e-6, atol=0)
        plain = rope_frequencies(head_dim, 500000.0, use_scaled=False)
        # All three regimes occur: kept, divided by 8, and blended.
        ratio = plain / mine
        assert (ratio == 1).any() and torch.isclose(ratio, torch.tensor(8.0)).any()
        assert ((ratio > 1.01) & (ratio < 7.99)).any()


def test_bf16_close_to_fp32(make_ckpt):
    ckpt = make_ckpt("llama3", dtype=torch.bfloat16)
    tok = str(ckpt / "tokenizer.model")
    f32 = Llama.build(str(ckpt), tok, max_seq_len=64, max_batch_size=1, device="cpu", dtype="float32")
    b16 = Llama.build(str(ckpt), tok, max_seq_len=64, max_batch_size=1, device="cpu", dtype="bfloat16")
    assert {p.dtype for p in b16.model.parameters()} == {torch.bfloat16}
    tokens = torch.randint(0, f32.tokenizer.n_words, (1, 16), generator=torch.Generator().manual_seed(2))
    a, b = f32.model.forward(tokens, 0), b16.model.forward(tokens, 0)
    assert b.dtype == torch.float32  # logits are returned as float
    assert (a - b).abs().max() < 0.05 * a.abs().max()
