"""Building a ready model from a Meta checkpoint: `Llama.build`'s steps, in order.

`build(...)` runs one small function per step, each named for what it does:

1. `check_arguments`: the caller's values (quantization, compile, sizes).
2. `read_model`: the tokenizer and params.json, vocab_size resolved from
   the tokenizer (Llama 2's -1) and checked against it.
3. `start_processes`: the process groups (torchrun or one process), CPU
   threads, the dtype (`choose_dtype`, which needs the memory plan of
   `fp32_need` on CPU), the seed.
4. `inspect_files`: cheap facts before any weight is read: this rank's files
   are there and fit params.json, the KV cache fits in memory
   (`check_cache_memory`), and every rank loads the same checkpoint with the
   same settings (fingerprints compared across ranks).
5. `load_state`: this rank's shard of the weights, in the model's dtype;
   linear weights stored quantized are taken as they are, and where our
   kernels run, the float ones are quantized here with `quantize`, one
   tensor at a time, or taken in the model's dtype (`kernel_weights`: no
   load holds the full-precision model beside what it keeps).
6. `construct`: the Transformer on the meta device, then
   `load_state_dict(assign=True)`: no weight is allocated twice.
7. `install_kernels`: faster matmuls (`use_kernels`, on the quantized
   weights of step 5 as they are) and our fused CPU
   decoding (`use_fused_decoding`), from outside the model; then `setup_caches`
   allocates the KV cache, and, if asked, `compile_decode`.
8. `weight_bytes_per_step`, then the "Loaded" log line.

Invariants: every rank runs every step in the same order, and each step that
exchanges something between ranks (`init_distributed`,
`check_same_checkpoint`, the sum in `weight_bytes_per_step`) is reached by
all of them; an error found by one rank in step 4 is exchanged, so that no
rank waits for one that has given up. Steps 1-4 read no weight: bad input
is refused in seconds, even for a 70B checkpoint.

Failure modes: FileNotFoundError or ValueError (CheckpointError) naming the
bad file or value and the fix; a KV cache that cannot fit is refused with
the numbers before anything is allocated.
"""

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch

from .kernels.compiled import compile_decode
from .kernels.fused import use_fused_decoding
from .kernels.linear import FLOAT_KINDS, QUANTIZATIONS, check_quantization, describe_matmuls, runs_ours, use_kernels
from .model import Transformer, cache_bytes
from .parallel.distributed import DistInfo, choose_dtype, init_distributed
from .parallel.fingerprint import check_same_checkpoint, replicated_hash
from .parallel.memory import ADDRESS_SPACE, CGROUP, available_memory, available_memory_and_limit
from .parallel.threads import local_ranks, set_threads
from .text.tokenizer import Tokenizer
from .weights.args import ModelArgs
from .weights import mapped, quantized
from .weights.checkpoint import (CheckpointError, expected_shapes, first_needed_shard, inspect_rank_files,
                                 load_prepared_rank_state, stored_types)
from .weights.schema import model_weights, shard_shapes, stage_holds
from .weights.stages import model_digest, model_folder, stage_folder, stage_layers

logger = logging.getLogger("llama")


@dataclass
class Built:
    """What `build` returns: the model, its tokenizer, and the weight bytes
    one decoding step reads over all ranks (for the metrics)."""

    model: Transformer
    tokenizer: Tokenizer
    weight_bytes_per_step: int


@dataclass
class Files:
    """What `inspect_files` found: this rank's prepared files, its folder and
    its pipeline stage's layers (None: all)."""

    prepared: tuple
    folder: Path
    layers: Optional[range]


def build(ckpt_dir: str, tokenizer_path: str, max_seq_len: int, max_batch_size: int,
          model_parallel_size: Optional[int] = None, seed: int = 1, device: Optional[str] = None,
          dtype: Optional[str] = None, quantize: Optional[str] = None, threads: Optional[int] = None,
          compile: bool = False, pipeline_stages: int = 1) -> Built:
    """Llama.build's work (see its docstring for the arguments)."""
    start = time.perf_counter()
    check_arguments(quantize, compile, max_seq_len, max_batch_size)
    n_threads = set_threads(threads)
    tokenizer, args, raw_vocab_size = read_model(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size)
    dist_info, torch_dtype, dtype_reason = start_processes(args, device, dtype, model_parallel_size, pipeline_stages,
                                                           quantize, seed)
    files = inspect_files(ckpt_dir, tokenizer_path, args, raw_vocab_size, dist_info, torch_dtype, quantize, seed)
    state, stored, layout = load_state(files, args, dist_info, torch_dtype, quantize)
    # Quantized weights are made on the CPU and then moved: the full-precision weights never occupy the GPU.
    load_device = torch.device("cpu") if quantize or stored else dist_info.device  # stored: only on a CPU, or quantized
    model, stored = construct(args, layout, files.layers, {k: v.to(load_device) for k, v in state.items()}, stored)
    del state
    kinds = sorted({kind for parts in stored.values() for kind, _, _ in parts} - set(FLOAT_KINDS.values()))
    install_kernels(model, quantize, dist_info.device, load_device, stored, torch_dtype)
    model.setup_caches(dist_info.device, torch_dtype)
    if compile:
        compile_decode(model)
    weight_bytes = weight_bytes_per_step(model, dist_info)
    logger.info("Loaded %s on %s in %.2f s: %s (%s)%s, %s%s, %d thread%s, rank %d of %d%s", files.folder,
                dist_info.device, time.perf_counter() - start, str(torch_dtype).replace("torch.", ""), dtype_reason,
                f", {quantize} weights" if quantize else f", weights stored {'/'.join(kinds)}" if kinds else "",
                describe_matmuls(model),
                ", compiled decoding" if compile else "",
                n_threads, "s" if n_threads > 1 else "", dist_info.rank, dist_info.world_size,
                f", pipeline stage {dist_info.stage} of {dist_info.stages}: layers {files.layers.start}.."
                f"{files.layers.stop - 1}" if files.layers is not None else "")
    return Built(model, tokenizer, weight_bytes)


def check_arguments(quantize: Optional[str], compile: bool, max_seq_len: int, max_batch_size: int) -> None:
    """ValueError, naming the argument, for values no checkpoint could make right."""
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantize!r}; use one of {QUANTIZATIONS[1:]} or leave it unset")
    if not isinstance(compile, bool):
        raise ValueError(f"compile must be true or false, got {compile!r}")
    for name, value in (("max_seq_len", max_seq_len), ("max_batch_size", max_batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def read_model(ckpt_dir: str, tokenizer_path: str, max_seq_len: int,
               max_batch_size: int) -> Tuple[Tokenizer, ModelArgs, int]:
    """(tokenizer, params.json's args with vocab_size resolved, params.json's own vocab_size)."""
    if not Path(ckpt_dir).is_dir():
        raise FileNotFoundError(f"checkpoint directory {ckpt_dir} not found (--ckpt_dir)")
    tokenizer = Tokenizer.from_file(tokenizer_path)
    args = ModelArgs.from_json(model_folder(ckpt_dir) / "params.json", max_seq_len=max_seq_len,
                               max_batch_size=max_batch_size)
    return tokenizer, with_tokenizer_vocab(args, tokenizer, ckpt_dir), args.vocab_size


def with_tokenizer_vocab(args: ModelArgs, tokenizer: Tokenizer, ckpt_dir) -> ModelArgs:
    """Resolves vocab_size -1 (Llama 2) and checks the tokenizer fits the model."""
    if args.vocab_size == -1:
        return dataclasses.replace(args, vocab_size=tokenizer.n_words)
    if args.vocab_size != tokenizer.n_words:
        raise ValueError(
            f"{tokenizer.path} has {tokenizer.n_words} tokens but {Path(ckpt_dir) / 'params.json'} says "
            f"vocab_size={args.vocab_size}: this tokenizer belongs to another model (Llama 2 uses a "
            "32000-token SentencePiece tokenizer.model, Llama 3 and 3.1 a 128256-token tiktoken one); "
            "pass the tokenizer.model that came with these weights"
        )
    return args


def start_processes(args: ModelArgs, device: Optional[str], dtype: Optional[str], model_parallel_size: Optional[int],
                    pipeline_stages: int, quantize: Optional[str], seed: int):
    """(DistInfo, torch dtype, why that dtype): the process groups, then the
    dtype (by default the device's fastest that fits), and the seed."""
    dist_info = init_distributed(device, model_parallel_size, pipeline_stages=pipeline_stages)
    check_quantization(quantize, dist_info.device)
    need = fp32_need(args, dist_info) if dtype is None and dist_info.device.type == "cpu" else (None, None)
    torch_dtype, dtype_reason = choose_dtype(dtype, dist_info.device, *need)
    torch.manual_seed(seed)
    return dist_info, torch_dtype, dtype_reason


def fp32_need(args: ModelArgs, dist_info: DistInfo) -> Tuple[Optional[int], Optional[int]]:
    """(bytes the weights and KV caches of this node's ranks take in float32, bytes free on it),
    for the default dtype; (None, None) where the split is impossible (reported later, with the fix)."""
    try:
        shapes = shard_shapes(args, dist_info.mp_size, "vocab")  # both layouts hold as many values
    except ValueError:
        return None, None
    per_rank = 4 * sum(math.prod(shape) for shape in shapes.values()) + cache_bytes(args, dist_info.mp_size,
                                                                                     torch.float32)
    per_rank //= dist_info.stages  # a pipeline stage holds about 1/stages of the layers
    return per_rank * local_ranks(), available_memory(dist_info.device)


def check_cache_memory(args: ModelArgs, world_size: int, device: torch.device, dtype: torch.dtype) -> None:
    """Refuses, with the numbers, a --max_seq_len / --max_batch_size whose KV
    cache (model.cache_bytes) cannot fit in the memory left on `device`,
    before anything is allocated."""
    need = cache_bytes(args, world_size, dtype)
    free = available_memory(device)  # the least of the machine's, ulimit -v's and the cgroup's room
    if free is not None and need > free:
        gib = 1024**3
        limit = available_memory_and_limit(device)[1]
        raise_it = f", or raise {limit}" if limit in (ADDRESS_SPACE, CGROUP) else ""
        raise CheckpointError(
            f"max_seq_len={args.max_seq_len} and max_batch_size={args.max_batch_size} need a KV cache of "
            f"{need / gib:,.1f} GiB per process with its RoPE table ({args.n_layers} layers x 2 x "
            f"{args.max_batch_size} x {args.max_seq_len} positions x {args.head_dim * args.n_kv_heads} KV values / "
            f"{world_size} process(es) x {dtype.itemsize} bytes, plus {args.max_seq_len} positions x "
            f"{3 * args.head_dim // 2 * 4} bytes of RoPE), but only {free / gib:,.1f} GiB is free on {device}; "
            f"lower --max_seq_len or --max_batch_size{raise_it}"
        )


def inspect_files(ckpt_dir: str, tokenizer_path: str, args: ModelArgs, raw_vocab_size: int, dist_info: DistInfo,
                  torch_dtype: torch.dtype, quantize: Optional[str], seed: int) -> Files:
    """Cheap facts first: this rank's files are there and fit params.json,
    the KV cache fits in memory, and every rank loads the same checkpoint
    with the same settings, before any weight is read. Errors are exchanged
    too (check_same_checkpoint raises on every rank if any failed)."""
    rank, size = dist_info.mp_rank, dist_info.mp_size  # within this rank's pipeline stage
    error, prepared, weights, folder, layers, split = None, None, {}, Path(ckpt_dir), None, None
    try:
        folder, held, split = stage_folder(ckpt_dir, dist_info.stages, dist_info.stage, args, dist_info.rank)
        if dist_info.stages > 1:
            layers = stage_layers(args, dist_info.stages, dist_info.stage, split)
        check_cache_memory(args if layers is None else dataclasses.replace(args, n_layers=len(layers)), size,
                           dist_info.device, torch_dtype)
        prepared = inspect_rank_files(folder, args, raw_vocab_size, rank, size, held=held)
        weights["weights (replicated norms)"] = replicated_hash(
            prepared[0][first_needed_shard(len(prepared[0]), rank, size)],
            keep=lambda key: layers is None or stage_holds(key, layers, args.n_layers))
    except (FileNotFoundError, ValueError) as e:
        error = e
    check_same_checkpoint(folder, tokenizer_path, error=error, extra=weights, stage=dist_info.stage,
                          model=model_digest(folder) if dist_info.stages > 1 else None,
                          dtype=torch_dtype, quantize=quantize, max_seq_len=args.max_seq_len,
                          max_batch_size=args.max_batch_size, seed=seed, pipeline_stages=dist_info.stages,
                          **({"stage_split": split} if dist_info.stages > 1 else {}))
    return Files(prepared, folder, layers)


def load_state(files: Files, args: ModelArgs, dist_info: DistInfo, torch_dtype: torch.dtype,
               quantize: Optional[str]):
    """(this rank's float weights under Meta's names in `torch_dtype`, its
    linear weights that go to their matmuls directly (`kernel_weights`),
    embedding layout), on the CPU."""
    state, layout = load_prepared_rank_state(files.prepared, files.folder, args, dist_info.mp_rank,
                                             dist_info.mp_size, files.layers)
    shapes = expected_shapes(args, dist_info.mp_size, layout, files.layers)
    stored = kernel_weights(state, shapes, args, quantize, dist_info.device, torch_dtype, files.folder)
    return {k: v.to(dtype=torch_dtype).contiguous() for k, v in state.items()}, stored, layout


def kernel_weights(state: dict, shapes: dict, args: ModelArgs, quantize: Optional[str], device: torch.device,
                   dtype: torch.dtype, folder: Path) -> dict:
    """Takes out of `state` the linear weights that go to their matmuls
    directly (use_kernels' `stored`), one tensor at a time, each one's pages
    of the checkpoint file released once it is done (llama/weights/mapped.py):

    * those the checkpoint stores quantized (llama/weights/quantized.py), as they are;
    * where our CPU kernels run them, with `quantize` the float ones, quantized
      here (ROW_CHUNK rows at a time), and without, the float ones in `dtype`:
      use_kernels copies each straight into the huge-page arena.

    So no load holds the full-precision model beside what it keeps, only one
    tensor more. `shapes`: the rank's expected shapes. Returns Meta name ->
    (type, weight, scales or None). CheckpointError for a --quantize that
    asks for other types than the checkpoint stores."""
    types = stored_types(state, shapes, str(folder))
    if types and quantize:
        other = {k: t for k, t in types.items() if t != quantized.type_for(quantize, k)}
        if other:
            key = sorted(other)[0]
            raise CheckpointError(
                f"{folder} stores its weights quantized ({key} as {other[key]}); --quantize {quantize} would "
                f"quantize them again: leave --quantize out, or quantize the full-precision checkpoint "
                f"(llama quantize --quantize {quantize})")
    schema = model_weights(args)
    ours = runs_ours(device)
    out = {}
    for key in list(state):
        if key in types:
            out[key] = (types[key], state.pop(key), state.pop(quantized.scales_key(key), None))
            continue
        if not (ours and key in schema and schema[key].kind in ("column", "row")
                and state[key].shape[1] % quantized.GROUP == 0 and (quantize or dtype in FLOAT_KINDS)):
            continue
        full = state.pop(key)
        if quantize:
            kind = quantized.type_for(quantize, key)
            out[key] = (kind, *quantized.quantize(full, kind))
        else:
            out[key] = (FLOAT_KINDS[dtype], full.to(dtype).contiguous(), None)
        if out[key][1] is not full:
            mapped.release([full])
        del full
    return out


def construct(args: ModelArgs, layout, layers: Optional[range], state: dict,
              stored: dict) -> Tuple[Transformer, dict]:
    """(the Transformer built on the meta device, then given `state`'s tensors
    (not copies); the weights of `stored` (Meta names, emptied) regrouped by
    the model's linear layers, which install_kernels gives them to)."""
    with torch.device("meta"):
        model = Transformer(args, embedding_layout=layout, layers=layers)
    by_module = {path: names for path, names in model.checkpoint_sources().items() if any(n in stored for n in names)}
    for names in by_module.values():
        floats = [n for n in names if n not in stored]
        if floats:
            raise CheckpointError(f"{floats[0]} is stored in float but {next(n for n in names if n in stored)} "
                                  f"quantized; this model runs {' | '.join(names)} as one matmul: store them alike")
    # Not strict: the layers of `stored` get their weights in install_kernels; every other key is checked here.
    result = model.load_state_dict(state, strict=False, assign=True)
    expected = {f"{path}.weight" for path in by_module}
    if set(result.missing_keys) != expected or result.unexpected_keys:
        raise CheckpointError(f"the weights do not fit the model: missing {sorted(set(result.missing_keys) - expected)[:4]}, "
                              f"unexpected {result.unexpected_keys[:4]}")
    regrouped = {path: [stored.pop(name) for name in names] for path, names in by_module.items()}
    if stored:
        raise CheckpointError(f"quantized weights of layers that are split across others: {sorted(stored)[:4]}")
    return model.eval(), regrouped


def install_kernels(model: Transformer, quantize: Optional[str], device: torch.device,
                    loaded_on: torch.device, stored: dict, act: torch.dtype) -> None:
    """Faster matmuls for `device` (quantized if asked; on weights stored
    quantized as they are), the model moved there from `loaded_on`, and our
    fused CPU decoding; the model can load no state dict afterwards."""
    use_kernels(model, quantize, device=device, stored=stored, act=act)
    if loaded_on != device:
        model.to(device)
    use_fused_decoding(model)


def weight_bytes_per_step(model: Transformer, dist_info: DistInfo) -> int:
    """Weight bytes one decoding step reads over all ranks (a step reads only
    B rows of the embedding table). Pipeline stages hold different layers:
    their sum is exchanged (every rank builds, so every rank is here)."""
    local = local_weight_bytes(model)
    if dist_info.stages == 1:
        return local * dist_info.world_size
    on = dist_info.device if torch.distributed.get_backend() == "nccl" else "cpu"
    total = torch.tensor([local], dtype=torch.float64, device=on)
    torch.distributed.all_reduce(total)
    return int(total.item())


def local_weight_bytes(model: Transformer) -> int:
    """Weight bytes one decoding step reads on this rank."""
    return sum(p.nbytes for name, p in model.named_parameters() if not name.startswith("tok_embeddings."))
