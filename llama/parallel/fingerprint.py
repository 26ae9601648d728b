"""Every node must load the same checkpoint with the same settings.

Each rank describes what it is about to load in a few hundred bytes (hashes
of params.json, the tokenizer, manifest.json and checklist.chk; the sizes of
the shard files it has; a hash of the weights every shard repeats (the
norms); dtype and the runtime limits) and all ranks exchange these at build
time, together with any error the rank met preparing its load. A node whose
folder holds another checkpoint would otherwise load and generate garbage,
or fail later in a collective with a raw error, while the others wait for
it; here every rank stops at once with a message naming the node and what
differs. Costs milliseconds: nothing is read but the small files and the
norms (memory-mapped).

A node may hold only its own ranks' shard files: shard sizes are compared
only for the files both ranks have. With pipeline stages, what differs from
stage to stage (the files of a stage's folder, the norms of its layers) is
compared between the ranks of one stage only.
"""

import hashlib
import os
import socket
from pathlib import Path
from typing import Dict, List, Optional

# Files that not every copy of a checkpoint has (a folder copied by hand may
# lack the checklist): compared only between ranks that have them.
_OPTIONAL = ("manifest.json", "checklist.chk", "pipeline.json")
# What a stage-split checkpoint has for each stage (llama/weights/stages.py).
_PER_STAGE = ("shard sizes",) + _OPTIONAL


def _sha(path: Path) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read(1 << 24)).hexdigest()[:16]
    except OSError:
        return None


def describe(ckpt_dir, tokenizer_path, **settings) -> Dict[str, object]:
    """What this rank is about to load: small, comparable across nodes."""
    ckpt_dir = Path(ckpt_dir)
    shards = sorted(ckpt_dir.glob("consolidated.*.pth"))
    about = {
        "params.json": _sha(ckpt_dir / "params.json"),
        "tokenizer": _sha(Path(tokenizer_path)),
        "shard sizes": {p.name: p.stat().st_size for p in shards if p.is_file()},
        **{name: _sha(ckpt_dir / name) for name in _OPTIONAL},
        **{k: str(v) for k, v in sorted(settings.items())},
    }
    return about


def _node() -> str:
    return f"node {os.environ.get('GROUP_RANK', '?')} ({socket.gethostname()})"


def differences(mine: Dict[str, object], theirs: Dict[str, object]) -> List[str]:
    """The keys whose values differ (optional files only if both ranks have them)."""
    out = []
    for key in mine.keys() | theirs.keys():
        a, b = mine.get(key), theirs.get(key)
        if key in _OPTIONAL and (a is None or b is None):
            continue
        if isinstance(a, dict) and isinstance(b, dict):  # only the files both have
            a, b = ({k: v for k, v in d.items() if k in a.keys() & b.keys()} for d in (a, b))
        if a != b:
            out.append(key)
    return sorted(out)


def replicated_hash(state: dict, keep=lambda key: True) -> str:
    """A hash of the tensors every shard holds whole (the norms): the same on
    every rank of one checkpoint, whichever shard it reads. `keep`: which
    names count (a pipeline stage's)."""
    import torch

    h = hashlib.sha256()
    for key in sorted(k for k in state if "norm" in k and keep(k)):
        t = state[key]
        h.update(key.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def check_same_checkpoint(ckpt_dir, tokenizer_path, error: Optional[BaseException] = None,
                          extra: Optional[dict] = None, stage: int = 0, **settings) -> None:
    """Raises on every rank if any rank loads something else than rank 0, or
    met `error` preparing its load (that rank raises its own error, the others
    a ValueError naming it). `extra`: more facts to compare (a weights hash),
    like the files, only with the first rank of the same pipeline `stage`."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        if error is not None:
            raise error
        return
    about = {**describe(ckpt_dir, tokenizer_path, **settings), **(extra or {})}
    mine = {"who": (dist.get_rank(), _node(), str(ckpt_dir)), "about": about, "stage": stage,
            "per stage": _PER_STAGE + tuple(extra or ()), "error": None if error is None else str(error)}
    everyone: List[dict] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if error is not None:
        raise error
    failed = [other for other in everyone if other["error"] is not None]
    if failed:
        rank, node, folder = failed[0]["who"]
        raise ValueError(f"rank {rank} on {node} cannot load its part of {folder}: {failed[0]['error']}"
                         + (f" ({len(failed) - 1} more ranks failed too)" if len(failed) > 1 else ""))
    first = everyone[0]
    problems = []
    for other in everyone[1:]:
        same_stage = next(o for o in everyone if o["stage"] == other["stage"])
        keys = [k for k in differences(first["about"], other["about"]) if k not in other["per stage"]]
        keys += [k for k in differences(same_stage["about"], other["about"]) if k in other["per stage"]]
        if keys:
            rank, node, folder = other["who"]
            problems.append(f"rank {rank} on {node} ({folder}) differs in {', '.join(keys)}")
    if problems:
        rank0, node0, folder0 = first["who"]
        raise ValueError(
            f"the nodes do not load the same checkpoint: compared with rank {rank0} on {node0} ({folder0}), "
            + "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more ranks" if len(problems) > 4 else "")
            + ". Give every node the same checkpoint files, tokenizer and options."
        )
