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
from typing import Dict, List, Sequence

import torch

from .args import ModelArgs
from .schema import UNUSED_KEYS, EmbeddingLayout, kv_replication, model_weights, shard_shapes

logger = logging.getLogger("llama")

StateDict = Dict[str, torch.Tensor]

_SHARD_NAME = re.compile(r"consolidated\.(\d+)\.pth$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file and the fix."""


def find_shards(ckpt_dir) -> List[Path]:
    """consolidated.*.pth files of a checkpoint directory, in rank order."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {ckpt_dir} not found (--ckpt_dir)")
    numbered = sorted((int(m.group(1)), p) for p in ckpt_dir.glob("*.pth") if (m := _SHARD_NAME.search(p.name)))
    if not numbered:
        from .hf_layout import original_folder_hint  # an error path only

        others = sorted(p.name for p in ckpt_dir.glob("*.pth"))
        hint = f" (found {others}; Meta's files are named consolidated.00.pth, ...)" if others else ""
        raise CheckpointError(f"no consolidated.*.pth files in {ckpt_dir}{hint}{original_folder_hint(ckpt_dir)}")
    indices = [i for i, _ in numbered]
    if indices != list(range(len(numbered))):
        missing = sorted(set(range(max(indices) + 1)) - set(indices))
        raise CheckpointError(
            f"{ckpt_dir} has shards {indices} but not {missing}: a shard is missing; download or copy it"
        )
    return [p for _, p in numbered]


def load_shard(path: Path) -> StateDict:
    """Loads one shard memory-mapped; `weights_only` keeps a malicious pickle from running code."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.lstrip()[:1] == b"<" or b"<html" in head.lower():
        raise CheckpointError(
            f"{path} is a web page, not weights: the download failed (an expired link saves an "
            "HTML error page). Download it again and check it against checklist.chk."
        )
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
    return state


class LazyShards(Sequence):
    """The shards of a checkpoint, each loaded (memory-mapped) on first access."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = list(paths)
        self._loaded: Dict[int, StateDict] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> StateDict:
        if i not in self._loaded:
            self._loaded[i] = load_shard(self.paths[i])
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


def expected_shapes(args: ModelArgs, size: int, layout: EmbeddingLayout) -> Dict[str, tuple]:
    """The shape of every tensor in one shard of a `size`-way checkpoint (see llama/schema.py)."""
    return shard_shapes(args, size, layout)


def check_shapes(state: StateDict, expected: Dict[str, tuple], where: str, hint: str) -> None:
    """Raises a CheckpointError listing missing, unexpected and mis-shaped tensors."""
    keys = set(state) - UNUSED_KEYS
    problems = [f"missing {k}" for k in sorted(set(expected) - keys)]
    problems += [f"unexpected {k}" for k in sorted(keys - set(expected))]
    problems += [
        f"{k} has shape {tuple(state[k].shape)}, expected {expected[k]}"
        for k in sorted(keys & set(expected)) if tuple(state[k].shape) != tuple(expected[k])
    ]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise CheckpointError(f"{where}: {shown}. {hint}")


def _range_slice(shards: Sequence[StateDict], key: str, axis: int, rank: int, size: int) -> torch.Tensor:
    """Rows (or columns) [rank*G/size, (rank+1)*G/size) of the tensor that the
    shards hold in consecutive pieces along `axis` (G = their total length)."""
    per_shard = shards[0][key].shape[axis]
    total = per_shard * len(shards)
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
    heads_per_old = shards[0][key].shape[0] // hd
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


def rank_state_dict(shards: Sequence[StateDict], args: ModelArgs, rank: int, size: int,
                    layout: EmbeddingLayout) -> StateDict:
    """Rank `rank` of `size`'s weights, from shards written for any other size.

    `shards` may load lazily (see LazyShards): only the files this rank needs
    are opened. Tensors stay views of the memory-mapped files where possible;
    only slices gathered from several files are copied.
    """
    check_world_size(args, size, f"running on {size} processes")
    out: StateDict = {}
    schema = model_weights(args)
    for key in shards[0]:
        if key in UNUSED_KEYS:
            continue
        weight = schema.get(key)  # an unknown key is kept whole; check_shapes reports it
        axis = weight.split_axis(layout) if weight else None
        try:
            if axis is None:
                out[key] = shards[0][key]  # replicated (norms)
            elif len(shards) == size:
                out[key] = shards[rank][key]  # the files already match this run
            elif weight.is_kv:
                out[key] = _kv_slice(shards, key, args, rank, size)
            else:
                out[key] = _range_slice(shards, key, axis, rank, size)
        except KeyError as e:
            raise CheckpointError(
                f"{key} is in shard 0 but missing from another shard: the shards come from different checkpoints"
            ) from e
    return out


def weights_vocab_size(paths: Sequence[Path]) -> int:
    """Vocabulary size the weights were trained with (output rows across all shards)."""
    out = LazyShards(paths[:1])[0].get("output.weight")
    if out is None:
        raise CheckpointError(f"{paths[0]} has no output.weight: it is not a Meta Llama checkpoint")
    return out.shape[0] * len(paths)


def inspect_checkpoint(ckpt_dir, args: ModelArgs, raw_vocab_size: int):
    """Finds the shards and checks shard 0 against params.json.

    Returns (shard paths, embedding layout). A mismatch is reported by tensor
    name and shape, not by a stack trace from deep inside torch.
    """
    paths = find_shards(ckpt_dir)
    shard0 = LazyShards(paths)[0]
    layout = detect_embedding_layout(shard0, len(paths), args, default_embedding_layout(raw_vocab_size))
    check_world_size(args, len(paths), f"{ckpt_dir} has {len(paths)} shards")
    vocab = weights_vocab_size(paths)
    if vocab != args.vocab_size:
        raise CheckpointError(
            f"the weights in {ckpt_dir} have a vocabulary of {vocab} tokens but the "
            f"tokenizer (or params.json) has {args.vocab_size}: pass the tokenizer.model of this model"
        )
    check_shapes(
        shard0, expected_shapes(args, len(paths), layout), str(paths[0]),
        f"Check that params.json belongs to these weights and that all {len(paths)} shards are present.",
    )
    return paths, layout


def checked_rank_state(paths: Sequence[Path], args: ModelArgs, rank: int, size: int,
                       layout: EmbeddingLayout) -> StateDict:
    """rank_state_dict over freshly opened shards, with every shape checked."""
    state = rank_state_dict(LazyShards(paths), args, rank, size, layout)
    check_shapes(state, expected_shapes(args, size, layout), f"{paths[0].parent} (rank {rank} of {size})",
                 "The shards do not agree with each other: they come from different checkpoints.")
    return state


def load_rank_state(ckpt_dir, args: ModelArgs, rank: int, size: int, raw_vocab_size: int):
    """This rank's weights from a checkpoint directory written for any MP size.

    Returns (state_dict, embedding_layout).
    """
    paths, layout = inspect_checkpoint(ckpt_dir, args, raw_vocab_size)
    if len(paths) != size:
        check_world_size(args, size, f"running on {size} processes")  # before announcing a reshard that cannot happen
        logger.info("Resharding %s from %d to %d model-parallel ranks on the fly (utils/shard_model_checkpoint.py "
                    "does it once, ahead of time)", ckpt_dir, len(paths), size)
    return checked_rank_state(paths, args, rank, size, layout), layout
