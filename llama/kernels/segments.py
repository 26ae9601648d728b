"""A linear weight made of row segments of different types, run by our kernels in one call.

GGUF's mixed quantizations keep some weights of one layer at more bits than
others: Q4_K_M files store attn_v in Q6_K in some layers while attn_q and
attn_k are Q4_K. Our model fuses wq | wk | wv into one matmul (wqkv), whose
output rows are then segments of different types. `SegmentedMatmul` holds
them as they are stored, one NativeMatmul per segment (`parts`, output rows
in order), and multiplies by all of them in one native call
(`native.linear_parts`: kernels.c's struct weight of up to
native.MAX_PARTS parts, each written into its own output columns); fused
decoding (llama/kernels/fused.py) passes the same parts to decode_layers.

Invariants: the result is torch.cat of the parts' own outputs, bit for bit
(each part runs the kernel it would alone); above native.MAX_ROWS rows
(prefill), PyTorch's GEMM on the parts' dequantized weights concatenated,
as NativeMatmul does for one. Failure modes: more than MAX_PARTS parts,
parts of different input widths or a part that is not a NativeMatmul are
refused when the matmul is built (ValueError / TypeError naming them).
"""

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import native
from .linear import NativeMatmul


class SegmentedMatmul(nn.Module):
    """y = x @ W^T for W = the parts' weights stacked by rows (see the module docstring)."""

    kind = "segments"

    def __init__(self, parts: Sequence[NativeMatmul]):
        super().__init__()
        parts = list(parts)
        bad = [type(p).__name__ for p in parts if not isinstance(p, NativeMatmul)]
        if bad:
            raise TypeError(f"SegmentedMatmul takes NativeMatmul parts, not {bad}")
        if not 1 <= len(parts) <= native.MAX_PARTS:
            raise ValueError(f"SegmentedMatmul takes 1 to {native.MAX_PARTS} parts, not {len(parts)}: "
                             "merge parts of one type first")
        native.parts_of(self._native(parts))  # checks whole blocks and one input width
        self.parts = nn.ModuleList(parts)
        self.wide = parts[0].wide

    @staticmethod
    def _native(parts) -> list:
        return [(p.weight, p.scales, p.kind) for p in parts]

    def native_parts(self) -> list:
        """[(weight, scales, kind)] of the parts, as native.linear_parts and decode_layers take them."""
        return self._native(self.parts)

    @property
    def out_features(self) -> int:
        return sum(p.weight.shape[0] for p in self.parts)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole (N, K) weight in `dtype`, the parts' rows in order."""
        return torch.cat([p.dequantized(dtype) for p in self.parts], 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= native.MAX_ROWS * x.shape[-1]:
            return native.linear_parts(x, self.native_parts())
        return F.linear(x.to(self.wide), self.dequantized(self.wide)).to(x.dtype)
