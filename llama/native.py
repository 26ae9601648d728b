"""Our own CPU kernels (llama/kernels.c), compiled for this CPU on first use.

Decoding multiplies a few rows of activations by every weight, so on CPU
its speed is the memory bandwidth a matmul kernel reaches. PyTorch's reach
less than the machine has for the formats we need at one to a few rows:
bf16 weights on CPUs without native bf16 (emulated), group-wise int8 (no
ATen kernel at all) and fp32 beyond one row (MKL's sgemm at 2-16 rows read
the weights at half the speed of one). kernels.c widens each weight to fp32
in registers, as llama.cpp does, with AVX2+FMA or AVX-512; measured in
benchmarks/linear_kernels.py and in the README's Speed section.

The library is built once per source, compiler and CPU (`cc -O3
-march=native -fopenmp`, about a second) into ~/.cache/llama/native (or
$LLAMA_NATIVE_CACHE), written under a temporary name and renamed, and loaded
with ctypes. Its OpenMP is the one PyTorch already loaded (libgomp, same
soname); each call is given torch.get_num_threads(). Without a C compiler,
on a CPU without AVX2 and FMA, or with LLAMA_NATIVE=0, `library()` is None
and the caller (linear.choose_matmul) uses PyTorch's kernels; `status()`
says why.
"""

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

SOURCE = Path(__file__).with_name("kernels.c")
VERSION = 1  # kernels.c's llama_kernels_version()
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
GROUP = 32  # int8 weights: one scale per this many input columns (kernels.c's group)
MAX_ROWS = 16  # above this many rows, MKL's sgemm is as fast (benchmarks/linear_kernels.py)

_status = "not loaded yet"


def status() -> str:
    """What `library()` found: 'AVX-512 (16 floats a vector)', or why there are no native kernels."""
    library()
    return _status


def _cpu_id() -> str:
    """The CPU's model and flags: a library built with -march=native runs only where they match."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    keep = [line for line in lines if line.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(dict.fromkeys(keep))  # one of each: every core lists them


def _compiler() -> Optional[str]:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _build(cc: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.stem, suffix=".tmp")
    os.close(fd)
    try:
        result = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed")
        os.replace(tmp, out)  # a crash never leaves a half-written library under the final name
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _declare(lib: ctypes.CDLL) -> None:
    p, n, i = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    lib.q8_linear.argtypes = [p, i, p, p, p, n, n, n, i]
    lib.bf16_linear.argtypes = [p, i, p, p, n, n, n, i]
    lib.f32_linear.argtypes = [p, i, p, p, n, n, n, i]
    for f in (lib.q8_linear, lib.bf16_linear, lib.f32_linear, lib.llama_kernels_version, lib.llama_kernels_vector_width):
        f.restype = i


@lru_cache(maxsize=None)
def library() -> Optional[ctypes.CDLL]:
    """The compiled kernels, or None (see `status()`)."""
    global _status
    if os.environ.get("LLAMA_NATIVE", "1") == "0":
        _status = "off (LLAMA_NATIVE=0)"
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        _status = f"none for {platform.machine()} (x86 AVX2 or AVX-512 only)"
        return None
    cc = _compiler()
    if cc is None:
        _status = "none: no C compiler (cc, gcc or $CC) to build llama/kernels.c"
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        _status = f"none: {cc} does not run ({e})"
        return None
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), version, _cpu_id()]).encode()).hexdigest()
    cache = Path(os.environ.get("LLAMA_NATIVE_CACHE") or Path.home() / ".cache" / "llama" / "native")
    path = cache / f"kernels-{key[:16]}.so"
    try:
        if not path.is_file():
            _build(cc, path)
        lib = ctypes.CDLL(str(path))
        _declare(lib)
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _status = f"none: building llama/kernels.c with {cc} failed ({e})"
        return None
    if lib.llama_kernels_version() != VERSION:
        _status = f"none: {path} is version {lib.llama_kernels_version()}, this code needs {VERSION}"
        return None
    width = lib.llama_kernels_vector_width()
    _status = f"{'AVX-512' if width == 16 else 'AVX2'} ({width} floats a vector)"
    return lib


def supports(weight: torch.Tensor) -> bool:
    """Whether the native kernels can multiply by this (N, K) weight."""
    return (library() is not None and weight.device.type == "cpu" and weight.dim() == 2
            and weight.shape[1] % GROUP == 0 and weight.dtype in (torch.float32, torch.bfloat16, torch.int8))


def linear(x: torch.Tensor, weight: torch.Tensor, scales: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x @ weight.T for x (..., K) in fp32 or bf16 (returned in x's dtype),
    weight (N, K) fp32, bf16, or int8 with `scales` (N, K / GROUP) fp32;
    all contiguous on the CPU. Sums in fp32."""
    lib = library()
    k = x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    rows, n = x2.shape[0], weight.shape[0]
    y = torch.empty(rows, n, dtype=x.dtype)
    x_bf16 = int(x.dtype == torch.bfloat16)
    threads = torch.get_num_threads()
    if weight.dtype == torch.int8:
        err = lib.q8_linear(x2.data_ptr(), x_bf16, weight.data_ptr(), scales.data_ptr(), y.data_ptr(), rows, n, k, threads)
    elif weight.dtype == torch.bfloat16:
        err = lib.bf16_linear(x2.data_ptr(), x_bf16, weight.data_ptr(), y.data_ptr(), rows, n, k, threads)
    else:
        err = lib.f32_linear(x2.data_ptr(), x_bf16, weight.data_ptr(), y.data_ptr(), rows, n, k, threads)
    if err:
        raise MemoryError(f"no memory to widen {rows}x{k} bf16 activations")
    return y.view(*x.shape[:-1], n)
