"""Our own CPU kernels (llama/kernels/kernels.c), compiled for this CPU on first use.

Decoding multiplies a few rows of activations by every weight, so on CPU
its speed is the memory bandwidth a matmul kernel reaches. PyTorch's reach
less than the machine has for the formats we need at one to a few rows:
bf16 weights on CPUs without native bf16 (emulated), group-wise int8 (no
ATen kernel at all) and fp32 beyond one row (MKL's sgemm at 2-16 rows read
the weights at half the speed of one). kernels.c widens each fp32 or bf16
weight to fp32 in registers, as llama.cpp does, with AVX2+FMA or AVX-512;
int8 and int4 weights meet activations quantized per group of 32 (as
llama.cpp's Q8_0) in int8 dot products, on AVX2 and AVX-512 VNNI
(`int8_dot()`); measured in benchmarks/linear_kernels.py and in the README's
Speed section. llama.cpp's K-quants (q4_k, q5_k, q6_k of
llama/weights/quantized.py: GGUF super-blocks as the file holds them, no
scales tensor) meet the same int8 activations on AVX2 and any AVX-512 with
BW (`kquant_int8_dot()`). uint8 is both q4_1 and the K-quants, so the
functions that take a weight take its type name (`kind`) where the dtype
alone does not say it.

The library is built once per source, compiler and CPU (`cc -O3
-march=native -fopenmp`, about a second; $LLAMA_NATIVE_ARCH replaces native)
into ~/.cache/llama/native (or $LLAMA_NATIVE_CACHE) as
kernels-<key>-<sha256>.so, and loaded with ctypes. That directory is trusted
code (a library there runs as the user), so llama/kernels/cache.py keeps it
private and loads only a library whose bytes hash to the sha256 its name
recorded when it was built (see its docstring: 0700 and owned by the user,
no links followed, rebuilt on any mismatch, builds under a temporary name
then renamed). Its OpenMP is the one PyTorch already loaded (libgomp, same
soname); each call is given torch.get_num_threads().

Without a C compiler, on a CPU without AVX2 and FMA, with LLAMA_NATIVE=0, or
with a cache directory someone else could write, `library()` is None and the
caller (linear.choose_matmul) uses PyTorch's kernels; `status()` says why
("none: ..." is also logged once as a warning). Nothing here raises.
"""

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional

import torch

from ..common.cpu import cpu_id
from ..weights import quantized
from . import cache

logger = logging.getLogger("llama")

SOURCE = Path(__file__).with_name("kernels.c")
VERSION = 7  # kernels.c's llama_kernels_version()
# -ffp-contract=off: no fused multiply-adds the source does not ask for, so that
# the elementwise kernels round as PyTorch does (the matmuls use FMA explicitly).
FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC"]
GROUP = quantized.GROUP  # int8 and int4 weights: one scale per this many input columns (kernels.c's group)
MAX_ROWS = 16  # above this many rows, MKL's sgemm is as fast (benchmarks/linear_kernels.py)
MAX_HEAD_DIM = 256  # kernels.c's decode_attention keeps a head's output in registers
MAX_PARTS = 3  # kernels.c's struct weight: row segments of different types (a fused wq | wk | wv)

_status = "not loaded yet"


def status() -> str:
    """What `library()` found: 'AVX-512' or 'AVX2', or why there are no native kernels ('off ...', 'none: ...')."""
    library()
    return _status


def _cpu_id() -> str:
    """The CPU's model and flags: a library built with -march=native runs only where they match."""
    ident = cpu_id()
    return platform.processor() if ident is None else ident


def _flags() -> list:
    """FLAGS for this CPU, or for $LLAMA_NATIVE_ARCH (e.g. haswell: AVX2 only,
    what benchmarks/linear_kernels.py --isa avx2 measures)."""
    return [f"-march={os.environ.get('LLAMA_NATIVE_ARCH') or 'native'}", *FLAGS]


def _compiler() -> Optional[str]:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def cache_directory() -> Path:
    """Where the kernels are cached: $LLAMA_NATIVE_CACHE, or ~/.cache/llama/native."""
    return Path(os.environ.get("LLAMA_NATIVE_CACHE") or Path.home() / ".cache" / "llama" / "native")


def _compile(cc: str, out: str) -> None:
    """Compile kernels.c into the library `out` (a new empty file cache.load made)."""
    command = [cc, *_flags(), str(SOURCE), "-o", out, "-lm"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed")


class _Part(ctypes.Structure):
    """kernels.c's struct part: consecutive output rows of a weight, of one type (rows 0: all)."""
    _fields_ = [("kind", ctypes.c_int), ("w", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("rows", ctypes.c_long)]


class _Weight(ctypes.Structure):
    """kernels.c's struct weight: a linear layer's weight for decode_layers, in up to MAX_PARTS parts."""
    _fields_ = [("part", _Part * MAX_PARTS)]


class _Block(ctypes.Structure):
    """kernels.c's struct block: a transformer block's weights and KV cache."""
    _fields_ = [("attention_norm", ctypes.c_void_p), ("ffn_norm", ctypes.c_void_p), ("wqkv", _Weight),
                ("wo", _Weight), ("w13", _Weight), ("w2", _Weight), ("cache_k", ctypes.c_void_p),
                ("cache_v", ctypes.c_void_p)]


# kernels.c's enum kind, by type name (NativeMatmul.kind, llama/weights/quantized.py's types)
KINDS = {"f32": 0, "bf16": 1, "q8_0": 2, "q4_1": 3, "q4_k": 4, "q5_k": 5, "q6_k": 6}
# The type a weight of this dtype is where no kind is given (uint8: q4_1, not a K-quant)
DTYPE_KINDS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.int8: "q8_0", torch.uint8: "q4_1"}
QK = quantized.QK  # K-quants: input columns per super-block
BLOCK_BYTES = {kind: nbytes for kind, (_, nbytes) in quantized.BLOCK_TYPES.items()}  # bytes per super-block


def kind_of(weight: torch.Tensor, kind: Optional[str] = None) -> str:
    """The type name of `weight` for kernels.c: `kind` if given (checked
    against the dtype), else the one its dtype says (uint8: q4_1)."""
    if kind is None:
        if weight.dtype not in DTYPE_KINDS:
            raise TypeError(f"our kernels take no {weight.dtype} weight; types: {list(KINDS)}")
        return DTYPE_KINDS[weight.dtype]
    if kind not in KINDS:
        raise ValueError(f"unknown weight type {kind!r} for our kernels; choose from {list(KINDS)}")
    want = torch.uint8 if kind in BLOCK_BYTES else next(d for d, k in DTYPE_KINDS.items() if k == kind)
    if weight.dtype != want:
        raise TypeError(f"a {kind} weight is {want}, this one is {weight.dtype}")
    return kind


def in_features(weight: torch.Tensor, kind: Optional[str] = None) -> int:
    """K of a weight as the kernels hold it: (N, K), (N, K / 2) packed int4,
    or a K-quant's (N, K / 256 * block bytes)."""
    kind = kind_of(weight, kind)
    if kind in BLOCK_BYTES:
        return weight.shape[1] // BLOCK_BYTES[kind] * QK
    return weight.shape[1] * (2 if kind == "q4_1" else 1)


def _check_blocks(weight: torch.Tensor, kind: str) -> None:
    """ValueError unless a K-quant weight's rows are whole super-blocks."""
    if kind in BLOCK_BYTES and (weight.dim() != 2 or weight.shape[1] % BLOCK_BYTES[kind]):
        raise ValueError(f"a {kind} weight is uint8 (N, K / {QK} * {BLOCK_BYTES[kind]}): whole super-blocks of "
                         f"{BLOCK_BYTES[kind]} bytes a row; this one is {tuple(weight.shape)}")


def _declare(lib: ctypes.CDLL) -> None:
    p, n, i = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    lib.q8_linear.argtypes = [p, i, p, p, p, n, n, n, i]
    lib.q4_linear.argtypes = [p, i, p, p, p, n, n, n, i]
    lib.dequantize.argtypes = [i, p, p, p, n, n, i, i]
    lib.k_linear.argtypes = [i, p, i, p, p, n, n, n, i]
    lib.weight_linear.argtypes = [ctypes.POINTER(_Weight), p, i, p, n, n, n, i]
    lib.bf16_linear.argtypes = [p, i, p, p, n, n, n, i]
    lib.f32_linear.argtypes = [p, i, p, p, n, n, n, i]
    lib.rms_norm.argtypes = [p, p, p, n, n, ctypes.c_float, i, i]
    lib.silu_mul.argtypes = [p, p, n, n, i, i]
    lib.decode_attention.argtypes = [p, p, p, p, p, i, p, p, n, n, n, n, n, i, i]
    lib.decode_layers.argtypes = [p, ctypes.POINTER(_Block), n, ctypes.c_float, p, p, i, p, n, n, n, n, n, n, n, i, i]
    lib.decode_half.argtypes = [p, p, p, i, p, ctypes.c_float, p, p, i, p, n, n, n, n, n, n, n, i, i]
    lib.rms_norm.restype = lib.silu_mul.restype = lib.dequantize.restype = None
    for f in (lib.q8_linear, lib.q4_linear, lib.bf16_linear, lib.f32_linear, lib.decode_attention, lib.decode_layers,
              lib.decode_half, lib.llama_kernels_version, lib.llama_kernels_vector_width, lib.llama_kernels_int8_dot,
              lib.k_linear, lib.llama_kernels_kquant_int8_dot, lib.weight_linear):
        f.restype = i


@lru_cache(maxsize=None)
def library() -> Optional[ctypes.CDLL]:
    """The compiled kernels, or None (see `status()`; a failure to build is also logged once)."""
    global _status
    lib, _status = _load()
    if lib is None and _status.startswith("none:"):
        logger.warning("Using PyTorch's kernels: %s", _status)
    return lib


def _load():
    """(library or None, status)."""
    if os.environ.get("LLAMA_NATIVE", "1") == "0":
        return None, "off (LLAMA_NATIVE=0)"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"none for {platform.machine()} (x86 AVX2 or AVX-512 only)"
    cc = _compiler()
    if cc is None:
        return None, "none: no C compiler (cc, gcc or $CC) to build llama/kernels/kernels.c"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"none: {cc} does not run ({e})"
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(_flags()), version, _cpu_id()]).encode()).hexdigest()
    try:
        lib, path = cache.load(str(cache_directory()), f"kernels-{key[:16]}", lambda out: _compile(cc, out))
    except (cache.Untrusted, cache.Busy) as e:
        return None, f"none: {e}"
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return None, f"none: building llama/kernels/kernels.c with {cc} failed ({e})"
    try:
        _declare(lib)
    except AttributeError as e:  # cannot happen to a library we built from this source
        return None, f"none: {path} is not our kernels ({e})"
    if lib.llama_kernels_version() != VERSION:
        return None, f"none: {path} is version {lib.llama_kernels_version()}, this code needs {VERSION}"
    return lib, "AVX-512" if lib.llama_kernels_vector_width() == 16 else "AVX2"


def int8_dot() -> bool:
    """Whether int8 and int4 weights meet int8-quantized activations
    (kernels.c's tile_q8 and tile_q4: AVX2, or AVX-512 with VNNI) rather
    than being widened to fp32 (AVX-512 without VNNI). False without our kernels."""
    lib = library()
    return lib is not None and bool(lib.llama_kernels_int8_dot())


def kquant_int8_dot() -> bool:
    """Whether K-quant weights meet int8-quantized activations (kernels.c's
    tile_k: AVX2, or AVX-512 with BW) rather than being widened to fp32.
    False without our kernels."""
    lib = library()
    return lib is not None and bool(lib.llama_kernels_kquant_int8_dot())


def supports(weight: torch.Tensor) -> bool:
    """Whether the native kernels can multiply by this (N, K) weight."""
    return (library() is not None and weight.device.type == "cpu" and weight.dim() == 2
            and weight.shape[1] % GROUP == 0 and weight.dtype in (torch.float32, torch.bfloat16, torch.int8))


def linear(x: torch.Tensor, weight: torch.Tensor, scales: Optional[torch.Tensor] = None,
           kind: Optional[str] = None) -> torch.Tensor:
    """x @ W.T for x (..., K) in fp32 or bf16 (returned in x's dtype), W
    (N, K) as `weight`: fp32, bf16, int8 (N, K) with `scales` (N, K / GROUP)
    fp32, or int4 packed two a byte (N, K / 2) uint8 with `scales` (N, K /
    GROUP, 2) fp16 = (scale, min) (quantized.group_int4's layout); all
    contiguous on the CPU. Sums in fp32; by int8 or int4 weights, where
    `int8_dot()`, each group of GROUP values of x is first quantized to int8
    with the scale max|x| / 127 (llama.cpp's Q8_0) and the group's dot
    product is exact in int32. `kind` names the weight's type where its
    dtype does not (a K-quant: "q4_k", "q5_k", "q6_k", uint8 (N, K / 256 *
    block bytes), scales None; see kernels.c's K-quant section)."""
    lib = library()
    kind = kind_of(weight, kind)
    _check_blocks(weight, kind)
    if x.dtype not in (torch.float32, torch.bfloat16) or x.shape[-1] != in_features(weight, kind):
        raise TypeError(f"native.linear takes fp32 or bf16 x (..., {in_features(weight, kind)}), "
                        f"not {x.dtype} {tuple(x.shape)}")
    k = x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    rows, n = x2.shape[0], weight.shape[0]
    y = torch.empty(rows, n, dtype=x.dtype)
    x_bf16 = int(x.dtype == torch.bfloat16)
    threads = torch.get_num_threads()
    if kind in BLOCK_BYTES:
        err = lib.k_linear(KINDS[kind], x2.data_ptr(), x_bf16, weight.data_ptr(), y.data_ptr(), rows, n, k, threads)
    elif weight.dtype in (torch.int8, torch.uint8):
        quantized = lib.q8_linear if weight.dtype == torch.int8 else lib.q4_linear
        err = quantized(x2.data_ptr(), x_bf16, weight.data_ptr(), scales.data_ptr(), y.data_ptr(), rows, n, k, threads)
    elif weight.dtype == torch.bfloat16:
        err = lib.bf16_linear(x2.data_ptr(), x_bf16, weight.data_ptr(), y.data_ptr(), rows, n, k, threads)
    else:
        err = lib.f32_linear(x2.data_ptr(), x_bf16, weight.data_ptr(), y.data_ptr(), rows, n, k, threads)
    if err:
        raise MemoryError(f"no memory to widen {rows}x{k} bf16 activations")
    return y.view(*x.shape[:-1], n)


def parts_of(entry) -> list:
    """A linear layer's weight as [(weight, scales, kind)] row segments: from
    one (weight, scales) or (weight, scales, kind), or a sequence of them
    (the segments in output order, up to MAX_PARTS); checked: whole blocks,
    one input width."""
    entries = [entry] if isinstance(entry[0], torch.Tensor) else list(entry)
    if not 1 <= len(entries) <= MAX_PARTS:
        raise ValueError(f"a weight in {len(entries)} parts; our kernels take 1 to {MAX_PARTS}")
    parts = [(w, s, kind_of(w, rest[0] if rest else None)) for w, s, *rest in entries]
    for w, _, kind in parts:
        _check_blocks(w, kind)
    widths = {in_features(w, kind) for w, _, kind in parts}
    if len(widths) > 1:
        raise ValueError(f"the parts of a weight differ in input columns: {sorted(widths)}")
    return parts


def _weight_struct(parts: list) -> _Weight:
    """kernels.c's struct weight of parts_of's list (one part: rows 0, all of them)."""
    one = len(parts) == 1
    return _Weight((_Part * MAX_PARTS)(*[_Part(KINDS[kind], w.data_ptr(), None if s is None else s.data_ptr(),
                                              0 if one else w.shape[0]) for w, s, kind in parts]))


def linear_parts(x: torch.Tensor, parts) -> torch.Tensor:
    """x @ W.T for a weight in row segments of different types (parts_of:
    [(weight, scales, kind)], output rows in order), in one native call:
    what torch.cat of native.linear of each part gives, bit for bit."""
    parts = parts_of(parts)
    k = in_features(parts[0][0], parts[0][2])
    if x.dtype not in (torch.float32, torch.bfloat16) or x.shape[-1] != k:
        raise TypeError(f"native.linear_parts takes fp32 or bf16 x (..., {k}), not {x.dtype} {tuple(x.shape)}")
    x2 = x.reshape(-1, k).contiguous()
    n = sum(w.shape[0] for w, _, _ in parts)
    y = torch.empty(x2.shape[0], n, dtype=x.dtype)
    if library().weight_linear(ctypes.byref(_weight_struct(parts)), x2.data_ptr(), int(x.dtype == torch.bfloat16),
                               y.data_ptr(), x2.shape[0], n, k, torch.get_num_threads()):
        raise MemoryError(f"no memory for {x2.shape[0]}x{n} outputs")
    return y.view(*x.shape[:-1], n)


def dequantize(weight: torch.Tensor, scales: Optional[torch.Tensor], dtype: torch.dtype,
               kind: Optional[str] = None) -> torch.Tensor:
    """The (N, K) weight that int8 `weight` with `scales`, packed int4, or a
    K-quant (`kind`, scales None) (as native.linear takes them), stands for,
    in fp32 or bf16 (computed in fp32, rounded once): one pass over it, for
    PyTorch's GEMM in prefill."""
    kind = kind_of(weight, kind)
    _check_blocks(weight, kind)
    out = torch.empty(weight.shape[0], in_features(weight, kind), dtype=dtype)
    library().dequantize(KINDS[kind], weight.data_ptr(), None if scales is None else scales.data_ptr(),
                         out.data_ptr(), out.shape[0], out.shape[1], int(dtype == torch.bfloat16),
                         torch.get_num_threads())
    return out


def fused(x: torch.Tensor) -> bool:
    """Whether the fused elementwise kernels below apply to activations `x`:
    ours are loaded, x is on the CPU in fp32 or bf16, and no torch.compile is
    tracing (inductor fuses these itself)."""
    return (not torch.compiler.is_compiling()  # first: dynamo then traces nothing below
            and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and library() is not None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """model.RMSNorm's forward: x (..., dim) and weight (dim,) in one dtype."""
    x = x.contiguous()
    y = torch.empty_like(x)
    dim = x.shape[-1]
    library().rms_norm(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // dim, dim, eps,
                       int(x.dtype == torch.bfloat16), torch.get_num_threads())
    return y


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up (..., 2 * hidden) = gate | up."""
    gate_up = gate_up.contiguous()
    hidden = gate_up.shape[-1] // 2
    y = gate_up.new_empty(*gate_up.shape[:-1], hidden)
    library().silu_mul(gate_up.data_ptr(), y.data_ptr(), y.numel() // hidden, hidden,
                       int(gate_up.dtype == torch.bfloat16), torch.get_num_threads())
    return y


def _step_positions(cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, bsz: int, cache_rows: int):
    """A decoding step's RoPE table and positions as kernels.c takes them:
    (cos, sin, per_row, pos (bsz,)) contiguous; per_row is 1 where cos has
    a row per batch row. Positions are checked by the caller
    (Transformer._inputs_at), the number of rows here."""
    if bsz > cache_rows:
        raise ValueError(f"{bsz} rows, but the KV cache holds {cache_rows}")
    return cos.contiguous(), sin.contiguous(), int(cos.shape[0] > 1), pos.reshape(bsz).contiguous()


def decode_attention(qkv: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, pos: torch.Tensor, n_q: int, n_kv: int) -> torch.Tensor:
    """model.Attention's decoding step in one call: RoPE on q and k, k and v
    written to cache row b at position pos[b], and attention of each row to
    its cache positions 0..pos[b].

    qkv (bs, 1, n_q + 2 n_kv, hd) contiguous; caches (rows, n_kv, max_seq, hd)
    in qkv's dtype; cos, sin (1 or bs, 1, 1, hd / 2, 2) as model.rope_table
    gives them at the rows' positions; pos (bs, 1) int64. Returns (bs, 1, n_q, hd).
    """
    bsz, hd = qkv.shape[0], qkv.shape[-1]
    cos, sin, per_row, pos = _step_positions(cos, sin, pos, bsz, cache_k.shape[0])
    out = qkv.new_empty(bsz, 1, n_q, hd)
    err = library().decode_attention(
        qkv.data_ptr(), cache_k.data_ptr(), cache_v.data_ptr(), cos.data_ptr(), sin.data_ptr(), per_row,
        pos.data_ptr(), out.data_ptr(), bsz, n_q, n_kv, hd, cache_k.shape[2], int(qkv.dtype == torch.bfloat16),
        torch.get_num_threads())
    if err:
        raise MemoryError(f"no memory for the attention scores of {int(pos.max()) + 1} positions")
    return out


class BlockWeights:
    """A transformer block as decode_layers takes it: its four linear layers
    (wqkv, wo, w13, w2) as `linears` = (weight, scales or None) or (weight,
    scales or None, kind) as NativeMatmul holds them (kind: its type name,
    needed for the K-quants), or a sequence of such row segments (parts_of), its two norms' weights and its KV cache. Shapes
    checked and the struct made once, not at every decoding step; holds the
    tensors, so that the struct's pointers stay valid."""

    def __init__(self, linears, attention_norm: torch.Tensor, ffn_norm: torch.Tensor, eps: float,
                 cache_k: torch.Tensor, cache_v: torch.Tensor, n_q: int, n_kv: int):
        dim, head_dim = ffn_norm.shape[0], cache_k.shape[-1]
        linears = [parts_of(entry) for entry in linears]
        hidden = in_features(linears[3][0][0], linears[3][0][2])
        shapes = [((n_q + 2 * n_kv) * head_dim, dim), (dim, n_q * head_dim), (2 * hidden, dim), (dim, hidden)]
        got = [(sum(w.shape[0] for w, _, _ in parts), in_features(parts[0][0], parts[0][2])) for parts in linears]
        if got != shapes:
            raise ValueError(f"decode_layers: weights {got}, expected {shapes}")
        # What every block of one decode_layers call must share:
        self.shape = (attention_norm.dtype, eps, dim, n_q, n_kv, hidden, tuple(cache_k.shape))
        self.tensors = (linears, attention_norm, ffn_norm, cache_k, cache_v)
        self.struct = _Block(attention_norm.data_ptr(), ffn_norm.data_ptr(),
                             *[_weight_struct(parts) for parts in linears], cache_k.data_ptr(), cache_v.data_ptr())


class Layers:
    """Consecutive blocks (BlockWeights of the same shapes) for one decode_layers call."""

    def __init__(self, blocks):
        if not blocks or any(b.shape != blocks[0].shape for b in blocks):
            raise ValueError("decode_layers: the blocks differ in dtype, eps or shape")
        self.blocks = list(blocks)
        self.structs = (_Block * len(blocks))(*[b.struct for b in blocks])
        self.each = [ctypes.addressof(self.structs) + i * ctypes.sizeof(_Block) for i in range(len(blocks))]
        self.dtype, self.eps, self.dim, self.n_q, self.n_kv, self.hidden, self.cache_shape = blocks[0].shape

    def step(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor) -> tuple:
        """h's copy to decode in place, and the arguments after the blocks
        that kernels.c's decode_layers and decode_half share (struct step)."""
        bsz, dim = h.shape[0], h.shape[-1]
        rows, _, max_seq, head_dim = self.cache_shape
        if h.dtype != self.dtype or dim != self.dim:
            raise TypeError(f"decode_layers: h is {h.dtype} (..., {dim}), the blocks take {self.dtype} (..., {self.dim})")
        cos, sin, per_row, pos = _step_positions(cos, sin, pos, bsz, rows)
        shapes = (self.eps, cos.data_ptr(), sin.data_ptr(), per_row, pos.data_ptr(), bsz, dim, self.n_q, self.n_kv,
                  head_dim, self.hidden, max_seq, int(h.dtype == torch.bfloat16), torch.get_num_threads())
        return h.contiguous().clone(), (cos, sin, pos), shapes


def decode_layers(h: torch.Tensor, layers: Layers, cos: torch.Tensor, sin: torch.Tensor,
                  pos: torch.Tensor) -> torch.Tensor:
    """model.TransformerBlock's decoding step for every block of `layers` in
    one call, for one process (no collective inside a block). h (bs, 1, dim)
    in the blocks' dtype; cos, sin and pos as decode_attention takes them.
    Returns the last block's output (bs, 1, dim)."""
    out, _held, shapes = layers.step(h, cos, sin, pos)
    if library().decode_layers(out.data_ptr(), layers.structs, len(layers.blocks), *shapes):
        raise MemoryError(f"no memory for a decoding step of {h.shape[0]} rows")
    return out


def decode_layers_parallel(h: torch.Tensor, layers: Layers, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                           all_reduce: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """decode_layers under tensor parallelism (each rank holds its shards of
    the blocks): half a block a call (kernels.c's decode_half: attention,
    then feed-forward), with `all_reduce` summing each half's output over the
    ranks in between, as the row-parallel wo and w2 do. Two calls and two
    reductions per block; the modules' way took about fifteen calls."""
    out, _held, shapes = layers.step(h, cos, sin, pos)
    delta, total, lib = torch.empty_like(out), None, library()
    for block in layers.each:
        for half in (0, 1):
            # total (the last sum, possibly delta itself) is added to out before delta is overwritten
            if lib.decode_half(out.data_ptr(), None if total is None else total.data_ptr(), block, half,
                               delta.data_ptr(), *shapes):
                raise MemoryError(f"no memory for a decoding step of {h.shape[0]} rows")
            total = all_reduce(delta).contiguous()
    lib.decode_half(out.data_ptr(), total.data_ptr(), None, 0, None, *shapes)
    return out
