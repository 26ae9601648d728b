"""The matmul kernels that replace F.linear: same results (oneDNN), close
results (int8), and the model-parallel collectives kept."""

import pytest
import torch
import torch.nn.functional as F

from llama import Llama
from llama.linear import Int8Matmul, KernelLinear, OneDNNMatmul, onednn_available


@pytest.mark.skipif(not onednn_available(torch.float32), reason="this PyTorch has no oneDNN linear")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_onednn_matches_f_linear(dtype):
    if not onednn_available(dtype):
        pytest.skip(f"oneDNN has no {dtype} linear on this CPU")
    w = torch.randn(96, 64).to(dtype)
    mm = OneDNNMatmul(w)
    for shape in [(1, 64), (3, 64), (2, 5, 64)]:
        x = torch.randn(shape).to(dtype)
        torch.testing.assert_close(mm(x), F.linear(x, w), atol=1e-2 if dtype == torch.bfloat16 else 1e-5, rtol=1e-2)


def test_int8_matmul_is_close_and_exact_on_representable_weights():
    torch.manual_seed(0)
    w = torch.randn(96, 64)
    x = torch.randn(4, 64)
    y = Int8Matmul(w)(x)
    assert y.dtype == x.dtype
    rel = (y - F.linear(x, w)).norm() / F.linear(x, w).norm()
    assert rel < 0.02
    # Weights that are exact multiples of their row scale quantize without loss.
    q = torch.randint(-127, 128, (8, 16)).float()
    q[:, 0] = 127  # each row's max is 127 * scale
    scale = torch.rand(8, 1) + 0.5
    exact = Int8Matmul(q * scale)
    assert torch.equal(exact.qweight.float(), q)
    xb = torch.randn(2, 16).bfloat16()
    torch.testing.assert_close(exact(xb).float(), F.linear(xb.float(), q * scale.bfloat16().float()), atol=0.1, rtol=0.02)


def test_kernels_replace_every_parallel_linear(make_ckpt):
    ckpt = make_ckpt("llama3")
    gen = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=32, max_batch_size=1,
                      device="cpu", dtype="bfloat16", quantize="int8")
    kernels = [m for m in gen.model.modules() if isinstance(m, KernelLinear)]
    assert len(kernels) == 2 * 4 + 1  # wq|wk|wv, wo, w1|w3 and w2 per layer, plus the output layer
    assert all(isinstance(k.matmul, Int8Matmul) for k in kernels)
    layer = gen.model.layers[0]
    assert gen.model.output.collective == "gather" and layer.attention.wo.collective == "reduce"
    assert layer.attention.wqkv.matmul.qweight.shape == (4 * 16 + 2 * 2 * 16, 64)  # 4 query heads, 2 KV heads
    assert layer.feed_forward.w13.matmul.qweight.shape == (2 * 192, 64)
    assert not hasattr(layer.attention, "wq") and not hasattr(layer.feed_forward, "w1")


def test_int8_model_agrees_with_bf16(make_ckpt):
    ckpt = make_ckpt("llama3", dtype=torch.bfloat16)
    kw = dict(max_seq_len=64, max_batch_size=2, device="cpu", dtype="bfloat16")
    base = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), **kw)
    quant = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), quantize="int8", **kw)
    tokens = torch.randint(0, 128000, (2, 40), generator=torch.Generator().manual_seed(3))
    ref, got = base.model.forward(tokens, 0), quant.model.forward(tokens, 0)
    agree = (ref.argmax(-1) == got.argmax(-1)).float().mean()
    assert agree > 0.9
    assert (ref - got).abs().max() < 0.1 * (ref.max() - ref.min())


def test_unknown_quantization(make_ckpt):
    ckpt = make_ckpt("llama3")
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=32, max_batch_size=1, quantize="int4")


@pytest.mark.parametrize("family", ["llama2", "llama3"])
def test_every_collective_goes_through_ours_in_any_dtype(family, make_ckpt, monkeypatch):
    """No fairscale layer is left (its all_reduce costs two round trips on
    gloo): with no faster kernel (oneDNN reported missing, as for bf16 on a CPU
    without AVX-512 BF16) the layers keep F.linear, the embedding its lookup,
    and the logits are those of fairscale's layers exactly."""
    from fairscale.nn.model_parallel.layers import (ColumnParallelLinear, ParallelEmbedding, RowParallelLinear,
                                                     VocabParallelEmbedding)

    import llama.linear as linear
    from llama.linear import KernelEmbedding, PlainMatmul

    ckpt = make_ckpt(family)
    kw = dict(max_seq_len=32, max_batch_size=1, device="cpu", dtype="bfloat16")
    tokens = torch.randint(0, 500, (1, 9), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(linear, "use_kernels", lambda model, quantize=None: model)
    monkeypatch.setattr("llama.generation.use_kernels", linear.use_kernels)
    plain = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), **kw).model.forward(tokens, 0)
    monkeypatch.undo()
    monkeypatch.setattr(linear, "onednn_available", lambda dtype: False)
    gen = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), **kw)
    fairscale_layers = (ColumnParallelLinear, RowParallelLinear, ParallelEmbedding, VocabParallelEmbedding)
    assert not [m for m in gen.model.modules() if isinstance(m, fairscale_layers)]
    assert isinstance(gen.model.tok_embeddings, KernelEmbedding)
    assert (gen.model.tok_embeddings.start is None) == (family == "llama2")  # Llama 2 splits the embedding by dim
    assert all(isinstance(m.matmul, PlainMatmul) for m in gen.model.modules() if isinstance(m, KernelLinear))
    assert torch.equal(gen.model.forward(tokens, 0), plain)
