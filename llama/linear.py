"""Matrix-multiply kernels for the model-parallel linear layers.

fairscale's ColumnParallelLinear / RowParallelLinear compute `F.linear(x, W)`
and then all-gather or all-reduce across ranks. Decoding one token reads every
weight once, so on CPU its speed is the memory bandwidth the matmul kernel
reaches. `F.linear` reaches about two thirds of it on our machines; oneDNN
with the weight reordered once into its blocked layout ("prepacked") reaches
close to all of it, in fp32 and bf16 (see benchmarks/linear_kernels.py).
Weight-only int8 reads half the bytes of bf16 again.

`use_kernels(model, ...)` swaps each parallel layer, after its weights are
loaded, for a `KernelLinear` that does the same collective through
collectives.py (one paired exchange per reduction on gloo, where fairscale's
own all_reduce costs two round trips) with the fastest matmul there is:
oneDNN's on CPU where it has the dtype, int8 if asked, else `F.linear`. The
embeddings are swapped the same way (`KernelEmbedding`), so that no
reduction of the model goes through fairscale's collectives.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import (
    ColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from torch import nn

from .collectives import all_gather_last_dim, all_reduce

QUANTIZATIONS = (None, "int8")


def onednn_available(dtype: torch.dtype) -> bool:
    """Whether this PyTorch has oneDNN's prepacked linear for `dtype` on this CPU."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return dtype == torch.float32


class OneDNNMatmul(nn.Module):
    """oneDNN linear on a weight reordered once into oneDNN's blocked layout."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features = weight.shape[0]
        # The batch-size hint only picks the layout; any batch works. 1 = decoding.
        self.weight = nn.Parameter(torch.ops.mkldnn._reorder_linear_weight(weight, 1), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], "")


class Int8Matmul(nn.Module):
    """Weight-only int8: per-output-channel symmetric scales, x in bf16.

    W ~= q * scale[:, None] with q = round(W / scale) in [-127, 127] and
    scale = max |W[row]| / 127.
    """

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        w = weight.float()
        # The kernel takes bf16 scales: round them first and quantize against
        # the rounded values, or every row carries up to 0.4% of scale error.
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(torch.bfloat16)
        q = torch.round(w / scales.float()[:, None]).clamp(-127, 127)
        self.qweight = nn.Parameter(q.to(torch.int8), requires_grad=False)
        self.scales = nn.Parameter(scales, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return dequantized_linear(x, self.qweight, self.scales)
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k).to(torch.bfloat16)
        # ATen's fused CPU kernel (it wants bf16 activations)
        y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales)
        return y.reshape(*lead, -1).to(x.dtype)


def dequantized_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The GPU path of Int8Matmul: the weight dequantized in x's dtype on every call.

    In x's dtype, not bf16: a GPU without native bf16 (V100, T4) runs fp16.
    The scales go into the weight before the matmul, so that an fp16 sum of
    x * q (q up to 127) cannot overflow. This saves memory, not time: a call
    reads 1 byte a weight and writes and reads a 2-byte copy (5 bytes, where
    plain bf16 reads 2). Whether ATen's `_weight_int8pack_mm` has a CUDA
    kernel depends on the torch build (the one in PyTorch's tree that we read
    widens x to fp32 and gives each output its own thread, with strided weight
    reads: not evidently faster); utils/check_gpu.py reports it and times both.
    """
    return F.linear(x, qweight.to(x.dtype) * scales.to(x.dtype)[:, None])


class PlainMatmul(nn.Module):
    """F.linear, what fairscale's layers compute (where no faster kernel applies)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class KernelEmbedding(nn.Module):
    """fairscale's VocabParallelEmbedding (rows split by vocabulary: a lookup
    of the local rows, then a sum over ranks) or ParallelEmbedding (columns
    split by dim: a lookup, then a gather), with collectives.py's collectives."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.weight = nn.Parameter(layer.weight.data, requires_grad=False)
        if isinstance(layer, VocabParallelEmbedding):
            self.start, self.stop = layer.vocab_start_index, layer.vocab_end_index
        elif isinstance(layer, ParallelEmbedding):
            self.start = self.stop = None
        else:
            raise TypeError(f"not a fairscale parallel embedding: {type(layer).__name__}")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.start is None:
            return all_gather_last_dim(F.embedding(tokens, self.weight))
        outside = (tokens < self.start) | (tokens >= self.stop)
        local = F.embedding((tokens - self.start).masked_fill(outside, 0), self.weight)
        return all_reduce(local.masked_fill(outside[..., None], 0))


class KernelLinear(nn.Module):
    """A fairscale parallel linear layer with another matmul, same collective."""

    def __init__(self, layer: nn.Module, matmul: nn.Module):
        super().__init__()
        self.matmul = matmul
        if isinstance(layer, RowParallelLinear):
            if not layer.input_is_parallel or layer.bias is not None:
                raise ValueError("only bias-free RowParallelLinear with parallel input is supported")
            self.collective = "reduce"
        elif isinstance(layer, ColumnParallelLinear):
            if layer.bias is not None:
                raise ValueError("only bias-free ColumnParallelLinear is supported")
            self.collective = "gather" if layer.gather_output else None
        else:
            raise TypeError(f"not a fairscale parallel linear layer: {type(layer).__name__}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x)
        if self.collective == "reduce":
            return all_reduce(y)
        if self.collective == "gather":
            return all_gather_last_dim(y)
        return y


def choose_matmul(weight: torch.Tensor, quantize: Optional[str]) -> nn.Module:
    """The fastest matmul for this weight (F.linear where nothing beats it)."""
    if quantize == "int8":
        return Int8Matmul(weight)
    if weight.device.type == "cpu" and onednn_available(weight.dtype):
        return OneDNNMatmul(weight)
    return PlainMatmul(weight)


def use_kernels(model: nn.Module, quantize: Optional[str] = None) -> nn.Module:
    """Gives every fairscale parallel linear layer of `model` a faster matmul, in place.

    On CPU the matmul becomes oneDNN's prepacked linear (fp32 and bf16, when
    available); with quantize="int8", weight-only int8 on any device. Only
    leaf layers are swapped, found by type: this module knows no attribute
    names of the model (which already fuses wq|wk|wv and w1|w3 into single,
    larger matmuls). Each rank converts its own shard. The model can no
    longer load a state dict afterwards: this is the last step of building it.
    """
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantize!r}; choose from {[q for q in QUANTIZATIONS if q]}")
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, (ColumnParallelLinear, RowParallelLinear)):
                setattr(module, child_name, KernelLinear(child, choose_matmul(child.weight.data, quantize)))
            elif isinstance(child, (VocabParallelEmbedding, ParallelEmbedding)):
                setattr(module, child_name, KernelEmbedding(child))
    return model
