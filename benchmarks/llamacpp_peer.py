"""llama.cpp as a peer in the benchmarks: the same weights as ours in its
formats, greedy decoding and its own timings, through llama-cpp-python.

    pip install -e ".[bench]"    # builds llama.cpp from source: see README "Speed"

`peer_files` writes a Meta checkpoint as an F32 GGUF (utils/export_gguf.py)
and lets llama.cpp's own quantizer make BF16 and Q8_0 from it, cached under
~/.cache/llama-bench ($LLAMA_BENCH_CACHE). `LlamaCppRunner` feeds token ids
(so tokenization plays no part) and times prefill and decode with llama.cpp's
own counters (llama_perf_context, what llama-cli prints), keeping the wall
clock of the Python loop beside them.
"""

import ctypes
import hashlib
import logging
import os
import re
import time
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

CACHE = Path(os.environ.get("LLAMA_BENCH_CACHE", Path.home() / ".cache" / "llama-bench"))
QUANT_FTYPES = {"BF16": "LLAMA_FTYPE_MOSTLY_BF16", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1"}
# Made only when asked for (peer_files(kinds=...)): the mix most published GGUF files use (Q4_K, Q6_K).
MORE_FTYPES = {"Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}


def import_llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        raise ImportError('the llama.cpp peer needs llama-cpp-python: CMAKE_ARGS="-DGGML_NATIVE=ON" '
                          'pip install -e ".[bench]" (builds from source, several minutes)') from e
    return llama_cpp


def checkpoint_key(ckpt_dir: Path) -> str:
    """A short name that changes when the checkpoint's weights or params change."""
    h = hashlib.sha256((ckpt_dir / "params.json").read_bytes())
    for shard in sorted(ckpt_dir.glob("consolidated.*.pth")):
        st = shard.stat()
        h.update(f"{shard.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return f"{ckpt_dir.name}-{h.hexdigest()[:10]}"


def quantize(src: Path, dst: Path, kind: str, threads: int) -> Path:
    """llama.cpp's quantizer (llama-quantize's code) from `src` to `dst` as `kind` (BF16, Q8_0, Q4_1, Q4_K_M)."""
    llama_cpp = import_llama_cpp()
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # not a line per tensor
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, {**QUANT_FTYPES, **MORE_FTYPES}[kind])
    params.nthread = threads
    tmp = dst.with_name(f".{dst.name}.tmp")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp could not quantize {src} to {kind}")
    os.replace(tmp, dst)
    return dst


def peer_files(ckpt_dir, tokenizer_gguf, threads: int = 2, cache: Path = CACHE, log=print,
               kinds: Sequence[str] = tuple(QUANT_FTYPES)) -> Dict[str, Path]:
    """{"F32": path, "BF16": path, "Q8_0": path, "Q4_1": path}: the checkpoint's weights as llama.cpp
    files (made once; `kinds` may add MORE_FTYPES). llama.cpp's quantizer keeps some tensors at more bits than the file type
    says (the output layer: Q8_0 or Q6_K), as ours keeps int4's output layer int8."""
    ckpt_dir = Path(ckpt_dir)
    base = cache / checkpoint_key(ckpt_dir)
    files = {"F32": base.with_name(base.name + "-F32.gguf")}
    if not files["F32"].is_file():
        from utils.export_gguf import export_gguf  # imports torch: not in processes that only run llama.cpp

        log(f"writing {files['F32']} (float32, from {ckpt_dir})")
        export_gguf(ckpt_dir, files["F32"], tokenizer_from=tokenizer_gguf)
    for kind in kinds:
        files[kind] = base.with_name(f"{base.name}-{kind}.gguf")
        if not files[kind].is_file():
            log(f"quantizing to {files[kind]} with llama.cpp's quantizer")
            quantize(files["F32"], files[kind], kind, threads)
    return files


def without_extra_buffers() -> None:
    """Makes every later llama_cpp.Llama load its weights without llama.cpp's "extra" CPU buffer
    types (AMX and repacked layouts): its build here crashes (SIGSEGV) in a multi-token eval of
    Q8_0 files on an AMX CPU with them. Slower, but it runs; callers say when they do this."""
    llama_cpp = import_llama_cpp()
    default = llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama.llama_cpp.llama_model_default_params = params


def version() -> str:
    return import_llama_cpp().__version__


def system_info() -> str:
    """The features llama.cpp was built with ("AVX2 AVX512 ..."), from llama_print_system_info."""
    text = import_llama_cpp().llama_print_system_info().decode(errors="replace")
    found = re.findall(r"(\w+) = 1\b", text)
    return "built with " + " ".join(found) if found else text.strip()


class LlamaCppRunner:
    """One llama.cpp model and context: greedy decoding of token ids, and its timings."""

    def __init__(self, path: Path, threads: int, n_ctx: int):
        llama_cpp = import_llama_cpp()
        self.api = llama_cpp
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                                   n_threads_batch=threads, logits_all=False, verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def _next(self) -> int:
        """Arg-max of the last evaluated position's logits."""
        logits = np.ctypeslib.as_array(self.api.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.n_vocab,))
        return int(logits.argmax())

    def _perf(self):
        return self.api.llama_perf_context(self.llm.ctx)

    def greedy(self, prompt: Sequence[int], n: int) -> List[int]:
        """`n` greedy tokens after `prompt` (from an empty cache)."""
        self.llm.reset()
        self.llm.eval(list(prompt))
        out = [self._next()]
        while len(out) < n:
            self.llm.eval([out[-1]])
            out.append(self._next())
        return out

    def decode(self, prompt: Sequence[int], n: int) -> Dict[str, float]:
        """Greedy `n` tokens; llama.cpp's ms per single-token step, and the Python loop's."""
        self.llm.reset()
        self.llm.eval(list(prompt))
        token = self._next()
        self.api.llama_perf_context_reset(self.llm.ctx)
        start = time.perf_counter()
        for _ in range(n - 1):
            self.llm.eval([token])
            token = self._next()
        wall = time.perf_counter() - start
        perf = self._perf()
        if perf.n_eval != n - 1:
            raise RuntimeError(f"llama.cpp counted {perf.n_eval} decode steps, expected {n - 1}")
        return {"decode_ms": perf.t_eval_ms / perf.n_eval, "decode_wall_ms": 1e3 * wall / (n - 1)}

    def prefill(self, prompt: Sequence[int]) -> Dict[str, float]:
        """Milliseconds to the first token's logits of `prompt` (one batch), by llama.cpp's counter and the clock."""
        self.llm.reset()
        self.api.llama_perf_context_reset(self.llm.ctx)
        start = time.perf_counter()
        self.llm.eval(list(prompt))
        self._next()
        wall = time.perf_counter() - start
        perf = self._perf()
        return {"prefill_ms": perf.t_p_eval_ms, "prefill_wall_ms": 1e3 * wall}

    def tokenize(self, text: str) -> List[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)


def teacher_forced_logits(path: Path, tokens: Sequence[int], threads: int, steps: bool = False) -> np.ndarray:
    """llama.cpp's logits (len(tokens), vocab) for `tokens`, row i predicting
    token i + 1: in batches of 512 (its prefill) or one token a step (its
    decoding), as quant_quality.teacher_forced_logits gives ours."""
    llama_cpp = import_llama_cpp()
    batch = 1 if steps else 512
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(tokens) + 8, n_batch=batch, n_ubatch=batch,
                          n_threads=threads, n_threads_batch=threads, logits_all=True, verbose=False)
    llm.eval(list(tokens))
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def quantization_quality(files: Dict[str, Path], tokens: Sequence[int], text: str, threads: int,
                         kinds: Sequence[str] = ("Q8_0",)) -> Dict[str, dict]:
    """{kind: our quality report's figures (quant_quality.quality_figures)}
    for each of llama.cpp's quantized `kinds` against its BF16 and F32 files,
    on the same tokens: how much llama.cpp's own formats move the top-1
    token, beside ours."""
    import torch

    from benchmarks.quant_quality import quality_figures

    names = {"fp32": "F32", "bf16": "BF16", **{kind: kind for kind in kinds}}
    logits = {name: torch.from_numpy(teacher_forced_logits(files[kind], tokens, threads))[:-1]
              for name, kind in names.items()}
    stepped = {name: torch.from_numpy(teacher_forced_logits(files[kind], tokens, threads, steps=True))[:-1]
               for name, kind in names.items()}
    out = {}
    for kind in kinds:
        keep = ("fp32", "bf16", kind)
        out[kind] = {**quality_figures({k: logits[k] for k in keep}, {k: stepped[k] for k in keep}, tokens, kind, text),
                     "engine": "llama.cpp"}
    return out
