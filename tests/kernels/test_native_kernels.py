"""Our CPU kernels (llama/kernels.c through llama/kernels/native.py): built for this
CPU, the same results as F.linear on the weights they hold, PyTorch's path
above native.MAX_ROWS rows, and a clear fallback when they cannot build.
No timing here: benchmarks/linear_kernels.py."""

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llama import Llama
from llama.kernels import native
from llama.kernels.fused import NativeDecoding, NativeRMSNorm, NativeSwiGLU, use_fused_decoding
from llama.kernels.linear import CpuCapability, NativeMatmul, PlainMatmul, choose_matmul
from llama.weights.quantized import group_int4, group_int8

CPU_FLAGS = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
CAN_BUILD = bool(shutil.which("cc") or shutil.which("gcc")) and " avx2 " in CPU_FLAGS and " fma " in CPU_FLAGS
needs_native = pytest.mark.skipif(native.library() is None, reason=f"no native kernels here: {native.status()}")


def weight(n, k, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / k ** 0.5


def quantized_x(x):
    """x (rows, K) per group of 32 as kernels.c quantizes it for int8 dot
    products (llama.cpp's Q8_0): (xq (rows, K / 32, 32), sx (rows, K / 32))
    in float64, sx = max|x| / 127 and xq = round(x / sx)."""
    rows, k = x.shape
    xg = x.double().view(rows, k // 32, 32)
    amax = xg.abs().amax(-1, keepdim=True)
    xq = torch.where(amax > 0, torch.round(xg.float() * (127 / amax.float())).double(), 0.0)
    return xq, amax[..., 0] / 127


def q8_reference(x, q, scales):
    """x @ (q * scales)^T as kernels.c's int8 dot products compute it, in
    float64: the dot of quantized_x with q exact, then both scales."""
    xq, sx = quantized_x(x)
    dots = torch.einsum("mgi,ngi->mng", xq, q.double().view(q.shape[0], *xq.shape[1:]))
    return (dots * sx[:, None, :] * scales.double()[None]).sum(-1)


def q4_reference(x, packed, scales):
    """x @ W^T for group_int4's (packed, scales) as kernels.c's int4 by int8
    dot products compute it, in float64: per group sx * (scale * (q . xq) +
    min * sum(xq)), the dot exact."""
    xq, sx = quantized_x(x)
    p = packed.view(packed.shape[0], -1, 16)
    q = torch.cat([p & 15, p >> 4], dim=-1).double()
    dots = torch.einsum("mgi,ngi->mng", xq, q)
    s = scales.double()[None]
    return ((dots * s[..., 0] + xq.sum(-1)[:, None, :] * s[..., 1]) * sx[:, None, :]).sum(-1)


def unpack_int4(packed, scales):
    """group_int4's weight (N, K) in fp32, by PyTorch's operators: the format
    as kernels.c reads it (low nibbles are a group's first 16 weights)."""
    n, half = packed.shape
    p = packed.view(n, -1, 16)
    q = torch.cat([p & 15, p >> 4], dim=-1).float()  # (N, K / 32, 32)
    return (q * scales[..., :1].float() + scales[..., 1:].float()).view(n, 2 * half)


def quantized(kind, w):
    """(weight, scales) of `w` as NativeMatmul holds it for "int8" or "int4",
    the float weight they stand for, and the kernels' reference."""
    if kind == "int8":
        q, scales = group_int8(w)
        return q, scales, (q.view(*w.shape[:1], -1, 32).float() * scales[..., None]).view(w.shape), q8_reference
    q, scales = group_int4(w)
    return q, scales, unpack_int4(q, scales), q4_reference


@pytest.mark.skipif(not CAN_BUILD, reason="no C compiler or no AVX2+FMA: the fallback is tested below")
def test_builds_here_into_its_cache_without_leftovers(fresh_library):
    lib = native.library()
    assert lib is not None, native.status()
    assert native.status() in ("AVX-512", "AVX2")
    built = sorted(p.name for p in fresh_library.iterdir())
    assert len(built) == 1 and built[0].startswith("kernels-") and built[0].endswith(".so")  # no temporary left


@needs_native
@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8", "int4"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_kernels_equal_f_linear_on_the_weight_they_hold(kind, x_dtype):
    """Every row count up to and past MAX_ROWS (PyTorch's GEMM there), a row
    count that leaves a partial tile (37), 3-D input; sums in fp32, so fp32
    is exact to rounding and bf16 output to one bf16 step (where the sum is
    not about 0). int8 and int4 by
    int8 dot products (native.int8_dot()) equal q8_reference and
    q4_reference instead, up to MAX_ROWS; 96 columns are three groups, so
    the last vector of 64 has one."""
    w = weight(37, 96)
    mm = NativeMatmul(w.bfloat16() if kind == "bf16" else w, kind if kind in ("int8", "int4") else None,
                      CpuCapability("AVX512"))
    held = mm.dequantized()
    for rows in list(range(1, 10)) + [native.MAX_ROWS, native.MAX_ROWS + 1, 40]:
        x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows)).to(x_dtype)
        y = mm(x)
        assert y.dtype == x_dtype and y.shape == (rows, 37)
        ref = F.linear(x.float(), held)
        if kind in ("int8", "int4") and native.int8_dot() and rows <= native.MAX_ROWS:
            ref = (q8_reference if kind == "int8" else q4_reference)(x.float(), mm.weight, mm.scales).float()
        if x_dtype == torch.float32:
            torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(y, ref.bfloat16(), atol=1e-6, rtol=2 ** -7)  # atol: sums that cancel to ~0
    x3 = torch.randn(2, 5, 96).to(x_dtype)
    torch.testing.assert_close(mm(x3).float(), mm(x3.reshape(10, 96)).float().reshape(2, 5, 37))


@pytest.mark.skipif(not CAN_BUILD, reason="no C compiler or no AVX2+FMA")
@pytest.mark.parametrize("arch", ["haswell", "skylake-avx512", "native"])
def test_quantized_kernels_for_each_instruction_set(fresh_library, monkeypatch, arch):
    """The library built for AVX2 (vpmaddubsw; llama.cpp's sign trick for
    int8), for AVX-512 without VNNI (weights widened to fp32) and for this
    CPU: int8 and int4 by int8 dot products equal q8_reference and
    q4_reference, widened ones F.linear, and all stay within the
    activations' quantization bound of F.linear on the held weight; a NaN in
    x gives NaN in its row only, as F.linear does."""
    if arch == "skylake-avx512" and " avx512f " not in CPU_FLAGS:
        pytest.skip("this CPU has no AVX-512")
    monkeypatch.setenv("LLAMA_NATIVE_ARCH", arch)
    native.library.cache_clear()
    assert native.library() is not None, native.status()
    here = " avx512_vnni " in CPU_FLAGS or " avx512f " not in CPU_FLAGS
    assert native.int8_dot() == {"haswell": True, "skylake-avx512": False, "native": here}[arch]
    for kind in ("int8", "int4"):
        q, scales, held, reference = quantized(kind, weight(67, 160, seed=3))  # a partial tile; an odd last group
        x = torch.randn(6, 160, generator=torch.Generator().manual_seed(9))
        x[2, 40:45] = torch.tensor([30.0, -0.0, 1e-30, -7.0, 0.0])  # an outlier coarsens its own group only
        x[4, 96:128] = 0.0  # a group of zeros: scale 0, not NaN
        y = native.linear(x, q, scales).double()
        exact = F.linear(x.double(), held.double())
        torch.testing.assert_close(y, reference(x, q, scales) if native.int8_dot() else exact, rtol=1e-5, atol=1e-5)
        step = x.view(6, 5, 32).abs().amax(-1) / 127  # |x - sx xq| <= sx / 2 per element
        bound = (step / 2).double() @ held.abs().view(67, 5, 32).sum(-1).double().T
        assert ((y - exact).abs() <= bound * 1.001 + 1e-6).all(), kind
        x[3, 77] = float("nan")
        y = native.linear(x, q, scales)
        assert y[3].isnan().all() and not y[[0, 1, 2, 4, 5]].isnan().any(), kind


@needs_native
def test_bf16_output_rounds_to_nearest_even():
    """Sums a + b exact in fp32 that fall on, near and past bf16 ties, and
    past bf16's largest value: the kernel's rounding to bf16 is torch's."""
    pairs = [(1.0, 2 ** -8), (1 + 2 ** -7, 2 ** -8), (1.0, 2 ** -8 + 2 ** -12), (-1.0, -(2 ** -8) - 2 ** -12),
             (3.3e38, 3.3e38), (float("nan"), 1.0), (2 ** -130, 0.0)]
    x = torch.zeros(len(pairs), 32)
    x[:, :2] = torch.tensor(pairs)
    x = x.bfloat16()
    w = torch.zeros(1, 32)
    w[0, :2] = 1
    sums = x.float()[:, 0] + x.float()[:, 1]  # exact in fp32
    y = native.linear(x, w)[:, 0]
    assert torch.equal(y.isnan(), sums.isnan())
    assert torch.equal(y[~y.isnan()], sums.bfloat16()[~sums.isnan()])


def test_group_int8_is_within_half_a_step_of_each_group():
    w = weight(8, 128)
    w[3, 70] = 50.0  # one large weight coarsens only its own group
    q, scales = group_int8(w)
    assert q.dtype == torch.int8 and scales.shape == (8, 4) and q.abs().max() <= 127
    deq = (q.view(8, 4, 32).float() * scales[..., None]).view(8, 128)
    assert ((deq - w).abs().view(8, 4, 32) <= scales[..., None] / 2 * 1.0001).all()
    assert scales[3, 2] == 50.0 / 127
    others = torch.ones(8, 4, dtype=torch.bool)
    others[3, 2] = False
    assert scales[others].max() < 0.5 / 127  # every other group keeps its own fine step (weight() < 0.5)


def test_group_int4_is_within_half_a_step_of_each_group():
    """Every weight within half a step (scale / 2) of itself, plus the
    rounding of the fp16 min; the packing puts weight j of a group in byte
    j % 16, the low nibble for j < 16; weights fp16 cannot scale are refused."""
    w = weight(8, 128)
    w[3, 70] = 50.0  # one large weight coarsens only its own group
    w[5, 32:64] = 0.25  # a constant group: exact
    packed, scales = group_int4(w)
    assert packed.dtype == torch.uint8 and packed.shape == (8, 64)
    assert scales.dtype == torch.float16 and scales.shape == (8, 4, 2)
    deq = unpack_int4(packed, scales)
    groups = w.view(8, 4, 32)
    lo_error = (scales[..., 1].float() - groups.amin(-1)).abs()[..., None]
    assert ((deq.view(8, 4, 32) - groups).abs() <= scales[..., :1].float() / 2 * 1.0001 + lo_error).all()
    assert (deq.view(8, 4, 32).amin(-1) == scales[..., 1].float()).all()  # the smallest weight has q = 0
    assert torch.equal(deq[5, 32:64], w[5, 32:64])
    others = torch.ones(8, 4, dtype=torch.bool)
    others[3, 2] = others[5, 1] = False
    assert scales[3, 2, 0] > 3.0 and scales[..., 0][others].max() < 1.0 / 15
    for bad in (float("inf"), float("nan"), 1e5):
        w[2, 3] = bad
        with pytest.raises(ValueError, match=r"int4 keeps fp16 scales.*\(8, 128\).*int8"):
            group_int4(w)
    one = torch.zeros(1, 32)
    one[0, 17] = 1.0  # weight 17: high nibble of byte 1
    packed, _ = group_int4(one)
    assert packed[0, 1] == 15 << 4 and packed[0, [0, *range(2, 16)]].eq(0).all()


@needs_native
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_dequantize_for_prefill_equals_pytorchs_unpacking(kind):
    """native.dequantize (what prefill's GEMM multiplies by) is the weight
    the decoding kernels read, as PyTorch's operators compute it: fp32
    exactly, bf16 rounded once from it."""
    q, scales, held, _ = quantized(kind, weight(37, 160, seed=5))
    assert torch.equal(native.dequantize(q, scales, torch.float32), held)
    assert torch.equal(native.dequantize(q, scales, torch.bfloat16), held.bfloat16())
    mm = NativeMatmul(weight(37, 160, seed=5), kind, CpuCapability("AVX512"))
    assert torch.equal(mm.dequantized(), held)


def test_off_switch_and_failed_builds_fall_back_with_a_reason(fresh_library, monkeypatch):
    monkeypatch.setenv("LLAMA_NATIVE", "0")
    native.library.cache_clear()
    assert native.library() is None and native.status() == "off (LLAMA_NATIVE=0)"
    assert type(choose_matmul(weight(8, 64), None, CpuCapability("AVX512"))) is not NativeMatmul
    monkeypatch.delenv("LLAMA_NATIVE")
    monkeypatch.setenv("CC", "false")  # a compiler that fails
    native.library.cache_clear()
    if native.platform.machine().lower() in ("x86_64", "amd64"):
        assert native.library() is None
        assert "building llama/kernels/kernels.c with false failed" in native.status() or "does not run" in native.status()
        assert not list(fresh_library.glob("*"))  # nothing half-written left behind
        monkeypatch.setattr(native, "_compiler", lambda: None)
        native.library.cache_clear()
        assert native.library() is None and "no C compiler" in native.status()


def test_the_loaded_line_says_whose_kernels_run(make_ckpt, monkeypatch, caplog):
    ckpt = make_ckpt("llama3")
    kw = dict(max_seq_len=32, max_batch_size=1, device="cpu", dtype="float32")
    with caplog.at_level("INFO", logger="llama"):
        _without_native(monkeypatch, lambda: Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), **kw))
    assert "float32 (as asked), PyTorch's kernels, " in caplog.text
    if native.library() is not None:
        caplog.clear()
        with caplog.at_level("INFO", logger="llama"):
            Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), **kw)
        assert f"float32 (as asked), our {native.status()} kernels, " in caplog.text


@needs_native
def test_a_library_of_another_version_is_refused(fresh_library, monkeypatch):
    monkeypatch.setattr(native, "VERSION", native.VERSION + 1)
    native.library.cache_clear()
    assert native.library() is None and "this code needs" in native.status()


def test_k_not_a_multiple_of_32_is_left_to_pytorch():
    assert not native.supports(weight(8, 48))
    assert type(choose_matmul(weight(8, 48), "int8", CpuCapability("AVX512"))) is not NativeMatmul


@needs_native
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_with_our_kernels_decodes_as_with_pytorchs(make_ckpt, monkeypatch, dtype):
    """The same greedy tokens and close logits as the build without our
    kernels; int8 decoding steps (our kernel) agree with its prefill
    (PyTorch's GEMM on the dequantized weights)."""
    ckpt = make_ckpt("llama3")
    kw = dict(max_seq_len=64, max_batch_size=2, device="cpu", dtype=dtype)
    ours = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), **kw)
    monkeypatch.setenv("LLAMA_NATIVE", "0")
    native.library.cache_clear()
    theirs = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), **kw)
    monkeypatch.undo()
    native.library.cache_clear()
    assert any(isinstance(m, NativeMatmul) for m in ours.model.modules())
    assert not any(isinstance(m, NativeMatmul) for m in theirs.model.modules())
    prompt = [[128000, 1000, 2000, 3000, 4000]]
    tokens = [g.generate(prompt, max_gen_len=8, temperature=0)[0][0] for g in (ours, theirs)]
    assert tokens[0] == tokens[1]

    long_seq = torch.randint(3, 500, (1, native.MAX_ROWS + 8), generator=torch.Generator().manual_seed(6))
    for quantize in ("int8", "int4"):
        quant = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), quantize=quantize, **kw)
        prefill = quant.model.forward(long_seq, 0)  # PyTorch's GEMM on the dequantized weights
        steps = [quant.model.forward(long_seq[:, :1], 0)]
        steps += [quant.model.forward(long_seq[:, i:i + 1], i) for i in range(1, long_seq.shape[1])]  # our kernel
        # activations quantized to int8 per group of 32 (native.int8_dot()) move logits by about 1.5% here
        tol = 0.1 if dtype == "bfloat16" else 0.05 if native.int8_dot() else 1e-3
        assert (torch.cat(steps, 1) - prefill).abs().max() < tol * prefill.abs().max(), quantize


def _without_native(monkeypatch, build):
    monkeypatch.setenv("LLAMA_NATIVE", "0")
    native.library.cache_clear()
    try:
        return build()
    finally:
        monkeypatch.undo()
        native.library.cache_clear()


@needs_native
@pytest.mark.parametrize("family, shape", [("llama2", {}), ("llama3", {}),  # head_dim 16
                                           ("llama3", dict(dim=256, n_heads=4, n_kv_heads=1)),  # 64, 4 per KV head
                                           ("llama3", dict(dim=256, n_heads=2, n_kv_heads=2))])  # 128
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_decoding_steps_equal_pytorchs(make_ckpt, monkeypatch, family, shape, dtype):
    """Every block's decoding step in one call (one process), half a block a
    call (tensor parallelism: decode_layers_parallel, here with one rank),
    and RMSNorm, silu * up and the decoding attention (RoPE, cache writes,
    grouped-query attention) in one call each (blocks that decode_layers
    cannot take): the same logits and caches as PyTorch's operators, for one
    row, rows at one position and rows at their own positions (the engine's
    continuous batching)."""
    ckpt = make_ckpt(family, **shape)
    kw = dict(max_seq_len=64, max_batch_size=3, device="cpu", dtype=dtype)
    build = lambda: Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), **kw)  # noqa: E731
    whole, halves, ops, theirs = build(), build(), build(), _without_native(monkeypatch, build)
    for block in halves.model.layers:  # as under model parallelism
        block.alone = False
    parallel_calls = []
    real = native.decode_layers_parallel
    monkeypatch.setattr(native, "decode_layers_parallel", lambda *a: parallel_calls.append(1) or real(*a))
    monkeypatch.setattr(ops.model.decode_hook, "layers", lambda model, dtype: None)  # the fused pieces, block by block
    assert native.fused(torch.zeros(1, dtype=getattr(torch, dtype)))
    hook = whole.model.decode_hook
    assert isinstance(hook, NativeDecoding)
    assert all(hook.block_weights(block, getattr(torch, dtype)) for block in whole.model.layers)
    other = build().model  # the decision follows a swapped matmul
    block = other.layers[0]
    assert other.decode_hook.block_weights(block, getattr(torch, dtype)) is not None
    block.feed_forward.w2.matmul = PlainMatmul(block.feed_forward.w2.matmul.weight)
    assert other.decode_hook.block_weights(block, getattr(torch, dtype)) is None
    lens = [5, 9, 2]
    seqs = [torch.randint(3, 500, (n + 3,), generator=torch.Generator().manual_seed(n)) for n in lens]
    gens = (whole, halves, ops, theirs)
    for gen in gens:
        gen.model.prefill([s[:n].tolist() for s, n in zip(seqs, lens)], rows=[0, 1, 2])
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == "float32" else dict(atol=0.1, rtol=0.05)
    for step in range(3):
        nxt = torch.stack([s[n + step] for s, n in zip(seqs, lens)])[:, None]
        start = torch.tensor(lens) + step
        logits = [gen.model.forward(nxt, start) for gen in gens]
        for mine in logits[:3]:
            torch.testing.assert_close(mine, logits[3], **tol)
        assert torch.equal(logits[0], logits[1])  # the same kernels, the same order of sums
    one = [gen.model.forward(seqs[0][:1][None], 20) for gen in gens]  # one row at an int position
    for mine in one[:3]:
        torch.testing.assert_close(mine, one[3], **tol)
    assert len(parallel_calls) == 4  # halves' four decoding steps, nobody else's
    for gen in (whole, halves, ops):
        for a, b in zip(gen.model.layers, theirs.model.layers):
            torch.testing.assert_close(a.attention.cache_k, b.attention.cache_k, **tol)
            torch.testing.assert_close(a.attention.cache_v, b.attention.cache_v, **tol)


@needs_native
def test_a_decoding_step_is_one_native_call_for_all_blocks(make_ckpt, monkeypatch):
    """One process: each decoded token runs every block in one decode_layers
    call (not one call per block, not PyTorch's operators); blocks that
    cannot be run together are refused with the reason."""
    ckpt = make_ckpt("llama3")
    gen = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=64, max_batch_size=1, device="cpu",
                      dtype="float32")
    calls = []
    real = native.decode_layers
    monkeypatch.setattr(native, "decode_layers", lambda h, layers, *a: calls.append(len(layers.blocks)) or real(h, layers, *a))
    gen.tokenizer.stop_tokens = frozenset()  # every run decodes its full length
    gen.generate([[128000, 1000, 2000]], max_gen_len=6, temperature=0)
    assert calls == [len(gen.model.layers)] * 5  # the first token comes from the prefill
    blocks = [gen.model.decode_hook.block_weights(layer, torch.float32) for layer in gen.model.layers]
    assert native.Layers(blocks).blocks == blocks
    with pytest.raises(ValueError, match="differ"):
        native.Layers([blocks[0], _bf16_block(blocks[1])])
    with pytest.raises(ValueError, match="differ"):
        native.Layers([])
    with pytest.raises(TypeError, match="bfloat16"):
        native.decode_layers(torch.zeros(1, 1, gen.model.params.dim, dtype=torch.bfloat16), native.Layers(blocks),
                             *[None] * 3)


def _bf16_block(block: native.BlockWeights) -> native.BlockWeights:
    """`block` with bf16 norms: a block of another dtype."""
    linears, attention_norm, ffn_norm, cache_k, cache_v = block.tensors
    _, eps, _, n_q, n_kv, _, _ = block.shape
    return native.BlockWeights(linears, attention_norm.bfloat16(), ffn_norm.bfloat16(), eps, cache_k, cache_v, n_q, n_kv)


def test_fused_decoding_is_installed_from_outside(make_ckpt):
    """A built model runs our fused norms and SwiGLU (same parameters, by
    identity) and decodes through the NativeDecoding hook; installing it
    again changes nothing, and a hook that declines leaves the step to the
    modules (the same logits)."""
    ckpt = make_ckpt("llama3")
    gen = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=64, max_batch_size=1, device="cpu",
                      dtype="float32")
    model = gen.model
    assert isinstance(model.norm, NativeRMSNorm) and isinstance(model.decode_hook, NativeDecoding)
    assert all(isinstance(b.feed_forward.swiglu, NativeSwiGLU) for b in model.layers)
    weight = model.layers[0].attention_norm.weight
    use_fused_decoding(model)
    assert model.layers[0].attention_norm.weight is weight
    model.prefill([[1, 5, 9]], rows=[0])
    fused = model.forward(torch.tensor([[11]]), 3)
    model.decode_hook = lambda *a: None  # declines
    torch.testing.assert_close(model.forward(torch.tensor([[11]]), 3), fused, atol=1e-4, rtol=1e-4)
