"""Matmuls that benchmarks/linear_kernels.py measures but the model never runs.

linear.choose_matmul picks among the kernels in llama/kernels/linear.py;
these two were measured against them and not chosen, because they lose
accuracy the chosen ones keep:

* Int8DynamicMatmul: int8 x int8 (fbgemm, VNNI), activations quantized per
  tensor. Fast, but one scale for a whole activation row cut the top-1
  agreement with bf16 far below NativeMatmul's per-group int8 (the
  figures are in the README's Speed section).
* Int4Matmul: ATen's group-wise 4-bit kernel, with another layout
  (quantize_int4) and bf16 activations; int4 runs on our kernels only.

Kept here so that the benchmark can still show why.
"""

import warnings

import torch
from torch import nn

from llama.kernels.linear import per_channel_int8
from llama.weights.quantized import int4_groups


class Int8DynamicMatmul(nn.Module):
    """int8 x int8 -> int32 (fbgemm's `quantized::linear_dynamic`, VNNI where
    the CPU has it): weights per-output-channel symmetric as in Int8Matmul,
    activations quantized per call (per tensor, asymmetric uint8), computed in
    fp32; any dtype in, the same dtype out."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        q, scales = per_channel_int8(weight, torch.float64)
        with warnings.catch_warnings():  # quantized tensors are deprecated; fbgemm's prepack still takes them
            warnings.simplefilter("ignore")
            qw = torch._make_per_channel_quantized_tensor(q, scales, torch.zeros(len(scales), dtype=torch.long), 0)
        self.packed = torch.ops.quantized.linear_prepack(qw, None)
        self.register_buffer("scales", scales.float(), persistent=False)

    def dequantized(self) -> torch.Tensor:
        return self.packed.unpack()[0].dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x.float(), self.packed, False).to(x.dtype)


def quantize_int4(weight: torch.Tensor, group: int):
    """int4_groups packed for ATen's `_weight_int4pack_mm_for_cpu`: (uint8
    [n, k/2], scales and zeros [k/group, n, 2] float32), which it reads as
    W ~= (q - 8) * scale + zero."""
    q, scale, lo = int4_groups(weight, group)
    zero = lo + 8 * scale
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    return packed, torch.stack([scale, zero], -1).transpose(0, 1).contiguous()


class Int4Matmul(nn.Module):
    """Group-wise 4-bit weights (ATen's `_weight_int4pack_mm_for_cpu`),
    activations computed in `act`; any dtype in, the same dtype out."""

    def __init__(self, weight: torch.Tensor, group: int, act: torch.dtype = torch.bfloat16):
        super().__init__()
        self.group, self.act = group, act
        packed, sz = quantize_int4(weight, group)
        self.qweight = nn.Parameter(packed, requires_grad=False)
        self.scales_and_zeros = nn.Parameter(sz.to(act), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, k).to(self.act), self.qweight, self.group,
                                                       self.scales_and_zeros)
        return y.reshape(*lead, -1).to(x.dtype)
