"""An optional compiled decoding step: one torch.compile'd graph per transformer block.

Decoding one token of a small model is mostly operator overhead, not
arithmetic: about 160 ATen calls per layer in eager mode (views, casts, RoPE
pieces, the norm's reductions), each a few microseconds, against four
matmuls that are the real work. `compile_decode(model)` compiles the block's
forward pass once (inductor; dynamic shapes, so every batch size and cache
length share one graph, and every layer reuses it: parameters are graph
inputs, not constants) and runs decoding steps through it, which fuses the
elementwise work into a few generated kernels.

The matmuls and their collectives stay outside the compiled code: each
model-parallel linear layer (whatever kernel `linear.use_kernels` chose:
oneDNN's prepacked weights, int8, ...) is called through one opaque custom
operator (except plain `F.linear` in a single process, which inductor
handles itself), so inductor neither needs to understand the kernel nor sees a
collective (no graph breaks, the same exchange order on every rank).
Prefill stays eager: it is matmul-bound.

Costs: the first start compiles (tens of seconds on a small CPU; inductor
caches the result on disk, so later starts take seconds) and needs a C++
compiler on CPU. Off by default (`Llama.build(..., compile=True)`, `--compile`).

Where our own kernels run (llama/kernels/native.py: x86 with AVX2 or AVX-512 and a C
compiler), eager decoding is faster than this: a token's blocks are one call of
hand-written code there (kernels/fused.py), while the compiled graph calls
the matmuls as opaque operators between its own kernels
(benchmarks/peer_benchmark.py --compile measures both). compile_decode then
says so in a warning and compiles anyway, as asked; its hook replaces the
fused one.
"""

import itertools
import logging
import weakref
from typing import Optional

import torch
from fairscale.nn.model_parallel.initialize import get_model_parallel_world_size
from torch import nn

from .linear import KernelLinear, NativeMatmul, PlainMatmul

logger = logging.getLogger("llama")

_layers: "weakref.WeakValueDictionary[int, OpaqueLinear]" = weakref.WeakValueDictionary()
_next_handle = itertools.count()


@torch.library.custom_op("llama::opaque_linear", mutates_args=())
def opaque_linear(x: torch.Tensor, handle: torch.Tensor, out_features: int) -> torch.Tensor:
    """Runs the parallel linear layer registered under `handle` (its matmul and collective)."""
    return _layers[int(handle)].layer(x)


@opaque_linear.register_fake
def _(x: torch.Tensor, handle: torch.Tensor, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


class OpaqueLinear(nn.Module):
    """A KernelLinear that compiled code calls as one opaque operator.

    The handle is a tensor (a graph input), not an int, so every layer's
    instance runs the same compiled graph. The output width is learned from
    the first (eager) call, which `compile_decode` makes before compiling.
    """

    def __init__(self, layer: KernelLinear):
        super().__init__()
        self.layer = layer
        key = next(_next_handle)
        _layers[key] = self
        self.register_buffer("handle", torch.tensor(key), persistent=False)
        self.out_features: Optional[int] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return torch.ops.llama.opaque_linear(x, self.handle, self.out_features)
        y = self.layer(x)
        self.out_features = y.shape[-1]
        return y


def _block(layer: nn.Module, x: torch.Tensor, inputs) -> torch.Tensor:
    return layer(x, inputs)


class CompiledDecoding:
    """Transformer.decode_hook: every block of a decoding step through one
    compiled graph (`block`, torch.compile'd `_block`)."""

    def __init__(self):
        self.block = torch.compile(_block, dynamic=True)

    def __call__(self, model: nn.Module, h: torch.Tensor, inputs) -> torch.Tensor:
        for layer in model.layers:
            h = self.block(layer, h, inputs)
        return h


def compile_decode(model: nn.Module) -> None:
    """Makes `model` (a Transformer after `use_kernels` and `setup_caches`)
    decode through a compiled block, in place: its `decode_hook`.

    Runs one eager decoding step and then one compiled step for each kind of
    step the engine makes (all rows at one position; rows at different
    positions), so that compiling happens here rather than in the middle of
    a request. The steps write only cache positions 1 and 2 of rows 0 and 1,
    which every prompt overwrites before reading them.
    """
    alone = get_model_parallel_world_size() == 1
    if any(isinstance(m, NativeMatmul) for m in model.layers.modules()):
        logger.warning("--compile: our CPU kernels (llama/kernels/kernels.c) decode faster without it on CPUs where they "
                       "build (see llama/kernels/compiled.py); compiling anyway, as asked")
    for module in list(model.layers.modules()):  # the blocks' layers; the output layer runs eagerly
        for name, child in list(module.named_children()):
            if isinstance(child, KernelLinear):
                # F.linear without a collective: inductor calls the BLAS itself, no opaque hop.
                plain = alone and isinstance(child.matmul, PlainMatmul)
                setattr(module, name, child.matmul if plain else OpaqueLinear(child))
    device = model.norm.weight.device
    if model.tok_embeddings is not None:
        token = torch.zeros(1, 1, dtype=torch.long, device=device)
    else:  # a later pipeline stage takes the previous stage's hidden state
        token = torch.zeros(1, 1, model.params.dim, dtype=model.norm.weight.dtype, device=device)
    model.decode_hook = None
    model(token, 1)  # eager: every OpaqueLinear learns its output width
    model.decode_hook = CompiledDecoding()  # in place of any other (fused.NativeDecoding)
    # Sizes 0 and 1 are always specialized: one row and several rows are two
    # graphs, rows at different positions (a bias mask) a third. Position 1
    # (2 cached keys) keeps the cache length symbolic.
    model(token, 1)
    rows = min(2, model.params.max_batch_size)
    if rows > 1:
        many = token.expand(rows, *token.shape[1:])
        model(many, 1)
        model(many, torch.tensor([1, 2], device=device))
