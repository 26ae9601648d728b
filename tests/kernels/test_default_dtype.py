"""The default dtype follows the hardware: bf16 where it is native, else fp32 (CPU) or fp16 (GPU)."""

import logging
import re

import pytest
import torch

from llama.parallel import distributed as d

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)

X86_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu vme sse sse2 avx avx2 fma f16c
"""
X86_SPR = X86_AVX2.replace("avx2 fma", "avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile")
X86_AVX512_BF16 = X86_AVX2.replace("avx2 fma", "avx2 fma avx512f avx512_bf16")
ARM_NEOVERSE_V1 = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm sve bf16 i8mm
"""
ARM_NEOVERSE_N1 = ARM_NEOVERSE_V1.replace(" sve bf16 i8mm", "")


@pytest.mark.parametrize("cpuinfo, feature", [
    (X86_AVX2, None), (X86_SPR, "amx_bf16"), (X86_AVX512_BF16, "avx512_bf16"),
    (ARM_NEOVERSE_V1, "bf16"), (ARM_NEOVERSE_N1, None),
])
def test_cpu_bf16_feature_from_cpuinfo(cpuinfo, feature):
    assert d.cpu_bf16_feature(cpuinfo) == feature


def test_cpu_bf16_feature_without_flags_asks_torch(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert d.cpu_bf16_feature("processor\t: 0\n") == "avx512_bf16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert d.cpu_bf16_feature("processor\t: 0\n") is None


def test_cpu_default(monkeypatch):
    monkeypatch.setattr(d, "cpu_bf16_feature", lambda: "avx512_bf16")
    assert d.choose_dtype(None, CPU) == (torch.bfloat16, "native bf16 on this CPU: avx512_bf16")
    monkeypatch.setattr(d, "cpu_bf16_feature", lambda: None)
    assert d.choose_dtype(None, CPU) == (torch.float32, "no native bf16 on this CPU")
    assert d.resolve_dtype(None, CPU) == torch.float32
    # float32 weights that would not fit: bf16 after all, and why
    dtype, why = d.choose_dtype(None, CPU, fp32_bytes=32 * 1024**3, free_bytes=20 * 1024**3)
    assert dtype == torch.bfloat16
    assert why == "this CPU has no native bf16, but float32 weights (32.0 GiB) would not fit in the 20.0 GiB free"
    assert d.choose_dtype(None, CPU, fp32_bytes=1024**3, free_bytes=20 * 1024**3)[0] == torch.float32


def test_an_asked_dtype_is_kept_and_said(monkeypatch):
    monkeypatch.setattr(d, "cpu_bf16_feature", lambda: None)
    assert d.choose_dtype("bfloat16", CPU) == (torch.bfloat16, "as asked; this CPU has no native bf16, float32 may be faster")
    assert d.choose_dtype("float32", CPU) == (torch.float32, "as asked")
    with pytest.raises(ValueError, match="float16 on CPU is very slow"):
        d.choose_dtype("float16", CPU)


def fake_gpu(monkeypatch, capability, keyword=True):
    """torch.cuda as a GPU of `capability` reports it; `keyword`: is_bf16_supported takes including_emulation."""
    native = capability >= (8, 0)
    if keyword:
        # torch counts bf16 emulated in fp32 as support unless told not to: V100 and T4 answer True
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    else:
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


@pytest.mark.parametrize("keyword", [True, False])
@pytest.mark.parametrize("capability, dtype, why", [
    ((7, 0), torch.float16, "this GPU has no native bf16"),  # V100
    ((7, 5), torch.float16, "this GPU has no native bf16"),  # T4
    ((8, 0), torch.bfloat16, "native bf16 on this GPU"),  # A100
    ((9, 0), torch.bfloat16, "native bf16 on this GPU"),  # H100
])
def test_gpu_default(monkeypatch, capability, dtype, why, keyword):
    fake_gpu(monkeypatch, capability, keyword)
    assert d.choose_dtype(None, CUDA) == (dtype, why)
    assert d.resolve_dtype(None, CUDA) == dtype


def build_default(ckpt, caplog):
    """Llama.build without a dtype, its log captured, the thread count restored."""
    from llama import Llama

    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO, logger="llama"):
            return Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=32, max_batch_size=1,
                               device="cpu", threads=1)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("feature, dtype, said", [
    (None, torch.float32, "float32 (no native bf16 on this CPU)"),
    ("amx_bf16", torch.bfloat16, "bfloat16 (native bf16 on this CPU: amx_bf16)"),
])
def test_build_uses_and_says_the_default(make_ckpt, monkeypatch, caplog, feature, dtype, said):
    monkeypatch.setattr(d, "cpu_bf16_feature", lambda: feature)
    gen = build_default(make_ckpt("llama3"), caplog)
    assert {p.dtype for p in gen.model.parameters()} == {dtype}
    assert re.search(rf"s: {re.escape(said)}, (our AVX(-512|2)|PyTorch's) kernels, 1 thread, rank 0 of 1", caplog.text)



def test_build_falls_back_to_bf16_when_fp32_would_not_fit(make_ckpt, monkeypatch, caplog):
    from llama import builder

    monkeypatch.setattr(d, "cpu_bf16_feature", lambda: None)
    monkeypatch.setattr(builder, "available_memory", lambda device: 1024**3 // 1000)  # about 1 MB free
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    gen = build_default(make_ckpt("llama3"), caplog)
    assert {p.dtype for p in gen.model.parameters()} == {torch.bfloat16}
    assert "bfloat16 (this CPU has no native bf16, but float32 weights (0.1 GiB) would not fit in the 0.0 GiB free)" \
        in caplog.text  # 2 x 128256 x 64 float32 values of embedding and output: 0.07 GiB
