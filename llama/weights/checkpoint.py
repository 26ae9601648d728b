"""Reading Meta "consolidated" checkpoints, for any model-parallel size.

A checkpoint directory holds params.json and consolidated.00.pth ..
consolidated.NN.pth, one file per model-parallel rank of the run that wrote
it. `rank_state_dict` gives one rank of an M-way run its slice of the weights,
whatever N the files were written for: it reads only what that rank needs from
memory-mapped files, so a rank holds about 1/M of the model, never all of it.
"""

import logging
import pickle
import re
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from . import manifest, quantized
from .args import ModelArgs
from ..common.files import shard_name
from .schema import UNUSED_KEYS, EmbeddingLayout, kv_replication, model_weights, shard_shapes, stage_holds

logger = logging.getLogger("llama")

StateDict = Dict[str, torch.Tensor]

_SHARD_NAME = re.compile(r"consolidated\.(\d+)\.pth$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file and the fix."""


def _shown(items: Sequence, n: int = 8) -> str:
    """At most n items of a list, for messages about lists an attacker can make long."""
    items = list(items)
    return str(items[:n])[:-1] + (f", ... ({len(items)} in all)]" if len(items) > n else "]")


def present_shards(ckpt_dir) -> Dict[int, Path]:
    """The consolidated.NN.pth files of a checkpoint directory, by index; gaps
    allowed (a node of a multi-node run may hold only the shards of its ranks).

    Only the names found are looked at (never a range up to an index a file
    name claims), so a stray consolidated.99999999999999999999.pth costs nothing.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {ckpt_dir} not found (--ckpt_dir)")
    numbered = sorted((int(m.group(1)), p) for p in ckpt_dir.glob("*.pth") if (m := _SHARD_NAME.fullmatch(p.name)))
    if not numbered:
        from ..common.hf_layout import original_folder_hint  # an error path only

        others = sorted(p.name for p in ckpt_dir.glob("*.pth"))
        hint = f" (found {_shown(others)}; Meta's files are named consolidated.00.pth, ...)" if others else ""
        raise CheckpointError(f"no consolidated.*.pth files in {ckpt_dir}{hint}{original_folder_hint(ckpt_dir)}")
    indices = [i for i, _ in numbered]
    if len(set(indices)) < len(indices):
        twice = sorted(p.name for i, p in numbered if indices.count(i) > 1)
        raise CheckpointError(f"{ckpt_dir} has two files for the same shard: {_shown(twice)}; remove the stray one")
    stray = [p.name for i, p in numbered if i > 4 * len(numbered) + 64]
    if stray:  # an index no real checkpoint has: never count up to it
        raise CheckpointError(f"{ckpt_dir} has {len(numbered)} shard files, but {_shown(stray, 3)} "
                              "cannot belong to them (its number is far too large); remove it")
    for _, p in numbered:
        if not p.is_file():  # a directory, a dangling link or a symlink loop
            raise CheckpointError(f"{p} is not a regular file (a directory or a broken symbolic link?); "
                                  "replace it with the shard file")
    return dict(numbered)


def find_shards(ckpt_dir) -> List[Path]:
    """Every consolidated.*.pth file of a checkpoint directory, in rank order
    (for tools that read the whole checkpoint: none may be missing)."""
    present = present_shards(ckpt_dir)
    indices = sorted(present)
    if indices != list(range(len(indices))):
        missing = [i for i in range(max(indices) + 1) if i not in present]
        raise CheckpointError(
            f"{ckpt_dir} has shards {_shown(indices)} but not {_shown(missing)}: a shard is missing; download or copy it"
        )
    return [present[i] for i in indices]


# Weights are stored in these dtypes (Meta: bfloat16; converters: float16/float32;
# quantized linear weights: int8 and uint8, with float scales, llama/weights/quantized.py).
WEIGHT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.int8, torch.uint8)


def check_tensors(state: dict, path: Path) -> None:
    """Accepts only dense, strided CPU tensors of a weight dtype whose bytes the
    file really holds: a sparse tensor with hostile indices, a stride-0 tensor
    that claims gigabytes over a few bytes, or storages larger than the file
    are refused here, before anything touches them."""
    file_bytes = path.stat().st_size
    storages: Dict[int, int] = {}
    for key, t in state.items():
        where = f"{path}: tensor {str(key)[:80]!r}"
        if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.layout != torch.strided or t.device.type != "cpu":
            raise CheckpointError(f"{where} is a {t.layout} {type(t).__name__} on {t.device}, not a dense tensor; "
                                  "this is not a Meta checkpoint (or it was damaged): download it again")
        if t.dtype not in WEIGHT_DTYPES:
            raise CheckpointError(f"{where} has dtype {t.dtype}; weights must be one of "
                                  f"{[str(d).replace('torch.', '') for d in WEIGHT_DTYPES]}")
        storage = t.untyped_storage()
        # The last element's byte offset + 1 element: what the view reads of its storage.
        extent = (t.storage_offset() + sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1) * t.element_size()
        if t.numel() and (any(st < 1 for n, st in zip(t.shape, t.stride()) if n > 1)
                          or extent > storage.nbytes() or t.nbytes > storage.nbytes()):
            raise CheckpointError(
                f"{where} of shape {tuple(t.shape)} claims {t.nbytes:,} bytes over a storage of "
                f"{storage.nbytes():,} bytes (strides {t.stride()}); the file is damaged or hostile")
        storages[storage.data_ptr()] = storage.nbytes()
    if sum(storages.values()) > file_bytes:
        raise CheckpointError(f"{path}: its tensors need {sum(storages.values()):,} bytes but the file has "
                              f"{file_bytes:,}; it is truncated or damaged: download it again")


def _check_archive(path: Path) -> None:
    """torch.save writes a zip whose entries are stored, not compressed. A
    compressed entry would be memory-mapped as if it held raw weights (silently
    wrong values), and a compressed pickle can expand without bound: refuse both."""
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # not a zip at all: torch.load says so, with the usual hint
    for entry in entries:
        if entry.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(
                f"{path}: its entry {entry.filename[:80]!r} is compressed; a memory-mapped load would read "
                "compressed bytes as weights. Save it again with torch.save (which stores entries uncompressed)")


def load_shard(path: Path) -> StateDict:
    """Loads one shard memory-mapped; `weights_only` keeps a malicious pickle from running code."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:  # a directory, a symlink loop, no permission
        raise CheckpointError(f"{path} cannot be read ({e.strerror or e}); replace it with the shard file") from e
    if head.lstrip()[:1] == b"<" or b"<html" in head.lower():
        raise CheckpointError(
            f"{path} is a web page, not weights: the download failed (an expired link saves an "
            "HTML error page). Download it again and check it against checklist.chk."
        )
    _check_archive(path)
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} holds Python objects other than tensors, which could run code when loaded; "
            f"refusing to load it (torch says: {str(e).splitlines()[0][:200]})"
        ) from e
    except (RuntimeError, zipfile.BadZipFile, EOFError, ValueError, OSError) as e:
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {str(e)[:200]}); "
            "it is probably truncated or corrupt: download it again and verify it with checklist.chk"
        ) from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a dict of tensors; it is not a Meta consolidated checkpoint")
    check_tensors(state, path)
    return state


class LazyShards(Sequence):
    """The shards of a checkpoint, each loaded (memory-mapped) on first access.

    `paths` is a list (every shard present) or a dict index -> path with
    `count` shards in all, of which a node may hold only some: asking for one
    it lacks raises a CheckpointError naming the file and `who` needs it.
    """

    def __init__(self, paths, count: Optional[int] = None, who: str = "this process"):
        self.by_index: Dict[int, Path] = dict(enumerate(paths)) if not isinstance(paths, dict) else dict(paths)
        self.count = len(self.by_index) if count is None else count
        self.who = who
        self._loaded: Dict[int, StateDict] = {}

    @property
    def paths(self) -> List[Path]:
        """The shard files present, in index order."""
        return [self.by_index[i] for i in sorted(self.by_index)]

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> StateDict:
        if i not in self._loaded:
            path = self.by_index.get(i)
            if path is None:
                folder = self.paths[0].parent
                raise CheckpointError(
                    f"{folder} lacks {shard_name(i)}, which {self.who} needs (this checkpoint has {self.count} "
                    f"shards; the folder holds {_shown(sorted(self.by_index))}): copy {shard_name(i)} into it")
            self._loaded[i] = load_shard(path)
        return self._loaded[i]


def default_embedding_layout(raw_vocab_size: int) -> EmbeddingLayout:
    """Llama 2 (params.json vocab_size -1) splits the embedding by dim, Llama 3 by vocab."""
    return "dim" if raw_vocab_size == -1 else "vocab"


def detect_embedding_layout(shard0: StateDict, n_shards: int, args: ModelArgs,
                            fallback: EmbeddingLayout) -> EmbeddingLayout:
    """Which axis a sharded checkpoint split tok_embeddings along, from shard 0's shape."""
    emb = shard0.get("tok_embeddings.weight")
    if n_shards == 1 or emb is None:
        return fallback
    return "dim" if emb.shape[1] * n_shards == args.dim else "vocab"


def expected_shapes(args: ModelArgs, size: int, layout: EmbeddingLayout,
                    layers: Optional[range] = None) -> Dict[str, tuple]:
    """The shape of every tensor in one shard of a `size`-way checkpoint (see
    llama/weights/schema.py); of a pipeline stage's tensors only, if it holds `layers`."""
    shapes = shard_shapes(args, size, layout)
    if layers is None:
        return shapes
    return {k: v for k, v in shapes.items() if stage_holds(k, layers, args.n_layers)}


def check_shards_agree(shards: LazyShards) -> None:
    """Every shard holds the tensors of shard 0, with the same shapes and dtypes
    (memory-mapped: only the pickled headers are read)."""
    present = sorted(shards.by_index)
    first = present[0]
    want = {k: (tuple(v.shape), v.dtype) for k, v in shards[first].items()}
    for i in present[1:]:
        have = {k: (tuple(v.shape), v.dtype) for k, v in shards[i].items()}
        if have != want:
            diff = sorted(set(have) ^ set(want)) or sorted(k for k in want if have[k] != want[k])
            raise CheckpointError(
                f"{shards.by_index[i]} does not match {shards.by_index[first]} (first difference: {diff[0]}"
                f"{'' if diff[0] not in have or diff[0] not in want else f' {have[diff[0]]} vs {want[diff[0]]}'}): "
                "the shards come from different checkpoints; download or copy the folder again from one source"
            )


_LAYER = re.compile(r"layers\.(\d+)\.")


def check_layer_count(shard0: StateDict, args: ModelArgs, path: Path, held: Optional[range] = None) -> None:
    """params.json's n_layers against the layers shard 0 holds, before anything
    is built per layer: the cheap fact first, with both numbers. `held`: the
    layers of a pipeline stage's folder (its pipeline.json says which)."""
    layers = {int(m.group(1)) for k in shard0 if (m := _LAYER.match(k))}
    if held is not None and held != range(args.n_layers):
        if layers != set(held):
            raise CheckpointError(
                f"{path} holds layers {_shown(sorted(layers), 4)} but its folder's pipeline.json says it holds "
                f"layers {held.start}..{held.stop - 1}: the folder mixes files of two splits; write it again")
        return
    if len(layers) != args.n_layers:
        raise CheckpointError(
            f"params.json says n_layers={args.n_layers} but {path} holds {len(layers)} layers"
            f"{' (' + _shown(sorted(layers), 4) + ')' if layers else ''}: params.json does not belong "
            "to these weights; use the params.json that came with them")


def stored_types(state: StateDict, expected: Dict[str, tuple], where: str) -> Dict[str, str]:
    """The quantized type of each weight `state` stores quantized (key -> type,
    llama/weights/quantized.py), checked: only 2-D weights named in `expected`
    other than the embedding may be quantized, each with the dtypes and shapes
    of its type, and every `.scales` tensor belongs to a quantized weight."""
    types: Dict[str, str] = {}
    for key, t in state.items():
        if key.endswith(quantized.SCALES):
            owner = quantized.weight_key(key)
            if owner not in state or not quantized.is_quantized(state[owner]):
                raise CheckpointError(f"{where}: {key} scales no quantized weight ({owner} is "
                                      f"{'missing' if owner not in state else state[owner].dtype}); "
                                      "the file is damaged or from another tool: write it again")
            continue
        if not quantized.is_quantized(t):
            continue
        shape = expected.get(key)
        if shape is None or len(shape) != 2 or key.startswith("tok_embeddings."):
            raise CheckpointError(f"{where}: {key} is stored as {t.dtype}, but only linear layers may be "
                                  "quantized (embeddings and norms stay float); write the checkpoint again")
        try:
            kind = quantized.stored_type(key, t, state.get(quantized.scales_key(key)), shape[1])
        except quantized.QuantizedWeightError as e:
            raise CheckpointError(f"{where}: {e}") from e
        if kind is not None:
            types[key] = kind
    return types


def check_shapes(state: StateDict, expected: Dict[str, tuple], where: str, hint: str) -> None:
    """Raises a CheckpointError listing missing, unexpected and mis-shaped
    tensors; a weight stored quantized is compared by the shape it stands for."""
    types = stored_types(state, expected, where)
    shapes = {k: quantized.logical_shape(types.get(k), v) for k, v in state.items()
              if k not in UNUSED_KEYS and not k.endswith(quantized.SCALES)}
    keys = set(shapes)
    problems = [f"missing {k}" for k in sorted(set(expected) - keys)]
    problems += [f"unexpected {k}" for k in sorted(keys - set(expected))]
    problems += [
        f"{k} has shape {shapes[k]}, expected {expected[k]}"
        for k in sorted(keys & set(expected)) if tuple(shapes[k]) != tuple(expected[k])
    ]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise CheckpointError(f"{where}: {shown}. {hint}")


def _range_slice(shards: Sequence[StateDict], key: str, axis: int, rank: int, size: int) -> torch.Tensor:
    """Rows (or columns) [rank*G/size, (rank+1)*G/size) of the tensor that the
    shards hold in consecutive pieces along `axis` (G = their total length)."""
    n = len(shards)
    per_shard = shards[first_needed_shard(n, rank, size)][key].shape[axis]
    total = per_shard * n
    start, stop = rank * total // size, (rank + 1) * total // size
    pieces = []
    for i in range(start // per_shard, (stop - 1) // per_shard + 1):
        lo, hi = max(start, i * per_shard) - i * per_shard, min(stop, (i + 1) * per_shard) - i * per_shard
        pieces.append(shards[i][key].narrow(axis, lo, hi - lo))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=axis)


def _kv_slice(shards: Sequence[StateDict], key: str, args: ModelArgs, rank: int, size: int) -> torch.Tensor:
    """The KV-head rows rank `rank` of `size` needs, replicating heads when
    there are more ranks than KV heads (and undoing a replication the files
    were written with)."""
    hd, n_kv = args.head_dim, args.n_kv_heads
    old_rep = kv_replication(n_kv, len(shards))
    heads_per_old = shards[first_needed_shard(len(shards), rank, size)][key].shape[0] // hd
    new_rep = kv_replication(n_kv, size)
    n_new = n_kv * new_rep // size  # KV heads this rank holds
    first = rank * n_new // new_rep if new_rep == 1 else rank // new_rep
    rows = []
    for unique in range(first, first + n_new):
        where = unique * old_rep  # its first copy in the files' concatenated rows
        shard, offset = divmod(where, heads_per_old)
        rows.append(shards[shard][key].narrow(0, offset * hd, hd))
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)


def supported_world_sizes(args: ModelArgs, limit: int = 64) -> List[int]:
    """Model-parallel sizes this model can be split into."""
    ok = []
    for m in range(1, limit + 1):
        try:
            kv_replication(args.n_kv_heads, m)
        except ValueError:
            continue
        if args.n_heads % m == 0 and args.ffn_hidden_dim % m == 0 and args.dim % m == 0 and args.vocab_size % m == 0:
            ok.append(m)
    return ok


def check_world_size(args: ModelArgs, size: int, what: str) -> None:
    if size not in supported_world_sizes(args, limit=max(size, 64)):
        raise CheckpointError(
            f"{what}: this model ({args.n_heads} heads, {args.n_kv_heads} KV heads, dim {args.dim}, "
            f"FFN {args.ffn_hidden_dim}, vocab {args.vocab_size}) cannot be split into {size} parts; "
            f"sizes that work: {supported_world_sizes(args)}"
        )


def first_needed_shard(n_shards: int, rank: int, size: int) -> int:
    """A shard that rank `rank` of `size` reads in any case: the one holding the
    first of its rows. It also gives the tensor names and the replicated norms,
    so a node needs no shard but its ranks' own."""
    return rank * n_shards // size


def rank_state_dict(shards: Sequence[StateDict], args: ModelArgs, rank: int, size: int,
                    layout: EmbeddingLayout, layers: Optional[range] = None) -> StateDict:
    """Rank `rank` of `size`'s weights, from shards written for any other size;
    of a pipeline stage holding `layers` only, if given (llama/weights/schema.py's stage_holds).

    `shards` may load lazily (see LazyShards): only the files this rank needs
    are opened. Tensors stay views of the memory-mapped files where possible;
    only slices gathered from several files are copied.
    """
    check_world_size(args, size, f"running on {size} processes")
    out: StateDict = {}
    schema = model_weights(args)
    ref = shards[first_needed_shard(len(shards), rank, size)]
    for key in ref:
        if key in UNUSED_KEYS or (layers is not None and not stage_holds(key, layers, args.n_layers)):
            continue
        weight = schema.get(quantized.weight_key(key))  # an unknown key is kept whole; check_shapes reports it
        axis = weight.split_axis(layout) if weight else None
        if axis == 1 and len(shards) != size and quantized.is_quantized(ref[key]):
            _check_quantized_split(key, ref, weight.shape[1], len(shards), size)
        try:
            if axis is None:
                out[key] = ref[key]  # replicated (norms)
            elif len(shards) == size:
                out[key] = shards[rank][key]  # the files already match this run
            elif weight.is_kv:
                out[key] = _kv_slice(shards, key, args, rank, size)
            else:
                out[key] = _range_slice(shards, key, axis, rank, size)
        except KeyError as e:
            raise CheckpointError(
                f"{key} is in one shard but missing from another shard: the shards come from different checkpoints"
            ) from e
    return out


def _check_quantized_split(key: str, ref: StateDict, k: int, n_files: int, size: int) -> None:
    """A row-parallel weight of `k` input columns stored quantized, read by
    `size` ranks from `n_files` shards (`ref` one of them): every cut must
    fall between whole groups."""
    try:
        kind = quantized.stored_type(key, ref[key], ref.get(quantized.scales_key(key)), k // n_files)
        quantized.check_split(key, kind, k, size)
    except ValueError as e:
        raise CheckpointError(f"{e} (the files hold {n_files} shards); run on a size that works, "
                              "or split the full-precision checkpoint and quantize each part") from e


def embeddings_tied(state: StateDict) -> bool:
    """Whether `state`'s output.weight is its tok_embeddings.weight (tied
    embeddings, as SmolLM2 has): the same view of one storage (how a converted
    GGUF stores them, and torch.save and a memory-mapped load keep), or the
    same shape, dtype and values (a file that stored them twice). Row 0 is
    compared first, so untied weights cost one row each, not a full read."""
    out, emb = state.get("output.weight"), state.get("tok_embeddings.weight")
    if out is None or emb is None or out.shape != emb.shape or out.dtype != emb.dtype or out.numel() == 0:
        return False
    if (out.untyped_storage().data_ptr() == emb.untyped_storage().data_ptr()
            and out.storage_offset() == emb.storage_offset() and out.stride() == emb.stride()):
        return True
    return torch.equal(out[:1], emb[:1]) and torch.equal(out, emb)


def weights_vocab_size(paths: Sequence[Path]) -> int:
    """Vocabulary size the weights were trained with (output rows across all shards)."""
    out = LazyShards(paths[:1])[0].get("output.weight")
    if out is None:
        raise CheckpointError(f"{paths[0]} has no output.weight: it is not a Meta Llama checkpoint")
    return out.shape[0] * len(paths)


def _shard_count(present: Dict[int, Path], ref: StateDict, args: ModelArgs, ckpt_dir, whole: bool,
                 has_output: bool = True) -> int:
    """How many shards the checkpoint has, from whole-model facts: the
    vocabulary (params.json or the tokenizer) over one shard's output rows
    (or, in a pipeline stage's folder without the output, the attention heads
    over one layer's query rows). The manifest, where there is one, says it
    too and must agree."""
    out = ref.get("output.weight")
    path = present[min(present)]
    if not has_output:
        wq = next((v for k, v in ref.items() if k.endswith(".attention.wq.weight")), None)
        queries = args.n_heads * args.head_dim
        if wq is None or wq.dim() != 2 or wq.shape[0] < 1 or queries % wq.shape[0]:
            raise CheckpointError(f"{path} has no attention weights of {args.n_heads} x {args.head_dim} query rows: "
                                  "it does not belong to this params.json; use the folder's own files")
        return queries // wq.shape[0]
    if out is None or out.dim() != 2 or out.shape[0] < 1:
        raise CheckpointError(f"{path} has no output.weight: it is not a Meta Llama checkpoint")
    rows, top = out.shape[0], max(present) + 1
    if args.vocab_size % rows or args.vocab_size // rows < top or (whole and args.vocab_size // rows != top):
        raise CheckpointError(
            f"the weights in {ckpt_dir} have a vocabulary of {rows * top} tokens but the "
            f"tokenizer (or params.json) has {args.vocab_size}: pass the tokenizer.model of this model"
            + (f" ({rows} rows per shard)" if top > 1 else "")
        )
    count = args.vocab_size // rows
    listed = manifest.read_manifest(Path(ckpt_dir))
    if listed is not None and len(listed["files"]) != count:
        raise CheckpointError(
            f"{Path(ckpt_dir) / manifest.NAME} lists {len(listed['files'])} shards but the weights are split "
            f"into {count} ({rows} of the {args.vocab_size} output rows per shard); copy the folder again")
    return count


def inspect_checkpoint(ckpt_dir, args: ModelArgs, raw_vocab_size: int):
    """Finds every shard (none may be missing) and checks them against params.json.

    Returns (shard paths, embedding layout). A mismatch is reported by tensor
    name and shape, not by a stack trace from deep inside torch.
    """
    shards, layout = inspect_rank_files(ckpt_dir, args, raw_vocab_size, rank=0, size=1, whole=True)
    return shards.paths, layout


def _check_manifest(ckpt_dir, paths: Sequence[Path], needed: Optional[List[str]]) -> None:
    try:
        manifest.check_folder(Path(ckpt_dir), [p.name for p in paths], needed)
    except manifest.ManifestError as e:
        raise CheckpointError(str(e)) from e


def inspect_rank_files(ckpt_dir, args: ModelArgs, raw_vocab_size: int, rank: int, size: int,
                       whole: bool = False, held: Optional[range] = None):
    """Finds the shards rank `rank` of `size` reads and checks one of them
    against params.json; the folder may lack the others (a node holding only
    its own ranks' files), unless `whole`. `held`: the layers the files hold
    (a pipeline stage's folder; default all).

    Returns (LazyShards, embedding layout).
    """
    whole = whole or size == 1  # one process reads every shard
    present = {i: p for i, p in enumerate(find_shards(ckpt_dir))} if whole else present_shards(ckpt_dir)
    first = min(present)
    ref = LazyShards({first: present[first]})[first]  # first, for its own diagnostics (a web page, a pickle)
    if whole:  # the manifest names missing files better than the shapes can
        _check_manifest(ckpt_dir, list(present.values()), None)
    has_output = held is None or held.stop == args.n_layers
    count = _shard_count(present, ref, args, ckpt_dir, whole, has_output)
    shards = LazyShards(present, count, who=f"rank {rank} of {size}")
    shards._loaded[first] = ref
    needed = first_needed_shard(count, rank, size)
    ref = shards[needed]  # a missing file this rank needs is named here, before anything else
    if not whole:
        last = max(-(-(rank + 1) * count // size), needed + 1)  # the shards holding this rank's rows
        _check_manifest(ckpt_dir, shards.paths, [shard_name(i) for i in range(needed, last)])
    has_manifest = manifest.read_manifest(Path(ckpt_dir)) is not None
    check_layer_count(ref, args, present[needed], held)
    if not has_manifest:  # Meta's folders: at least every shard must have the tensors, shapes and dtypes of the others
        check_shards_agree(shards)
    layout = detect_embedding_layout(ref, count, args, default_embedding_layout(raw_vocab_size))
    check_world_size(args, count, f"{ckpt_dir} has {count} shards")
    check_shapes(
        ref, expected_shapes(args, count, layout, held), str(present[needed]),
        f"Check that params.json belongs to these weights and that all {count} shards are present.",
    )
    return shards, layout


def checked_rank_state(paths, args: ModelArgs, rank: int, size: int,
                       layout: EmbeddingLayout, layers: Optional[range] = None) -> StateDict:
    """rank_state_dict over freshly opened shards (a list of paths, or LazyShards), with every shape checked."""
    shards = paths if isinstance(paths, LazyShards) else LazyShards(paths)
    state = rank_state_dict(shards, args, rank, size, layout, layers)
    check_shapes(state, expected_shapes(args, size, layout, layers), f"{shards.paths[0].parent} (rank {rank} of {size})",
                 "The shards do not agree with each other: they come from different checkpoints.")
    return state


def load_rank_state(ckpt_dir, args: ModelArgs, rank: int, size: int, raw_vocab_size: int,
                    layers: Optional[range] = None, held: Optional[range] = None):
    """This rank's weights from a checkpoint directory written for any MP size;
    only the shard files this rank reads need to be in it. `layers`: a
    pipeline stage's (default all); `held`: the layers the files hold (a
    stage folder's; default all).

    Returns (state_dict, embedding_layout).
    """
    prepared = inspect_rank_files(ckpt_dir, args, raw_vocab_size, rank, size, held=held)
    return load_prepared_rank_state(prepared, ckpt_dir, args, rank, size, layers)


def load_prepared_rank_state(prepared, ckpt_dir, args: ModelArgs, rank: int, size: int,
                             layers: Optional[range] = None):
    """load_rank_state after `inspect_rank_files` gave `prepared` (shards, layout);
    `layers`: a pipeline stage's (default all)."""
    shards, layout = prepared
    if len(shards) != size:
        check_world_size(args, size, f"running on {size} processes")  # before announcing a reshard that cannot happen
        logger.info("Resharding %s from %d to %d model-parallel ranks on the fly (utils/shard_model_checkpoint.py "
                    "does it once, ahead of time)", ckpt_dir, len(shards), size)
    return checked_rank_state(shards, args, rank, size, layout, layers), layout
