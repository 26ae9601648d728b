"""The GPU path, checked without a GPU: the device probes faked, the GPU
int8 matmul run on CPU tensors, and utils/check_gpu.py's refusal and parity check."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO
from llama.kernels.linear import Int8Matmul, dequantized_linear
from llama.engine.metrics import MetricsRecorder, cpu_peak_rss_bytes, device_probes


def test_gpu_peak_memory_is_the_allocators_peak_of_the_call(monkeypatch):
    calls = []
    peak = {"bytes": 7_000_000_000}  # an earlier call's peak, still in the allocator's statistics
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: (calls.append(("reset", device)),
                                                                               peak.update(bytes=100)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: peak["bytes"])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: calls.append(("sync", device)))
    gpu = torch.device("cuda", 1)
    rec = MetricsRecorder(1, 4, 1000, **device_probes(gpu))
    assert calls == [("reset", gpu)]  # reset when the call starts
    peak["bytes"] = 2_500_000_000  # what this call allocated at most
    rec.step()
    m = rec.finish(1)
    assert m.peak_memory_bytes == 2_500_000_000
    assert calls == [("reset", gpu), ("sync", gpu), ("sync", gpu)]  # first token and end only


def test_cpu_peak_memory_is_the_resident_high_water_mark():
    probes = device_probes(torch.device("cpu"))
    assert probes["peak_memory"] is cpu_peak_rss_bytes and probes["synchronize"]() is None


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_gpu_int8_matmul_computes_in_the_activation_dtype(dtype, tol):
    """On a GPU the int8 weight is dequantized in x's dtype (fp16 on V100/T4, not emulated bf16),
    the scales folded in first: large fp16 activations, whose sum against raw q would pass 65504, stay finite."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 256, generator=g) / 16
    layer = Int8Matmul(w)
    x = (torch.randn(3, 256, generator=g) * 60).to(dtype)
    y = dequantized_linear(x, layer.qweight, layer.scales)
    assert y.dtype == dtype and torch.isfinite(y).all()
    reference = F.linear(x.float(), layer.qweight.float() * layer.scales.float()[:, None])
    assert (F.linear(x.float(), layer.qweight.float()).abs().max() > 65504)  # the unscaled sum would overflow fp16
    torch.testing.assert_close(y.float(), reference, atol=tol * reference.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_a_model_bound_for_a_gpu_gets_gpu_matmuls_though_its_weights_are_on_the_cpu(make_ckpt, quantize):
    """int8 is quantized on the CPU, then the model moves to the GPU: none of
    our CPU kernels (NativeMatmul) may be chosen for it, nor an arena of CPU
    memory be made for them."""
    from fairscale.nn.model_parallel.layers import ColumnParallelLinear

    from conftest import build_tiny
    from llama.kernels.linear import KernelLinear, NativeMatmul, PlainMatmul, choose_matmul, use_kernels

    build_tiny(make_ckpt("llama3"))  # sets up the (one-process) model-parallel group the layers need
    assert type(choose_matmul(torch.randn(32, 64), quantize, device=torch.device("cuda"))) is not NativeMatmul
    with torch.device("meta"):
        model = torch.nn.Sequential(ColumnParallelLinear(64, 32, bias=False, gather_output=False))
    model[0].weight = torch.nn.Parameter(torch.randn(32, 64), requires_grad=False)
    use_kernels(model, quantize, device=torch.device("cuda"))
    assert isinstance(model[0], KernelLinear)
    assert type(model[0].matmul) is (Int8Matmul if quantize else PlainMatmul)
    assert not any(isinstance(m, NativeMatmul) for m in model.modules())


def test_check_gpu_refuses_without_cuda():
    r = subprocess.run([sys.executable, "utils/check_gpu.py"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "error: no CUDA device" in r.stderr and "Traceback" not in r.stderr


def test_check_gpu_parity_function_on_cpu_against_cpu(make_ckpt):
    from utils.check_gpu import parity

    before = torch.get_num_threads()
    same = parity(make_ckpt("llama3"), device="cpu", dtype="float32", reference_device="cpu", gen_len=6)
    bf16 = parity(make_ckpt("llama3"), device="cpu", dtype="bfloat16", reference_device="cpu", gen_len=6)
    torch.set_num_threads(before)
    assert same["same_tokens"] and same["first_tokens_agree"] == 6 and same["max_logprob_diff"] == 0.0
    assert same["tokens"] == same["reference_tokens"] and [len(t) for t in same["tokens"]] == [6, 6]
    assert bf16["max_logprob_diff"] > 1e-4  # a real difference is seen (bf16 against fp32)
