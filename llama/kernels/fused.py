"""Fused CPU decoding: our kernels (llama/kernels/kernels.c) in place of PyTorch's
operators, installed on a built model from outside.

`use_fused_decoding(model)` changes a Transformer in place, after
`linear.use_kernels` chose its matmuls and `setup_caches` allocated its KV
cache:

* every RMSNorm and SwiGLU leaf becomes one that computes the same in one
  native call (`native.rms_norm`, `native.silu_mul`), in prefill and
  decoding alike;
* `model.decode_hook` becomes a `NativeDecoding`, which runs a decoding step
  (one token a row, rows in the KV cache) as one `native.decode_layers`
  call for all blocks (one process), or as `native.decode_layers_parallel`
  (tensor parallelism: half a block a call, with the sums over the ranks in
  between). Where the blocks cannot all run that way (a matmul that is not
  ours, a dtype or head size kernels.c lacks), it runs them block by block
  with the decoding attention in one call (`native.decode_attention`).

Invariants: every fused path computes what the model's PyTorch operators
compute (tests/kernels/test_native_kernels.py compares logits and caches),
so declining is always safe. Nothing here applies where our kernels are not
loaded, on another device, or while torch.compile traces (`native.fused`
says no, and the PyTorch operators run): installing it is harmless anywhere.

What decode_layers takes (native.BlockWeights, native.Layers) is decided
once per dtype, KV cache, set of matmuls and norm weights, by identity, and
again when any of them changes: walking the modules at every step would
cost more than the check.
"""

from typing import Optional

import torch
from torch import nn

from . import native
from .linear import KernelLinear, NativeMatmul
from .segments import SegmentedMatmul
from ..model import Attention, AttentionInputs, RMSNorm, SwiGLU, Transformer, TransformerBlock
from ..parallel.collectives import all_reduce


class NativeRMSNorm(RMSNorm):
    """model.RMSNorm, in one native call where `native.fused` applies."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if native.fused(x) and self.weight.dtype == x.dtype:
            return native.rms_norm(x, self.weight, self.eps)
        return super().forward(x)


class NativeSwiGLU(SwiGLU):
    """model.SwiGLU, in one native call where `native.fused` applies."""

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        if native.fused(gate_up):
            return native.silu_mul(gate_up)
        return super().forward(gate_up)


def native_weight(layer: nn.Module) -> Optional[tuple]:
    """(weight, scales or None, kind) of a KernelLinear that runs our kernels,
    for native.decode_layers (kind: NativeMatmul's type name, which the
    K-quants need, as uint8 is also q4_1), or a list of them for a
    SegmentedMatmul's row segments; None for any other layer."""
    if isinstance(layer, KernelLinear) and isinstance(layer.matmul, NativeMatmul):
        return layer.matmul.weight, layer.matmul.scales, layer.matmul.kind
    if isinstance(layer, KernelLinear) and isinstance(layer.matmul, SegmentedMatmul):
        return layer.matmul.native_parts()
    return None


def attention_fits(attention: Attention, dtype: torch.dtype) -> bool:
    """Whether kernels.c's decode_attention takes this layer's decoding step in `dtype`."""
    return (dtype == attention.cache_k.dtype and attention.head_dim % 16 == 0
            and attention.head_dim <= native.MAX_HEAD_DIM)


class NativeDecoding:
    """Transformer.decode_hook for our CPU kernels (see the module docstring)."""

    def __init__(self):
        # Per KV-cache set (Transformer.select_cache swaps the cache tensors):
        # (id(block), id(cache_k)) -> (what it was decided for, BlockWeights or None),
        # and id(first block's cache_k) -> native.Layers, so alternating sets rebuild nothing.
        self._blocks: dict = {}
        self._layers: dict = {}

    def __call__(self, model: Transformer, h: torch.Tensor, inputs: AttentionInputs) -> Optional[torch.Tensor]:
        if inputs.self_attention or not native.fused(h):
            return None
        layers = self.layers(model, h.dtype)
        if layers is not None and model.layers[0].alone:
            return native.decode_layers(h, layers, inputs.cos, inputs.sin, inputs.cache_pos)
        if layers is not None:  # tensor-parallel: the sums over the ranks between the calls
            return native.decode_layers_parallel(h, layers, inputs.cos, inputs.sin, inputs.cache_pos, all_reduce)
        for block in model.layers:
            h = block_step(block, h, inputs)
        return h

    def layers(self, model: Transformer, dtype: torch.dtype) -> Optional[native.Layers]:
        """Every block for native.decode_layers, or None unless each block
        can (`block_weights`)."""
        key = id(model.layers[0].attention.__dict__["cache_k"]) if model.layers else None
        if key not in self._layers and len(self._layers) >= max(1, model.__dict__.get("cache_sets", 1)):
            self._layers.clear()  # a new cache (setup_caches again): drop the old sets' state and tensors
            self._blocks.clear()
        blocks = [self.block_weights(layer, dtype) for layer in model.layers]
        if not blocks or any(b is None for b in blocks):
            return None
        layers = self._layers.get(key)
        if layers is None or any(new is not old for new, old in zip(blocks, layers.blocks)):
            layers = self._layers[key] = native.Layers(blocks)
        return layers

    def block_weights(self, block: TransformerBlock, dtype: torch.dtype) -> Optional[native.BlockWeights]:
        """`block` for native.decode_layers (decode_layers_parallel under
        tensor parallelism), or None where that does not apply: another
        kernel or collective, or a dtype or head size it lacks."""
        # By identity, through the modules' own dicts: nn.Module.__getattr__
        # would make this check a noticeable part of a small model's step.
        m = block._modules
        a, f = m["attention"], m["feed_forward"]
        linears = (a._modules["wqkv"], a._modules["wo"], f._modules["w13"], f._modules["w2"])
        key = (dtype, a.__dict__["cache_k"], a.__dict__["cache_v"], m["attention_norm"]._parameters["weight"],
               m["ffn_norm"]._parameters["weight"], *(layer._modules.get("matmul") for layer in linears))
        slot = (id(block), id(key[1]))
        seen = self._blocks.get(slot)
        if seen is None or any(new is not old for new, old in zip(key, seen[0])):
            seen = self._blocks[slot] = (key, _block_weights(block, dtype))
        return seen[1]


def _block_weights(block: TransformerBlock, dtype: torch.dtype) -> Optional[native.BlockWeights]:
    a, f = block.attention, block.feed_forward
    if not (block.attention_norm.weight.dtype == dtype == block.ffn_norm.weight.dtype
            and block.ffn_norm.eps == block.attention_norm.eps and attention_fits(a, dtype)):
        return None
    layers = (a.wqkv, a.wo, f.w13, f.w2)
    linears = [native_weight(layer) for layer in layers]
    # the row-parallel wo and w2 sum over the ranks (decode_layers_parallel does), nothing else gathers
    if any(w is None for w in linears) or [layer.collective for layer in layers] != [None, "reduce", None, "reduce"]:
        return None
    return native.BlockWeights(linears, block.attention_norm.weight, block.ffn_norm.weight, block.ffn_norm.eps,
                               a.cache_k, a.cache_v, a.n_local_heads, a.n_local_kv_heads)


def block_step(block: TransformerBlock, h: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
    """TransformerBlock.forward for one token a row, its attention (RoPE,
    cache writes, attention to the cached positions) in one native call
    where `attention_fits`; else the block's own forward."""
    a = block.attention
    if not attention_fits(a, h.dtype):
        return block(h, inputs)
    bsz, n_q, n_kv = h.shape[0], a.n_local_heads, a.n_local_kv_heads
    qkv = a.wqkv(block.attention_norm(h)).view(bsz, 1, n_q + 2 * n_kv, a.head_dim)  # heads: q, then k, then v
    if qkv.dtype != h.dtype:  # a matmul that returns another dtype: nothing is written yet, the modules redo it
        return block(h, inputs)
    out = native.decode_attention(qkv, a.cache_k, a.cache_v, inputs.cos, inputs.sin, inputs.cache_pos, n_q, n_kv)
    h = h + a.wo(out.reshape(bsz, 1, -1))
    return h + block.feed_forward(block.ffn_norm(h))


def _swap(module: nn.Module, new_cls: type) -> nn.Module:
    """`module` (an RMSNorm or SwiGLU) as `new_cls`, holding the same parameters."""
    new = new_cls.__new__(new_cls)
    new.__dict__.update(module.__dict__)
    new.__dict__["_parameters"] = dict(module._parameters)
    return new


def use_fused_decoding(model: Transformer) -> Transformer:
    """Makes `model` run our CPU kernels' fused operations and decoding step,
    in place (see the module docstring); the last step of building it,
    after `setup_caches`. Returns the model."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is RMSNorm:
                setattr(module, name, _swap(child, NativeRMSNorm))
            elif type(child) is SwiGLU:
                setattr(module, name, _swap(child, NativeSwiGLU))
    model.decode_hook = NativeDecoding()
    return model
