"""Matrix-multiply kernels for the model-parallel linear layers, chosen by the CPU.

fairscale's ColumnParallelLinear / RowParallelLinear compute `F.linear(x, W)`
and then all-gather or all-reduce across ranks. Decoding one token reads every
weight once, so on CPU its speed is the memory bandwidth the matmul kernel
reaches, and which kernel reaches most depends on the instruction set:
`choose_matmul` picks by weight dtype, quantization and `cpu_capability()`
(our own kernels, `NativeMatmul` (llama/kernels/native.py), wherever they build: x86
with AVX2 or AVX-512; else `F.linear` for fp32, oneDNN's prepacked linear for
bf16 on AVX-512, per-channel weight-only int8 with bf16 activations; the
measurements are benchmarks/linear_kernels.py's).
NativeMatmul's int8 and int4 quantize activations per group of 32, as
llama.cpp's Q8_0 does (benchmarks/matmuls.py keeps the PyTorch kernels that
quantize them coarser, measured there and not chosen).

`use_kernels(model, ...)` swaps each parallel layer, after its weights are
loaded, for a `KernelLinear` that does the same collective through
collectives.py (one paired exchange per reduction on gloo, where fairscale's
own all_reduce costs two round trips) with the chosen matmul. The embeddings
are swapped the same way (`KernelEmbedding`), so that no reduction of the
model goes through fairscale's collectives.
"""

from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import (
    ColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from torch import nn

from ..common.cpu import cpu_flags
from . import huge_pages
from . import native
from ..parallel.collectives import all_gather_last_dim, all_reduce
from ..weights import mapped, quantized

# int4: our kernels only (NativeMatmul), 4-bit blocks and an int8 output layer
# (use_kernels; README, Speed).
QUANTIZATIONS = (None, "int8", "int4")


@dataclass(frozen=True)
class CpuCapability:
    """What this CPU computes fast, as the kernels see it.

    isa: ATen's vector kernels, torch.backends.cpu.get_cpu_capability()
        ("AVX512", "AVX2", "DEFAULT", ...; ATEN_CPU_CAPABILITY=avx2 lowers it).
    vnni: int8 dot products (AVX512-VNNI, or AVX-VNNI under AVX2).
    bf16: native bf16 dot products (AVX512-BF16 or AMX-BF16).
    """

    isa: str
    vnni: bool = False
    bf16: bool = False


def _cpu_flags() -> frozenset:
    return cpu_flags() or frozenset()


@lru_cache(maxsize=None)
def cpu_capability() -> CpuCapability:
    """This process's CpuCapability: ATen's level, and /proc/cpuinfo's flags
    that level can use (a forced AVX2 level ignores the AVX-512 ones)."""
    isa = torch.backends.cpu.get_cpu_capability()
    flags = _cpu_flags()
    if isa == "AVX512":
        return CpuCapability(isa, vnni="avx512_vnni" in flags, bf16=bool({"avx512_bf16", "amx_bf16"} & flags))
    if isa == "AVX2":
        return CpuCapability(isa, vnni="avx_vnni" in flags)
    return CpuCapability(isa)


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


def per_channel_int8(weight: torch.Tensor, scale_dtype: torch.dtype):
    """q = round(W / scale) in [-127, 127], scale = max |W[row]| / 127, computed
    against the scales rounded to `scale_dtype` (the kernel's), so that no row
    carries the rounding of its scale as error."""
    w = weight.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(scale_dtype)
    q = torch.round(w / scales.float()[:, None]).clamp(-127, 127)
    return q.to(torch.int8), scales


class Int8Matmul(nn.Module):
    """Weight-only int8 (ATen's `_weight_int8pack_mm`): per-output-channel
    symmetric scales, W ~= q * scale[:, None]; activations computed in `act`
    (bf16 or fp32), any dtype in, the same dtype out."""

    def __init__(self, weight: torch.Tensor, act: torch.dtype = torch.bfloat16):
        super().__init__()
        self.act = act
        q, scales = per_channel_int8(weight, act)
        self.qweight = nn.Parameter(q, requires_grad=False)
        self.scales = nn.Parameter(scales, requires_grad=False)

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scales.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return dequantized_linear(x, self.qweight, self.scales)
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k).to(self.act)
        y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales)  # ATen's fused CPU kernel
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


# NativeMatmul.kind by the dtype of the weight kernels.c reads; quantized
# weights are named by their stored type (llama/weights/quantized.py).
FLOAT_KINDS = {torch.float32: "f32", torch.bfloat16: "bf16"}


class NativeMatmul(nn.Module):
    """Our kernels (llama/kernels/native.py) for up to native.MAX_ROWS rows: fp32 or
    bf16 weights, or a quantized type of llama/weights/quantized.py: q8_0 (int8,
    a scale per 32 input columns; quantize="int8") or q4_1 (4 bits, a scale
    and a min per 32; quantize="int4"); quantized weights meet activations
    quantized per group of 32 where native.int8_dot(); activations fp32 or
    bf16, sums in fp32. Above MAX_ROWS (prefill), PyTorch's GEMM on the
    weight widened to `wide`: fp32 where the CPU has no native bf16
    (emulated bf16 GEMMs ran at a third of fp32's speed), else the
    activations' dtype. `kind` names what kernels.c reads ("f32", "bf16",
    "q8_0", "q4_1")."""

    def __init__(self, weight: torch.Tensor, quantize: Optional[str], cpu: CpuCapability):
        super().__init__()
        if quantize in ("int8", "int4"):
            self.kind = "q8_0" if quantize == "int8" else "q4_1"
            q, scales = quantized.quantize(weight, self.kind)
            self.weight = nn.Parameter(q, requires_grad=False)
            self.scales = nn.Parameter(scales, requires_grad=False)
        else:
            self.kind = FLOAT_KINDS[weight.dtype]
            self.weight = nn.Parameter(weight, requires_grad=False)
            self.scales = None
        self.wide = wide_dtype(weight.dtype, cpu)

    @classmethod
    def stored(cls, kind: str, weight: torch.Tensor, scales: Optional[torch.Tensor], act: torch.dtype,
               cpu: CpuCapability) -> "NativeMatmul":
        """A matmul on weights a checkpoint stores quantized as `kind`, used as
        they are (no quantization at load), for activations in `act`."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.kind = kind
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.scales = None if scales is None else nn.Parameter(scales, requires_grad=False)
        self.wide = wide_dtype(act, cpu)
        return self

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as the kernels read it, (N, K) in `dtype`."""
        if self.kind in FLOAT_KINDS.values():
            return self.weight.to(dtype)
        direct = dtype in (torch.float32, torch.bfloat16)  # what native.dequantize writes
        return native.dequantize(self.weight, self.scales, dtype if direct else torch.float32, self.kind).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= native.MAX_ROWS * x.shape[-1]:
            return native.linear(x, self.weight, self.scales, self.kind)
        return F.linear(x.to(self.wide), self.dequantized(self.wide)).to(x.dtype)


def wide_dtype(dtype: torch.dtype, cpu: CpuCapability) -> torch.dtype:
    """The dtype of NativeMatmul's prefill GEMM for weights or activations in `dtype`."""
    return torch.bfloat16 if dtype == torch.bfloat16 and cpu.bf16 else torch.float32


class StoredMatmul(nn.Module):
    """A weight stored quantized (llama/weights/quantized.py), where our
    kernels do not run (no compiler, another CPU, a GPU): dequantized in
    PyTorch at every call, in x's dtype. Saves memory, not time."""

    def __init__(self, kind: str, weight: torch.Tensor, scales: Optional[torch.Tensor]):
        super().__init__()
        self.kind = kind
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.scales = None if scales is None else nn.Parameter(scales, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, quantized.dequantize(self.kind, self.weight, self.scales, x.dtype))


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


def choose_matmul(weight: torch.Tensor, quantize: Optional[str] = None,
                  cpu: Optional[CpuCapability] = None, device: Optional[torch.device] = None) -> nn.Module:
    """The fastest matmul for this weight, by its dtype, the quantization and
    the CPU's capability (`cpu`, default this process's cpu_capability()),
    for the device the model will run on (`device`, default the weight's: an
    int8 model for a GPU is quantized on the CPU, then moved).

    Decoding reads every weight once per token, so the kernel that reads
    weights fastest at a few rows wins; benchmarks/linear_kernels.py
    measures each candidate (the README's Speed section has the figures):
    * Our kernels (NativeMatmul) wherever llama/kernels/kernels.c builds for this
      weight (native.supports: x86 with AVX2+FMA or AVX-512, a multiple of
      native.GROUP input columns), for fp32, bf16, int8 and int4: they widen
      weights in registers and quantize activations per group, and the fused
      decoding step (kernels/fused.py) runs in one call only where every
      matmul is ours.
    * Elsewhere on a CPU: fp32 F.linear (MKL); bf16 oneDNN's prepacked linear
      on AVX-512 (real or emulated bf16 dot products), F.linear on AVX2
      (oneDNN has no bf16 linear there); int8 ATen's weight-only
      per-channel kernel with bf16 activations (its fp32-activation kernel
      is much slower).
    * int4 without our kernels: ValueError. int4 is only worth its quality
      loss where it is faster than int8; there is no slow fallback.
    * Not on a CPU: F.linear, or Int8Matmul (dequantized per call) for int8.
    """
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantize!r}; choose from {[q for q in QUANTIZATIONS if q]}")
    on_cpu = (device or weight.device).type == "cpu"
    cpu = cpu or cpu_capability() if on_cpu else None
    ours = (on_cpu and cpu.isa in ("AVX2", "AVX512") and weight.dtype in (torch.float32, torch.bfloat16)
            and native.supports(weight))
    if quantize == "int4" and not ours:
        raise _int4_refused(f"on {(device or weight.device).type}" if not on_cpu else
                            f"for a ({weight.shape[0]}, {weight.shape[1]}) {weight.dtype} weight, which needs a "
                            f"multiple of {native.GROUP} input columns per rank (our kernels: {native.status()})")
    if not on_cpu:
        return Int8Matmul(weight) if quantize == "int8" else PlainMatmul(weight)
    if ours:
        return NativeMatmul(weight, quantize, cpu)
    if quantize == "int8":
        return Int8Matmul(weight, torch.bfloat16)
    if weight.dtype == torch.bfloat16 and cpu.isa == "AVX512" and onednn_available(weight.dtype):
        return OneDNNMatmul(weight)
    return PlainMatmul(weight)


def check_quantization(quantize: Optional[str], device: torch.device) -> None:
    """Before any weight is read: ValueError if int4 cannot run on `device`
    (it needs our CPU kernels; whether each weight's shape suits them,
    choose_matmul says)."""
    if quantize == "int4" and (device.type != "cpu" or native.library() is None
                               or cpu_capability().isa not in ("AVX2", "AVX512")):
        raise _int4_refused(f"on {device.type}" if device.type != "cpu" else
                            f"on this CPU (our kernels: {native.status()})")


def _int4_refused(where: str) -> ValueError:
    return ValueError(f"--quantize int4 runs on our CPU kernels only (x86 with AVX2 or AVX-512 and a C compiler), "
                      f"not {where}; use --quantize int8")


def use_kernels(model: nn.Module, quantize: Optional[str] = None, device: Optional[torch.device] = None,
                stored: Optional[Dict[str, list]] = None, act: Optional[torch.dtype] = None) -> nn.Module:
    """Gives every fairscale parallel linear layer of `model` a faster matmul, in place,
    for the device it will run on (`device`, default where its weights are).

    Each matmul is choose_matmul's for this CPU (ours, oneDNN's prepacked
    linear or F.linear); with quantize="int8", int8 weights on any device;
    with "int4", 4-bit weights on our CPU kernels, except the output layer
    (`model.output`), which stays int8, as llama.cpp's 4-bit mixes keep it
    at 6 bits or more: the logits come straight out of it, and 4 bits there
    cost far more agreement with bf16 than 4 bits anywhere else. Only
    leaf layers are swapped, found by type (and the output layer by that
    one name): the model already fuses wq|wk|wv and w1|w3 into single,
    larger matmuls. Each rank converts its own shard. The model can no
    longer load a state dict afterwards: this is the last step of building it.

    `stored`: module path -> [(type, weight, scales), ...], the parts (rows, in
    order) of layers whose weights arrive quantized (llama/weights/quantized.py:
    stored so, or quantized while loading); they are used as they are
    (`stored_matmul`, activations in `act`), and the dict is emptied as they
    are, so that each part is freed once its layer holds it.
    """
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantize!r}; choose from {[q for q in QUANTIZATIONS if q]}")
    stored = {} if stored is None else stored
    place = _stored_arena(stored, device)
    output = getattr(model, "output", None)
    modules = dict(model.named_modules())
    for child_path, child in list(modules.items()):  # in the model's order, which is decoding's
        parent_path, _, child_name = child_path.rpartition(".")
        module = modules[parent_path]
        if isinstance(child, (ColumnParallelLinear, RowParallelLinear)):
            if child_path in stored:
                matmul = stored_matmul(stored.pop(child_path), act or torch.float32, device, place)
                if place is not None:  # its parts, now in the arena, were freed: give their memory back
                    huge_pages.return_freed_memory()
            else:
                q = "int8" if quantize == "int4" and child is output else quantize
                matmul = choose_matmul(child.weight.data, q, device=device)
            setattr(module, child_name, KernelLinear(child, matmul))
        elif isinstance(child, (VocabParallelEmbedding, ParallelEmbedding)):
            setattr(module, child_name, KernelEmbedding(child))
    if stored:
        raise ValueError(f"quantized weights for layers this model does not have: {sorted(stored)[:4]}")
    _weights_on_huge_pages(model)
    return model


def runs_ours(device: Optional[torch.device] = None) -> bool:
    """Whether our kernels run the matmuls on `device` (default: the CPU)."""
    return ((device is None or torch.device(device).type == "cpu") and native.library() is not None
            and cpu_capability().isa in ("AVX2", "AVX512"))


def _stored_arena(stored: Dict[str, list], device: Optional[torch.device]):
    """For stored quantized weights our kernels will run: a function giving
    each joined tensor its place in one HugePageArena (in the model's order,
    which is `stored`'s), so that parts are copied once, straight into it;
    None where there is no arena (huge_pages.why_not) or no kernels of ours."""
    if not stored or not runs_ours(device):
        return None
    sizes = [part[i].nbytes for parts in stored.values() for part in parts for i in (1, 2) if part[i] is not None]
    arena = huge_pages.reserve(sizes)
    return None if arena is None else arena.take


def stored_matmul(parts: list, act: torch.dtype, device: Optional[torch.device] = None, place=None) -> nn.Module:
    """The matmul for a layer whose weight arrives quantized, as `parts`
    [(type, weight, scales or None), ...] holding consecutive rows: our
    kernels where they run (NativeMatmul.stored; parts of different types,
    as a GGUF file may mix in wq|wk|wv, as one segments.SegmentedMatmul),
    else StoredMatmul (PyTorch, any device; a ConcatMatmul of them for mixed
    types). Each part is copied once: into
    `place(shape, dtype)` (the huge-page arena, _stored_arena) if given, or
    concatenated; its pages mapped from the checkpoint are then released
    (llama/weights/mapped.py)."""
    ours = runs_ours(device)
    runs = _same_kind_runs(parts)
    if len(runs) > 1:  # parts of different types, each run of one type joined
        matmuls = [stored_matmul(run, act, device, place) for run in runs]
        parts.clear()
        if ours:
            from .segments import SegmentedMatmul  # it builds on NativeMatmul, defined here

            return SegmentedMatmul(matmuls)
        return ConcatMatmul(matmuls)
    kind = runs[0][0][0]

    def joined(i):
        tensors = [part[i] for part in parts]
        if tensors[0] is None:
            return None
        if place is None and len(tensors) == 1:
            return tensors[0]  # used in place (mapped from the file), or copied to huge pages later
        shape = (sum(t.shape[0] for t in tensors), *tensors[0].shape[1:])
        out = torch.cat(tensors, out=place(shape, tensors[0].dtype)) if place else torch.cat(tensors)
        mapped.release(tensors)
        return out

    weight, scales = joined(1), joined(2)
    parts.clear()
    if ours:
        matmul = NativeMatmul.stored(kind, weight, scales, act, cpu_capability())
        matmul.placed = place is not None  # already on huge pages
        return matmul
    if kind in FLOAT_KINDS.values():
        return PlainMatmul(weight)
    return StoredMatmul(kind, weight, scales)


def _same_kind_runs(parts: list) -> list:
    """`parts` grouped into runs of consecutive parts of one type."""
    runs: list = []
    for part in parts:
        if runs and runs[-1][-1][0] == part[0]:
            runs[-1].append(part)
        else:
            runs.append([part])
    return runs


class ConcatMatmul(nn.Module):
    """Matmuls over consecutive row blocks of one weight, outputs concatenated
    (StoredMatmuls of different types, where our kernels do not run)."""

    def __init__(self, parts: list):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)


TRIM_BYTES = 256 << 20


def _weights_on_huge_pages(model: nn.Module) -> None:
    """Moves the weights our kernels stream (NativeMatmuls' weights and scales)
    into one huge_pages.HugePageArena, in the model's order, which is the
    order decoding reads them. One at a time: each original is freed as its
    copy replaces it (unless something else holds it, such as the mapped
    checkpoint file's pages, which the kernel can drop), and freed memory is
    returned to the system every TRIM_BYTES, so that the weights are not held
    twice."""
    held = [(m, name) for m in model.modules() if isinstance(m, NativeMatmul) and not getattr(m, "placed", False)
            for name in ("weight", "scales") if getattr(m, name) is not None]
    arena = huge_pages.gather([getattr(m, name) for m, name in held])
    if arena is None:
        return
    since_trim = 0
    for m, name in held:
        original = getattr(m, name).data
        since_trim += original.numel() * original.element_size()
        setattr(m, name, nn.Parameter(arena.copy(original), requires_grad=False))
        mapped.release([original])  # a weight used as the checkpoint stores it: its file pages
        del original
        if since_trim >= TRIM_BYTES:
            huge_pages.return_freed_memory()
            since_trim = 0
    huge_pages.return_freed_memory()


def describe_matmuls(model: nn.Module) -> str:
    """For the Loaded line: whose matmul kernels the model's linear layers run."""
    ours = [m.matmul for m in model.modules() if isinstance(m, KernelLinear) and isinstance(m.matmul, NativeMatmul)]
    if not ours:
        return "PyTorch's kernels"
    quantized = any(m.weight.dtype in (torch.int8, torch.uint8) for m in ours)
    return f"our {native.status()} kernels" + (", int8 dot products" if quantized and native.int8_dot() else "")

