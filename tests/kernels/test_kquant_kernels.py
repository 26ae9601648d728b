"""llama.cpp's K-quants (q4_k, q5_k, q6_k) as GGUF files hold them: the
layout of llama/weights/quantized.py (exact to the gguf package's numpy
dequantizers), and our kernels on the raw super-blocks (kernels.c's tile_k,
dequantize and decode_layers) against references that quantize the
activations per group of 32 as the kernels do, on every instruction set the
CPU can build. No timing here: benchmarks/linear_kernels.py."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llama import Llama
from llama.kernels import native
from llama.kernels.linear import CpuCapability, NativeMatmul
from llama.kernels.segments import SegmentedMatmul
from llama.weights import quantized
from llama.weights.quantized import BLOCK_TYPES, QuantizedWeightError

gguf_quants = pytest.importorskip("gguf.quants")
from gguf.constants import GGMLQuantizationType  # noqa: E402

CPU_FLAGS = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
CAN_BUILD = bool(shutil.which("cc") or shutil.which("gcc")) and " avx2 " in CPU_FLAGS and " fma " in CPU_FLAGS
needs_native = pytest.mark.skipif(native.library() is None, reason=f"no native kernels here: {native.status()}")
KINDS = list(BLOCK_TYPES)  # q4_k, q5_k, q6_k
GGML = {"q4_k": GGMLQuantizationType.Q4_K, "q5_k": GGMLQuantizationType.Q5_K, "q6_k": GGMLQuantizationType.Q6_K}
SHAPES = [(7, 256), (8, 512), (5, 2048)]  # (N odd / even, K = 1, 2 and 8 super-blocks)


def random_blocks(kind, n, k, seed=0, scale=(0.01, 0.1)):
    """An (n, k) weight of `kind` as uint8 rows of super-blocks: random bytes
    (every bit pattern of the scales and quants), with the fp16 d (and dmin)
    drawn from `scale`, so that every value is finite and sane."""
    rng = np.random.default_rng(seed)
    cols, size = BLOCK_TYPES[kind]
    blocks = rng.integers(0, 256, size=(n, k // cols, size), dtype=np.uint8)
    d = rng.uniform(*scale, size=(n, k // cols, 2)).astype(np.float16).view(np.uint8)
    if kind == "q6_k":
        blocks[..., 208:210] = d[..., :2]  # d last
    else:
        blocks[..., 0:4] = d  # d, dmin first
    return torch.from_numpy(blocks.reshape(n, -1))


def quantized_x(x):
    """x (rows, K) per group of 32 as kernels.c quantizes it for int8 dot
    products (llama.cpp's Q8_0): (xq (rows, K / 32, 32), sx (rows, K / 32))
    in float64, sx = max|x| / 127 and xq = round(x / sx), with 127 / max|x|
    divided in fp32 as the kernels do (PyTorch's 127 / tensor multiplies
    by a reciprocal, which moves ties)."""
    rows, k = x.shape
    xg = x.float().view(rows, k // 32, 32)
    amax = xg.abs().amax(-1, keepdim=True)
    inv = torch.full_like(amax, 127.0) / amax
    xq = torch.where(amax > 0, torch.round(xg * inv), 0.0).double()
    return xq, amax[..., 0].double() / 127


def k_reference(x, held):
    """x @ held^T as the kernels compute it, in float64: per group of 32,
    sx (W . xq) with the weight held exactly (K-quant values are exact in
    fp32, and the kernels apply d sc and dmin m to exact int32 dots)."""
    xq, sx = quantized_x(x)
    n = held.shape[0]
    dots = torch.einsum("mgi,ngi->mng", xq, held.double().view(n, *xq.shape[1:]))
    return (dots * sx[:, None, :]).sum(-1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n, k", SHAPES)
def test_dequantize_equals_the_gguf_packages(kind, n, k):
    """quantized.dequantize is gguf.quants.dequantize bit for bit (the same
    fp32 operations), and bf16 is that rounded once."""
    blocks = random_blocks(kind, n, k, seed=k + n)
    theirs = torch.from_numpy(gguf_quants.dequantize(blocks.numpy(), GGML[kind]).copy())
    ours = quantized.dequantize(kind, blocks, None)
    assert ours.dtype == torch.float32 and ours.shape == (n, k) == theirs.shape
    assert torch.equal(ours, theirs)
    assert torch.equal(quantized.dequantize(kind, blocks, None, torch.bfloat16), theirs.bfloat16())


def test_k_quant_scales_unpack_bit_by_bit():
    """Each of the 12 bytes' bits lands in the scale or min the format says."""
    packed = torch.zeros(12, dtype=torch.uint8)
    packed[0] = 0b11_000001  # sc[0] = 1, top bits of sc[4] = 3
    packed[5] = 0b10_000010  # m[1] = 2, top bits of m[5] = 2
    packed[8] = 0x5A  # sc[4] low 4 bits 0xA, m[4] low 4 bits 5
    sc, mn = quantized.kquant_scales(packed)
    assert sc.tolist() == [1, 0, 0, 0, 0x3A, 0, 0, 0]
    assert mn.tolist() == [0, 2, 0, 0, 5, 0x20, 0, 0]


@pytest.mark.parametrize("kind", KINDS)
def test_stored_type_recognises_k_quants_and_refuses_what_fits_none(kind):
    """uint8 without scales is a K-quant, told apart by its row bytes; K must
    be a multiple of 256; q4_1 (uint8 with scales) is as before; shapes,
    splits and the fallback follow the block."""
    cols, size = BLOCK_TYPES[kind]
    blocks = random_blocks(kind, 6, 512)
    assert blocks.shape == (6, 512 // cols * size)
    assert quantized.stored_type("layers.0.attention.wq.weight", blocks, None, 512) == kind
    assert quantized.logical_shape(kind, blocks) == (6, 512)
    assert quantized.stored_shapes(kind, 6, 512) == ((6, 2 * size), None)
    assert quantized.column_unit(kind) == 256
    quantized.check_split("w", kind, 1024, 4)
    with pytest.raises(ValueError, match="groups of 256"):
        quantized.check_split("w", kind, 1024, 8)
    with pytest.raises(QuantizedWeightError, match="multiple of 256 input columns.*has 480"):
        quantized.stored_type("w.weight", torch.zeros(6, 480 // 32 * 18, dtype=torch.uint8), None, 480)
    with pytest.raises(QuantizedWeightError, match=r"uint8 \(6, 100\) without w.scales.*q4_1"):
        quantized.stored_type("w.weight", torch.zeros(6, 100, dtype=torch.uint8), None, 512)
    q, s = quantized.quantize(torch.randn(6, 512), "q4_1")
    assert quantized.stored_type("w.weight", q, s, 512) == "q4_1"
    q, s = quantized.quantize(torch.randn(6, 512), "q8_0")
    assert quantized.stored_type("w.weight", q, s, 512) == "q8_0"
    assert quantized.stored_shapes("q4_1", 6, 512) == ((6, 256), (6, 16, 2))


@needs_native
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n, k", SHAPES)
def test_linear_equals_x_times_the_dequantized_weight(kind, n, k):
    """native.linear on the raw super-blocks, 1, 3 and 16 rows (full and
    partial tiles of rows and of weight rows), fp32 and bf16 x: the
    int8-dot reference to fp32 summation (the activations quantized per 32
    as the kernels do), and F.linear on the held weight within the bound
    that quantization leaves (|x - sx xq| <= sx / 2 per element)."""
    blocks = random_blocks(kind, n, k, seed=n * k)
    held = quantized.dequantize(kind, blocks, None)
    for rows in (1, 3, 16):
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows + k))
        y = native.linear(x, blocks, None, kind)
        assert y.dtype == torch.float32 and y.shape == (rows, n)
        exact = F.linear(x.double(), held.double())
        if native.kquant_int8_dot():
            ref = k_reference(x, held)
            scale = ref.abs().max().item()
            torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6 * scale)
            step = x.view(rows, -1, 32).abs().amax(-1) / 127
            bound = (step / 2).double() @ held.abs().view(n, -1, 32).sum(-1).double().T
            assert ((y.double() - exact).abs() <= bound * 1.001 + 1e-6 * scale).all()
        else:
            torch.testing.assert_close(y.double(), exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item())
        xb = x.bfloat16()
        yb = native.linear(xb, blocks, None, kind)
        assert yb.dtype == torch.bfloat16
        ref_b = k_reference(xb.float(), held) if native.kquant_int8_dot() else F.linear(xb.double(), held.double())
        torch.testing.assert_close(yb.float(), ref_b.float().bfloat16().float(), rtol=2 ** -7,
                                   atol=1e-5 * ref_b.abs().max().item())
    x3 = torch.randn(2, 3, k)
    torch.testing.assert_close(native.linear(x3, blocks, None, kind),
                               native.linear(x3.view(6, k), blocks, None, kind).view(2, 3, n))


@needs_native
@pytest.mark.parametrize("kind", KINDS)
def test_linear_keeps_nan_in_its_row_and_refuses_bad_shapes(kind):
    blocks = random_blocks(kind, 9, 512, seed=2)
    x = torch.randn(4, 512)
    x[2, 300] = float("nan")
    x[1, 0:32] = 0.0  # a group of zeros: scale 0, not NaN
    y = native.linear(x, blocks, None, kind)
    assert y[2].isnan().all() and not y[[0, 1, 3]].isnan().any()
    with pytest.raises(TypeError, match=r"\(\.\.\., 512\)"):
        native.linear(torch.randn(2, 256), blocks, None, kind)
    with pytest.raises(ValueError, match="whole super-blocks"):
        native.linear(torch.randn(2, 512), blocks[:, :-1].contiguous(), None, kind)
    with pytest.raises(TypeError, match="is torch.uint8, this one is torch.int8"):
        native.linear(x, blocks.view(torch.int8), None, kind)
    with pytest.raises(ValueError, match="unknown weight type 'q3_k'"):
        native.linear(x, blocks, None, "q3_k")


@needs_native
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n, k", SHAPES)
def test_native_dequantize_equals_pytorchs(kind, n, k):
    """native.dequantize (prefill's weight) is quantized.dequantize: fp32
    exactly, bf16 rounded once; NativeMatmul.stored runs the same kernels,
    and above MAX_ROWS PyTorch's GEMM on that weight."""
    blocks = random_blocks(kind, n, k, seed=7 * n + k)
    held = quantized.dequantize(kind, blocks, None)
    assert torch.equal(native.dequantize(blocks, None, torch.float32, kind), held)
    assert torch.equal(native.dequantize(blocks, None, torch.bfloat16, kind), held.bfloat16())
    mm = NativeMatmul.stored(kind, blocks, None, torch.float32, CpuCapability("AVX512"))
    assert mm.kind == kind and torch.equal(mm.dequantized(), held)
    x = torch.randn(3, k)
    assert torch.equal(mm(x), native.linear(x, blocks, None, kind))
    x = torch.randn(native.MAX_ROWS + 4, k)
    torch.testing.assert_close(mm(x), F.linear(x, held))


@pytest.mark.skipif(not CAN_BUILD, reason="no C compiler or no AVX2+FMA")
@pytest.mark.parametrize("arch", ["haswell", "skylake-avx512", "native"])
def test_each_instruction_set_gives_the_same_results(fresh_library, monkeypatch, arch):
    """The library built for AVX2 (vpmaddubsw), for AVX-512 without VNNI
    (vpmaddubsw on 64 bytes) and for this CPU: K-quants by int8 dot products
    on all three, equal to the reference, and dequantized exactly."""
    if arch == "skylake-avx512" and " avx512bw " not in CPU_FLAGS:
        pytest.skip("this CPU has no AVX-512 BW")
    monkeypatch.setenv("LLAMA_NATIVE_ARCH", arch)
    native.library.cache_clear()
    assert native.library() is not None, native.status()
    assert native.kquant_int8_dot()
    for kind in KINDS:
        blocks = random_blocks(kind, 11, 768, seed=5)
        held = quantized.dequantize(kind, blocks, None)
        assert torch.equal(native.dequantize(blocks, None, torch.float32, kind), held)
        x = torch.randn(5, 768, generator=torch.Generator().manual_seed(8))
        x[2, 40:45] = torch.tensor([30.0, -0.0, 1e-30, -7.0, 0.0])  # an outlier coarsens its own group only
        ref = k_reference(x, held)
        torch.testing.assert_close(native.linear(x, blocks, None, kind).double(), ref, rtol=1e-5,
                                   atol=1e-6 * ref.abs().max().item())


def _k_quant_model(make_ckpt, kinds, dtype, segmented=False):
    """A tiny Llama 3 of 256-wide blocks whose four matmuls per block are
    NativeMatmul.stored on random K-quant blocks of the types in `kinds`
    (wqkv, wo, w13, w2), scaled so that activations stay sane; `segmented`:
    wqkv a SegmentedMatmul of q and k in q4_k and v in q6_k (Q4_K_M's mix)."""
    ckpt = make_ckpt("llama3", dim=256, n_heads=4, n_kv_heads=1, multiple_of=256)
    gen = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=32, max_batch_size=3, device="cpu",
                      dtype=dtype)
    for i, block in enumerate(gen.model.layers):
        a, f = block.attention, block.feed_forward
        for j, (layer, kind) in enumerate(zip((a.wqkv, a.wo, f.w13, f.w2), kinds)):
            n, k = layer.matmul.weight.shape[0], layer.matmul.dequantized().shape[1]
            blocks = random_blocks(kind, n, k, seed=10 * i + j, scale=(2e-5, 6e-5))
            layer.matmul = NativeMatmul.stored(kind, blocks, None, getattr(torch, dtype), CpuCapability("AVX512"))
        if segmented:
            dim, kv = a.n_local_heads * a.head_dim, a.n_local_kv_heads * a.head_dim
            parts = [NativeMatmul.stored(kind, random_blocks(kind, rows, dim, seed=100 * i + j, scale=(2e-5, 6e-5)),
                                         None, getattr(torch, dtype), CpuCapability("AVX512"))
                     for j, (kind, rows) in enumerate([("q4_k", dim), ("q4_k", kv), ("q6_k", kv)])]
            a.wqkv.matmul = SegmentedMatmul(parts)
    return gen


@needs_native
@pytest.mark.parametrize("kinds, segmented", [(("q4_k", "q4_k", "q4_k", "q6_k"), False),
                                             (("q6_k", "q5_k", "q5_k", "q6_k"), False),
                                             (("q5_k", "q6_k", "q4_k", "q5_k"), False),
                                             (("q4_k", "q4_k", "q4_k", "q6_k"), True)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_decoding_with_k_quants_equals_block_by_block(make_ckpt, monkeypatch, kinds, segmented, dtype):
    """All blocks in one decode_layers call, half a block a call
    (decode_half, as under tensor parallelism) and block by block (the
    modules, each matmul one native call): the same logits and caches, for
    rows at their own positions; also with wqkv in row segments of two
    types (SegmentedMatmul: Q4_K_M's q, k in Q4_K and v in Q6_K)."""
    whole, halves, ops = (_k_quant_model(make_ckpt, kinds, dtype, segmented) for _ in range(3))
    for block in halves.model.layers:
        block.alone = False
    monkeypatch.setattr(ops.model.decode_hook, "layers", lambda model, dtype: None)
    calls = []
    real = native.decode_layers
    monkeypatch.setattr(native, "decode_layers", lambda *a: calls.append(1) or real(*a))
    hook = whole.model.decode_hook
    weights = hook.block_weights(whole.model.layers[0], getattr(torch, dtype))
    assert weights is not None
    wanted = [["q4_k", "q4_k", "q6_k"] if segmented and i == 0 else [kind] for i, kind in enumerate(kinds)]
    assert [[kind for _, _, kind in parts] for parts in weights.tensors[0]] == wanted
    lens = [5, 9, 2]
    seqs = [torch.randint(3, 500, (n + 3,), generator=torch.Generator().manual_seed(n)) for n in lens]
    gens = (whole, halves, ops)
    for gen in gens:
        gen.model.prefill([s[:n].tolist() for s, n in zip(seqs, lens)], rows=[0, 1, 2])
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == "float32" else dict(atol=0.05, rtol=0.02)
    for step in range(3):
        nxt = torch.stack([s[n + step] for s, n in zip(seqs, lens)])[:, None]
        logits = [gen.model.forward(nxt, torch.tensor(lens) + step) for gen in gens]
        assert logits[0].isfinite().all() and logits[0].abs().max() > 0
        assert torch.equal(logits[0], logits[1])  # the same kernels, the same order of sums
        torch.testing.assert_close(logits[2], logits[0], **tol)
    assert len(calls) == 3  # whole's steps went through decode_layers
    for a, b in zip(whole.model.layers, ops.model.layers):
        torch.testing.assert_close(a.attention.cache_k, b.attention.cache_k, **tol)
        torch.testing.assert_close(a.attention.cache_v, b.attention.cache_v, **tol)


@needs_native
def test_block_weights_take_kinds_and_check_k_quant_shapes(make_ckpt):
    gen = _k_quant_model(make_ckpt, ("q4_k", "q4_k", "q4_k", "q6_k"), "float32")
    block = gen.model.decode_hook.block_weights(gen.model.layers[0], torch.float32)
    linears, attention_norm, ffn_norm, cache_k, cache_v = block.tensors
    _, eps, _, n_q, n_kv, _, _ = block.shape
    same = native.BlockWeights(linears, attention_norm, ffn_norm, eps, cache_k, cache_v, n_q, n_kv)
    parts = [same.struct.wqkv.part[0], same.struct.wo.part[0], same.struct.w2.part[0]]
    assert [p.kind for p in parts] == [native.KINDS["q4_k"]] * 2 + [6]
    assert parts[2].scales is None and parts[2].rows == 0 and same.struct.w2.part[1].rows == 0  # one part: all rows
    wrong = list(linears)
    wrong[3] = (linears[3][0][0], None, "q5_k")  # Q6_K bytes read as Q5_K: rows of another length
    with pytest.raises(ValueError, match="whole super-blocks|expected"):
        native.BlockWeights(wrong, attention_norm, ffn_norm, eps, cache_k, cache_v, n_q, n_kv)


def _parts(k, seed=0):
    """NativeMatmuls of 8 q4_k rows, 5 q8_0 rows, 4 q6_k rows and 3 fp32 rows, k input columns."""
    cpu = CpuCapability("AVX512")
    q8, s8 = quantized.quantize(torch.randn(5, k, generator=torch.Generator().manual_seed(seed)), "q8_0")
    return [NativeMatmul.stored("q4_k", random_blocks("q4_k", 8, k, seed=seed), None, torch.float32, cpu),
            NativeMatmul.stored("q8_0", q8, s8, torch.float32, cpu),
            NativeMatmul.stored("q6_k", random_blocks("q6_k", 4, k, seed=seed + 1), None, torch.float32, cpu),
            NativeMatmul(torch.randn(3, k, generator=torch.Generator().manual_seed(seed + 2)), None, cpu)]


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_segments_of_different_types_in_one_call(dtype):
    """native.linear_parts writes each part's outputs into its own columns:
    torch.cat of native.linear of each part, bit for bit, for 1, 3 and 16
    rows; SegmentedMatmul runs it, and above MAX_ROWS PyTorch's GEMM on the
    parts' weights stacked."""
    parts = _parts(512)
    for chosen in (parts[:3], [parts[0], parts[2]], parts[1:], [parts[2]]):
        mm = SegmentedMatmul(chosen)
        assert mm.out_features == sum(p.weight.shape[0] for p in chosen)
        for rows in (1, 3, 16):
            x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows)).to(dtype)
            alone = torch.cat([native.linear(x, p.weight, p.scales, p.kind) for p in chosen], -1)
            assert torch.equal(native.linear_parts(x, mm.native_parts()), alone)
            assert torch.equal(mm(x), alone)
        held = torch.cat([p.dequantized() for p in chosen])
        assert torch.equal(mm.dequantized(), held)
        x = torch.randn(native.MAX_ROWS + 3, 512)
        torch.testing.assert_close(mm(x), F.linear(x, held))


@needs_native
def test_row_segments_refuse_what_kernels_c_cannot_take():
    parts = _parts(512)
    with pytest.raises(ValueError, match="1 to 3 parts, not 4"):
        SegmentedMatmul(parts)
    with pytest.raises(ValueError, match=r"differ in input columns: \[256, 512\]"):
        SegmentedMatmul([parts[0], _parts(256)[2]])
    with pytest.raises(TypeError, match="NativeMatmul parts, not \\['Linear'\\]"):
        SegmentedMatmul([parts[0], torch.nn.Linear(512, 4)])
    with pytest.raises(TypeError, match=r"\(\.\.\., 512\)"):
        native.linear_parts(torch.randn(1, 256), [(p.weight, p.scales, p.kind) for p in parts[:2]])
