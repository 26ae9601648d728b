"""The matmul kernels that replace F.linear: the same results as F.linear on
the weights they hold (within the dtype's tolerance), the path chosen for each
CPU capability, quantized models that agree with bf16, and the
model-parallel collectives kept. No timing here: benchmarks/linear_kernels.py."""

import pytest
import torch
import torch.nn.functional as F

from benchmarks.matmuls import Int4Matmul, Int8DynamicMatmul
from llama import Llama
from llama.kernels import native
from llama.kernels.linear import (CpuCapability, Int8Matmul, KernelLinear, NativeMatmul,
                          OneDNNMatmul, PlainMatmul, check_quantization, choose_matmul, cpu_capability,
                          onednn_available)
from llama.weights.quantized import int4_groups

SHAPES = [(1, 64), (8, 64), (2, 5, 64)]  # M=1 (decoding), M=8 (a batch), 3-D (bs, seq, dim)
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}
CAPABILITIES = [CpuCapability("AVX512", vnni=True, bf16=True), CpuCapability("AVX512", vnni=True), CpuCapability("AVX512"),
                CpuCapability("AVX2", vnni=True), CpuCapability("AVX2"), CpuCapability("DEFAULT")]


def weight(n=96, k=64, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / k ** 0.5


def inputs(dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for shape in SHAPES]


def int4_dequantized(w, group):
    q, scale, lo = int4_groups(w, group)
    n, k = w.shape
    return (q.reshape(n, k // group, group) * scale[..., None] + lo[..., None]).reshape(n, k)


@pytest.mark.skipif(not onednn_available(torch.float32), reason="this PyTorch has no oneDNN linear")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_onednn_and_plain_match_f_linear(dtype):
    w = weight().to(dtype)
    for mm in (OneDNNMatmul(w), PlainMatmul(w)):
        for x in inputs(dtype):
            y = mm(x)
            assert y.dtype == dtype and y.shape == (*x.shape[:-1], 96)
            torch.testing.assert_close(y, F.linear(x, w), **TOL[dtype])


@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_int8_weight_only_matches_f_linear_on_its_dequantized_weight(act, x_dtype):
    w = weight()
    mm = Int8Matmul(w, act)
    deq = mm.dequantized()
    assert (deq - w).abs().max() <= w.abs().amax(1).max() / 127 / 2 * 1.01  # half a step of the row's scale
    for x in inputs(x_dtype):
        y = mm(x)
        assert y.dtype == x_dtype and y.shape == (*x.shape[:-1], 96)
        ref = F.linear(x.to(act).float(), deq)
        torch.testing.assert_close(y.float(), ref, **TOL[torch.bfloat16 if torch.bfloat16 in (act, x_dtype) else act])


def test_int8_weight_only_is_exact_on_representable_weights():
    q = torch.randint(-127, 128, (8, 16)).float()
    q[:, 0] = 127  # each row's max is 127 * scale
    scale = torch.rand(8, 1) + 0.5
    exact = Int8Matmul(q * scale)
    assert torch.equal(exact.qweight.float(), q)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_int8_dynamic_matches_f_linear_on_its_dequantized_weight(x_dtype):
    """Activations are quantized too (per tensor, 8 bits): close, not exact."""
    w = weight()
    mm = Int8DynamicMatmul(w)
    deq = mm.dequantized()
    assert (deq - w).abs().max() <= w.abs().amax(1).max() / 127 / 2 * 1.01
    for x in inputs(x_dtype):
        y = mm(x)
        assert y.dtype == x_dtype and y.shape == (*x.shape[:-1], 96)
        ref = F.linear(x.float(), deq)
        assert (y.float() - ref).norm() / ref.norm() < 0.02
        # one activation step (max|x| / 255 in uint8) times the weights' row sums bounds the error
        bound = (x.float().amax() - x.float().amin()) / 255 * deq.abs().sum(1).max() + 0.02
        assert (y.float() - ref).abs().max() < bound


@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_int4_matches_f_linear_on_its_dequantized_weight(group, act, x_dtype):
    w = weight()
    deq = int4_dequantized(w, group)
    steps = (w.reshape(96, -1, group).amax(-1) - w.reshape(96, -1, group).amin(-1)) / 15
    assert (deq - w).abs().max() <= steps.max() / 2 * 1.01  # half a step of the group's scale
    mm = Int4Matmul(w, group, act)
    for x in inputs(x_dtype):
        y = mm(x)
        assert y.dtype == x_dtype and y.shape == (*x.shape[:-1], 96)
        ref = F.linear(x.to(act).float(), deq)
        torch.testing.assert_close(y.float(), ref, **TOL[torch.bfloat16 if torch.bfloat16 in (act, x_dtype) else act])


def test_cpu_capability_reads_aten_and_flags(monkeypatch):
    import llama.kernels.linear as linear

    cap = cpu_capability()
    assert cap.isa == torch.backends.cpu.get_cpu_capability()
    flags = {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16"}
    monkeypatch.setattr(linear, "_cpu_flags", lambda: frozenset(flags))
    for isa, expected in [("AVX512", CpuCapability("AVX512", vnni=True, bf16=True)),
                          ("AVX2", CpuCapability("AVX2", vnni=True)),  # AVX2 uses neither AVX-512 flag
                          ("DEFAULT", CpuCapability("DEFAULT"))]:
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda isa=isa: isa)
        linear.cpu_capability.cache_clear()
        assert linear.cpu_capability() == expected
    flags.discard("avx512_vnni")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    linear.cpu_capability.cache_clear()
    assert linear.cpu_capability() == CpuCapability("AVX512", vnni=False, bf16=True)
    monkeypatch.undo()
    linear.cpu_capability.cache_clear()


# What choose_matmul picks, per capability and weight dtype, where our kernels
# (llama/kernels.c) cannot run (int8: Int8Matmul with bf16 activations
# everywhere); with AVX2 or AVX-512, NativeMatmul wherever they built. The
# measured choices of benchmarks/linear_kernels.py (see llama/kernels/linear.py).
EXPECTED = {
    "AVX512": {torch.float32: PlainMatmul, torch.bfloat16: OneDNNMatmul},
    "AVX2": {torch.float32: PlainMatmul, torch.bfloat16: PlainMatmul},
    "DEFAULT": {torch.float32: PlainMatmul, torch.bfloat16: PlainMatmul},
}


@pytest.mark.parametrize("cpu", CAPABILITIES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_each_capability_gets_its_path_and_it_matches(cpu, dtype, quantize):
    """The measured path for each faked capability, and its results equal
    F.linear on the weight it holds, with activations in the weight's dtype."""
    w = weight().to(dtype)
    mm = choose_matmul(w, quantize, cpu)
    expected = Int8Matmul if quantize == "int8" else EXPECTED[cpu.isa][dtype]
    if expected is OneDNNMatmul and not onednn_available(dtype):  # this PyTorch / CPU has none: F.linear
        expected = PlainMatmul
    if cpu.isa in ("AVX512", "AVX2") and native.library() is not None:
        expected = NativeMatmul
    assert type(mm) is expected
    if expected is Int8Matmul:
        assert mm.act == torch.bfloat16  # ATen's int8 kernel is 4-20x slower with fp32 activations
    deq = mm.dequantized() if quantize else w.float()
    for x in inputs(dtype):
        y = mm(x)
        assert y.dtype == dtype and y.shape == (*x.shape[:-1], 96)
        ref = F.linear(x.float(), deq)
        assert (y.float() - ref).norm() / ref.norm() < 0.01


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_kernels_replace_every_parallel_linear(make_ckpt, quantize):
    """Each linear layer holds its quantized weight (int4: the output layer
    in int8, as llama.cpp's 4-bit mixes keep it at 6 bits or more)."""
    if quantize == "int4" and native.library() is None:
        pytest.skip(f"int4 runs on our kernels only, and there are none here: {native.status()}")
    ckpt = make_ckpt("llama3")
    gen = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=32, max_batch_size=1,
                      device="cpu", dtype="bfloat16", quantize=quantize)
    kernels = [m for m in gen.model.modules() if isinstance(m, KernelLinear)]
    assert len(kernels) == 2 * 4 + 1  # wqkv, wo, w13 and w2 per layer, plus the output layer
    assert all(type(k.matmul) is (NativeMatmul if native.library() else Int8Matmul) for k in kernels)
    if native.library():
        held = {torch.int8: "int8", torch.uint8: "int4"}
        assert [held[k.matmul.weight.dtype] for k in kernels] == [quantize] * 8 + ["int8"]
    layer = gen.model.layers[0]
    assert gen.model.output.collective == "gather" and layer.attention.wo.collective == "reduce"
    assert layer.attention.wqkv.matmul.dequantized().shape == (4 * 16 + 2 * 2 * 16, 64)  # 4 query heads, 2 KV heads
    assert layer.feed_forward.w13.matmul.dequantized().shape == (2 * 192, 64)
    assert not hasattr(layer.attention, "wq") and not hasattr(layer.feed_forward, "w1")


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("quantize, agreement, spread", [("int8", 0.9, 0.2), ("int4", 0.65, 0.2)])
def test_quantized_model_agrees_with_bf16(make_ckpt, dtype, quantize, agreement, spread):
    """Teacher-forced top-1 agreement with the bf16 model, and greedy tokens
    the same for the first steps. Random tiny weights are harder to quantize
    than trained ones (no position is confidently predicted), hence the rates
    here: the real-model figures are in the README."""
    if quantize == "int4" and native.library() is None:
        pytest.skip(f"int4 runs on our kernels only, and there are none here: {native.status()}")
    ckpt = make_ckpt("llama3", dtype=torch.bfloat16)
    kw = dict(max_seq_len=64, max_batch_size=2, device="cpu")
    base = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), dtype="bfloat16", **kw)
    quant = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), dtype=dtype, quantize=quantize, **kw)
    tokens = torch.randint(0, 128000, (2, 40), generator=torch.Generator().manual_seed(3))
    ref, got = base.model.forward(tokens, 0), quant.model.forward(tokens, 0)
    assert (ref.argmax(-1) == got.argmax(-1)).float().mean() >= agreement
    assert (ref - got).abs().max() < spread * (ref.max() - ref.min())
    prompt = [[128000, 1000, 2000, 3000]]
    same = [g.generate(prompt, max_gen_len=3, temperature=0)[0][0] for g in (base, quant)]
    assert same[0] == same[1]


def test_unknown_quantization(make_ckpt):
    ckpt = make_ckpt("llama3")
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=32, max_batch_size=1, quantize="int3")
    with pytest.raises(ValueError, match="unknown quantization 'int3'.*int8.*int4"):
        choose_matmul(weight(), "int3")


def test_int4_where_our_kernels_cannot_run_is_refused_before_loading(make_ckpt, monkeypatch):
    """int4 has no PyTorch path: on a GPU, without our kernels, or for a
    weight they cannot take, a clear error that says to use int8."""
    with pytest.raises(ValueError, match="int4 runs on our CPU kernels only.*not on cuda.*int8"):
        check_quantization("int4", torch.device("cuda"))
    with pytest.raises(ValueError, match="int4 runs on our CPU kernels only.*on cuda.*int8"):
        choose_matmul(weight(), "int4", device=torch.device("cuda"))
    with pytest.raises(ValueError, match=r"\(96, 48\).*multiple of 32.*int8"):
        choose_matmul(torch.zeros(96, 48), "int4", CpuCapability("AVX512"))
    check_quantization("int8", torch.device("cuda"))  # int8 has a GPU path
    ckpt = make_ckpt("llama3")
    monkeypatch.setenv("LLAMA_NATIVE", "0")
    native.library.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"int4 runs on our CPU kernels only.*off \(LLAMA_NATIVE=0\).*int8"):
            Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=32, max_batch_size=1, quantize="int4")
    finally:
        monkeypatch.undo()
        native.library.cache_clear()


@pytest.mark.parametrize("family", ["llama2", "llama3"])
def test_every_collective_goes_through_ours_in_any_dtype(family, make_ckpt, monkeypatch):
    """No fairscale layer is left (its all_reduce costs two round trips on
    gloo): with no faster kernel (every capability choosing F.linear) the
    layers keep F.linear, the embedding its lookup, and the logits are those
    of fairscale's layers exactly."""
    from fairscale.nn.model_parallel.layers import (ColumnParallelLinear, ParallelEmbedding, RowParallelLinear,
                                                     VocabParallelEmbedding)

    import llama.kernels.linear as linear
    from llama.kernels.linear import KernelEmbedding

    ckpt = make_ckpt(family)
    kw = dict(max_seq_len=32, max_batch_size=1, device="cpu", dtype="bfloat16")
    tokens = torch.randint(0, 500, (1, 9), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(linear, "use_kernels", lambda model, quantize=None, device=None, **_: model)
    monkeypatch.setattr("llama.builder.use_kernels", linear.use_kernels)
    monkeypatch.setattr("llama.builder.runs_ours", lambda device: False)  # the weights stay in fairscale's layers
    plain = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), **kw).model.forward(tokens, 0)
    monkeypatch.undo()
    monkeypatch.setattr(linear, "cpu_capability", lambda: CpuCapability("DEFAULT"))
    gen = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), **kw)
    fairscale_layers = (ColumnParallelLinear, RowParallelLinear, ParallelEmbedding, VocabParallelEmbedding)
    assert not [m for m in gen.model.modules() if isinstance(m, fairscale_layers)]
    assert isinstance(gen.model.tok_embeddings, KernelEmbedding)
    assert (gen.model.tok_embeddings.start is None) == (family == "llama2")  # Llama 2 splits the embedding by dim
    assert all(isinstance(m.matmul, PlainMatmul) for m in gen.model.modules() if isinstance(m, KernelLinear))
    assert torch.equal(gen.model.forward(tokens, 0), plain)


def test_every_benchmarked_kernel_computes_the_linear_layer():
    """benchmarks/linear_kernels.py times each candidate on what it computes:
    each must be F.linear up to its format's error (no timing here)."""
    from benchmarks.linear_kernels import candidate_kernels, chosen_kernels

    w = weight(96, 128)
    tol = {"fp32": 1e-4, "bf16": 0.02, "int8": 0.03, "int4": 0.15}
    for kern in candidate_kernels() + chosen_kernels():
        factory = kern.prepare(w)
        factory()
        state = factory()  # a second copy, as the benchmark makes
        assert kern.bytes_of(state) > 0
        for m in (1, 8):
            x = torch.randn(m, 128, generator=torch.Generator().manual_seed(m))
            ref = F.linear(x.to(kern.act).float(), w)
            y = kern.call(x.to(kern.act), state).float()
            rel = ((y - ref).norm() / ref.norm()).item()
            limit = tol[kern.weights] if kern.act == torch.float32 or kern.weights != "fp32" else 0.02
            assert rel < limit, f"{kern.name} {kern.weights}, M={m}: relative error {rel:.4f}"
